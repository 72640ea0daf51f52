"""Two processes under torchrun (gloo, CPU) train exactly as one process does with the same global batch.

Each run is tests/ddp_driver.py: three steps of each trainer on the tiny model, called in the test's own process
(one process) or launched once under `python -m torch.distributed.run --nproc_per_node 2` for all the trainers,
with the per-process token-count bug as one more. The two must end with the same weights up to float
summation order: a step's gradient is summed in another order (two half sums, then DDP's all-reduce and
division by 2), which moves a float32 gradient by a few ulps, and Adam's update is at most ~lr whatever the
gradient. After three steps at lr 1e-3 we measured ≤ 2e-7 (SFT), 0 (DPO, reward model), 3e-8 (RLOO). The
tolerance, 1e-5, is fifty times that and under a tenth of what the steps move a weight (each test checks
both); a normaliser that counts only each process's tokens moves the weights by 5e-3 and fails.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import distributed
from inputs import InputError

DRIVER = Path(__file__).parent / "ddp_driver.py"
TOLERANCE = 1e-5


TRAINERS = ("sft", "dpo", "rm", "rloo", "rloo-skip")


def weights(trainers, out_dir):
    return {t: load_file(common.checkpoints(Path(out_dir) / t)[-1] / "model.safetensors") for t in trainers}


def two_process_launch(trainers, out_dir):
    """The trainers in one torchrun launch of ddp_driver.py: {trainer: its final weights}, and the launch's stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(DRIVER), ",".join(trainers), str(out_dir)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return weights(trainers, out_dir), done.stdout


def max_difference(a, b):
    assert a.keys() <= b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def initial_weights(trainer):
    """The weights every run starts from (the driver's seed 5), to show that three steps moved them."""
    model = common.load_model("tiny", common.load_tokenizer("tiny"), dtype=torch.float32, device="cpu", seed=5,
                              reward=trainer == "rm")
    return model.state_dict()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same driver as one process: this one (what it patches and the thread count are put back after)."""
    import ddp_driver
    import rloo
    import sft
    out, threads = tmp_path_factory.mktemp("one"), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as m:
        for module, name in ((rloo, "make_sampler"), (rloo, "score_completions"), (sft, "step_tokens"),
                             (distributed, "_joined")):
            m.setattr(module, name, getattr(module, name))   # to be restored
        try:
            ddp_driver.main(",".join(TRAINERS), str(out))
        finally:
            torch.set_num_threads(threads)
    return weights(TRAINERS, out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):   # and the bug the per-process token count test must catch, in the same launch
    return two_process_launch(TRAINERS + ("sft-per-rank-tokens",), tmp_path_factory.mktemp("two"))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_processes_train_as_one(trainer, one_process, two_processes):
    one, (two, log) = one_process[trainer], two_processes
    assert max_difference(one, two[trainer]) <= TOLERANCE < max_difference(one, initial_weights(trainer)) / 10
    if trainer == "sft":
        assert "over 2 processes" in log   # rank 0 says how the step divides; the other rank printed nothing
        assert log.count("saved ") == len(TRAINERS) + 1
    if trainer == "rloo-skip":   # the case the zero pass is for: a step where one process had no prompt to train on
        assert any("live 0.5" in line for line in log.splitlines())


def test_a_per_process_token_count_is_caught(one_process, two_processes):
    assert max_difference(one_process["sft"], two_processes[0]["sft-per-rank-tokens"]) > 100 * TOLERANCE


def test_a_step_that_does_not_divide_among_the_processes_is_one_line(monkeypatch):
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 2))
    assert distributed.my_share(list("abcd"), 4, "--grad-accum") == ["b", "d"]
    with pytest.raises(InputError, match=r"--grad-accum 3: .* divide among the 2 processes"):
        distributed.my_share(list("abc"), 3, "--grad-accum")


def test_resuming_needs_the_runs_process_count(monkeypatch):
    states = [distributed.rng_state(), distributed.rng_state()]   # saved by a run of two processes
    with pytest.raises(InputError, match="had 2 process"):
        distributed.restore_rng_states(states)
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 2))
    torch.manual_seed(0)
    states[1]["torch"] = torch.get_rng_state()
    expected = torch.rand(3)
    torch.manual_seed(1)
    distributed.restore_rng_states(states)   # rank 1 takes its own state back
    assert torch.equal(torch.rand(3), expected)


def test_each_process_seeds_its_own_stream(monkeypatch):
    distributed.seed_everything(7)
    rank0 = torch.rand(4)
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 2))
    distributed.seed_everything(7)
    rank1 = torch.rand(4)
    distributed.seed_everything(7)
    assert not torch.equal(rank0, rank1) and torch.equal(torch.rand(4), rank1)   # different, and reproducible
