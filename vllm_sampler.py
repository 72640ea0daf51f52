"""common.make_sampler's vLLM engine (CUDA only; the one place vLLM is imported, lazily)."""
import os

import torch


class VLLMSampler:
    """`generate` through an in-process vLLM engine (CUDA only; the one place vLLM is imported).

    The engine starts from `source` (a model directory or a hub id) and afterwards receives the
    policy's weights straight from memory with `load_weights(model)` after every optimiser step — no
    checkpoint round trip. Same contract as `generate`: stop on <|im_end|> / <|endoftext|>, the stop
    token kept, unknown ids never sampled. Written against vLLM 0.32–0.33's V1 engine run in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, or the model lives in another process); tests/test_vllm_contract.py
    holds the facts of vLLM's source this relies on.
    """

    def __init__(self, source, stops, known, gpu_memory_utilization=0.3, seed=0, dtype=torch.bfloat16,
                 under_torchrun=False):
        """stops: the stop token ids; known: how many ids the tokenizer owns (len(tokenizer)). Starting the engine
        reseeds Python's, numpy's and torch's global RNGs and sets torch to one thread (the caller puts them back).

        under_torchrun: one engine per process, on the process's own GPU (LOCAL_RANK), sampling its own prompts.
        vLLM's default executor would put every process's engine on cuda:0; its "external_launcher" executor takes
        the device from LOCAL_RANK and, with tensor parallel size 1, makes each process its own replica (every
        process builds its engine at the same time: the start is a collective)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # set, not defaulted: with 1 the weights cannot be pushed
        from vllm import LLM
        launcher = {"distributed_executor_backend": "external_launcher"} if under_torchrun else {}
        self.llm = LLM(model=source, tokenizer=source, dtype=str(dtype).removeprefix("torch."), seed=seed,
                       enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization, **launcher)
        self.stops, self.dtype = stops, dtype
        # the rows no token owns (Qwen: 271) get vLLM's lowest bias, −100; allowed_token_ids would need all
        # 151 665 ids, and vLLM takes at most 1 024 there (and in logit_bias)
        self.unknown = {i: -100.0 for i in range(known, self.llm.model_config.get_vocab_size())} or None

    def load_weights(self, model):
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)
        weights = ((name, p.detach().to(self.dtype)) for name, p in model.state_dict().items())   # the engine's dtype
        worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()   # cached prefixes hold the old weights' keys and values

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, repetition_penalty=1.0, stop_strings=()):
        from vllm import SamplingParams
        # a stop string (`</tool_call>`) ends the text and finishes with "stop"; the token that completed it is kept
        params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, top_k=-1,
                                repetition_penalty=repetition_penalty, max_tokens=max_new_tokens,
                                stop_token_ids=self.stops, skip_special_tokens=False, logit_bias=self.unknown,
                                stop=list(stop_strings) or None, include_stop_str_in_output=True)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        completions = [list(out.outputs[0].token_ids) for out in outputs]   # a stop token is kept, as in `generate`
        return completions, [out.outputs[0].finish_reason == "stop" for out in outputs]
