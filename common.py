"""What the trainers share: loading, tokenisation and masks, log-probs, optimiser, checkpoints, logs.

Every correctness-critical piece lives here once: the completion mask (built from lengths, never from token ids:
Qwen's pad token is its EOS), the shift by one between logits and labels, the temperature applied to log-probs of
sampled text, the end-of-turn token inside the loss. No losses, no training loops: those are in the trainers.
How completions are drawn (our decoding loop, or the vLLM engine) is sampling.py.
"""
import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import testbed
from tools import response_pieces
from distributed import (all_rng_states, all_sum, barrier, end_processes, my_share, rank_and_world,  # noqa: F401
                         restore_rng_states, rng_state, seed_everything, set_rng_state, start_processes,  # noqa: F401
                         sync_if, training_forward)  # noqa: F401
# What the user hands in (flags, files, puzzles) is read and checked in inputs.py; the trainers import it from here.
from inputs import (SFT_RUNS, InputError, check_args, checkpoints, hold_out, hub_dataset,  # noqa: F401
                    hub_reachable, load_puzzles, locate, parse_args, preference_pairs, puzzle,  # noqa: F401
                    read_jsonl, resolve_checkpoint, run, run_dir, sft_run)  # noqa: F401
from testbed import END_OF_TEXT, IM_END

QWEN = "Qwen/Qwen2.5-0.5B"
SYSTEM_PROMPT = "You are a helpful assistant."  # the one system turn of every chat prompt, train and eval


# -------------------------------------------------------------------------------------------- loading

def device_and_dtype():
    """(device, compute dtype): cuda + bf16 where the card computes in it (Ampere and newer), cuda + fp16 on older
    cards (Colab's T4, V100); cpu + bf16 where the CPU computes in it (AMX tiles or AVX-512 BF16), else cpu + fp32:
    elsewhere bf16 is emulated (an AVX2 EPYC: 1 GFLOP/s against 159 in fp32). RL_CPU_BF16=0 or 1 overrides the
    CPU's choice (the tests set 0: the same arithmetic on every machine). Trainers keep fp32 weights and autocast."""
    if not torch.cuda.is_available():
        forced = os.environ.get("RL_CPU_BF16", "")
        bf16 = forced == "1" if forced in ("0", "1") else cpu_computes_bf16()
        return "cpu", torch.bfloat16 if bf16 else torch.float32
    return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def cpu_computes_bf16():
    """Whether this CPU multiplies bf16 matrices in hardware: Intel's AMX tiles (Sapphire Rapids on), AVX-512 BF16."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def mixed_precision(device, dtype):
    """A trainer's autocast context, gradient scaler and a label for its first log line, for device_and_dtype()'s
    choice: bf16 autocast; fp16 autocast with loss scaling (fp16 gradients underflow unscaled); or plain fp32."""
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    label = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}.get(dtype, "fp32")
    return autocast, scaler, f"{device}, {label}"


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
    """A causal LM in eval mode, by default in device_and_dtype()'s dtype (trainers ask for fp32 master weights).

    `tiny` and `qwen-random` (Qwen2.5-0.5B's shape) are seeded random models built in-process (testbed.py).
    reward=True: a one-output sequence classifier (a new scalar head on a causal trunk, or an encoder).
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
    config = model.config
    if device == "cpu" and getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads):
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
        AttentionInterface.register("sdpa_gqa", _sdpa_gqa)
        AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)   # the masks "sdpa" gets (padding included)
        model.set_attn_implementation("sdpa_gqa")
    return model.to(device).eval()


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **_):
    """transformers' "sdpa" attention without copying the key/value heads of grouped-query attention: with a padding
    mask it repeats them (repeat_kv) before calling SDPA, which on the CPU makes decoding 2.5× slower (SmolLM2-135M,
    64 prompts; `python bench/step_cost.py`); torch's SDPA reads the groups in place (enable_gqa). The CPU's only."""
    causal = query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None else module.is_causal)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def stop_token_ids(tokenizer):
    """Token ids that end a completion: the EOS, <|im_end|> and <|endoftext|> (Qwen's EOS and pad), those the
    tokenizer has (SmolLM2's <|endoftext|> is also its unknown token: a real token, and a stop)."""
    ids = {tokenizer.convert_tokens_to_ids(t): t for t in (IM_END, END_OF_TEXT)}
    real = [i for i, t in ids.items() if i is not None and tokenizer.convert_ids_to_tokens(i) == t]
    return sorted({tokenizer.eos_token_id, *real} - {None})


# ------------------------------------------------------------------------------------- tokenisation

def chat_prompt(tokenizer, user_text):
    """The chat-template prompt for one user turn, with our fixed system turn, ending '<|im_start|>assistant\\n'."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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

    A tool response in the completion (<tool_response>…</tool_response>, tools.py) was written by the harness:
    the text is cut around it, each piece tokenised alone (as the tool loop appends it), and "spans" lists the
    [start, end) token ranges of everything else, the model's; collate's completion_mask covers those only.
    """
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if completion is None:
        return {"input_ids": prompt_ids, "prompt_len": len(prompt_ids)}
    pieces = response_pieces(completion)
    ids, spans = list(prompt_ids), []
    for piece, harness in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if not harness:
            spans.append((len(ids), len(ids) + len(piece_ids)))
        ids += piece_ids
    if end:   # the end of turn (or of text) is the model's
        ids.append(tokenizer.convert_tokens_to_ids(IM_END) if chat else tokenizer.eos_token_id)
        spans.append((len(ids) - 1, len(ids)))
    example = {"input_ids": ids, "prompt_len": len(prompt_ids)}
    return {**example, "spans": spans} if any(harness for _, harness in pieces) else example


def collate(examples, pad_id):
    """Right-pad a list of `encode` outputs. Masks come from lengths, never from token ids.

    attention_mask: 1 on the real tokens; completion_mask: 1 on the completion tokens (end token included), or,
    where an example has "spans" (a tool-use completion), on those [start, end) ranges only: the model's tokens.
    """
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    positions = torch.arange(int(lengths.max()))[None, :]
    input_ids = torch.full((len(examples), positions.shape[1]), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for i, e in enumerate(examples):
        input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        for start, end in e["spans"] if "spans" in e else [(e["prompt_len"], len(e["input_ids"]))]:
            completion_mask[i] |= (positions[0] >= start) & (positions[0] < end)
    attention_mask = positions < lengths[:, None]
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "completion_mask": completion_mask}


def length_grouped_batches(lengths, batch_size, seed, group=64):
    """Index batches of similar length (little padding) in a seeded random order: shuffle, cut into groups of
    `group` batches, sort each group by length, batch it, shuffle the batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * group):
        chunk = sorted(order[start:start + batch_size * group], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# Flags a resumed run may change: they decide what is logged and kept, and how fast, not what is trained.
RESUMABLE = {"resume", "out_dir", "log_every", "eval_every", "save_every", "sample_every", "vllm", "vllm_memory",
             "gradient_checkpointing"}


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
    if metrics.exists() and rank_and_world()[0] == 0:
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


def save_checkpoint(out_dir, step, model, tokenizer, args, trainer_state, keep=2):
    """Write out_dir/step-N atomically: a temporary directory, then one rename. Keep the newest `keep`.
    Every process calls it (it gathers their RNG states into the trainer state); rank 0 alone writes.

    The saved generation config names every stop id we sample with (<|im_end|> and <|endoftext|>).

    A kill -9 during the save leaves a `.tmp-*` directory that loading ignores, never a half checkpoint
    (an old checkpoint, too, and one saved again at the same step, is renamed out of sight before it is deleted).
    trainer_state holds what resuming needs (optimizer, scheduler, step; the RNG states are added).
    """
    trainer_state = {**trainer_state, "rng": all_rng_states()}
    if rank_and_world()[0] != 0:
        return None
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
    for old in checkpoints(out_dir)[:-keep]:
        os.replace(old, out_dir / f".tmp-old-{old.name}-{os.getpid()}")  # out of sight first, then deleted
    for stale in out_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_trainer_state(checkpoint_dir):
    return torch.load(Path(checkpoint_dir) / "trainer_state.pt", weights_only=False)


def log_metrics(out_dir, step, total, metrics):
    """One line on stdout (`step  40/500 | loss 0.412 | ... | 3.1 s`); the same record into metrics.jsonl (rank 0)."""
    if rank_and_world()[0] != 0:
        return
    parts = [f"step {step:>{len(str(total))}}/{total}"]
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "time"]
    if "time" in metrics:
        parts.append(f"{metrics['time']:.1f} s")
    print(" | ".join(parts), flush=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics, "wall": time.time()}) + "\n")
