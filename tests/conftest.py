import os
import runpy
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download: a stray hub call fails at once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["RL_CPU_BF16"] = "0"   # fp32 on every CPU, AMX or not: the same arithmetic, and tolerances, on every machine

import pytest
import torch

import common

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    return common.load_tokenizer("tiny")


@pytest.fixture(scope="session")
def model(tokenizer):
    torch.manual_seed(0)
    return common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu")


def pytest_ignore_collect(collection_path, config):
    """`pytest -m math` (the equations' tests, in seconds): files without such a test are not even imported."""
    if config.getoption("markexpr") == "math" and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "pytest.mark.math" not in collection_path.read_text()
    return None


@pytest.fixture
def script(capfd, monkeypatch):
    """`python <script> <flags…>` run in this process: runpy executes the file as __main__, the same code a new
    interpreter runs, without its ~5 s of imports (torch, transformers) and tokenizer builds. Returns what
    subprocess.run returns (exit code, stdout, stderr); sys.exit("why") is printed to stderr and exits 1, as Python
    does. An exception other than SystemExit propagates: the test fails with its traceback."""
    def run(name, *argv, cwd=None):
        capfd.readouterr()
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", [str(ROOT / name), *map(str, argv)])
            if cwd is not None:
                m.chdir(cwd)
            try:
                runpy.run_path(str(ROOT / name), run_name="__main__")
                code, why = 0, ""
            except SystemExit as e:
                code, why = (e.code or 0, "") if e.code is None or isinstance(e.code, int) else (1, f"{e.code}\n")
            sys.stdout.flush(), sys.stderr.flush()
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([name, *argv], code, out, err + why)
    return run
