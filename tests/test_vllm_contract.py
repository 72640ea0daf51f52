"""vllm_sampler.VLLMSampler and rloo.py against a stand-in `vllm` that enforces what vLLM 0.33.0's source says.

vLLM is CUDA-only and can't be installed here, so the facts the sampler relies on are written down as a
stand-in module (this file only), each with the file of vLLM 0.33.0 it was read from, and the repo's
sampler and rloo.py's loop are driven through it on the tiny model:
- v1/worker/gpu/sample/logit_bias.py: `allowed_token_ids` and `logit_bias` take at most 1 024 ids each
  ("Too many allowed token IDs"), checked inside the engine at generate time;
- sampling_params.py: logit_bias keys must lie below model_config.get_vocab_size(); biases live in [−100, 100];
- v1/core/sched/utils.py (check_stop): a stop token id stays the last of `token_ids`, finish_reason
  "stop", stop_reason the id; a completion cut at max_tokens finishes with "length";
- v1/engine/detokenizer.py (check_stop_strings) and output_processor.py: a stop string is found in the
  detokenized text; the request finishes with "stop", stop_reason the string, `token_ids` keeping the token
  that completed it;
- v1/engine/llm_engine.py: `llm_engine.model_executor` exists only when VLLM_ENABLE_V1_MULTIPROCESSING is
  0 (envs.py: read from the environment when the engine starts; default 1); the driver worker wraps the
  worker, whose model_runner holds the model;
- utils/torch_utils.py (set_random_seed, called by v1/worker/gpu_worker.py): starting the engine reseeds
  Python's, numpy's and torch's global RNGs with its seed, and serving sets torch to one thread;
- weights pushed in another dtype than the engine's are cast on copy, with a warning each time;
- v1/executor/uniproc_executor.py: under torchrun the default executor puts its worker on the device its
  config names (cuda, so cuda:0, in every process); ExecutorWithExternalLauncher takes LOCAL_RANK, and
  distributed/parallel_state.py lays the launcher's processes out as external data parallel
  (reshape(-1, dp, pp, pcp, tp)), each engine generating alone at tensor parallel size 1.
"""
import importlib.machinery
import os
import random
import sys
import types

import numpy as np
import pytest
import torch

import common
import rloo
import vllm_sampler

MAX_IDS = 1024


class SamplingParams:
    def __init__(self, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=16, stop_token_ids=None,
                 skip_special_tokens=True, logit_bias=None, allowed_token_ids=None, seed=None, stop=None,
                 include_stop_str_in_output=False):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        if logit_bias:
            self.logit_bias = {int(k): min(100.0, max(-100.0, v)) for k, v in logit_bias.items()}


class _Completion:
    def __init__(self, token_ids, finish_reason, stop_reason):
        self.token_ids, self.finish_reason, self.stop_reason = token_ids, finish_reason, stop_reason


class _Runner:
    def __init__(self, model, dtype, warnings):
        self.model = types.SimpleNamespace(load_weights=self.load_weights)
        self.hf, self.dtype, self.warnings, self.loads = model, dtype, warnings, 0

    def load_weights(self, weights):
        params = self.hf.state_dict()
        for name, tensor in weights:
            if tensor.dtype != self.dtype:
                self.warnings.append(f"{name}: {tensor.dtype} cast to {self.dtype}")
            params[name].copy_(tensor)
        self.loads += 1


class LLM:
    started = []   # every engine started in a test

    def __init__(self, model, tokenizer=None, dtype="auto", seed=0, enable_prefix_caching=False,
                 gpu_memory_utilization=0.9, distributed_executor_backend=None):
        external = distributed_executor_backend == "external_launcher"
        self.device, self.seed = f"cuda:{os.environ['LOCAL_RANK'] if external else 0}", seed
        random.seed(seed)   # set_random_seed
        np.random.seed(seed)
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        self.dtype = getattr(torch, dtype)
        hf = common.load_model(model, dtype=self.dtype, device="cpu")
        self.tokenizer = common.load_tokenizer(tokenizer or model)
        self.warnings, self.resets = [], 0
        self.runner = _Runner(hf, self.dtype, self.warnings)
        self.model_config = types.SimpleNamespace(get_vocab_size=lambda: hf.get_output_embeddings().weight.shape[0])
        self.llm_engine = types.SimpleNamespace()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":   # else the model lives in another process
            worker = types.SimpleNamespace(model_runner=self.runner)
            self.llm_engine.model_executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(worker=worker))
        LLM.started.append(self)

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, params, use_tqdm=True):
        bias = params.logit_bias or {}
        if params.allowed_token_ids is not None and len(params.allowed_token_ids) > MAX_IDS:
            raise ValueError(f"Too many allowed token IDs: {len(params.allowed_token_ids)}. The max size is {MAX_IDS}.")
        if len(bias) > MAX_IDS:
            raise ValueError(f"Too many logit bias tokens: {len(bias)}. The max size is {MAX_IDS}.")
        if any(not 0 <= k < self.model_config.get_vocab_size() for k in bias):
            raise ValueError("token_id(s) in logit_bias contain out-of-vocab token ids")
        return [self._one(p["prompt_token_ids"], params, bias) for p in prompts]

    @torch.no_grad()
    def _one(self, prompt, params, bias):
        ids = list(prompt)
        for _ in range(params.max_tokens):
            logits = self.runner.hf(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for token, b in bias.items():
                logits[token] += b
            if params.temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(logits / params.temperature, -1), 1))
            ids.append(token)
            if token in (params.stop_token_ids or ()):
                return types.SimpleNamespace(outputs=[_Completion(ids[len(prompt):], "stop", token)])
            text = self.tokenizer.decode(ids[len(prompt):], skip_special_tokens=params.skip_special_tokens)
            hit = next((s for s in params.stop or () if s in text), None)   # detokenizer.check_stop_strings
            if hit is not None:   # the token that completed the string is kept
                return types.SimpleNamespace(outputs=[_Completion(ids[len(prompt):], "stop", hit)])
        return types.SimpleNamespace(outputs=[_Completion(ids[len(prompt):], "length", None)])


@pytest.fixture
def vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)   # found by importlib.util.find_spec
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")   # a user's setting: the sampler must override it
    monkeypatch.setattr(common, "device_and_dtype", lambda: ("cuda", torch.bfloat16))   # what make_sampler checks
    LLM.started = []
    return module


@pytest.fixture
def tiny_dir(tmp_path, tokenizer, model):
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_the_sampler_fits_vllms_id_caps_at_qwens_vocabulary(vllm, monkeypatch):
    qwen = common.load_tokenizer("qwen-random")
    engine = types.SimpleNamespace(model_config=types.SimpleNamespace(get_vocab_size=lambda: 151_936), calls=[])
    engine.generate = lambda prompts, params, use_tqdm: engine.calls.append(params) or LLM.generate(engine, prompts, params)
    monkeypatch.setattr(vllm, "LLM", lambda **kw: engine)
    sampler = vllm_sampler.VLLMSampler("Qwen/Qwen2.5-0.5B", common.stop_token_ids(qwen), len(qwen))
    sampler.generate([], max_new_tokens=8)   # the engine validates the parameters, as vLLM does at generate time
    bias = engine.calls[0].logit_bias
    assert sorted(bias) == list(range(151_665, 151_936)) and set(bias.values()) == {-100.0}   # 271 rows, never sampled
    assert engine.calls[0].allowed_token_ids is None


def test_the_sampler_keeps_the_stop_token_never_samples_spare_rows_and_leaves_the_rngs(vllm, tiny_dir, tokenizer):
    random.seed(7)
    before = (random.random(), torch.get_num_threads())
    random.seed(7)
    sample, engine = common.make_sampler(tokenizer, tiny_dir, seed=3)
    assert (random.random(), torch.get_num_threads()) == before   # the engine's reseeding was undone
    prompts = [common.encode(tokenizer, f"Q{i}: say something")["input_ids"] for i in range(6)]
    with torch.no_grad():   # make the spare rows (and the stop token) very likely, as in the transformers test
        LLM.started[0].runner.hf.get_output_embeddings().weight[len(tokenizer):] *= 50
    completions, stopped = sample(prompts, max_new_tokens=12, temperature=1.0)
    stops = set(common.stop_token_ids(tokenizer))
    assert all(t < len(tokenizer) for c in completions for t in c)
    for c, s in zip(completions, stopped):
        assert s == (c[-1] in stops) and (s or len(c) == 12) and not stops & set(c[:-1])


def test_rloo_pushes_each_step_s_weights_in_the_engine_dtype(vllm, tiny_dir, tmp_path):
    args = dict(model=tiny_dir, puzzles="3to4:train", n_prompts=8, eval_prompts=0, k=2, prompts_per_step=2, steps=2,
                lr=1e-3, kl_coef=0.0, max_new_tokens=6, eval_every=0, sample_every=0, out_dir=str(tmp_path / "o"))
    policy, _ = rloo.main(rloo.Args(**args))
    engine, = LLM.started
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine.runner.loads == 2 and engine.resets == 2 and engine.warnings == []   # bf16 pushed: no casts
    for name, p in engine.runner.hf.state_dict().items():
        torch.testing.assert_close(p, policy.state_dict()[name].to(torch.bfloat16), atol=0, rtol=0)


def test_under_torchrun_each_process_has_its_own_engine_gpu_and_seed(vllm, tiny_dir, tokenizer, monkeypatch):
    monkeypatch.setattr(common, "rank_and_world", lambda: (1, 2))   # the second of two processes
    monkeypatch.setenv("LOCAL_RANK", "1")
    common.make_sampler(tokenizer, tiny_dir, seed=3)
    monkeypatch.setattr(common, "rank_and_world", lambda: (0, 1))   # one process: vLLM's default executor
    common.make_sampler(tokenizer, tiny_dir, seed=3)
    (second, alone) = LLM.started
    assert (second.device, second.seed) == ("cuda:1", 4) and (alone.device, alone.seed) == ("cuda:0", 3)
