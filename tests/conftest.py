import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download: a stray hub call fails at once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["RL_CPU_BF16"] = "0"   # fp32 on every CPU, AMX or not: the same arithmetic, and tolerances, on every machine

import pytest
import torch

import common


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
