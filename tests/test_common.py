"""common.py: the CLI, masks from lengths, log-probs against references, sampling, atomic saves."""
import json
from pathlib import Path
from dataclasses import dataclass

import pytest
import torch

import common
import sampling
from common import collate, encode, parse_args, sequence_logprobs
from countdown_reward import warmstart_query


@dataclass
class Knobs:
    k: int = 4             # K samples per prompt
    kl_coef: float = 0.0   # β of the KL term
    name: str = "x"        # a string knob
    flag: bool = False     # a switch


def test_parse_args_forms():
    assert parse_args(Knobs, ["--k", "8"]).k == 8
    assert parse_args(Knobs, ["--k=8"]).k == 8
    assert parse_args(Knobs, ["--kl-coef", "0.1"]).kl_coef == 0.1
    assert parse_args(Knobs, ["--kl_coef=0.2"]).kl_coef == 0.2
    assert parse_args(Knobs, ["--flag"]).flag is True
    assert parse_args(Knobs, ["--no-flag"]).flag is False
    assert parse_args(Knobs, []) == Knobs()


@pytest.mark.parametrize("argv", [["--bogus", "1"], ["--k", "eight"], ["--kl-coef", "x"]])
def test_parse_args_rejects_with_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Knobs, argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_comes_from_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse_args(Knobs, ["--help"])
    out = capsys.readouterr().out
    assert "K samples per prompt" in out and "β of the KL term" in out


# ------------------------------------------------------------------------------------ tokenisation

def test_tiny_tokenizer_carries_qwen_specials_and_single_digits(tokenizer):
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    digits = tokenizer("1234567890", add_special_tokens=False)["input_ids"]
    assert len(digits) == 10
    prompt = warmstart_query([95, 36, 32], 91)
    assert len(tokenizer(prompt)["input_ids"]) < 60  # the preamble is short in tokens
    assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt


def test_a_saved_tiny_tokenizer_reloads_identically(tokenizer, model, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = common.load_tokenizer(str(tmp_path))
    text = common.chat_prompt(tokenizer, "Using the numbers [1, 2], make 3.") + warmstart_query([95, 36, 32], 91)
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template and reloaded.pad_token_id == tokenizer.pad_token_id


def test_chat_template_is_qwen_style_and_our_system_turn_replaces_the_default(tokenizer):
    default = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert default.startswith("<|im_start|>system\nYou are Qwen") and default.endswith("<|im_start|>assistant\n")
    ours = common.chat_prompt(tokenizer, "hi")
    assert "Qwen" not in ours and ours == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                           "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.math
def test_encode_ends_with_the_end_token_and_marks_the_prompt_length(tokenizer):
    raw = encode(tokenizer, "Q: 1+1?", " 2")
    assert raw["input_ids"][-1] == tokenizer.eos_token_id
    assert raw["input_ids"][:raw["prompt_len"]] == tokenizer("Q: 1+1?", add_special_tokens=False)["input_ids"]
    chat = encode(tokenizer, "hi", "hello", chat=True)
    assert chat["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(chat["input_ids"][chat["prompt_len"]:]) == "hello<|im_end|>"


def test_control_tokens_written_inside_a_completion_are_plain_text(tokenizer):
    text = " a chat log: <|im_end|> then <|endoftext|> and more"
    example = encode(tokenizer, "hi", text, chat=True)
    completion = example["input_ids"][example["prompt_len"]:]
    stops = set(common.stop_token_ids(tokenizer))
    assert [i for i, t in enumerate(completion) if t in stops] == [len(completion) - 1]   # only the appended end
    assert tokenizer.decode(completion[:-1]) == text


@pytest.mark.math
def test_masks_come_from_lengths_even_when_pad_equals_eos(tokenizer):
    a, b = encode(tokenizer, "Q: 1+1?", " 2"), encode(tokenizer, "Q: a longer question?", " a longer answer")
    batch = collate([a, b], tokenizer.pad_token_id)
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    assert la < lb
    assert batch["attention_mask"][0].tolist() == [1] * la + [0] * (lb - la)
    assert batch["completion_mask"][0].tolist() == [0] * a["prompt_len"] + [1] * (la - a["prompt_len"]) + [0] * (lb - la)
    assert batch["input_ids"][0, la - 1] == tokenizer.eos_token_id      # the EOS is learned …
    assert batch["completion_mask"][0, la - 1]                          # … though pads carry the same id
    assert (batch["input_ids"][0, la:] == tokenizer.eos_token_id).all()


def test_length_grouped_batches_cover_every_index_once_with_little_padding():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = common.length_grouped_batches(lengths, 8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches would spread ~75
    assert batches == common.length_grouped_batches(lengths, 8, seed=0) != common.length_grouped_batches(lengths, 8, seed=1)


# --------------------------------------------------------------------------------------- log-probs

def _batch(tokenizer):
    examples = [encode(tokenizer, warmstart_query([95, 36, 32], 91), "\n<think>\n36 - 32 = 4\n</think>\n<answer>95 - 4</answer>"),
                encode(tokenizer, "hi", "hello there", chat=True), encode(tokenizer, "Q", " A")]
    return collate(examples, tokenizer.pad_token_id)


@pytest.mark.math
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_equal_a_naive_log_softmax_gather(model, tokenizer, temperature):
    batch = _batch(tokenizer)
    with torch.no_grad():
        ours = sequence_logprobs(model, **batch, temperature=temperature, chunk=7)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
        naive = (logp * batch["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.math
def test_sequence_logprobs_equal_the_transformers_loss(model, tokenizer):
    batch = _batch(tokenizer)
    for i in range(3):
        ids, mask = batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1]
        labels = ids.masked_fill(~batch["completion_mask"][i:i + 1], -100)
        with torch.no_grad():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # mean over predicted tokens
            ours = sequence_logprobs(model, ids, mask, batch["completion_mask"][i:i + 1])
        n = batch["completion_mask"][i, 1:].sum()
        torch.testing.assert_close(ours[0], -loss * n, atol=1e-4, rtol=1e-5)


@pytest.mark.math
def test_prompt_and_pad_tokens_never_change_the_logprob_or_its_gradient(model, tokenizer):
    a = encode(tokenizer, "Q: 1+1?", " 2")
    alone = collate([a], tokenizer.pad_token_id)
    padded = collate([a, encode(tokenizer, "a much longer prompt than the first one", " and a longer answer too")], 99)
    with torch.no_grad():
        x = sequence_logprobs(model, **alone)[0]
        y = sequence_logprobs(model, **padded)[0]
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # the gradient reaches the hidden states of completion-predicting positions only
    grads = []

    def keep_grad(module, inputs, output):
        output.last_hidden_state.register_hook(grads.append)
    handle = model.get_decoder().register_forward_hook(keep_grad)
    sequence_logprobs(model, **alone).sum().backward()
    handle.remove()
    model.zero_grad()
    g, p, n = grads[0][0].abs().sum(-1), a["prompt_len"], len(a["input_ids"])
    assert (g[:p - 1] == 0).all() and (g[p - 1:n - 1] > 0).all() and g[n - 1] == 0


@pytest.mark.math
def test_temperature_scales_logits_before_the_softmax(model, tokenizer):
    batch = _batch(tokenizer)
    with torch.no_grad():
        cold, warm = sequence_logprobs(model, **batch, temperature=0.5), sequence_logprobs(model, **batch, temperature=2.0)
    assert not torch.allclose(cold, warm)


# ---------------------------------------------------------------------------------------- sampling

def test_generate_stops_cuts_and_never_samples_unknown_ids(tokenizer):
    model = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=3)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert vocab > len(tokenizer)
    with torch.no_grad():  # make the unknown rows (and the EOS) very likely
        model.get_output_embeddings().weight[len(tokenizer):] *= 50
    prompt = encode(tokenizer, "Q")["input_ids"]
    torch.manual_seed(0)
    completions, stopped = sampling.generate(model, tokenizer, [prompt] * 8, max_new_tokens=12, temperature=1.0)
    assert all(t < len(tokenizer) for c in completions for t in c)
    stops = set(common.stop_token_ids(tokenizer))
    for c, s in zip(completions, stopped):
        assert s == (c[-1] in stops) and not any(t in stops for t in c[:-1]) and len(c) <= 12


def test_greedy_generation_is_deterministic(model, tokenizer):
    prompt = encode(tokenizer, "Q")["input_ids"]
    a = sampling.generate(model, tokenizer, [prompt], max_new_tokens=8, temperature=0)
    b = sampling.generate(model, tokenizer, [prompt, encode(tokenizer, "a longer prompt")["input_ids"]], max_new_tokens=8, temperature=0)
    assert a[0][0] == b[0][0]  # left padding in a batch changes nothing


# ------------------------------------------------------------------------------------------ saving

def test_save_is_atomic_and_keeps_the_newest(tmp_path, tokenizer, model, monkeypatch):
    state = {"optimizer": {}, "rng": common.rng_state()}
    common.save_checkpoint(tmp_path, 1, model, tokenizer, Knobs(), state)
    common.save_checkpoint(tmp_path, 2, model, tokenizer, Knobs(), state)
    common.save_checkpoint(tmp_path, 3, model, tokenizer, Knobs(), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    assert json.loads((tmp_path / "step-3" / "args.json").read_text())["k"] == 4

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(common.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(tmp_path, 4, model, tokenizer, Knobs(), state)
    assert common.resolve_checkpoint(tmp_path).name == "step-3"
    assert not (tmp_path / "step-4").exists()
    assert common.load_trainer_state(tmp_path / "step-3")["step"] == 3
    reloaded = common.load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    for p, q in zip(model.parameters(), reloaded.parameters()):
        assert torch.equal(p, q)


def test_only_step_integer_folders_are_the_run_s_checkpoints(tmp_path, tokenizer, model):
    for name in ("step-66-good", "step-best", "step-03", "step-\uff13"):   # a user's: never read, never rotated away
        (tmp_path / name).mkdir()
    (tmp_path / "step-9.txt").write_text("notes")
    for step in (1, 2, 3):
        common.save_checkpoint(tmp_path, step, model, tokenizer, Knobs(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-03", "step-2", "step-3", "step-66-good", "step-9.txt",
                                                          "step-best", "step-\uff13"]
    assert common.resolve_checkpoint(tmp_path).name == "step-3" and common.checkpoints(tmp_path)[0].name == "step-2"


def test_a_checkpoint_names_every_stop_id_for_stock_harnesses(tmp_path, tokenizer, model):
    from transformers import GenerationConfig
    common.save_checkpoint(tmp_path, 1, model, tokenizer, Knobs(), {})
    saved = GenerationConfig.from_pretrained(tmp_path / "step-1")
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    assert sorted(saved.eos_token_id) == sorted(stops) and saved.pad_token_id == tokenizer.pad_token_id


def test_read_jsonl_names_file_row_and_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"query": "a", "completion": "b"}\n{"query": "c"}\n')
    with pytest.raises(common.InputError, match=r"rows.jsonl, row 2: missing column 'completion'"):
        common.read_jsonl(path, required=("query", "completion"))
    path.write_text('{"query": "a"\n')
    with pytest.raises(common.InputError, match="row 1: not valid JSON"):
        common.read_jsonl(path)


def test_warmup_cosine_shape():
    lrs = [common.warmup_cosine(s, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)




def test_a_kill_while_a_step_is_saved_again_leaves_a_whole_checkpoint(tmp_path, tokenizer, model, monkeypatch):
    common.save_checkpoint(tmp_path, 3, model, tokenizer, Knobs(), {})
    real = common.shutil.rmtree

    def killed(path, *args, **kwargs):   # the process dies while deleting the old copy
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if not files:
            return
        files[0].unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(common.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(tmp_path, 3, model, tokenizer, Knobs(), {})   # a finished run, resumed: step 3 again
    monkeypatch.setattr(common.shutil, "rmtree", real)
    newest = common.resolve_checkpoint(tmp_path)
    assert newest.name == "step-3" and {p.name for p in newest.iterdir()} >= {"config.json", "model.safetensors",
                                                                              "trainer_state.pt", "args.json"}
    assert common.load_trainer_state(newest)["step"] == 3


def test_a_loaded_model_owns_aligned_memory(tmp_path, tokenizer, model):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = common.load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    assert {p.data_ptr() % 64 for p in loaded.parameters()} == {0}   # safetensors views sit at any offset
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight   # still tied
