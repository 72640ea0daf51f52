"""Direct preference optimisation (spec §1.4.2, Eq. 7; implicit reward Eq. 4) on UltraFeedback or Countdown.

    python dpo.py --model out/sft-smoltalk                                   # UltraFeedback (GPU)
    python dpo.py --model out/sft --data countdown                           # on-policy Countdown pairs (spec §1.3)
    python dpo.py --model out/sft-smoltalk --rlaif-model out/rm --rlaif-drop 0.2  # RLAIF relabelling (report 000)
    python dpo.py --model tiny --data tests/fixtures/ultrafeedback.jsonl --steps 20 --lr 1e-3   # CPU, offline

Eq. 7: L = −E log σ(β log π_θ(y_w|x)/π_ref(y_w|x) − β log π_θ(y_l|x)/π_ref(y_l|x)), averaged over pairs;
log π(y|x) is the sum of the completion tokens' log-probs (end-of-turn token included), per sequence,
not per token. Chosen and rejected sequences share one forward pass. π_ref is the SFT model: its
log-probs are computed once, in a no-grad pass before training, and only the policy stays in memory.

Countdown pairs: two completions per puzzle (--pair-samples) sampled from the SFT model at a
non-zero temperature, scored by the rule reward; the best and the worst make the pair, ties are
dropped (the spec's only filter: no length budget, the cap is --pair-max-tokens); cached as JSONL in
out_dir so they are built once.

Deviations from the spec: a completion cut at the length limit is scored without an end token it
never produced.
"""
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common import (InputError, adamw, all_sum, barrier, check_args, collate, device_and_dtype, encode, end_processes,
                    hold_out, length_grouped_batches, load_model, load_puzzles, load_tokenizer, log_metrics,
                    mixed_precision, my_share, preference_pairs, rank_and_world, read_jsonl, resolve_checkpoint,
                    restore_rng_states, resume_point, run, run_dir, save_checkpoint, seed_everything,
                    sequence_logprobs, sft_run, start_processes, sync_if, training_forward, warmup_cosine)
from countdown_reward import score_response, warmstart_query
from sampling import make_sampler


@dataclass
class Args:
    model: str = ""                   # π_θ at step 0 and π_ref unless --ref-model; empty: the task's SFT run (out/sft
                                      # for --data countdown, out/sft-smoltalk for ultrafeedback; a file needs --model)
    ref_model: str = ""               # π_ref; empty: --model. Its log-probs are computed once, then it is freed
    data: str = "ultrafeedback"       # ultrafeedback | countdown (on-policy pairs) | a .jsonl with prompt, chosen, rejected
    eval_data: str = ""               # held-out pairs .jsonl; default: test_prefs, or the last eval_rows pairs
    out_dir: str = "out/dpo"          # checkpoints (step-N/), metrics.jsonl, countdown_pairs.jsonl
    beta: float = 0.1                 # β in Eq. 7 (report 000)
    lr: float = 1e-6                  # AdamW peak learning rate (report 000)
    batch_size: int = 4               # pairs per micro-batch (2 × sequences in one forward pass)
    grad_accum: int = 16              # micro-batches per optimizer step
    epochs: float = 1.0               # passes over the pairs; sets the step count when --steps is 0
    steps: int = 0                    # optimizer steps (0: from --epochs)
    warmup: float = 0.1               # share of steps with linear warmup; then cosine decay to lr/10
    grad_clip: float = 1.0            # max global gradient norm
    weight_decay: float = 0.0         # AdamW decay of weight matrices, never biases or norms (HF/TRL: 0)
    max_len: int = 1024               # token budget of prompt + response of file / UltraFeedback pairs; longer ones are
                                      # dropped and counted (sampled Countdown pairs: capped by --pair-max-tokens)
    log_every: int = 10               # steps between log lines
    eval_every: int = 100             # steps between held-out metrics; 0: none
    eval_rows: int = 200              # held-out pairs
    save_every: int = 200             # steps between checkpoints
    seed: int = 0                     # seeds data order, the puzzles and pair sampling
    resume: bool = False              # continue from out_dir's newest checkpoint
    gradient_checkpointing: bool = False # recompute each layer in backward: activations ÷ ~10, ~⅓ more compute
    puzzles: str = "hub"              # Countdown prompts: hub (rows 0…) | a shape (3to4, easy, course; :train/:test/:sft/:rl) | a .jsonl
    pair_prompts: int = 2000          # puzzles sampled for Countdown pairs (one pair per puzzle at most)
    pair_samples: int = 2             # completions per puzzle; the best and the worst form its pair
    pair_temperature: float = 1.0     # sampling temperature of the pairs (spec: non-zero)
    pair_max_tokens: int = 1024       # max new tokens of a sampled completion
    pairs_file: str = ""              # Countdown pair cache; default out_dir/countdown_pairs.jsonl
    vllm: bool = torch.cuda.is_available()  # sample the pairs with vLLM, when installed (default: on CUDA; CPU: --vllm)
    vllm_memory: float = 0.3          # share of GPU memory vLLM may take (a CPU engine: a 2 GiB KV cache)
    rlaif_model: str = ""             # RLAIF: a reward model directory that rescores and reorders every pair
    rlaif_drop: float = 0.0           # RLAIF: share of pairs dropped, those whose better response the RM scores lowest


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Eq. 7, averaged over pairs; also the implicit rewards of Eq. 4 (detached), for logging.

    Each argument is a (pairs,) tensor of per-sequence log-prob sums. Returns
    (loss, chosen_rewards, rejected_rewards), rewards r = β (log π_θ(y|x) − log π_ref(y|x)).
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)        # Eq. 4
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # Eq. 4
    loss = -F.logsigmoid(chosen - rejected).mean()                  # Eq. 7
    return loss, chosen.detach(), rejected.detach()


# ------------------------------------------------------------------------------------ Countdown pairs

def label_countdown_pairs(puzzles, samples):
    """One pair per puzzle from its sampled completions, scored by the rule reward: the first of the
    best-scored is chosen, the first of the worst-scored rejected; a puzzle whose samples all tie is dropped.

    samples[i] = [(text, stopped), ...] for puzzles[i] (two or more). Returns (pairs, ties).
    """
    pairs, ties = [], 0
    for puzzle, group in zip(puzzles, samples):
        scored = [(text, stop, score_response(text, puzzle)) for text, stop in group]
        (w, w_stop, sw), (l, l_stop, sl) = max(scored, key=lambda x: x[2]), min(scored, key=lambda x: x[2])
        if sw == sl:
            ties += 1
            continue
        pairs.append({"prompt": warmstart_query(puzzle["nums"], puzzle["target"]), "chosen": w, "rejected": l,
                      "chat": False, "chosen_end": w_stop, "rejected_end": l_stop, "chosen_score": sw,
                      "rejected_score": sl, "nums": puzzle["nums"], "target": puzzle["target"]})
    return pairs, ties


def build_countdown_pairs(model, tokenizer, args, path):
    """Sample --pair-samples completions per puzzle from the SFT model, pair them, cache the pairs to `path` (and
    what made them beside it, `pair_recipe`)."""
    n = args.pair_samples
    puzzles = load_puzzles(args.puzzles, args.pair_prompts, seed=args.seed)
    prompts = [encode(tokenizer, warmstart_query(p["nums"], p["target"]))["input_ids"] for p in puzzles]
    # rank 0 alone samples the pairs, so no engine under torchrun (vLLM's launcher starts one in every process)
    sample, engine = make_sampler(tokenizer, args.model, model, args.vllm and rank_and_world()[1] == 1,
                                  args.vllm_memory, seed=args.seed)
    completions, stopped = sample([p for p in prompts for _ in range(n)], max_new_tokens=args.pair_max_tokens,
                                  temperature=args.pair_temperature)
    if engine is not None:
        engine.close()   # shut down now, not when collected: its memory back before training (on CUDA: not measured)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    samples = [list(zip(texts[i:i + n], stopped[i:i + n])) for i in range(0, len(texts), n)]
    pairs, ties = label_countdown_pairs(puzzles, samples)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    _recipe_path(path).write_text(json.dumps(pair_recipe(args), indent=1))
    print(f"countdown pairs: {len(pairs)} from {len(puzzles)} puzzles ({ties} ties dropped) → {path}")
    return pairs


def pair_recipe(args):
    """What Countdown pairs are made from: the sampling model (its checkpoint and when that was written), the
    puzzles, the sampling settings and the seed. A cache made otherwise is not reused."""
    source = Path(args.model)
    model = {"model": args.model}
    if source.is_dir():
        checkpoint = resolve_checkpoint(source)
        model = {"model": str(checkpoint.resolve()), "written": (checkpoint / "config.json").stat().st_mtime_ns}
    return {**model, **{k: getattr(args, k) for k in ("puzzles", "pair_prompts", "pair_samples", "pair_temperature",
                                                        "pair_max_tokens", "seed")}}


def cached_pairs(path, args):
    """The pairs cached at `path` if they were made by this run's recipe and are not empty; else None, and why."""
    path = Path(path)
    if not path.exists():
        return None
    recipe = json.loads(_recipe_path(path).read_text()) if _recipe_path(path).exists() else None
    pairs = read_jsonl(path, required=("prompt", "chosen", "rejected"))
    differs = [k for k, v in pair_recipe(args).items() if (recipe or {}).get(k) != v]
    if differs or not pairs:
        print(f"countdown pairs in {path} not reused: " + (f"made with another {', '.join(differs)}" if differs else
                                                            "it holds none"))
        return None
    print(f"countdown pairs: {len(pairs)} from {path}")
    return pairs


def _recipe_path(path):
    return Path(path).with_suffix(".recipe.json")


def rlaif_relabel(pairs, rm_path, drop=0.0):
    """RLAIF (spec §2.1, report 000): order each pair by a reward model, then drop the share `drop` of pairs whose
    better response scores lowest. A share, not a threshold: a Bradley–Terry RM's scale is arbitrary (report 000's
    "chosen below −10" was on Nemotron's). The log gives the cut in the RM's own units."""
    import reward_model
    if not 0 <= drop < 1:
        raise InputError(f"--rlaif-drop {drop}: a share of the pairs, 0 ≤ share < 1")
    rm, rm_tokenizer = reward_model.load(rm_path)
    prompts = [p["prompt"] for p in pairs]
    a, b = (reward_model.score(rm, rm_tokenizer, prompts, [p[k] for p in pairs], ends=[p.get(f"{k}_end", True) for p in pairs])
            for k in ("chosen", "rejected"))
    del rm
    ordered = [p if sa >= sb else {**p, "chosen": p["rejected"], "rejected": p["chosen"],
                                    "chosen_end": p.get("rejected_end", True), "rejected_end": p.get("chosen_end", True)}
               for p, sa, sb in zip(pairs, a.tolist(), b.tolist())]
    best = torch.maximum(a, b)
    n_drop = int(drop * len(pairs))
    rank = torch.argsort(best, stable=True)
    kept = sorted(rank[n_drop:].tolist())
    cut = f", the {n_drop} whose better response scored below {best[rank[n_drop]].item():.4g} (RM units) dropped" if n_drop else ""
    print(f"RLAIF: {(b > a).sum().item()} of {len(pairs)} pairs reordered by {rm_path}{cut}")
    return [ordered[i] for i in kept]


# ----------------------------------------------------------------------------------------------- data

def encode_pairs(tokenizer, pairs, max_len=None):
    """[(chosen example, rejected example)], and the number of pairs dropped for length (max_len None: none)."""
    encoded, dropped = [], 0
    for p in pairs:
        both = tuple(encode(tokenizer, p["prompt"], p[k], chat=p.get("chat", True), end=p.get(f"{k}_end", True))
                     for k in ("chosen", "rejected"))
        if max_len is not None and max(len(e["input_ids"]) for e in both) > max_len:
            dropped += 1
            continue
        encoded.append(both)
    return encoded, dropped


def pair_logprobs(model, pairs, pad_id, autocast, forward=None):
    """Log-probs (chosen, rejected) of a list of encoded pairs, in one forward pass: sequence_logprobs on model, or
    forward(**batch), the training forward (inside DDP under torchrun)."""
    batch = {k: v.to(model.device) for k, v in collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id).items()}
    with autocast:
        logps = forward(**batch) if forward is not None else sequence_logprobs(model, **batch)
    return logps[:len(pairs)], logps[len(pairs):]


@torch.no_grad()
def reference_logprobs(model, pairs, pad_id, batch_size, autocast):
    """π_ref log-probs of every pair, (n, 2): computed once, before training. Under torchrun each process computes
    every world-th pair and the rows are summed across processes (a process's other rows are 0)."""
    rank, world = rank_and_world()
    out, mine = torch.zeros(len(pairs), 2), list(range(rank, len(pairs), world))
    for start in tqdm(range(0, len(mine), batch_size), desc="π_ref log-probs", leave=False, disable=len(mine) < 500):
        rows = mine[start:start + batch_size]
        chosen, rejected = pair_logprobs(model, [pairs[i] for i in rows], pad_id, autocast)
        out[rows] = torch.stack([chosen, rejected], 1).float().cpu()
    return all_sum(out)


# ----------------------------------------------------------------------------------------------- main

def main(args):
    # 1. setup (under torchrun, this process is one of `world`: see distributed.py)
    check_args(args)
    rank, world = start_processes()
    my_share(range(args.grad_accum), args.grad_accum, "--grad-accum")   # a step's micro-batches divide among them
    seed_everything(args.seed)
    device, amp_dtype = device_and_dtype()
    autocast, scaler, precision = mixed_precision(device, amp_dtype)
    args = replace(args, model=sft_run(args.model, args.data, flag="--data"))
    out_dir = run_dir(args.out_dir, args.resume)
    tokenizer = load_tokenizer(args.model)
    policy_source, state = resume_point(out_dir, args) if args.resume else (args.model, None)
    model = load_model(str(policy_source), tokenizer, dtype=torch.float32, device=device, seed=args.seed)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = training_forward(sequence_logprobs, model)   # DDP over the log-probs' forward with several processes

    # 2. data (Countdown pairs are sampled from the SFT model, once)
    if args.data == "countdown":
        cache = Path(args.pairs_file or out_dir / "countdown_pairs.jsonl")
        pairs = cached_pairs(cache, args)
        if pairs is None and args.resume:
            raise InputError(f"{cache}: this run's Countdown pairs are missing or were made otherwise; cannot resume")
        if pairs is None and rank == 0:
            pairs = build_countdown_pairs(model, tokenizer, args, cache)
        barrier()                          # the other processes read what rank 0 sampled
        pairs = pairs if pairs is not None else cached_pairs(cache, args)
    else:
        pairs = preference_pairs(args.data)
    if args.eval_data:
        held_pairs = preference_pairs(args.eval_data)
    elif args.data == "ultrafeedback":
        held_pairs = preference_pairs("ultrafeedback", split="test_prefs")
    else:
        pairs, held_pairs = hold_out(pairs, args.eval_rows)
    held_pairs = held_pairs[:args.eval_rows]
    if args.rlaif_model:
        pairs = rlaif_relabel(pairs, args.rlaif_model, args.rlaif_drop)
    # a sampled pair is as long as sampling let it be: a budget below prompt + --pair-max-tokens would drop exactly
    # the completions cut at the cap, the pairs that teach stopping
    budget = None if args.data == "countdown" else args.max_len
    train, dropped = encode_pairs(tokenizer, pairs, budget)
    held, _ = encode_pairs(tokenizer, held_pairs, budget)
    if not train:
        raise InputError(f"no preference pairs left in --data {args.data} (dropped over --max-len: {dropped})")
    per_step = args.batch_size * args.grad_accum
    total = args.steps or max(1, math.ceil(args.epochs * len(train) / per_step))
    length = f"{dropped} dropped over --max-len {budget}" if budget else f"capped at --pair-max-tokens {args.pair_max_tokens}"
    print(f"{len(train)} training pairs ({length}), {len(held)} held out | "
          f"{args.batch_size} × {args.grad_accum} = {per_step} pairs per step"
          f"{f' over {world} processes' if world > 1 else ''} | {total} steps | β {args.beta} | {precision}")

    # 3. π_ref log-probs, once; then only the policy is kept
    ref_source = args.ref_model or (args.model if args.resume else "")
    ref = load_model(ref_source, tokenizer, dtype=torch.float32, device=device, seed=args.seed) if ref_source else model
    ref_train = reference_logprobs(ref.eval(), train, tokenizer.pad_token_id, args.batch_size, autocast)
    ref_held = reference_logprobs(ref, held, tokenizer.pad_token_id, args.batch_size, autocast)
    del ref
    if device == "cuda":
        torch.cuda.empty_cache()
    model.train()
    optimizer = adamw(model, args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, max(1, int(args.warmup * total))))
    start_step = 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"])
        start_step = state["step"]
    lengths = [max(len(c["input_ids"]), len(r["input_ids"])) for c, r in train]
    stream = (b for epoch in range(10 ** 9) for b in length_grouped_batches(lengths, args.batch_size, args.seed * 1_000_003 + epoch))
    for _ in range(start_step * args.grad_accum):
        next(stream)

    def save(step):
        return save_checkpoint(out_dir, step, model, tokenizer, args, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})

    @torch.no_grad()
    def evaluate(step):
        model.eval()
        stats = torch.zeros(4)  # loss·n, correct, margin, n
        for start in range(0, len(held), args.batch_size):
            chosen, rejected = pair_logprobs(model, held[start:start + args.batch_size], tokenizer.pad_token_id, autocast)
            ref_c, ref_r = ref_held[start:start + args.batch_size].to(device).unbind(1)
            loss, rc, rr = dpo_loss(chosen, rejected, ref_c, ref_r, args.beta)
            stats += torch.tensor([loss.item() * len(rc), (rc > rr).sum().item(), (rc - rr).sum().item(), len(rc)])
        model.train()
        log_metrics(out_dir, step, total, {"eval_loss": stats[0].item() / stats[3].item(),
                                           "eval_acc": stats[1].item() / stats[3].item(),
                                           "eval_margin": stats[2].item() / stats[3].item()})

    # 4. loop: per step, grad_accum micro-batches (each process takes its share); the loss is the mean over the
    # step's pairs, all processes'
    if rank == 0 and held and args.eval_every and start_step == 0:
        evaluate(0)
    tick = time.time()
    for step in range(start_step + 1, total + 1):
        groups = [next(stream) for _ in range(args.grad_accum)]
        n_pairs = sum(map(len, groups))
        mine = my_share(groups, args.grad_accum, "--grad-accum")
        sums = torch.zeros(5)  # loss, correct, margin, chosen log-prob, rejected log-prob
        for i, index in enumerate(mine):
            with sync_if(i == len(mine) - 1, policy):   # gradients all-reduced once, on the last micro-batch
                chosen, rejected = pair_logprobs(model, [train[j] for j in index], tokenizer.pad_token_id, autocast,
                                                 forward=policy)
                ref_c, ref_r = ref_train[index].to(device).unbind(1)
                loss, rc, rr = dpo_loss(chosen, rejected, ref_c, ref_r, args.beta)
                scaler.scale(loss * len(index) / (n_pairs / world)).backward()   # DDP averages over the world
            sums += torch.tensor([loss.item() * len(index), (rc > rr).sum().item(), (rc - rr).sum().item(),
                                  chosen.sum().item(), rejected.sum().item()])
        sums = all_sum(sums)
        if not math.isfinite(sums[0].item()):
            raise SystemExit(f"dpo.py: loss is {sums[0].item()} at step {step}; stopped before the update")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = scheduler.get_last_lr()[0]   # the rate this step uses; scheduler.step() moves to the next
        scaler.step(optimizer)   # skipped when fp16 gradients overflowed; the scale then shrinks
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == total:
            loss, acc, margin, logp_c, logp_r = (sums / n_pairs).tolist()
            log_metrics(out_dir, step, total, {"loss": loss, "acc": acc, "margin": margin, "logp_chosen": logp_c,
                                               "logp_rejected": logp_r, "lr": lr, "time": time.time() - tick})
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
