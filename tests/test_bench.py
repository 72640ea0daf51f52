"""The benchmarks still run: bench/step_cost.py at its small size (the GPU figures come from the same code).

On a CPU the bench runs each part in a process of its own (its peak resident memory is that part's): one part
goes that way here; the others print their rows through the `script` fixture, in this process, where the peak
column is this process's (not checked).
"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def row(lines, trainer):
    line = next(line for line in lines if line.startswith(trainer + " "))
    seconds, tokens_per_second, peak = re.search(r" (\d+\.\d+) +(\d+) +(\d+\.\d) ", line).groups()
    assert float(seconds) > 0 and int(tokens_per_second) > 0
    return line, float(peak)


def test_step_cost_bench_runs_a_part_in_a_process_of_its_own():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step_cost.py"), "--small", "--only", "sft"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("CPU | --model tiny | cpu, fp32") and len(lines) == 3   # heading, columns, the row
    assert 0.1 < row(lines, "sft")[1] < 8   # the child's own peak, in GiB: a tiny model's


def test_step_cost_bench_rows_and_decoders_on_equal_tokens(script):
    import dpo
    import reward_model
    import rloo
    patched = ("save_checkpoint", "sequence_logprobs", "rewards", "make_sampler", "_logps")
    before = {(m, a): getattr(m, a) for m in (dpo, reward_model, rloo) for a in patched if hasattr(m, a)}
    out = script("bench/step_cost.py", "--small", "--only", "dpo,reward_model,rloo,generate", "--row", cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(getattr(m, a) is f for (m, a), f in before.items())   # the bench put back what it wrapped
    lines = out.stdout.splitlines()
    for trainer in ("dpo", "reward_model", "rloo"):   # sft's row: the test above
        row(lines, trainer)
    assert "sampling" in row(lines, "rloo")[0]
    assert "same tokens: True" in next(line for line in lines if line.startswith("generate, greedy"))
    assert "tokens/s" in lines[-1] and lines[-1].startswith("generate, RLOO's sampling, 2 prompts × K 4")
