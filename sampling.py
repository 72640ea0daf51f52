"""How completions are drawn: `generate`, our decoding loop on a transformers model (one KV cache, finished rows
leave the batch, a prompt's copies read once, a harness that may write between tokens), and `make_sampler`, which
gives a trainer that loop or the vLLM engine (vllm_sampler.py) behind one signature."""
import importlib.util

import torch
from tqdm.auto import tqdm

import testbed
from common import device_and_dtype, load_model, stop_token_ids
from distributed import rank_and_world, rng_state, set_rng_state
from inputs import locate


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, repetition_penalty=1.0,
             batch_size=64, stop_strings=(), respond=None):
    """Sample (temperature > 0) or decode greedily (temperature 0) a completion for each prompt.

    Returns a list of completion token lists, each cut after its first stop token (which is kept: it
    is part of what was sampled), and a list of booleans, True where a stop token was produced.
    stop_strings (tools.py's `</tool_call>`) stop a completion too: after the token that completes one.
    Ids the tokenizer does not know (Qwen's embedding has ~270 spare rows) are never sampled.
    Runs under the trainers' autocast (bf16 or fp16 on CUDA), so fp32 training weights sample at bf16 speed.

    respond (tools.tool_loop): a harness that writes between the model's pieces. respond(i, piece, stop) is called
    when prompt i's piece (its tokens since the harness last wrote) ends on a stop token or string (stop True) or
    on the budget; it returns the harness's tokens, which the model reads as context and goes on, or None: the
    completion is over. The completion holds both.
    """
    from transformers import GenerationConfig
    stops = stop_token_ids(tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    unknown = list(range(len(tokenizer), vocab))
    device = next(model.parameters()).device
    device_type, dtype = device_and_dtype()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == device_type and dtype != torch.float32)
    sample = temperature > 0  # every setting explicit: none inherited from a model's generation_config.json
    # (Qwen2.5-Instruct's asks for top_k 20, top_p 0.8, repetition_penalty 1.05); top_k 0 = off
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
                              top_p=top_p if sample else 1.0, top_k=0 if sample else 50,
                              repetition_penalty=repetition_penalty, eos_token_id=stops,
                              pad_token_id=tokenizer.pad_token_id, suppress_tokens=unknown or None,
                              stop_strings=list(stop_strings) or None)
    completions, stopped = [], []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="sampling", leave=False,
                      disable=len(prompt_ids) <= 4 * batch_size):
        batch = prompt_ids[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + list(p) for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        harness = (lambda i, *piece: respond(start + i, *piece)) if respond is not None else lambda *_: None
        with autocast:
            rows, ends = _decode(model, tokenizer, ids, mask, config, harness)
        completions += rows
        stopped += ends
    return completions, stopped


def _decode(model, tokenizer, ids, mask, config, respond):
    """transformers' generate loop, with two savings and a harness: identical prompts (RLOO's K samples, DPO's pair
    samples) are read once, their cache copied out to every row; a finished sequence leaves the batch (and the
    cache); one token per sequence per step over one KV cache, the harness's tokens fed in one a step, as if sampled
    (what was sampled for them is dropped), so no sequence waits for another's piece and nothing is read twice.
    The logits go through transformers' own processors, built from generate's GenerationConfig: the same sampling
    (tests/test_tools.py holds it to transformers' tokens). Under generate's no_grad."""
    from transformers import DynamicCache
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                                                        TopPLogitsWarper)
    c, sample = config, config.do_sample
    processors = LogitsProcessorList(
        ([RepetitionPenaltyLogitsProcessor(c.repetition_penalty)] if c.repetition_penalty != 1 else [])
        + ([SuppressTokensLogitsProcessor(c.suppress_tokens, ids.device)] if c.suppress_tokens else [])
        + ([TemperatureLogitsWarper(c.temperature)] if sample and c.temperature != 1 else [])
        + ([TopPLogitsWarper(c.top_p)] if sample and c.top_p < 1 else []))
    stops, stop_strings, max_new_tokens = set(c.eos_token_id), c.stop_strings or (), c.max_new_tokens
    window = max(map(len, stop_strings), default=0)   # a token writes ≥ 1 character: a stop string just completed
    n = len(ids)                                      # lies within its last `window` tokens
    rows, out, ends = list(range(n)), [[] for _ in range(n)], [False] * n
    start, forced = [0] * n, [[] for _ in range(n)]   # each sequence's piece starts at out[start]; the harness's queue
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    first = {}                                        # the first row of each distinct prompt, in order
    copy_of = torch.tensor([first.setdefault((tuple(i), tuple(m)), r) for r, (i, m) in
                            enumerate(zip(ids.tolist(), mask.tolist()))], device=ids.device)
    distinct = torch.tensor(sorted(first.values()), device=ids.device)
    cache = DynamicCache()
    logits = model(input_ids=ids[distinct], attention_mask=mask[distinct], position_ids=positions[distinct],
                   past_key_values=cache, logits_to_keep=1).logits[:, -1].float()
    if len(distinct) < n:   # the prefill's results, copied out to the rows that share a prompt
        where = torch.searchsorted(distinct, copy_of)
        cache.batch_select_indices(where)
        logits = logits[where]
    while rows:
        scores = processors(ids, logits)
        tokens = (torch.multinomial(scores.softmax(-1), 1)[:, 0] if sample else scores.argmax(-1)).tolist()
        keep = []
        for b, r in enumerate(rows):
            harness = bool(forced[r])
            token = tokens[b] = forced[r].pop(0) if harness else tokens[b]
            out[r].append(token)
            full = len(out[r]) == max_new_tokens
            if harness:
                if not full:
                    keep.append(b)
                continue
            piece = out[r][start[r]:]
            stop = token in stops or window > 0 and any(
                s in tokenizer.decode(piece[-window:], skip_special_tokens=False) for s in stop_strings)
            if not (stop or full):
                keep.append(b)
                continue
            response = respond(r, piece, stop)   # the piece has ended: the harness reads it
            if response is None or full:
                ends[r] = stop
                continue
            forced[r], start[r] = list(response), len(out[r]) + len(response)
            keep.append(b)
        ids = torch.cat([ids, torch.tensor(tokens, device=ids.device)[:, None]], 1)
        if not keep:
            break
        if len(keep) < len(rows):   # the finished leave the batch
            index = torch.tensor(keep, dtype=torch.long, device=ids.device)
            cache.batch_select_indices(index)
            ids, mask, positions = ids[index], mask[index], positions[index]
            rows = [rows[b] for b in keep]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        logits = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                       logits_to_keep=1).logits[:, -1].float()
    return out, ends


def make_sampler(tokenizer, path, model=None, use_vllm=True, gpu_memory_utilization=0.3, seed=0, batch_size=64):
    """(sample, engine): sample(prompt_ids, max_new_tokens, temperature, top_p, repetition_penalty) → (completions, stopped).

    vLLM when asked for and installed, on CUDA or a CPU (engine: the VLLMSampler, for `load_weights`), started from
    `path` (a test bed built in-process, from a saved copy of `model`); otherwise transformers' `generate` on `model`
    (engine None), which is loaded from `path` only then, `batch_size` prompts at a time. A vLLM that is installed
    but fails to import is an error.
    """
    device, dtype = device_and_dtype()
    if use_vllm and importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed: sampling with transformers' generate")
    elif use_vllm:
        import vllm_sampler
        vllm_sampler.import_vllm()                                    # a broken install: one line, before any work
        copy = None
        if path in testbed.NAMES:   # built in-process: the engine starts from a saved copy, which it reads at its start
            copy = vllm_sampler.saved_copy(model if model is not None else load_model(path, tokenizer, seed=seed),
                                           tokenizer)
        state, threads = rng_state(), torch.get_num_threads()   # starting the engine reseeds every global RNG
        rank, world = rank_and_world()   # under torchrun: an engine per process, each with its own seed
        engine = vllm_sampler.VLLMSampler(copy.name if copy else locate(path), stop_token_ids(tokenizer),
                                          len(tokenizer), gpu_memory_utilization, seed + rank, dtype,
                                          under_torchrun=world > 1, device=device)
        if copy:
            copy.cleanup()                                            # read once: the engine holds weights and tokenizer
        set_rng_state(state)                                          # and may change torch's threads: both put back
        torch.set_num_threads(threads)
        return engine.generate, engine
    model = model if model is not None else load_model(path, tokenizer, seed=seed)
    def sample(ids, **kw):
        return generate(model, tokenizer, ids, batch_size=batch_size, **kw)
    sample.responds = True   # takes generate's `respond`: tools.tool_loop's harness runs between tokens, not rounds
    return sample, None
