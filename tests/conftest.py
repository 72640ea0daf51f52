import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download: a stray hub call fails at once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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
