"""What every trainer shares: flags that must change how a step is computed, never what it computes."""
import json
import math
from pathlib import Path

import pytest
import torch

import common
import dpo
import reward_model
import rloo
import sampling
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


@pytest.mark.parametrize("trainer", RUNS)
def test_adamw_decays_nothing_by_default_and_never_biases_or_norms(trainer, tmp_path, monkeypatch):
    module, args = RUNS[trainer]
    groups = []
    real = torch.optim.AdamW.__init__

    def spy(self, params, *a, **kw):
        params = list(params)
        groups.append([(g.get("weight_decay", kw.get("weight_decay", 0.01)), g["params"]) for g in params]
                      if isinstance(params[0], dict) else [(kw.get("weight_decay", 0.01), params)])
        return real(self, params, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    for decay in (0.0, 0.1):
        module.main(module.Args(model="tiny", steps=1, eval_every=0, weight_decay=decay,
                                out_dir=str(tmp_path / str(decay)), **args))
        (built,) = groups[-1:]
        assert {wd for wd, params in built if any(p.ndim < 2 for p in params)} == {0.0}   # biases, norm gains
        assert {wd for wd, params in built if any(p.ndim >= 2 for p in params)} == {decay}


@pytest.mark.parametrize("trainer", ["sft", "dpo", "reward_model"])
def test_the_logged_learning_rate_is_the_one_the_step_used(trainer, tmp_path):
    module, args = RUNS[trainer]
    module.main(module.Args(model="tiny", steps=4, warmup=0.5, eval_every=0, log_every=1, out_dir=str(tmp_path),
                            **args))
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lr = args["lr"]   # linear warmup over steps 1-2, then cosine from lr towards lr/10: steps 3, 4 at progress 0, ½
    assert logged == pytest.approx([lr / 2, lr, lr, lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))])


def test_each_task_starts_from_its_own_sft_run_or_says_which_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no out/ here
    with pytest.raises(common.InputError, match="--model: no SFT run for ultrafeedback at out/sft-smoltalk"):
        dpo.main(dpo.Args())                                           # UltraFeedback by default
    with pytest.raises(common.InputError, match="--model: no SFT run for ultrafeedback at out/sft-smoltalk"):
        rloo.main(rloo.Args(task="ultrafeedback"))
    with pytest.raises(common.InputError, match="--model: no SFT run for countdown at out/sft"):
        rloo.main(rloo.Args())
    with pytest.raises(common.InputError, match="--model: no default SFT checkpoint for --data prefs.jsonl"):
        dpo.main(dpo.Args(data="prefs.jsonl"))
    # sft.py writes each task's run where they look: smoltalk → out/sft-smoltalk
    rows = [{"prompt": "hi", "completion": "hello", "chat": True}] * 4
    monkeypatch.setattr(sft, "load_data", lambda args: (rows, rows[:1]))
    sft.main(sft.Args(model="tiny", data="smoltalk", steps=1, batch_size=2, grad_accum=1, eval_every=0))
    assert common.sft_run("", "ultrafeedback") == "out/sft-smoltalk" and (tmp_path / "out/sft-smoltalk/step-1").is_dir()


@pytest.mark.parametrize("data, steps", [("warmstart", 50 * 8 // 4), ("smoltalk", 3 * 8 // 4)])
def test_sft_plans_report_000s_epochs_per_dataset_and_says_so_first(data, steps, tmp_path, monkeypatch, capsys):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}", "chat": data == "smoltalk"} for i in range(8)]
    monkeypatch.setattr(sft, "load_data", lambda args: (rows, []))
    sft.main(sft.Args(model="tiny", data=data, batch_size=2, grad_accum=2, eval_every=0, log_every=1000,
                      save_every=1000, out_dir=str(tmp_path)))
    first = capsys.readouterr().out.splitlines()[0]
    assert f"planned: {steps} steps ≈ {steps * 4 / 8:.2f} epochs" in first


@pytest.mark.parametrize("cuda, bf16, expected", [(False, False, ("cpu", torch.float32)),
                                                   (True, True, ("cuda", torch.bfloat16)),    # Ampere and newer
                                                   (True, False, ("cuda", torch.float16))])   # T4, V100
def test_the_compute_dtype_follows_the_card(cuda, bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    # with emulation counted, a T4 "supports" bf16 too, at a fraction of fp16's speed
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or bf16)
    assert common.device_and_dtype() == expected


@pytest.mark.parametrize("amx, avx512_bf16, forced, expected", [
    (False, False, "", torch.float32), (True, False, "", torch.bfloat16), (False, True, "", torch.bfloat16),
    (True, True, "0", torch.float32), (False, False, "1", torch.bfloat16)])
def test_the_cpu_autocasts_to_bf16_only_where_it_computes_in_bf16(amx, avx512_bf16, forced, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setenv("RL_CPU_BF16", forced)
    assert common.device_and_dtype() == ("cpu", expected)


@pytest.mark.parametrize("trainer", RUNS)
def test_fp16_trains_with_loss_scaling_and_says_so(trainer, tmp_path, monkeypatch, capsys):
    module, args = RUNS[trainer]
    monkeypatch.setattr(module, "device_and_dtype", lambda: ("cpu", torch.float16))   # as on a T4, on the CPU
    model, _ = module.main(module.Args(model="tiny", steps=2, eval_every=0, out_dir=str(tmp_path), **args))
    assert "cpu, fp16 autocast + loss scaling" in capsys.readouterr().out.splitlines()[0]
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())   # fp32 master weights
    state = common.load_trainer_state(tmp_path / "step-2")
    assert state["scaler"]["scale"] > 0   # the scaler's state is saved for --resume


def test_generate_runs_under_the_trainers_autocast(model, tokenizer, monkeypatch):
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    prompt = [common.encode(tokenizer, "Q: 1 + 2 ?")["input_ids"]]
    fp32, _ = sampling.generate(model, tokenizer, prompt, max_new_tokens=4, temperature=0)
    monkeypatch.setattr(sampling, "device_and_dtype", lambda: ("cpu", torch.bfloat16))
    sampling.generate(model, tokenizer, prompt, max_new_tokens=4, temperature=0)
    hook.remove()
    assert seen[:len(seen) // 2] == [False] * (len(seen) // 2) and all(seen[len(seen) // 2:])


def test_a_run_is_not_overwritten_and_resumes_only_with_its_own_flags(tmp_path, capsys):
    args = dict(model="tiny", data=str(FIXTURES / "smoltalk.jsonl"), eval_rows=1, batch_size=2, grad_accum=1,
                steps=4, save_every=2, log_every=1, eval_every=0, out_dir=str(tmp_path))
    sft.main(sft.Args(**args))
    with pytest.raises(common.InputError, match=r"holds a run \(step-4\): continue it with --resume"):
        sft.main(sft.Args(**{**args, "steps": 2}))          # would have rotated away its own step-2 at once
    with pytest.raises(common.InputError, match=r"--resume with other flags: --lr 0.1 \(the run's: 2e-05\)"):
        sft.main(sft.Args(**args, lr=0.1, resume=True))
    import shutil
    shutil.rmtree(tmp_path / "step-4")                       # killed after step 4 was logged, before it was saved
    sft.main(sft.Args(**{**args, "log_every": 2}, resume=True))   # what is logged may change
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4]                                # steps 3 and 4 of the first run dropped, 4 logged again


def test_a_small_file_still_trains_and_says_what_it_held_out(tmp_path, capsys):
    rows = FIXTURES / "ultrafeedback.jsonl"                  # 8 pairs: --eval-rows 500 would have held out all
    reward_model.main(reward_model.Args(model="tiny", data=str(rows), steps=1, batch_size=2, grad_accum=1, eval_every=0,
                                        out_dir=str(tmp_path / "rm")))
    assert capsys.readouterr().out.startswith("8 training pairs (0 dropped over 1024 tokens), 0 held out")
    sft.main(sft.Args(model="tiny", data=str(FIXTURES / "smoltalk.jsonl"), eval_rows=0, steps=1, batch_size=2,
                      grad_accum=1, eval_every=0, out_dir=str(tmp_path / "sft")))   # [:-0] held out everything
    assert "6 training rows" in capsys.readouterr().out
