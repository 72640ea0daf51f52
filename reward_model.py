"""Bradley–Terry reward model (spec §1.4.3, Eq. 9; Eq. 1 and 3) on UltraFeedback or a local preference file.

    python reward_model.py --model out/sft-smoltalk                  # Qwen trunk + scalar head (GPU)
    python reward_model.py --model microsoft/deberta-v3-base --lr 2e-5 --out-dir out/rm-deberta   # an encoder (report 001)
    python reward_model.py --model tiny --data tests/fixtures/ultrafeedback.jsonl --steps 20   # CPU, offline

    from reward_model import load, score
    rm, tok = load("out/rm"); score(rm, tok, ["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."])

Eq. 9: maximise E log σ(r_φ(x, y_w) − r_φ(x, y_l)); the loss is its negation, averaged over pairs.
The reward is one scalar per sequence: a causal-LM trunk's head is read at the last real token (found
from lengths, never by looking for a pad id), an encoder's from its own pooling. `score` formats text
exactly as training does (chat template, fixed system turn, closing <|im_end|>), so a response scores
the same at evaluation as in a training batch. Pairwise accuracy on the held-out pairs is reported.

Deviations from the spec: none in the objective.
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common import (InputError, adamw, all_sum, check_args, collate, device_and_dtype, encode, end_processes,
                    hold_out, length_grouped_batches, load_model, load_tokenizer, log_metrics, mixed_precision,
                    my_share, preference_pairs, resolve_checkpoint, restore_rng_states, resume_point, run, run_dir,
                    save_checkpoint, seed_everything, start_processes, sync_if, training_forward, warmup_cosine)


@dataclass
class Args:
    model: str = "Qwen/Qwen2.5-0.5B"  # trunk: causal LM (hub id, directory, run directory), an encoder, or `tiny`
    data: str = "ultrafeedback"       # ultrafeedback (train_prefs) or a .jsonl with prompt, chosen, rejected
    eval_data: str = ""               # held-out .jsonl; default: test_prefs, or a file's last eval_rows pairs
    out_dir: str = "out/rm"           # checkpoints (step-N/) and metrics.jsonl
    max_len: int = 1024               # token budget of prompt + response; longer pairs are dropped and counted
    batch_size: int = 8               # pairs per micro-batch (2 × sequences)
    grad_accum: int = 4               # micro-batches per optimizer step
    epochs: float = 1.0               # passes over the pairs; sets the step count when --steps is 0
    steps: int = 0                    # optimizer steps (0: from --epochs)
    lr: float = 1e-5                  # AdamW peak learning rate
    warmup: float = 0.03              # share of steps with linear warmup; then cosine decay to lr/10
    grad_clip: float = 1.0            # max global gradient norm
    weight_decay: float = 0.0         # AdamW decay of weight matrices, never biases or norms (HF/TRL: 0)
    log_every: int = 10               # steps between log lines
    eval_every: int = 100             # steps between held-out accuracies; 0: none
    eval_rows: int = 500              # held-out pairs
    save_every: int = 200             # steps between checkpoints
    seed: int = 0                     # seeds data order and the head's initialisation
    resume: bool = False              # continue from out_dir's newest checkpoint
    gradient_checkpointing: bool = False # recompute each layer in backward: activations ÷ ~10, ~⅓ more compute


def bt_loss(r_chosen, r_rejected):
    """Eq. 9, negated: −log σ(r_φ(x, y_w) − r_φ(x, y_l)), averaged over pairs (per-pair normalisation)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def encode_pair(tokenizer, prompt, response, chat=True, end=True):
    """A (prompt, response) as the reward model reads it. Causal trunks use common.encode (the chat
    template and the end-of-turn token; end=False: a response cut at the length limit, scored without
    the end it never produced); encoders without a chat template use their own pair format."""
    if tokenizer.chat_template is None:
        return {"input_ids": tokenizer(prompt, response)["input_ids"], "prompt_len": 0}
    return encode(tokenizer, prompt, response, chat=chat, end=end)


def rewards(model, input_ids, attention_mask, **_):
    """One scalar per sequence: a causal trunk's head at the last real token (from lengths), else the encoder's."""
    if not hasattr(model, "score"):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(1) - 1
    return model.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


@torch.no_grad()
def score(model, tokenizer, prompts, responses, chat=True, ends=None, batch_size=16):
    """Rewards for (prompt, response) pairs, formatted exactly as in training; a (n,) float tensor on the CPU.

    ends[i] False: response i was cut at the length limit; it is scored as sampled, without an end-of-turn
    token, so the reward model can see it never finished (rloo.py's --overlong-penalty can add a cost).
    """
    amp_dtype = device_and_dtype()[1]   # bf16 where the GPU has it; autocast below takes the model's own device
    ends = [True] * len(prompts) if ends is None else list(ends)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = zip(prompts[start:start + batch_size], responses[start:start + batch_size], ends[start:start + batch_size])
        examples = [encode_pair(tokenizer, p, r, chat, end) for p, r, end in chunk]
        batch = {k: v.to(model.device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
        with torch.autocast(model.device.type, dtype=amp_dtype, enabled=model.device.type == "cuda"):
            out.append(rewards(model, **batch).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def load(path, device=None):
    """A trained reward model and its tokenizer (a directory or a run directory), ready for `score`.

    A checkpoint that is not a sequence classifier (a causal LM, an SFT run) is refused: loading it as one
    would score with a randomly initialised head."""
    config = resolve_checkpoint(path) / "config.json" if Path(path).is_dir() else None
    if config is not None:
        architectures = (json.loads(config.read_text()).get("architectures") if config.exists() else None) or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise InputError(f"{path}: not a reward model ({', '.join(architectures) or 'no architecture'}): its score "
                             f"head was never trained; train one with reward_model.py")
    tokenizer = load_tokenizer(str(path))
    return load_model(str(path), tokenizer, device=device, reward=True), tokenizer


# ----------------------------------------------------------------------------------------------- data

def encode_pairs(tokenizer, pairs, max_len):
    """[(chosen example, rejected example)], and the number of pairs dropped for length."""
    encoded, dropped = [], 0
    for p in pairs:
        both = tuple(encode_pair(tokenizer, p["prompt"], p[k], p.get("chat", True)) for k in ("chosen", "rejected"))
        if max(len(e["input_ids"]) for e in both) > max_len:
            dropped += 1
            continue
        encoded.append(both)
    return encoded, dropped


def load_pairs(args):
    train = preference_pairs(args.data)
    if args.eval_data:
        held = preference_pairs(args.eval_data)
    elif args.data == "ultrafeedback":
        held = preference_pairs("ultrafeedback", split="test_prefs")
    else:
        train, held = hold_out(train, args.eval_rows)
    return train, held[:args.eval_rows]


@torch.no_grad()
def pairwise_accuracy(model, pairs, pad_id, batch_size, autocast):
    """Share of held-out pairs whose chosen response gets the higher reward, and the mean BT loss."""
    correct, loss = 0, 0.0
    for start in tqdm(range(0, len(pairs), batch_size), desc="held-out", leave=False, disable=len(pairs) < 500):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(model.device) for k, v in collate([c for c, _ in chunk] + [r for _, r in chunk], pad_id).items()}
        with autocast:
            r = rewards(model, **batch)
        rc, rr = r[:len(chunk)], r[len(chunk):]
        correct += (rc > rr).sum().item()
        loss += bt_loss(rc, rr).item() * len(chunk)
    return correct / max(len(pairs), 1), loss / max(len(pairs), 1)


# ----------------------------------------------------------------------------------------------- main

def main(args):
    # 1. setup (under torchrun, this process is one of `world`: see distributed.py)
    check_args(args)
    rank, world = start_processes()
    my_share(range(args.grad_accum), args.grad_accum, "--grad-accum")   # a step's micro-batches divide among them
    seed_everything(args.seed)
    device, amp_dtype = device_and_dtype()
    autocast, scaler, precision = mixed_precision(device, amp_dtype)
    out_dir = run_dir(args.out_dir, args.resume)

    # 2. data
    tokenizer = load_tokenizer(args.model)
    train_pairs, held_pairs = load_pairs(args)
    train, dropped = encode_pairs(tokenizer, train_pairs, args.max_len)
    held, _ = encode_pairs(tokenizer, held_pairs, args.max_len)
    if not train:
        raise InputError(f"no preference pairs left in --data {args.data} (dropped for length: {dropped})")
    per_step = args.batch_size * args.grad_accum
    total = args.steps or max(1, math.ceil(args.epochs * len(train) / per_step))
    print(f"{len(train)} training pairs ({dropped} dropped over {args.max_len} tokens), {len(held)} held out | "
          f"{args.batch_size} × {args.grad_accum} = {per_step} pairs per step"
          f"{f' over {world} processes' if world > 1 else ''} | {total} steps | {precision}")

    # 3. model, optimizer, schedule
    source, state = resume_point(out_dir, args) if args.resume else (args.model, None)
    start_step = state["step"] if state else 0
    model = load_model(str(source), tokenizer, dtype=torch.float32, device=device, seed=args.seed, reward=True).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scorer = training_forward(rewards, model)   # DDP over the reward head's forward with several processes
    optimizer = adamw(model, args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, max(1, int(args.warmup * total))))
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"])
    lengths = [max(len(c["input_ids"]), len(r["input_ids"])) for c, r in train]
    stream = (b for epoch in range(10 ** 9) for b in length_grouped_batches(lengths, args.batch_size, args.seed * 1_000_003 + epoch))
    for _ in range(start_step * args.grad_accum):
        next(stream)

    def save(step):
        return save_checkpoint(out_dir, step, model, tokenizer, args, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})

    def evaluate(step):
        model.eval()
        acc, loss = pairwise_accuracy(model, held, tokenizer.pad_token_id, args.batch_size, autocast)
        model.train()
        log_metrics(out_dir, step, total, {"eval_loss": loss, "eval_acc": acc})

    # 4. loop: chosen and rejected of a micro-batch go through the model together; each process takes its share of
    # the step's micro-batches, the loss is the mean over the step's pairs, all processes'
    if rank == 0 and held and args.eval_every and start_step == 0:
        evaluate(0)
    tick = time.time()
    for step in range(start_step + 1, total + 1):
        groups = [[train[i] for i in next(stream)] for _ in range(args.grad_accum)]
        n_pairs = sum(map(len, groups))
        mine = my_share(groups, args.grad_accum, "--grad-accum")
        step_loss, correct, margin = 0.0, 0, 0.0
        for i, pairs in enumerate(mine):
            batch = {k: v.to(device) for k, v in collate([c for c, _ in pairs] + [r for _, r in pairs], tokenizer.pad_token_id).items()}
            with sync_if(i == len(mine) - 1, scorer):   # gradients all-reduced once, on the last micro-batch
                with autocast:
                    r = scorer(**batch)
                rc, rr = r[:len(pairs)], r[len(pairs):]
                loss = bt_loss(rc, rr) * len(pairs) / (n_pairs / world)  # the step's mean; DDP averages over the world
                scaler.scale(loss).backward()
            step_loss += loss.item()
            correct += (rc > rr).sum().item()
            margin += (rc - rr).sum().item()
        step_loss, correct, margin = all_sum(torch.tensor([step_loss / world, correct, margin], dtype=torch.float64)).tolist()
        if not math.isfinite(step_loss):
            raise SystemExit(f"reward_model.py: loss is {step_loss} at step {step}; stopped before the update")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = scheduler.get_last_lr()[0]   # the rate this step uses; scheduler.step() moves to the next
        scaler.step(optimizer)   # skipped when fp16 gradients overflowed; the scale then shrinks
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == total:
            log_metrics(out_dir, step, total, {"loss": step_loss, "acc": correct / n_pairs, "margin": margin / n_pairs,
                                               "lr": lr, "time": time.time() - tick})
            tick = time.time()
        if rank == 0 and held and args.eval_every and (step % args.eval_every == 0 or step == total):
            evaluate(step)
        if step % args.save_every == 0 and step != total:
            save(step)

    # 5. final save
    path = save(total)
    print(f"saved {path}")
    end_processes()
    return model, tokenizer


if __name__ == "__main__":
    run(main, Args)
