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
import math
import os
import random
import re
import shutil
import socket
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
        raise InputError(f"{path}: not a model directory (no config.json) and no step-N checkpoint inside")
    return steps[-1]


def locate(name):
    """Where to load `name` from: a local directory (a run directory: its newest checkpoint) or a hub id the hub can
    serve (cached, or reachable now). Anything else is one line, at once: no retries against an unreachable hub."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{name}: a file, not a model directory")
        return str(resolve_checkpoint(path))
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name.split("/")[0]).is_dir()
    if looks_like_path:
        raise InputError(f"{name}: no such directory")
    from huggingface_hub import try_to_load_from_cache
    if not isinstance(try_to_load_from_cache(name, "config.json"), str) and not _hub_reachable():
        raise InputError(f"{name}: no such directory, and the hub cannot be reached to fetch it (offline?)")
    return name


def _hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_dataset(name, split):
    """A split of a hub dataset, or one line saying the hub cannot be reached (offline, and not cached)."""
    from datasets import load_dataset
    try:
        return load_dataset(name, split=split)
    except (ConnectionError, OSError) as e:
        raise InputError(f"cannot load the hub dataset {name} ({split}): {str(e).splitlines()[0][:160]}") from None


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
    source = locate(name)
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
        source = locate(name)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype, trust_remote_code=False)
        if model.config.pad_token_id is None and tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        source = locate(name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    if device == "cpu" and name not in testbed.NAMES:
        for param in model.parameters():   # own, aligned memory: loaded tensors are views into the file's buffer at
            param.data = param.data.clone()  # any offset, and CPU kernels round differently on unaligned data
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


_POSITIVE, _COUNT = (lambda v: 0 < v < math.inf, "> 0"), (lambda v: v >= 1, "≥ 1")
_NON_NEGATIVE, _OFF_OR_MORE = (lambda v: 0 <= v < math.inf, "≥ 0"), (lambda v: v >= 0, "≥ 0 (0: off)")
_SHARE = (lambda v: 0 <= v < 1, "in [0, 1)")
# The valid values of every numeric flag of every script, by name (a name means the same everywhere).
FLAG_RANGES = {
    "lr": _POSITIVE, "beta": _POSITIVE, "pair_temperature": _POSITIVE, "repetition_penalty": _POSITIVE,
    "weight_decay": _NON_NEGATIVE, "kl_coef": _NON_NEGATIVE, "epochs": _NON_NEGATIVE, "overlong_penalty": _NON_NEGATIVE,
    "temperature": (lambda v: 0 <= v < math.inf, "≥ 0 (0: greedy)"),
    "grad_clip": (lambda v: v > 0, "> 0 (inf: no clipping)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "vllm_memory": (lambda v: 0 < v < 1, "in (0, 1)"),
    "warmup": _SHARE, "rlaif_drop": _SHARE,
    "batch_size": _COUNT, "grad_accum": _COUNT, "max_len": _COUNT, "max_new_tokens": _COUNT, "pair_max_tokens": _COUNT,
    "log_every": _COUNT, "save_every": _COUNT, "synthetic_rows": _COUNT, "pair_prompts": _COUNT, "n_prompts": _COUNT,
    "prompts_per_step": _COUNT, "micro_prompts": _COUNT, "samples": _COUNT, "n": _COUNT,
    "k": (lambda v: v >= 2, "≥ 2 (the leave-one-out baseline)"), "pair_samples": (lambda v: v >= 2, "≥ 2 (a pair)"),
    "steps": (lambda v: v >= 0, "≥ 0"), "eval_rows": (lambda v: v >= 0, "≥ 0"), "eval_prompts": (lambda v: v >= 0, "≥ 0"),
    "eval_every": _OFF_OR_MORE, "sample_every": _OFF_OR_MORE,
    "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2³²)"), "skip": (lambda v: v >= -1, "≥ 0, or -1 (the default)"),
}


def check_args(args):
    """Every numeric flag against FLAG_RANGES, before any work: one line naming the flag and its valid values."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.name in FLAG_RANGES and not isinstance(value, bool) and isinstance(value, (int, float)):
            valid, text = FLAG_RANGES[field.name]
            if not valid(value):
                raise InputError(f"--{field.name.replace('_', '-')} {value}: must be {text}")


# Flags a resumed run may change: they decide what is logged and kept, and how fast, not what is trained.
RESUMABLE = {"resume", "out_dir", "log_every", "eval_every", "save_every", "sample_every", "vllm", "vllm_memory",
             "gradient_checkpointing"}


def run_dir(out_dir, resume=None):
    """out_dir as a Path, checked before any work: named, and not a file. For a trainer (resume True/False) also: a
    run already there (step-N, metrics.jsonl) needs --resume, and --resume needs a checkpoint there. A new run on an
    old one's directory would rotate away its own checkpoints (the old ones are newer by number) and mix the logs."""
    if not str(out_dir).strip():
        raise InputError("--out-dir is empty: name the run's directory")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out-dir {out}: a file, not a directory")
    if resume is None:
        return out
    steps = sorted(out.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if resume and not steps:
        raise InputError(f"--resume: no checkpoint (step-N) in {out}")
    if not resume and (steps or (out / "metrics.jsonl").exists()):
        raise InputError(f"--out-dir {out} holds a run ({steps[-1].name if steps else 'metrics.jsonl'}): continue it "
                         f"with --resume, or give another --out-dir")
    return out


def resume_point(out_dir, args):
    """(checkpoint, trainer state) a run continues from: its newest checkpoint, made with the same flags (RESUMABLE
    may change). Metrics logged after that checkpoint are dropped: the resumed run logs those steps again."""
    source = resolve_checkpoint(out_dir)
    saved = json.loads((source / "args.json").read_text())
    changed = [k for k, v in dataclasses.asdict(args).items() if k not in RESUMABLE and k in saved and saved[k] != v]
    if changed:
        shown = "; ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved[k]})" for k in changed[:3])
        raise InputError(f"--resume with other flags: {shown}. Resume with the run's flags, or give another --out-dir")
    state = load_trainer_state(source)
    metrics = Path(out_dir) / "metrics.jsonl"
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines() if _step(line) is not None and _step(line) <= state["step"]]
        tmp = metrics.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)
    return source, state


def _step(line):
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):   # a line torn by a kill
        return None


def hold_out(rows, wanted):
    """(training rows, held-out rows): the last `wanted` rows, at most a tenth of them, so a small file still trains
    (the trainers' first line says how many were held out)."""
    n = min(wanted, len(rows) // 10)
    return rows[:len(rows) - n], rows[len(rows) - n:]


def read_jsonl(path, required=()):
    """Rows (JSON objects) of a JSONL file; a bad line, a row that is not an object, a missing column or a file that
    is not UTF-8 is an InputError naming file, row and column."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:   # JSONDecodeError, and integers of over 4 300 digits
                    raise InputError(f"{path}, row {number}: not valid JSON ({getattr(e, 'msg', e)})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}, row {number}: not a JSON object (a {type(row).__name__})")
                missing = [c for c in required if c not in row]
                if missing:
                    raise InputError(f"{path}, row {number}: missing column {missing[0]!r} (has {sorted(row)})")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return rows


def preference_pairs(source, split="train_prefs"):
    """Rows {prompt, chosen, rejected, chat} from UltraFeedback or a local JSONL in its schema.

    `ultrafeedback` is HuggingFaceH4/ultrafeedback_binarized (`train_prefs` / `test_prefs`), where
    chosen and rejected are conversations whose last message is the response; in a local file they
    may also be plain response strings. Raw-text pairs (Countdown) carry "chat": false.
    """
    if source == "ultrafeedback":
        records, name = hub_dataset("HuggingFaceH4/ultrafeedback_binarized", split), "ultrafeedback_binarized"
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
        rows = hub_dataset("Jiayi-Pan/Countdown-Tasks-3to4", "train")
        rows = rows.select(range(min(skip, len(rows)), min(skip + n, len(rows))))
    elif str(source).endswith((".json", ".jsonl")):
        rows = read_jsonl(source) if str(source).endswith(".jsonl") else _read_json_list(source)
        if skip >= len(rows):
            raise InputError(f"{source}: {len(rows)} rows; --skip {skip} leaves none")
        rows = rows[skip:skip + n]
    else:
        raise InputError(f"puzzles {source!r}: use a shape ({', '.join(SHAPES)}), hub, or a .json/.jsonl file")
    return [puzzle(row, f"{source}, row {number}") for number, row in enumerate(rows, skip + 1)]


def _read_json_list(path):
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:   # missing, not UTF-8, not JSON
        raise InputError(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(rows, list):
        raise InputError(f"{path}: a JSON list of puzzles expected")
    return rows


def puzzle(row, where):
    """{"target", "nums"} of a row that names its numbers "nums", "num" (the course) or "numbers", checked, never
    coerced: whole numbers in [0, 10¹²) only (3.9 is not truncated to 3, "12" is not read as [1, 2])."""
    whole = lambda x: not isinstance(x, bool) and (isinstance(x, int) or isinstance(x, float) and x.is_integer()) \
        and 0 <= x < 10 ** 12
    nums = next((row[k] for k in ("nums", "num", "numbers") if k in row), None) if isinstance(row, dict) else None
    if nums is None or "target" not in row:
        raise InputError(f"{where}: needs 'target' and 'nums' (or 'num')")
    if not whole(row["target"]):
        raise InputError(f"{where}: target {str(row['target'])[:24]!r} is not a whole number in [0, 10¹²)")
    if not isinstance(nums, list) or not nums or not all(map(whole, nums)):
        raise InputError(f"{where}: nums {str(nums)[:40]!r} is not a list of whole numbers in [0, 10¹²)")
    return {"target": int(row["target"]), "nums": [int(x) for x in nums]}


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


def make_sampler(tokenizer, path, model=None, use_vllm=True, gpu_memory_utilization=0.3, seed=0, batch_size=64):
    """(sample, engine): sample(prompt_ids, max_new_tokens, temperature, top_p, repetition_penalty) → (completions, stopped).

    vLLM when asked for, installed, on CUDA, and the model has a path or hub id (engine: the VLLMSampler, for
    `load_weights`); otherwise transformers' `generate` on `model` (engine None), which is loaded from `path`
    only then, `batch_size` prompts at a time. A vLLM that is installed but fails to import is an error.
    """
    device, dtype = device_and_dtype()
    if use_vllm and device == "cuda" and path not in testbed.NAMES:
        if importlib.util.find_spec("vllm") is None:
            print("vLLM is not installed: sampling with transformers' generate")
        else:
            engine = VLLMSampler(path, tokenizer, gpu_memory_utilization, seed=seed, dtype=dtype)
            return engine.generate, engine
    model = model if model is not None else load_model(path, tokenizer, seed=seed)
    return (lambda ids, **kw: generate(model, tokenizer, ids, batch_size=batch_size, **kw)), None


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
    (an old checkpoint, too, and one saved again at the same step, is renamed out of sight before it is deleted).
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
    if final.exists():   # saved again at the same step (a resumed, finished run): the old copy goes out of sight first
        os.replace(final, out_dir / f".tmp-old-{final.name}-{os.getpid()}")
    os.replace(tmp, final)
    for old in sorted(out_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        os.replace(old, out_dir / f".tmp-old-{old.name}-{os.getpid()}")  # out of sight first, then deleted
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
