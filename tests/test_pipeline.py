"""The tiny pipeline's commands still connect: QUICK=1 runs the README's main chain, shortened.

tiny_pipeline.sh is run by bash with `python` on PATH replaced by a recorder, then each recorded command runs, in
order, through the `script` fixture (this process, the scripts' own __main__): the chain's twelve commands without
twelve interpreters' imports. The script has no control flow on a command's result (set -e stops at the first
failure; so does this test), so the recorded list is the chain the script runs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands_of(pipeline, args, tmp_path, env):
    """The python commands a shell script runs, in order, each as [script, flag, …] (nothing runs)."""
    shim, record = tmp_path / "bin" / "python", tmp_path / "commands.jsonl"
    shim.parent.mkdir()
    shim.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "with open(os.environ['RECORD'], 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    shim.chmod(0o755)
    env = {**env, "PATH": f"{shim.parent}{os.pathsep}{env['PATH']}", "RECORD": str(record)}
    done = subprocess.run(["bash", str(ROOT / pipeline), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_quick_tiny_pipeline_runs_end_to_end_and_writes_the_table(tmp_path, script):
    out = tmp_path / "tiny"
    env = {**os.environ, "QUICK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    commands = commands_of("tiny_pipeline.sh", [str(out), "3"], tmp_path, env)
    assert [c[0] for c in commands] == ["sft.py", "rloo.py", "dpo.py"] + ["evaluate.py"] * 9
    assert not out.exists()   # recording ran nothing
    for command in commands:
        run = script(*command, cwd=ROOT)
        assert run.returncode == 0, (command, run.stderr[-3000:])
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
