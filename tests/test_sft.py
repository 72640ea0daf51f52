"""sft.py: Eq. 6 by hand, accumulation, learning on the tiny model, resume, bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import sampling
import sft
from calculator import synthetic_warmstart
from countdown_reward import score_response

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.math
def test_eq6_sft_loss_is_the_per_token_mean_of_negative_logprobs():
    # two sequences with completion log-probs summing to −3 and −1, over 4 completion tokens in the step
    assert sft.sft_loss(torch.tensor([-3.0, -1.0]), n_tokens=4).item() == pytest.approx(1.0)
    # a micro-batch holding half the step's tokens contributes its share only
    assert sft.sft_loss(torch.tensor([-3.0]), n_tokens=6).item() == pytest.approx(0.5)


@pytest.mark.math
def test_accumulating_4_quarter_batches_gives_the_gradient_of_one_batch(model, tokenizer):
    rows = synthetic_warmstart(8, seed=1)
    examples = [common.encode(tokenizer, r["query"], r["completion"]) for r in rows]

    def grads(groups):
        model.zero_grad()
        batches = [common.collate(g, tokenizer.pad_token_id) for g in groups]
        n_tokens = sum(b["completion_mask"][:, 1:].sum().item() for b in batches)
        for b in batches:
            sft.sft_loss(common.sequence_logprobs(model, **b), n_tokens).backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out

    whole, quarters = grads([examples]), grads([examples[i:i + 2] for i in range(0, 8, 2)])
    for a, b in zip(whole, quarters):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_sft_memorises_a_few_dozen_countdown_examples(tmp_path, capsys):
    rows = synthetic_warmstart(64, seed=123, max_wrong=0)  # one line of steps: short enough to memorise fast
    train, held = write_jsonl(tmp_path / "train.jsonl", rows[:32]), write_jsonl(tmp_path / "held.jsonl", rows[32:])
    args = sft.Args(model="tiny", data=train, eval_data=held, out_dir=str(tmp_path / "out"), batch_size=16,
                    grad_accum=1, lr=3e-3, steps=200, eval_every=200, log_every=50, save_every=10 ** 6)
    model, tokenizer = sft.main(args)
    evals = [json.loads(line)["eval_loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert evals[-1] < 0.75 * evals[0]           # held-out loss falls well below its start (~6.6)
    completions, _ = sampling.generate(model.eval(), tokenizer, [common.encode(tokenizer, r["query"])["input_ids"] for r in rows[:32]],
                                     max_new_tokens=64, temperature=0)
    solved = sum(score_response(tokenizer.decode(c, skip_special_tokens=True), r) == 1.0 for c, r in zip(completions, rows))
    assert solved >= 26                           # of 32; a random model solves none
    assert "greedy sample" in capsys.readouterr().out


def test_skipped_rows_are_counted(tmp_path, capsys):
    rows = synthetic_warmstart(12, seed=4)
    rows[0]["completion"] = "   "
    rows[1]["query"] = "word " * 3000
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    sft.main(sft.Args(model="tiny", data=data, eval_rows=2, max_len=512, batch_size=4, grad_accum=1, steps=1,
                      out_dir=str(tmp_path / "o")))
    assert "skipped 1 empty, 1 over 512 tokens" in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_warmstart(16, seed=5))
    real, calls = sft.sft_loss, []

    def poisoned(logps, n_tokens):
        calls.append(1)
        return real(logps, n_tokens) * (math.nan if len(calls) == 3 else 1.0)
    monkeypatch.setattr(sft, "sft_loss", poisoned)
    with pytest.raises(SystemExit, match="loss is nan at step 3"):
        sft.main(sft.Args(model="tiny", data=data, eval_rows=2, batch_size=4, grad_accum=1, steps=6, save_every=2,
                          out_dir=str(tmp_path / "o")))
    assert common.resolve_checkpoint(tmp_path / "o").name == "step-2"
    assert not (tmp_path / "o" / "step-3").exists()


def test_cli_missing_column_is_one_line_naming_file_and_column(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "completion": "c"}, {"query": "q only"}])
    out = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", "tiny", "--data", data],   # a new
                         capture_output=True, text=True, timeout=120)   # interpreter: its import-time output counts too
    assert out.returncode == 2
    assert out.stderr.strip() == f"sft.py: error: {data}, row 2: missing column 'completion' (need query + completion, or messages)"


def test_chat_rows_use_the_first_turn(tmp_path):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    rows = sft.rows_from_records([{"messages": messages[1:]}, {"messages": messages}], "x")
    assert rows == [{"prompt": "u1", "completion": "a1", "chat": True}, {"prompt": "s\n\nu1", "completion": "a1", "chat": True}]


def test_a_smoltalk_system_instruction_reaches_the_prompt_under_our_one_system_turn(tokenizer):
    records = [json.loads(line) for line in (ROOT / "tests" / "fixtures" / "smoltalk.jsonl").open()]
    rewrite = next(r for r in records if r["source"] == "smol-rewrite")
    row, = sft.rows_from_records([rewrite], "smoltalk")
    prompt = tokenizer.decode(common.encode(tokenizer, row["prompt"], row["completion"], chat=True)["input_ids"])
    assert prompt.count("<|im_start|>system\n") == 1 and f"<|im_start|>system\n{common.SYSTEM_PROMPT}<|im_end|>" in prompt
    assert "<|im_start|>user\nRewrite the input text to make it more concise" in prompt


def test_eval_every_0_turns_the_held_out_loss_off(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_warmstart(12, seed=4))
    for every, expected in ((0, False), (2, True)):
        out = tmp_path / f"o{every}"
        sft.main(sft.Args(model="tiny", data=data, eval_rows=2, batch_size=4, grad_accum=1, steps=2, eval_every=every,
                          out_dir=str(out)))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("eval_loss" in r for r in records) is expected


def test_cli_rejects_a_zero_log_interval_in_one_line(script):
    out = script("sft.py", "--model", "tiny", "--log-every", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == "sft.py: error: --log-every 0: must be ≥ 1"


@pytest.mark.parametrize("flags, says", [
    (["--trace", "search", "--puzzles", "3to4:train"], "--puzzles 3to4:train --trace search: the search trace is for 3"),
    (["--trace", "guess", "--puzzles", "easy:train"], "--trace 'guess': use one of attempts, search"),
    (["--puzzles", "hard:train"], "--puzzles hard:train --trace attempts: puzzle shape 'hard:train': use one of")])
def test_cli_bad_synthetic_flags_are_one_line(flags, says, script):
    out = script("sft.py", "--model", "tiny", "--data", "synthetic", *flags)
    assert out.returncode == 2
    assert out.stderr.startswith(f"sft.py: error: {says}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_resume_in_a_new_process_is_bit_identical(tmp_path, script):
    """Killed after the step-2 save and resumed in a fresh process (nothing carried over in memory), the run ends
    with the very weights of the run that went straight through."""
    flags = ["--model", "tiny", "--data", "synthetic", "--synthetic-rows", "64", "--steps", "4", "--batch-size", "4",
             "--grad-accum", "2", "--lr", "1e-3", "--save-every", "2", "--eval-every", "0"]
    assert script("sft.py", *flags, "--out-dir", "a", cwd=tmp_path).returncode == 0   # straight through, 4 steps
    import shutil
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "step-4")                                          # as if killed after step 2
    resumed = subprocess.run([sys.executable, str(ROOT / "sft.py"), *flags, "--out-dir", "b", "--resume"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]   # the step-2 checkpoint, loaded in a fresh process
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "step-4" / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
