"""The tiny pipeline's commands still connect: QUICK=1 runs the README's main chain, shortened."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_tiny_pipeline_runs_end_to_end_and_writes_the_table(tmp_path):
    out = tmp_path / "tiny"
    env = {**os.environ, "QUICK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(["bash", str(ROOT / "tiny_pipeline.sh"), str(out), "3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("sft", "rloo", "dpo"):
        assert any((out / stage).glob("step-*/config.json")), stage
    assert (out / "dpo" / "countdown_pairs.jsonl").exists()
    table = (out / "results.md").read_text()
    for stage in ("base", "sft", "rloo", "dpo"):
        assert f"| {stage}-greedy | greedy |" in table and f"| {stage}-sampled | sampled |" in table
    assert table == run.stdout[-len(table):]   # the chain ends by printing the table it wrote
    again = subprocess.run(["bash", str(ROOT / "tiny_pipeline.sh"), str(out), "3"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and f"{out} exists" in again.stderr   # never a new run over an old one
