"""Runs trainers on the tiny model for tests/test_distributed.py, as one process or under torchrun: each in turn,
into OUT/<trainer> (one launch for them all: a launch costs more than the three steps).

    python tests/ddp_driver.py sft,dpo,rm,rloo,rloo-skip OUT                    # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_driver.py sft,dpo OUT
    ... tests/ddp_driver.py sft,sft-per-rank-tokens OUT                        # and the bug the test must catch

RLOO's samples come from a sampler that is a fixed function of the prompt and its sample index, and its reward
from the digits in a sample, so that one and two processes see the very same samples: what is compared is the
distributed arithmetic (shards, normalisers, all-reduce), not the sampling seeds, which differ per process.
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import distributed  # noqa: E402
import dpo  # noqa: E402
import reward_model  # noqa: E402
import rloo  # noqa: E402
import sft  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def fixed_sampler(tokenizer, *args, **kwargs):
    """A sampler whose k-th completion of a prompt depends on nothing but the prompt and k."""
    def sample(prompt_ids, max_new_tokens, **_):
        seen, completions, stopped = {}, [], []
        for ids in prompt_ids:
            k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            rng = random.Random(hash((tuple(ids), k)) % 2 ** 32)
            length = rng.randint(1, max_new_tokens)
            completions.append([rng.randrange(3, len(tokenizer)) for _ in range(length)])
            stopped.append(False)
        return completions, stopped
    return sample, None


def digit_share(task, prompts, texts, reward_model=None, stopped=None):
    return torch.tensor([sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts])


def main(trainers, out_dir):
    """(Also called in-process by the tests for the one-process run: they put back what it changes.)"""
    torch.set_num_threads(1)
    distributed.start_processes()   # the group (rank 1 printing nothing) is the driver's, for all the trainers: a
    ours, distributed._joined = distributed._joined, False   # trainer leaves it to the driver (a group destroyed
    for trainer in trainers.split(","):                      # cannot be joined again); none is made in one process
        run(trainer, str(Path(out_dir) / trainer))
    if ours:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(trainer, out_dir):
    if trainer == "sft-per-rank-tokens":   # the bug: each process normalises by its own micro-batches' tokens
        real_tokens, real_share = sft.step_tokens, sft.my_share
        sft.step_tokens = lambda batches: sum(b["completion_mask"][:, 1:].sum().item()
                                              for b in real_share(batches, len(batches), "")) * common.rank_and_world()[1]
        try:
            return run("sft", out_dir)
        finally:
            sft.step_tokens = real_tokens
    common_args = dict(model="tiny", steps=3, lr=1e-3, eval_every=0, log_every=1, save_every=10 ** 6, seed=5,
                       out_dir=out_dir)
    if trainer == "sft":
        sft.main(sft.Args(data="synthetic", synthetic_rows=64, puzzles="3to4:train", batch_size=3, grad_accum=4,
                          eval_rows=4, **common_args))
    elif trainer == "dpo":
        dpo.main(dpo.Args(data=str(FIXTURES / "ultrafeedback.jsonl"), batch_size=2, grad_accum=2, **common_args))
    elif trainer == "rm":
        reward_model.main(reward_model.Args(data=str(FIXTURES / "ultrafeedback.jsonl"), batch_size=2, grad_accum=2,
                                            **common_args))
    elif trainer == "rloo":
        rloo.make_sampler, rloo.score_completions = fixed_sampler, digit_share
        rloo.main(rloo.Args(puzzles="3to4:train", n_prompts=24, eval_prompts=0, k=4, prompts_per_step=4,
                            micro_prompts=1, max_new_tokens=12, kl_coef=0.01, sample_every=0, **common_args))
    elif trainer == "rloo-skip":   # β 0, and only puzzles with an even target get rewards that differ: some steps
        rloo.make_sampler = fixed_sampler   # leave a process with no prompt to train on
        rloo.score_completions = lambda task, prompts, texts, rm=None, stopped=None: torch.tensor(
            [share if p["target"] % 2 == 0 else 0.5 for p, share in zip(prompts, digit_share(task, prompts, texts))])
        rloo.main(rloo.Args(puzzles="3to4:train", n_prompts=24, eval_prompts=0, k=4, prompts_per_step=2,
                            micro_prompts=1, max_new_tokens=12, kl_coef=0.0, sample_every=0, **{**common_args, "steps": 6}))


if __name__ == "__main__":
    main(*sys.argv[1:])
