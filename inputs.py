"""What the user hands in, read and checked: flags (the CLI, every numeric flag's range), JSONL files, preference
pairs (UltraFeedback's schema), Countdown puzzles, where a --model lives (a directory or a hub id), hub datasets. Bad input is an InputError: the scripts print it as
one line naming the flag, file or row, and exit 2.

The trainers import these through common.py, their one import.
"""
import argparse
import dataclasses
import inspect
import io
import json
import math
import os
import re
import socket
import sys
import tokenize
from pathlib import Path


class InputError(ValueError):
    """Bad user input (a file, a row, a flag): scripts print it as one line and exit 2."""


# ------------------------------------------------------------------------------------------------ flags

def run(main, args_class):
    """The command-line entry point of a script: parse the flags, run, and turn an InputError into one line."""
    args = parse_args(args_class)
    try:
        main(args)
    except InputError as e:
        if os.environ.get("RANK", "0") == "0":   # under torchrun every process stops; rank 0 says why
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


_POSITIVE, _COUNT = (lambda v: 0 < v < math.inf, "> 0"), (lambda v: v >= 1, "≥ 1")
_NON_NEGATIVE, _OFF_OR_MORE = (lambda v: 0 <= v < math.inf, "≥ 0"), (lambda v: v >= 0, "≥ 0 (0: off)")
_SHARE = (lambda v: 0 <= v < 1, "in [0, 1)")
# The valid values of every numeric flag of every script, by name (a name means the same everywhere).
FLAG_RANGES = {
    "lr": _POSITIVE, "beta": _POSITIVE, "pair_temperature": _POSITIVE, "repetition_penalty": _POSITIVE,
    "weight_decay": _NON_NEGATIVE, "kl_coef": _NON_NEGATIVE, "epochs": _NON_NEGATIVE, "overlong_penalty": _NON_NEGATIVE,
    "call_penalty": _NON_NEGATIVE, "invalid_call_penalty": _NON_NEGATIVE,
    "temperature": (lambda v: 0 <= v < math.inf, "≥ 0 (0: greedy)"),
    "grad_clip": (lambda v: v > 0, "> 0 (inf: no clipping)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "vllm_memory": (lambda v: 0 < v < 1, "in (0, 1)"),
    "warmup": _SHARE, "rlaif_drop": _SHARE,
    "batch_size": _COUNT, "grad_accum": _COUNT, "max_len": _COUNT, "max_new_tokens": _COUNT, "pair_max_tokens": _COUNT,
    "log_every": _COUNT, "save_every": _COUNT, "synthetic_rows": _COUNT, "pair_prompts": _COUNT, "n_prompts": _COUNT,
    "prompts_per_step": _COUNT, "micro_prompts": _COUNT, "samples": _COUNT, "n": _COUNT,
    "k": (lambda v: v >= 2, "≥ 2 (the leave-one-out baseline)"), "pair_samples": (lambda v: v >= 2, "≥ 2 (a pair)"),
    "steps": (lambda v: v >= 0, "≥ 0"), "eval_rows": (lambda v: v >= 0, "≥ 0"), "eval_prompts": (lambda v: v >= 0, "≥ 0"),
    "eval_every": _OFF_OR_MORE, "sample_every": _OFF_OR_MORE, "max_calls": (lambda v: 0 <= v <= 64, "in [0, 64]"),
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
    steps = checkpoints(out)
    if resume and not steps:
        raise InputError(f"--resume: no checkpoint (step-N) in {out}")
    if not resume and (steps or (out / "metrics.jsonl").exists()):
        raise InputError(f"--out-dir {out} holds a run ({steps[-1].name if steps else 'metrics.jsonl'}): continue it "
                         f"with --resume, or give another --out-dir")
    return out


# ------------------------------------------------------------------------------------------------ files

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


def hub_reachable(timeout=3.0):
    """False when offline (HF_HUB_OFFLINE) or when the hub's host does not answer within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def checkpoints(run_dir):
    """The run's checkpoints, oldest first: folders named exactly step-<integer> as save_checkpoint writes it (ASCII
    digits, no leading zero). Anything else (a user's copy `step-66-good`, a `step-best`, a `step-03`) is not the
    run's: never read as a checkpoint, never rotated away."""
    found = [p for p in Path(run_dir).glob("step-*") if re.fullmatch(r"step-(0|[1-9][0-9]*)", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# ---------------------------------------------------------------------------------------- --model

def resolve_checkpoint(path):
    """A model (or tokenizer) directory, or a run directory (out_dir of a trainer): then its newest complete checkpoint."""
    path = Path(path)
    if (path / "config.json").exists() or (path / "tokenizer_config.json").exists():
        return path
    steps = checkpoints(path)
    if not steps:
        raise InputError(f"{path}: not a model directory (no config.json) and no step-N checkpoint inside")
    return steps[-1]


def locate(name):
    """Where to load `name` from: a local directory (a run directory: its newest checkpoint), `smollm2` or a .gguf
    file (converted once to a cached directory: testbed.py), or a hub id the hub can serve (cached, or reachable
    now). Anything else is one line, at once: no retries against an unreachable hub."""
    path = Path(name).expanduser()
    if name == "smollm2" or name.endswith(".gguf") and path.is_file():
        import testbed
        try:
            return str(testbed.smollm2_dir() if name == "smollm2" else testbed.gguf_dir(path))
        except testbed.Unavailable as e:
            raise InputError(str(e)) from None
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{name}: a file, not a model directory")
        return str(resolve_checkpoint(path))
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name.split("/")[0]).is_dir()
    if looks_like_path:
        raise InputError(f"{name}: no such directory")
    from huggingface_hub import try_to_load_from_cache
    if not isinstance(try_to_load_from_cache(name, "config.json"), str) and not hub_reachable():
        raise InputError(f"{name}: no such directory, and the hub cannot be reached to fetch it (offline?)")
    return name


def hub_dataset(name, split):
    """A split of a hub dataset, or one line saying the hub cannot be reached (offline, and not cached)."""
    from datasets import load_dataset
    try:
        return load_dataset(name, split=split)
    except (ConnectionError, OSError) as e:
        raise InputError(f"cannot load the hub dataset {name} ({split}): {str(e).splitlines()[0][:160]}") from None
