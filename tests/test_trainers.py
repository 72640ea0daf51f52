"""What every trainer shares: flags that must change how a step is computed, never what it computes."""
from pathlib import Path

import pytest
import torch

import dpo
import reward_model
import rloo
import sft

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = {   # two optimizer steps of each trainer on the tiny model
    "sft": (sft, dict(data=str(FIXTURES / "smoltalk.jsonl"), eval_rows=1, batch_size=2, grad_accum=2, lr=1e-3)),
    "dpo": (dpo, dict(data=str(FIXTURES / "ultrafeedback.jsonl"), batch_size=2, grad_accum=2, lr=1e-3)),
    "reward_model": (reward_model, dict(data=str(FIXTURES / "ultrafeedback.jsonl"), eval_rows=2, batch_size=2,
                                        grad_accum=2, lr=1e-3)),
    "rloo": (rloo, dict(puzzles="3to4:train", n_prompts=4, eval_prompts=0, k=4, prompts_per_step=2, lr=1e-3,
                        max_new_tokens=8, kl_coef=0.01)),
}


@pytest.mark.parametrize("trainer", RUNS)
def test_gradient_checkpointing_recomputes_the_same_update(trainer, tmp_path):
    module, args = RUNS[trainer]
    runs = {}
    for checkpointing in (False, True):
        runs[checkpointing], _ = module.main(module.Args(model="tiny", steps=2, eval_every=0, seed=3,
                                                         gradient_checkpointing=checkpointing,
                                                         out_dir=str(tmp_path / str(checkpointing)), **args))
        layers = runs[checkpointing].base_model.layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
    for p, q in zip(runs[False].parameters(), runs[True].parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
