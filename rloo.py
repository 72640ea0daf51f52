"""REINFORCE leave-one-out (spec §1.4.3, Eq. 8, with Eq. 2's KL) on Countdown or UltraFeedback.

    python rloo.py --k 8 --lr 1e-6                                  # Countdown from out/sft, rule reward (GPU)
    python rloo.py --task ultrafeedback --model out/sft-smoltalk --reward-model out/rm
    python rloo.py --model tiny --puzzles 3to4:train --steps 20 --max-new-tokens 32   # CPU, no downloads

Per step: P prompts, K samples each at temperature T; reward R (compute_score, or a reward model);
with β > 0 the per-sequence KL estimate log π_θ(y|x) − log π_ref(y|x) is folded into the reward
(R − β·KL, no gradient through it; Eq. 2); leave-one-out advantages A_i = R_i − 1/(K−1) Σ_{j≠i} R_j
within each prompt's K samples (Eq. 8); loss −A_i · log π_θ(y_i|x), with log π summed over the
completion's tokens (stop token included) and averaged over the step's P·K sequences: per-sequence
normalisation, as in Eq. 8's 1/k Σ_i. Log-probs of sampled text always use the sampling temperature.

The K samples of a prompt always share a micro-batch, so the KL, the baseline and the loss come out
of one forward pass and one backward pass: no separate pass for "old" log-probs (one update per
batch keeps the samples on-policy). With β = 0, a prompt whose K rewards are all equal has zero
advantages and is not passed through the model at all (the logged `live` share is what is left).

A reward model reads each completion as it was sampled: one cut at --max-new-tokens keeps no
end-of-turn token, so the RM sees it never finished.

Deviations from the spec: an optional penalty for completions that hit the length limit without
stopping (--overlong-penalty, 0 by default; TRL's missing_eos_penalty).
"""
import math
import time
from functools import partial
from dataclasses import dataclass, replace

import torch

from common import (InputError, adamw, all_sum, check_args, collate, device_and_dtype, encode, end_processes,
                    hub_dataset, load_model, load_puzzles, load_tokenizer, log_metrics, mixed_precision,
                    my_share, rank_and_world, read_jsonl, restore_rng_states, resume_point, run, run_dir,
                    save_checkpoint, seed_everything, sequence_logprobs, sft_run, start_processes, sync_if,
                    training_forward, warmup_cosine)
from countdown_reward import score_response, warmstart_query
from sampling import make_sampler
from tools import tool_loop, tool_names, tool_query


@dataclass
class Args:
    model: str = ""                      # π_θ at step 0, a frozen copy is π_ref; empty: the task's SFT run (out/sft,
                                         # or out/sft-smoltalk for --task ultrafeedback)
    task: str = "countdown"              # countdown (rule reward) | ultrafeedback (--reward-model)
    reward_model: str = "out/rm"         # reward_model.py's output, for --task ultrafeedback
    puzzles: str = "hub"                 # Countdown prompts: hub (rows 0…) | a shape (3to4, easy, course; :train/:test/:sft/:rl) | a .jsonl
    prompts: str = "ultrafeedback"       # UltraFeedback prompts: ultrafeedback (train_prefs) | a .jsonl with "prompt"
    n_prompts: int = 20000               # training prompts drawn (cycled when exhausted)
    eval_prompts: int = 200              # held-out prompts for the greedy evaluation
    out_dir: str = "out/rloo"            # checkpoints (step-N/) and metrics.jsonl
    k: int = 8                           # K samples per prompt (Eq. 8)
    prompts_per_step: int = 16           # P prompts per optimizer step: P·K sequences
    micro_prompts: int = 1               # prompts per forward/backward pass (their K samples together)
    steps: int = 200                     # optimizer steps
    lr: float = 1e-6                     # AdamW learning rate
    warmup: float = 0.0                  # share of steps with linear warmup; then cosine decay to lr/10
    grad_clip: float = 1.0               # max global gradient norm
    weight_decay: float = 0.0            # AdamW decay of weight matrices, never biases or norms (HF/TRL: 0)
    kl_coef: float = 0.001               # β in Eq. 2; 0 turns the KL term (and π_ref) off
    temperature: float = 1.0             # sampling temperature T, also applied to every log-prob of samples
    top_p: float = 1.0                   # nucleus sampling: must stay 1 (Eq. 8's log-probs are of the untruncated policy)
    max_new_tokens: int = 1024           # completion length limit
    overlong_penalty: float = 0.0        # subtracted from the reward of a completion cut at the limit (TRL: missing_eos_penalty)
    tools: str = ""                      # Countdown with the tool loop (tools.py): calculate | calculate,solve; "": none
    max_calls: int = 4                   # tool loop: calls per completion (a call beyond ends it)
    call_penalty: float = 0.0            # tool loop: subtracted from the reward per call (0: calls are free)
    invalid_call_penalty: float = 0.0    # tool loop: subtracted per call that got an error back
    log_every: int = 1                   # steps between log lines
    sample_every: int = 10               # steps between printed sample completions
    eval_every: int = 50                 # steps between greedy held-out evaluations; 0: none
    save_every: int = 50                 # steps between checkpoints
    seed: int = 0                        # seeds prompts and sampling
    resume: bool = False                 # continue from out_dir's newest checkpoint
    gradient_checkpointing: bool = False # recompute each layer in backward: activations ÷ ~10, ~⅓ more compute
    vllm: bool = torch.cuda.is_available()  # sample with vLLM, when installed (default: on CUDA; on a CPU: --vllm)
    vllm_memory: float = 0.3             # share of GPU memory vLLM may take (a CPU engine: a 2 GiB KV cache)


def rloo_advantages(rewards):
    """Eq. 8's baseline: A_i = R_i − 1/(K−1) Σ_{j≠i} R_j, for a (prompts, K) tensor; never across prompts.

    Computed as 1/(K−1) Σ_{j≠i} (R_i − R_j), the same number, so that equal rewards give exactly 0.
    """
    return (rewards[:, :, None] - rewards[:, None, :]).sum(2) / (rewards.shape[1] - 1)


def kl_penalised_rewards(rewards, policy_logps, ref_logps, kl_coef):
    """Eq. 2 as a reward: R − β (log π_θ(y|x) − log π_ref(y|x)), per sequence, without gradient."""
    return rewards - kl_coef * (policy_logps - ref_logps).detach()


def informative_prompts(rewards):
    """Prompts whose K rewards differ, for a (prompts, K) tensor: the others have A_i = 0 for every sample.

    With β = 0 such a prompt adds exactly nothing to Eq. 8's gradient, so its forward and backward passes
    can be skipped; with β > 0 the KL makes its shaped rewards differ, and it is always kept.
    """
    return (rewards != rewards[:, :1]).any(1)


def rloo_loss(advantages, logps, n_sequences):
    """Eq. 8 as a loss: −Σ_i A_i · log π_θ(y_i|x) over this micro-batch, / the step's sequence count.

    advantages, logps: (prompts, K); log π summed over completion tokens. Summed over a step's
    micro-batches, this is the mean over its P·K sequences (per-sequence normalisation).
    """
    return -(advantages.detach() * logps).sum() / n_sequences


# ------------------------------------------------------------------------------------------- data

def load_prompts(args, tokenizer):
    """Training and held-out prompts: [{"text", "ids", ...}] — Countdown puzzles or UltraFeedback user turns."""
    total = args.n_prompts + args.eval_prompts
    if args.task == "countdown":
        rows = load_puzzles(args.puzzles, total, seed=args.seed)
        query = (lambda n, t: tool_query(n, t, tool_names(args.tools))) if args.tools else warmstart_query
        rows = [{**p, "text": query(p["nums"], p["target"])} for p in rows]
        chat = False
    else:
        if args.prompts == "ultrafeedback":
            records = hub_dataset("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
            records = records.select(range(min(total, len(records))))
        else:
            records = read_jsonl(args.prompts, required=("prompt",))[:total]
            bad = next((i for i, r in enumerate(records, 1) if not isinstance(r["prompt"], str)), None)
            if bad:
                raise InputError(f"{args.prompts}, row {bad}: prompt must be text")
        rows, chat = [{"text": r["prompt"]} for r in records], True
    for r in rows:
        r["ids"] = encode(tokenizer, r["text"], chat=chat)["input_ids"]
    if len(rows) <= args.eval_prompts:
        raise InputError(f"{len(rows)} prompts: need more than --eval-prompts {args.eval_prompts}")
    return rows[args.eval_prompts:], rows[:args.eval_prompts]


def score_completions(task, prompts, texts, reward_model=None, stopped=None):
    """Rewards of decoded completions: the rule reward (as the original evaluation scores a response), or an RM,
    which reads each completion as sampled: one cut at the length limit (stopped False) gets no end-of-turn token."""
    if task == "countdown":
        return torch.tensor([score_response(t, p) for p, t in zip(prompts, texts)])
    import reward_model as rm
    model, tokenizer = reward_model
    return rm.score(model, tokenizer, [p["text"] for p in prompts], texts, ends=stopped)


def score_runs(runs, prompts, tokenizer, task, rm, device):
    """(task rewards, decoded texts) of roll_out's runs; a reward model visits the accelerator only while it scores."""
    texts = [tokenizer.decode(r["ids"], skip_special_tokens=True) for r in runs]
    with _Visit(rm[0] if rm else None, device):
        return score_completions(task, prompts, texts, rm, [r["stopped"] for r in runs]).float(), texts


def roll_out(sample, tokenizer, prompt_ids, args, temperature):
    """One dict per prompt: "ids" (the completion), "spans" (the model's tokens in it), "stopped", "calls",
    "invalid": the tool loop with --tools, else plain sampling (all of the completion is the model's)."""
    if args.tools:
        return tool_loop(sample, tokenizer, prompt_ids, args.max_new_tokens, args.max_calls, tool_names(args.tools),
                         temperature=temperature, top_p=args.top_p)
    completions, stopped = sample(prompt_ids, max_new_tokens=args.max_new_tokens, temperature=temperature,
                                  top_p=args.top_p)
    return [{"ids": c, "spans": [(0, len(c))], "stopped": s, "calls": 0, "invalid": 0}
            for c, s in zip(completions, stopped)]


def penalties(runs, args):
    """What is taken off each sample's task reward: a completion cut at the length limit, and the tool loop's calls."""
    stopped, calls, invalid = (torch.tensor([r[key] for r in runs], dtype=torch.float32)
                               for key in ("stopped", "calls", "invalid"))
    return args.overlong_penalty * (1 - stopped) + args.call_penalty * calls + args.invalid_call_penalty * invalid


def log_step(out_dir, step, args, step_loss, task_rewards, kls, live, runs, seconds):
    """One log line of the step, over every process's samples (summed across them). kls: None with β = 0 (no π_ref,
    no KL measured)."""
    world = rank_and_world()[1]
    kl = torch.cat(kls) if kls else torch.zeros(0)
    (loss_sum, reward, right, formatted, kl_sum, kl_n, live_n, prompts_n, length, stops, calls, invalid, n) = all_sum(
        torch.tensor([step_loss, task_rewards.sum(), (task_rewards == 1).sum(), (task_rewards > 0).sum(), kl.sum(),
                      len(kl), live.sum(), len(live), sum(len(r["ids"]) for r in runs), sum(r["stopped"] for r in runs),
                      sum(r["calls"] for r in runs), sum(r["invalid"] for r in runs), len(runs)], dtype=torch.float64)
    ).tolist()
    metrics = {"loss": loss_sum / world, "reward": reward / n}
    if args.task == "countdown":
        metrics |= {"acc": right / n, "format": formatted / n}
    if kls is not None:
        metrics["kl"] = kl_sum / kl_n
    if args.tools:
        metrics |= {"calls": calls / n, "invalid": invalid / n}
    log_metrics(out_dir, step, args.steps, metrics | {"live": live_n / prompts_n, "len": length / n,
                                                      "stopped": stops / n, "time": seconds})


# ------------------------------------------------------------------------------------------- main

def check_flags(args):
    """Every flag checked before any work: ranges (inputs.FLAG_RANGES), then the combinations that make no sense."""
    check_args(args)
    if args.task not in ("countdown", "ultrafeedback"):
        raise InputError(f"--task {args.task!r}: use countdown or ultrafeedback")
    if args.temperature == 0:   # log-probs are of logits / T: greedy decoding has none
        raise InputError("--temperature 0: RLOO samples, and scores the samples, at a temperature T > 0")
    if args.top_p != 1:   # sampled from the truncated distribution, scored under the full one: not Eq. 8's gradient
        raise InputError(f"--top-p {args.top_p}: RLOO trains on log-probs of the full distribution; sample with --top-p 1 "
                         f"(evaluate.py may truncate)")
    if args.tools:   # checked before any work: the tool loop is Countdown's, with known tools
        if args.task != "countdown":
            raise InputError(f"--tools {args.tools}: the tool loop is for --task countdown")
        try:
            tool_names(args.tools)
        except ValueError as e:
            raise InputError(str(e)) from None
    else:
        loop_only = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("max_calls", "call_penalty",
                                                                            "invalid_call_penalty")
                     if getattr(args, k) != getattr(Args, k)]
        if loop_only:
            raise InputError(f"{', '.join(loop_only)}: a setting of the tool loop, which does nothing without --tools")


def main(args):
    # 1. setup
    check_flags(args)
    rank, world = start_processes()   # under torchrun, this process is one of `world`: see distributed.py
    my_share(range(args.prompts_per_step), args.prompts_per_step, "--prompts-per-step")   # a step's prompts divide
    seed_everything(args.seed)
    device, amp_dtype = device_and_dtype()
    autocast, scaler, precision = mixed_precision(device, amp_dtype)
    args = replace(args, model=sft_run(args.model, args.task))
    out_dir = run_dir(args.out_dir, args.resume)
    tokenizer = load_tokenizer(args.model)
    train_prompts, held_prompts = load_prompts(args, tokenizer)
    per_step = args.prompts_per_step * args.k
    print(f"{len(train_prompts)} training prompts, {len(held_prompts)} held out | {args.prompts_per_step} prompts × "
          f"K {args.k} = {per_step} samples per step, {args.micro_prompts * args.k} per forward pass | "
          f"{args.steps} steps = {args.steps * args.prompts_per_step / len(train_prompts):.2f} epochs"
          f"{f' | {world} processes' if world > 1 else ''} | T {args.temperature} | β {args.kl_coef} | {precision}")

    # 2. models: the policy on the accelerator; π_ref and a reward model stay on the CPU until used
    source, state = resume_point(out_dir, args) if args.resume else (args.model, None)
    start_step = state["step"] if state else 0
    model = load_model(str(source), tokenizer, dtype=torch.float32, device=device, seed=args.seed)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = training_forward(sequence_logprobs, model)   # DDP over the log-probs' forward with several processes
    # π_ref in float32 like π_θ, so both run the same autocast arithmetic and the KL is exactly 0 at step 0
    ref = load_model(args.model, tokenizer, dtype=torch.float32, device="cpu", seed=args.seed) if args.kl_coef else None
    rm = None
    if args.task == "ultrafeedback":
        import reward_model
        rm = reward_model.load(args.reward_model, device="cpu")
    optimizer = adamw(model, args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.steps, int(args.warmup * args.steps)))
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"])
    sample, vllm = make_sampler(tokenizer, str(source), model, args.vllm, args.vllm_memory, seed=args.seed)

    def save(step):
        return save_checkpoint(out_dir, step, model, tokenizer, args, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})

    def evaluate(step):
        model.eval()
        runs = roll_out(sample, tokenizer, [p["ids"] for p in held_prompts], args, temperature=0)
        rewards, _ = score_runs(runs, held_prompts, tokenizer, args.task, rm, device)
        metrics = {"eval_reward": rewards.mean().item()}
        if args.task == "countdown":
            metrics |= {"eval_acc": (rewards == 1).float().mean().item(), "eval_format": (rewards > 0).float().mean().item()}
        log_metrics(out_dir, step, args.steps, metrics)

    # 3. loop: sample → reward → (π_ref log-probs) → per micro-batch: KL, advantages, loss → update. Each process
    # takes its share of the step's prompts, every prompt with its K samples: a baseline never crosses processes
    if rank == 0 and held_prompts and start_step == 0 and args.eval_every:
        evaluate(0)
    tick = time.time()
    for step in range(start_step + 1, args.steps + 1):
        first = (step - 1) * args.prompts_per_step
        prompts = [train_prompts[(first + i) % len(train_prompts)] for i in range(args.prompts_per_step)]
        prompts = my_share(prompts, args.prompts_per_step, "--prompts-per-step")
        model.eval()
        repeated = [p for p in prompts for _ in range(args.k)]
        runs = roll_out(sample, tokenizer, [p["ids"] for p in repeated], args, args.temperature)
        task_rewards, texts = score_runs(runs, repeated, tokenizer, args.task, rm, device)
        rewards = task_rewards - penalties(runs, args)
        # the model's tokens only: a tool response is context, never scored (spans: tools.tool_loop)
        examples = [{"input_ids": p["ids"] + r["ids"], "prompt_len": len(p["ids"]),
                     "spans": [(len(p["ids"]) + start, len(p["ids"]) + end) for start, end in r["spans"]]}
                    for p, r in zip(repeated, runs)]
        ref_logps = torch.zeros(len(examples))
        if ref is not None:
            with _Visit(ref, device), torch.no_grad():   # π_ref visits the accelerator only while it is used
                ref_logps = torch.cat([_logps(partial(sequence_logprobs, ref), examples[i:i + args.micro_prompts * args.k],
                                              tokenizer, args, autocast, device)
                                       for i in range(0, len(examples), args.micro_prompts * args.k)]).cpu()

        # with β = 0, prompts whose K rewards are all equal have zero advantages: no pass for them (β > 0 keeps
        # all); the loss still divides by all P·K sequences, so the gradient is the one of the full step. With none
        # live, one pass weighted 0: the gradient is zero, not missing (AdamW's moments and decay step as on the full
        # batch), and under torchrun this process still takes part in the all-reduce
        live = informative_prompts(rewards.view(-1, args.k)) | (ref is not None)
        rows = torch.arange(len(examples)).view(-1, args.k)[live].flatten()
        size = args.micro_prompts * args.k
        parts = [rows[i:i + size] for i in range(0, len(rows), size)] or [None]
        model.train()
        step_loss, kls = 0.0, []
        for i, part in enumerate(parts):
            weight, part = (1.0, part) if part is not None else (0.0, torch.arange(args.k))
            with sync_if(i == len(parts) - 1, policy):   # gradients all-reduced once, on the last micro-batch
                logps = _logps(policy, [examples[j] for j in part], tokenizer, args, autocast, device)
                shaped = kl_penalised_rewards(rewards[part].to(device), logps, ref_logps[part].to(device), args.kl_coef)
                advantages = rloo_advantages(shaped.view(-1, args.k))
                # the step's P·K sequences over the world size: DDP averages the processes' gradients
                loss = weight * rloo_loss(advantages, logps.view(-1, args.k), args.prompts_per_step * args.k / world)
                scaler.scale(loss).backward()
            step_loss += loss.item()
            if ref is not None:
                kls.append(logps.detach().cpu() - ref_logps[part])
        if not math.isfinite(step_loss):
            raise SystemExit(f"rloo.py: loss is {step_loss} at step {step}; stopped before the update")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)   # skipped when fp16 gradients overflowed; the scale then shrinks
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if vllm:
            vllm.load_weights(model)

        if step % args.log_every == 0 or step == args.steps:
            log_step(out_dir, step, args, step_loss, task_rewards, kls if ref is not None else None, live, runs,
                     time.time() - tick)
            tick = time.time()
        if args.sample_every and step % args.sample_every == 0:
            print(f"  sample (reward {task_rewards[0]:.2f}): {texts[0]!r}")
        if rank == 0 and held_prompts and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            evaluate(step)
        if step % args.save_every == 0 and step != args.steps:
            save(step)

    # 4. final save
    path = save(args.steps)
    print(f"saved {path}")
    end_processes()
    return model, tokenizer


def _logps(forward, examples, tokenizer, args, autocast, device):
    """log π(completion | prompt) of sampled sequences, summed over completion tokens, at the sampling temperature;
    forward(**batch): sequence_logprobs on a model, or the training forward (inside DDP under torchrun)."""
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    with autocast:
        return forward(**batch, temperature=args.temperature)


class _Visit:
    """Move a frozen model to the accelerator for a `with` block, and back to the CPU after it."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __enter__(self):
        if self.model is not None and self.device != "cpu":
            self.model.to(self.device)

    def __exit__(self, *exc):
        if self.model is not None and self.device != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    run(main, Args)
