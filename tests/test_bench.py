"""The benchmarks still run: bench/step_cost.py at its small size (the GPU figures come from the same code)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_cost_bench_runs_small_and_compares_decoders_on_equal_tokens():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step_cost.py"), "--small"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("CPU | --model tiny | cpu, fp32")
    for trainer in ("sft", "dpo", "reward_model", "rloo"):
        row = next(line for line in lines if line.startswith(trainer + " "))
        seconds, tokens_per_second, peak = re.search(r" (\d+\.\d+) +(\d+) +(\d+\.\d) ", row).groups()
        assert float(seconds) > 0 and int(tokens_per_second) > 0 and 0.1 < float(peak) < 8   # each its own process
    assert "sampling" in next(line for line in lines if line.startswith("rloo "))
    assert "same tokens: True" in next(line for line in lines if line.startswith("generate, greedy"))
    assert "tokens/s" in lines[-1] and lines[-1].startswith("generate, RLOO's sampling, 2 prompts × K 4")
