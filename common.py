"""Shared helpers for the trainers: CLI, loading, tokenisation and masks, log-probs, sampling, saving.

Every correctness-critical piece lives here once: the completion mask (built from lengths, never
from token ids: Qwen's pad token is its EOS), the shift by one between logits and labels, the
temperature applied to log-probs of sampled text, and the end-of-turn token inside the loss.
No losses, no training loops: those are in the trainer files.
"""
import argparse
import dataclasses
import importlib.util
import inspect
import io
import json
import os
import random
import re
import shutil
import sys
import time
import tokenize
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

import testbed
from testbed import END_OF_TEXT, IM_END

QWEN = "Qwen/Qwen2.5-0.5B"
SYSTEM_PROMPT = "You are a helpful assistant."  # the one system turn of every chat prompt, train and eval


# ------------------------------------------------------------------------------------------------ CLI

def run(main, args_class):
    """The command-line entry point of a script: parse the flags, run, and turn an InputError into one line."""
    args = parse_args(args_class)
    try:
        main(args)
    except InputError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_args(args_class, argv=None):
    """A dataclass of knobs from the command line: `--k 8`, `--k=8`, `--kl-coef`/`--kl_coef`, `--flag`/`--no-flag`.

    Help text is each field's trailing comment. An unknown flag or a bad value exits 2 (argparse).
    """
    comments = _field_comments(args_class)
    parser = argparse.ArgumentParser(description=(sys.modules[args_class.__module__].__doc__ or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(args_class):
        names = dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}"])
        kind = _TYPES.get(field.type, field.type)  # annotations may be strings (`from __future__ import annotations`)
        if kind is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=field.default,
                                help=comments.get(field.name, ""))
        else:
            parser.add_argument(*names, type=kind, default=field.default, help=comments.get(field.name, ""))
    return args_class(**vars(parser.parse_args(argv)))


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _field_comments(args_class):
    try:
        source = inspect.getsource(args_class)
    except (OSError, TypeError):  # defined in a notebook cell
        return {}
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and (m := re.match(r"\s*(\w+)\s*:", tok.line)):
            comments[m.group(1)] = tok.string.lstrip("# ").strip()
    return comments


# -------------------------------------------------------------------------------------------- loading

def device_and_dtype():
    """(device, compute dtype): cuda + bf16 where the card computes in it (Ampere and newer), cuda + fp16 on older
    cards (Colab's T4, V100), else cpu + fp32. Trainers keep fp32 weights and autocast to this dtype."""
    if not torch.cuda.is_available():
        return "cpu", torch.float32
    return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def mixed_precision(device, dtype):
    """A trainer's autocast context, gradient scaler and a label for its first log line, for device_and_dtype()'s
    choice: bf16 autocast; fp16 autocast with loss scaling (fp16 gradients underflow unscaled); or plain fp32."""
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    label = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}.get(dtype, "fp32")
    return autocast, scaler, f"{device}, {label}"


def resolve_checkpoint(path):
    """A model (or tokenizer) directory, or a run directory (out_dir of a trainer): then its newest complete checkpoint."""
    path = Path(path)
    if (path / "config.json").exists() or (path / "tokenizer_config.json").exists():
        return path
    steps = sorted(path.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not steps:
        raise FileNotFoundError(f"{path}: no config.json and no step-* checkpoint inside")
    return steps[-1]


SFT_RUNS = {"countdown": "out/sft", "ultrafeedback": "out/sft-smoltalk"}   # where the README's sft.py commands write


def sft_run(model, task, flag="--task"):
    """--model if given, else the SFT run of the task (SFT_RUNS); a one-line error when there is none."""
    if model:
        return model
    if task not in SFT_RUNS:
        raise InputError(f"--model: no default SFT checkpoint for {flag} {task}; pass the checkpoint to start from")
    if not Path(SFT_RUNS[task]).exists():
        raise InputError(f"--model: no SFT run for {task} at {SFT_RUNS[task]}; train it first (README) or pass --model")
    return SFT_RUNS[task]


def load_tokenizer(name=QWEN):
    """The tokenizer of a hub id or local directory; `tiny` and `qwen-random` are built in-process (testbed.py)."""
    if name in testbed.NAMES:
        try:
            return testbed.tokenizer(name)
        except testbed.Unavailable as e:
            raise InputError(str(e)) from None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    source = resolve_checkpoint(name) if Path(name).exists() else name
    config = Path(source) / "tokenizer_config.json"
    saved_class = json.loads(config.read_text()).get("tokenizer_class") if config.exists() else None
    # A saved generic tokenizer (the tiny one) loads as itself: AutoTokenizer would pick the class of the
    # model type (Qwen2Tokenizer) and replace its pre-tokenizer.
    loader = PreTrainedTokenizerFast if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast") else AutoTokenizer
    tokenizer = loader.from_pretrained(source, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name=QWEN, tokenizer=None, dtype=None, device=None, seed=0, reward=False):
    """A causal LM in eval mode (dropout off). dtype/device default to bf16 on CUDA, fp32 on CPU.

    Trainers load their policy in float32 (master weights for AdamW) and run forward passes under
    bf16 autocast on CUDA; frozen models (reference, evaluation) use bf16 directly.
    `tiny` and `qwen-random` (Qwen2.5-0.5B's shape) are seeded random models built in-process (testbed.py).
    reward=True: a sequence classifier with one output (a new scalar head on a causal LM's trunk, or
    an encoder such as DeBERTa), for reward_model.py.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    default_device, default_dtype = device_and_dtype()
    device, dtype = device or default_device, dtype or default_dtype
    if name in testbed.NAMES:
        model = testbed.model(name, tokenizer or load_tokenizer(name), seed=seed, reward=reward).to(dtype)
    elif reward:
        source = resolve_checkpoint(name) if Path(name).exists() else name
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype, trust_remote_code=False)
        if model.config.pad_token_id is None and tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        source = resolve_checkpoint(name) if Path(name).exists() else name
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    return model.to(device).eval()


def stop_token_ids(tokenizer):
    """Token ids that end a completion: <|im_end|> and <|endoftext|> (Qwen's EOS and pad)."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(END_OF_TEXT)}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


# ------------------------------------------------------------------------------------- tokenisation

def chat_prompt(tokenizer, user_text):
    """The chat-template prompt for one user turn, with our fixed system turn, ending '<|im_start|>assistant\\n'."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_completion(tokenizer, chat):
    """The token a completion ends with: <|im_end|> in chat format, EOS in raw-text format."""
    return tokenizer.convert_tokens_to_ids(IM_END) if chat else tokenizer.eos_token_id


def encode(tokenizer, prompt, completion=None, chat=False, end=True):
    """Token ids of prompt + completion + end token, and the prompt's length (where the loss starts).

    Prompt and completion are tokenised separately, so the boundary between them is a token boundary,
    exactly as when the model continues a prompt at sampling time. `chat=True`: `prompt` is the user
    turn and goes through the chat template. The end-of-turn token belongs to the completion: the
    model must learn to stop. end=False leaves it off (a sampled completion cut at the length limit).
    With completion None only the prompt is encoded (for sampling).
    A completion is data: a control token written inside it as text (`<|im_end|>` in a chat log) is encoded
    as plain text, so the appended end token is the only stop the model learns. The prompt is tokenised as
    any harness tokenises a chat-template string (control tokens parsed), so training sees what inference sees.
    """
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if completion is None:
        return {"input_ids": prompt_ids, "prompt_len": len(prompt_ids)}
    completion_ids = tokenizer(completion, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    completion_ids += [end_of_completion(tokenizer, chat)] if end else []
    return {"input_ids": prompt_ids + completion_ids, "prompt_len": len(prompt_ids)}


def collate(examples, pad_id):
    """Right-pad a list of `encode` outputs. Masks come from lengths, never from token ids.

    attention_mask: 1 on the real tokens; completion_mask: 1 on the completion tokens (end token included).
    """
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    prompt_lens = torch.tensor([e["prompt_len"] for e in examples])
    positions = torch.arange(int(lengths.max()))[None, :]
    input_ids = torch.full((len(examples), positions.shape[1]), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
    attention_mask = positions < lengths[:, None]
    completion_mask = attention_mask & (positions >= prompt_lens[:, None])
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "completion_mask": completion_mask}


def length_grouped_batches(lengths, batch_size, seed, group=64):
    """Index batches of similar length (little padding) in a seeded random order.

    Shuffle, cut into groups of `group` batches, sort each group by length, batch it, shuffle the batches.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * group):
        chunk = sorted(order[start:start + batch_size * group], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class InputError(ValueError):
    """Bad user input (a file, a row, a flag): scripts print it as one line and exit 2."""


def check_intervals(args):
    """--log-every and --save-every must be ≥ 1; --eval-every and --sample-every ≥ 0 (0 turns them off)."""
    for name, least in (("log_every", 1), ("save_every", 1), ("eval_every", 0), ("sample_every", 0)):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise InputError(f"--{name.replace('_', '-')} {value}: must be ≥ {least}")


def read_jsonl(path, required=()):
    """Rows of a JSONL file; a bad line or a missing column is an InputError naming file, row and column."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}, row {number}: not valid JSON ({e.msg})") from None
            missing = [c for c in required if c not in row]
            if missing:
                raise InputError(f"{path}, row {number}: missing column {missing[0]!r} (has {sorted(row)})")
            rows.append(row)
    return rows


def preference_pairs(source, split="train_prefs"):
    """Rows {prompt, chosen, rejected, chat} from UltraFeedback or a local JSONL in its schema.

    `ultrafeedback` is HuggingFaceH4/ultrafeedback_binarized (`train_prefs` / `test_prefs`), where
    chosen and rejected are conversations whose last message is the response; in a local file they
    may also be plain response strings. Raw-text pairs (Countdown) carry "chat": false.
    """
    if source == "ultrafeedback":
        from datasets import load_dataset
        records, name = load_dataset("HuggingFaceH4/ultrafeedback_binarized", split=split), "ultrafeedback_binarized"
    elif str(source).endswith(".jsonl"):
        records, name = read_jsonl(source, required=("prompt", "chosen", "rejected")), source
    else:
        raise InputError(f"preference data {source!r}: use ultrafeedback or a .jsonl with prompt, chosen, rejected")
    response = lambda x: x[-1]["content"] if isinstance(x, list) else x
    pairs = []
    for number, r in enumerate(records, 1):
        if not isinstance(r["prompt"], str) or not all(isinstance(response(r[k]), str) for k in ("chosen", "rejected")):
            raise InputError(f"{name}, row {number}: prompt must be text, chosen/rejected text or a list of messages")
        pairs.append({"prompt": r["prompt"], "chosen": response(r["chosen"]), "rejected": response(r["rejected"]),
                      "chat": r.get("chat", True)})
    return pairs


def load_puzzles(source, n, seed=0, skip=0):
    """Countdown puzzles [{"target", "nums"}] from one of:

    a generated shape (calculator.SHAPES): "3to4" (like Countdown-Tasks-3to4), "easy", "course",
    optionally split ("easy:train", "easy:test": disjoint by construction; "easy:sft" and "easy:rl" cut
    "easy:train" in two, see calculator.SPLITS), seeded;
    "hub": Jiayi-Pan/Countdown-Tasks-3to4, rows skip … skip + n;
    a .json / .jsonl file of rows with "target" and "nums" (or the course's "num", or "numbers").
    """
    from calculator import SHAPES, puzzles_from_spec
    if source.partition(":")[0] in SHAPES:
        try:
            return puzzles_from_spec(source, n, seed)
        except ValueError as e:
            raise InputError(str(e)) from None
    if source == "hub":
        from datasets import load_dataset
        rows = load_dataset("Jiayi-Pan/Countdown-Tasks-3to4", split="train").select(range(skip, skip + n))
    elif str(source).endswith((".json", ".jsonl")):
        rows = read_jsonl(source) if str(source).endswith(".jsonl") else json.loads(Path(source).read_text())
        rows = rows[skip:skip + n]
    else:
        raise InputError(f"puzzles {source!r}: use a shape ({', '.join(SHAPES)}), hub, or a .json/.jsonl file")
    puzzles = []
    for number, row in enumerate(rows, skip + 1):
        nums = next((row[k] for k in ("nums", "num", "numbers") if k in row), None)
        if nums is None or "target" not in row:
            raise InputError(f"{source}, row {number}: needs 'target' and 'nums' (or 'num')")
        puzzles.append({"target": int(row["target"]), "nums": [int(x) for x in nums]})
    return puzzles


# ------------------------------------------------------------------------------------------ log-probs

def sequence_logprobs(model, input_ids, attention_mask, completion_mask, temperature=1.0, chunk=128):
    """Σ_t log π(y_t | x, y_<t) over each sequence's completion tokens: a (batch,) tensor.

    Logits are divided by `temperature` (the sampling temperature, for sampled text). The shift by
    one lives here: the hidden state at position t predicts token t+1. Only completion positions go
    through the output layer, `chunk` rows at a time, as logit[token] − logsumexp(logits): the
    full-vocabulary log_softmax never exists, and under autograd each chunk is recomputed in the
    backward pass rather than stored, so memory holds hidden states, not (tokens × vocabulary) logits.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    predicts = completion_mask[:, 1:].bool()                   # position t scores token t+1
    rows = hidden[:, :-1][predicts]                            # (n completion tokens, hidden)
    targets = input_ids[:, 1:][predicts]
    head = model.get_output_embeddings()
    pieces = []
    for i in range(0, rows.shape[0], chunk):
        args = (rows[i:i + chunk], head.weight, head.bias, targets[i:i + chunk], temperature)
        pieces.append(checkpoint(_token_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _token_logprobs(*args))
    token_logps = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
    batch_index = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(predicts)[predicts]
    return torch.zeros(input_ids.shape[0], device=input_ids.device).index_add(0, batch_index, token_logps)


def _token_logprobs(rows, weight, bias, targets, temperature):
    logits = F.linear(rows, weight, bias).float().div_(temperature)  # in place: one (chunk × vocab) buffer less
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)


# ------------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, repetition_penalty=1.0,
             batch_size=64):
    """Sample (temperature > 0) or decode greedily (temperature 0) a completion for each prompt.

    Returns a list of completion token lists, each cut after its first stop token (which is kept: it
    is part of what was sampled), and a list of booleans, True where a stop token was produced.
    Ids the tokenizer does not know (Qwen's embedding has ~270 spare rows) are never sampled.
    Runs under the trainers' autocast (bf16 or fp16 on CUDA), so fp32 training weights sample at bf16 speed.
    """
    stops = stop_token_ids(tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    unknown = list(range(len(tokenizer), vocab))
    device = next(model.parameters()).device
    device_type, dtype = device_and_dtype()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == device_type and dtype != torch.float32)
    from transformers import GenerationConfig
    sample = temperature > 0  # every setting explicit: none inherited from a model's generation_config.json
    # (Qwen2.5-Instruct's asks for top_k 20, top_p 0.8, repetition_penalty 1.05); top_k 0 = off
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
                              top_p=top_p if sample else 1.0, top_k=0 if sample else 50,
                              repetition_penalty=repetition_penalty, eos_token_id=stops,
                              pad_token_id=tokenizer.pad_token_id, suppress_tokens=unknown or None)
    completions, stopped = [], []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="sampling", leave=False,
                      disable=len(prompt_ids) <= 4 * batch_size):
        batch = prompt_ids[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + list(p) for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with autocast:
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            completions.append(row if end is None else row[:end + 1])
            stopped.append(end is not None)
    return completions, stopped


class VLLMSampler:
    """`generate` through an in-process vLLM engine (CUDA only; the one place vLLM is imported).

    The engine starts from `path` (a model or run directory, or a hub id) and afterwards receives the
    policy's weights straight from memory with `load_weights(model)` after every optimiser step — no
    checkpoint round trip. Same contract as `generate`: stop on <|im_end|> / <|endoftext|>, the stop
    token kept, unknown ids never sampled. Written against vLLM 0.32–0.33's V1 engine run in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, or the model lives in another process); tests/test_vllm_contract.py
    holds the facts of vLLM's source this relies on.
    """

    def __init__(self, path, tokenizer, gpu_memory_utilization=0.3, seed=0, dtype=torch.bfloat16):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # set, not defaulted: with 1 the weights cannot be pushed
        from vllm import LLM
        source = str(resolve_checkpoint(path)) if Path(path).exists() else path
        state, threads = rng_state(), torch.get_num_threads()   # the engine reseeds every global RNG, and sets
        self.llm = LLM(model=source, tokenizer=source, dtype=str(dtype).removeprefix("torch."), seed=seed,
                       enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization)
        set_rng_state(state)                                     # torch to one thread: both put back
        torch.set_num_threads(threads)
        self.tokenizer, self.stops, self.dtype = tokenizer, stop_token_ids(tokenizer), dtype
        # the rows no token owns (Qwen: 271) get vLLM's lowest bias, −100; allowed_token_ids would need all
        # 151 665 ids, and vLLM takes at most 1 024 there (and in logit_bias)
        self.unknown = {i: -100.0 for i in range(len(tokenizer), self.llm.model_config.get_vocab_size())} or None

    def load_weights(self, model):
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)
        weights = ((name, p.detach().to(self.dtype)) for name, p in model.state_dict().items())   # the engine's dtype
        worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()   # cached prefixes hold the old weights' keys and values

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, repetition_penalty=1.0):
        from vllm import SamplingParams
        params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, top_k=-1,
                                repetition_penalty=repetition_penalty, max_tokens=max_new_tokens,
                                stop_token_ids=self.stops, skip_special_tokens=False, logit_bias=self.unknown)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        completions = [list(out.outputs[0].token_ids) for out in outputs]   # a stop token is kept, as in `generate`
        return completions, [out.outputs[0].finish_reason == "stop" for out in outputs]


def make_sampler(tokenizer, path, model=None, use_vllm=True, gpu_memory_utilization=0.3, seed=0):
    """(sample, engine): sample(prompt_ids, max_new_tokens, temperature, top_p, repetition_penalty) → (completions, stopped).

    vLLM when asked for, installed, on CUDA, and the model has a path or hub id (engine: the VLLMSampler, for
    `load_weights`); otherwise transformers' `generate` on `model` (engine None), which is loaded from `path`
    only then. A vLLM that is installed but fails to import is an error, not a silent fallback.
    """
    device, dtype = device_and_dtype()
    if use_vllm and device == "cuda" and path not in testbed.NAMES:
        if importlib.util.find_spec("vllm") is None:
            print("vLLM is not installed: sampling with transformers' generate")
        else:
            engine = VLLMSampler(path, tokenizer, gpu_memory_utilization, seed=seed, dtype=dtype)
            return engine.generate, engine
    model = model if model is not None else load_model(path, tokenizer, seed=seed)
    return (lambda ids, **kw: generate(model, tokenizer, ids, **kw)), None


# ------------------------------------------------------------------------------ seeding, saving, logs

def warmup_cosine(step, total, warmup_steps, floor=0.1):
    """Learning-rate multiplier: linear warmup from 0, then cosine from 1 down to `floor`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))


def adamw(model, lr, weight_decay=0.0):
    """Fused AdamW over the model's trainable parameters; decay only matrices (and the embedding), never biases or
    norm gains (HF/TRL's convention). Fused: one kernel per step, no full-size temporaries."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, step, model, tokenizer, args, trainer_state, keep=2):
    """Write out_dir/step-N atomically: a temporary directory, then one rename. Keep the newest `keep`.

    The saved generation config names every stop id we sample with (<|im_end|> and <|endoftext|>).

    A kill -9 during the save leaves a `.tmp-*` directory that loading ignores, never a half checkpoint
    (an old checkpoint, too, is renamed out of sight before it is deleted).
    trainer_state holds what resuming needs (optimizer, scheduler, RNG states, step).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = out_dir / f"step-{step}", out_dir / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if getattr(model, "generation_config", None) is not None:   # so a stock harness (vLLM, pipeline) stops where we do
        model.generation_config.eos_token_id = stop_token_ids(tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    torch.save({**trainer_state, "step": step}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(out_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        os.replace(old, out_dir / f".tmp-old-{old.name}")  # out of sight first, then deleted
    for stale in out_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_trainer_state(checkpoint_dir):
    return torch.load(Path(checkpoint_dir) / "trainer_state.pt", weights_only=False)


def log_metrics(out_dir, step, total, metrics):
    """One line on stdout (`step  40/500 | loss 0.412 | ... | 3.1 s`); the same record into metrics.jsonl."""
    parts = [f"step {step:>{len(str(total))}}/{total}"]
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "time"]
    if "time" in metrics:
        parts.append(f"{metrics['time']:.1f} s")
    print(" | ".join(parts), flush=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics, "wall": time.time()}) + "\n")
