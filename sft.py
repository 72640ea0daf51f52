"""Supervised fine-tuning (spec §1.4.1, Eq. 6) on WarmStart, SmolTalk, synthetic Countdown or a local file.

    python sft.py                                             # Qwen2.5-0.5B on WarmStart (GPU)
    python sft.py --data smoltalk --out-dir out/sft-smoltalk
    python sft.py --model tiny --data synthetic --steps 300   # CPU, no downloads

    from sft import main, Args; main(Args(model="tiny", data="synthetic", steps=50))   # in a notebook

Eq. 6 maximises Σ_t log π(y_t | x, y_<t) over the completion tokens. The loss is its negation summed
over every completion token of an optimizer step (the end-of-turn token included, so the model
learns to stop) and divided by the number of those tokens: per-token normalisation over the whole
step, so 4 micro-batches of B/4 give the gradient of one batch of B.

Deviations from the spec: none in the objective. Practical choices: AdamW with linear warmup and a
cosine decay to lr/10, gradient clipping, rows whose prompt + completion exceed --max-len are
skipped (and counted) rather than truncated, which would cut off the end-of-turn token.
"""
import math
import sys
import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from calculator import TRACES as SEARCH_TRACES
from common import (InputError, SFT_RUNS, adamw, all_sum, check_args, checkpoints, collate, device_and_dtype,
                    encode, end_processes, hold_out, hub_dataset, length_grouped_batches, load_model,
                    load_tokenizer, log_metrics, mixed_precision, my_share, read_jsonl, restore_rng_states,
                    resume_point, run, run_dir, save_checkpoint, seed_everything, sequence_logprobs, start_processes,
                    sync_if, training_forward, warmup_cosine)
from sampling import generate

TRACES = SEARCH_TRACES + ("tools", "tools-solve")   # --trace: the calculator's own, and calls to it (tools.py)


@dataclass
class Args:
    model: str = "Qwen/Qwen2.5-0.5B"  # hub id, model directory, run directory, or `tiny` (CPU, no download)
    data: str = "warmstart"           # warmstart | smoltalk | synthetic | a .jsonl with {query, completion} or {messages}
    eval_data: str = ""               # held-out .jsonl; default: the dataset's test split, or a file's last eval_rows rows
    out_dir: str = ""                 # checkpoints (step-N/), metrics.jsonl; empty: out/sft-smoltalk for --data smoltalk,
                                      # else out/sft (where dpo.py and rloo.py look for the task's SFT run)
    max_len: int = 1024               # token budget of prompt + completion; longer rows are skipped and counted
    batch_size: int = 8               # sequences per micro-batch
    grad_accum: int = 8               # micro-batches per optimizer step (report 000: 8 × 8)
    epochs: float = 0.0               # passes over the rows (sets the steps when --steps is 0); 0: report 000's recipe,
                                      # 50 for warmstart (its Countdown SFT, ~1 000 rows: ~780 steps), else 3 (its SmolTalk)
    steps: int = 0                    # optimizer steps (0: from --epochs)
    lr: float = 2e-5                  # AdamW peak learning rate (report 000)
    warmup: float = 0.05              # share of steps with linear warmup; then cosine decay to lr/10
    weight_decay: float = 0.0         # AdamW decay of weight matrices, never biases or norms (HF/TRL: 0)
    grad_clip: float = 1.0            # max global gradient norm
    log_every: int = 10               # steps between log lines
    eval_every: int = 100             # steps between held-out losses (and a greedy sample); 0: none
    eval_rows: int = 200              # held-out rows
    save_every: int = 200             # steps between checkpoints (a crash loses at most this many)
    synthetic_rows: int = 2000        # rows of --data synthetic (calculator.synthetic_warmstart)
    puzzles: str = "3to4:train"       # puzzle shape of --data synthetic: 3to4, easy, course (:train/:test/:sft/:rl)
    trace: str = "attempts"           # --data synthetic: attempts (guesses, then the solution) | sums (+ and − by sums, any
                                      # count of numbers) | search | search-unmarked | search-mixed (3 numbers) | tools
                                      # (the search, each hit checked with the calculator) | tools-solve
    seed: int = 0                     # seeds data order, model init (tiny) and sampling
    resume: bool = False              # continue from out_dir's newest checkpoint
    gradient_checkpointing: bool = False # recompute each layer in backward: activations ÷ ~10, ~⅓ more compute


def sft_loss(completion_logps, n_tokens):
    """Eq. 6, negated: −Σ log π(y_t | x, y_<t) over this micro-batch's completion tokens, / n_tokens.

    completion_logps: (batch,) per-sequence sums of completion-token log-probs. n_tokens: completion
    tokens in the whole optimizer step (all micro-batches), so summing the micro-batch losses gives
    the per-token mean over the step. Under torchrun each process passes n_tokens / world: DDP averages
    the processes' gradients, so the step's gradient is still that of the per-token mean.
    """
    return -completion_logps.sum() / n_tokens


def step_tokens(batches):
    """Eq. 6's normaliser: the completion tokens of a step's micro-batches, all of them (every process's share)."""
    return sum(b["completion_mask"][:, 1:].sum().item() for b in batches)


# ----------------------------------------------------------------------------------------------- data

def first_turn(messages):
    """(user text, assistant text) of a conversation's first exchange, or None.

    A system turn the conversation opens with (smol-smoltalk's rewrite and summarise sources keep their
    instruction there) goes in front of the user text: every prompt keeps our one system turn, and the
    instruction the answer follows is not lost.
    """
    system = messages[0]["content"] if messages and messages[0].get("role") == "system" else ""
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    if len(turns) < 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
        return None
    return (f"{system}\n\n{turns[0]['content']}" if system else turns[0]["content"]), turns[1]["content"]


def rows_from_records(records, source):
    """Records of either schema → rows {prompt, completion, chat}. Raw text keeps the WarmStart format."""
    rows = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise InputError(f"{source}, row {number}: not a JSON object")
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                         and isinstance(m.get("content"), str) for m in messages):
                raise InputError(f"{source}, row {number}: messages must be a list of {{role, content}} with text in each")
            turn = first_turn(record["messages"])
            if turn is not None:
                rows.append({"prompt": turn[0], "completion": turn[1], "chat": True})
        elif "query" in record and "completion" in record:
            if not isinstance(record["query"], str) or not isinstance(record["completion"], str):
                raise InputError(f"{source}, row {number}: query and completion must be text")
            rows.append({"prompt": record["query"], "completion": record["completion"], "chat": False})
        else:
            missing = "completion" if "query" in record else "query"
            raise InputError(f"{source}, row {number}: missing column {missing!r} (need query + completion, or messages)")
    return rows


def load_data(args):
    """(train rows, held-out rows) for --data, each a list of {prompt, completion, chat}."""
    if args.data == "synthetic":
        from calculator import synthetic_warmstart
        test_shape = args.puzzles.partition(":")[0] + ":test"   # held-out puzzles: disjoint by construction
        if args.trace in ("tools", "tools-solve"):   # calls to the calculator (and the solver): tools.py
            from tools import synthetic_tool_traces
            tools = ("calculate", "solve") if args.trace == "tools-solve" else ("calculate",)
            synthetic_warmstart = lambda n, seed, shape, trace: synthetic_tool_traces(n, seed, shape, tools=tools)
        try:
            train = synthetic_warmstart(args.synthetic_rows, args.seed, args.puzzles, trace=args.trace)
            held = synthetic_warmstart(args.eval_rows, args.seed + 10_000, test_shape, trace=args.trace)
        except ValueError as e:  # an unknown shape or trace, or a search trace for 4 numbers
            raise InputError(f"--puzzles {args.puzzles} --trace {args.trace}: {e}") from None
        train, held = rows_from_records(train, "synthetic"), rows_from_records(held, "synthetic")
    elif args.data.endswith(".jsonl"):
        train = rows_from_records(read_jsonl(args.data), args.data)
        train, held = (train, None) if args.eval_data else hold_out(train, args.eval_rows)
    elif args.data in ("warmstart", "smoltalk"):
        name = {"warmstart": "Asap7772/cog_behav_all_strategies", "smoltalk": "HuggingFaceTB/smol-smoltalk"}[args.data]
        train = rows_from_records(hub_dataset(name, "train"), name)
        held = rows_from_records(hub_dataset(name, "test"), name)[:args.eval_rows]
        if args.data == "smoltalk":  # report 000's filter: query < 128 words, completion < 512 words
            short = lambda r: len(r["prompt"].split()) < 128 and len(r["completion"].split()) < 512
            train, held = [r for r in train if short(r)], [r for r in held if short(r)]
    else:
        raise InputError(f"--data {args.data!r}: use warmstart, smoltalk, synthetic or a .jsonl file")
    if args.eval_data:
        held = rows_from_records(read_jsonl(args.eval_data), args.eval_data)[:args.eval_rows]
    return train, held


def encode_rows(tokenizer, rows, max_len):
    """Encoded examples, and counts of the rows skipped (empty completion, over the token budget)."""
    examples, skipped = [], {"empty": 0, "too_long": 0}
    for row in rows:
        if not row["completion"].strip():
            skipped["empty"] += 1
            continue
        example = encode(tokenizer, row["prompt"], row["completion"], chat=row["chat"])
        if len(example["input_ids"]) > max_len:
            skipped["too_long"] += 1
            continue
        examples.append(example)
    return examples, skipped


def micro_batches(examples, batch_size, seed):
    """An endless, seeded stream of length-grouped micro-batches, epoch after epoch."""
    lengths = [len(e["input_ids"]) for e in examples]
    for epoch in range(10 ** 9):
        for batch in length_grouped_batches(lengths, batch_size, seed=seed * 1_000_003 + epoch):
            yield [examples[i] for i in batch]


@torch.no_grad()
def held_out_loss(model, examples, pad_id, batch_size, autocast):
    """Per-token mean of −log π over the held-out completions."""
    total, tokens = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="held-out", leave=False, disable=len(examples) < 500):
        batch = {k: v.to(model.device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with autocast:
            total -= sequence_logprobs(model, **batch).sum().item()
        tokens += batch["completion_mask"][:, 1:].sum().item()
    return total / max(tokens, 1)


# ----------------------------------------------------------------------------------------------- main

def main(args):
    # 1. setup (under torchrun, this process is one of `world`: see distributed.py)
    check_args(args)
    if args.data == "synthetic" and args.trace not in TRACES:
        raise InputError(f"--trace {args.trace!r}: use one of {', '.join(TRACES)}")
    rank, world = start_processes()
    my_share(range(args.grad_accum), args.grad_accum, "--grad-accum")   # a step's micro-batches divide among them
    seed_everything(args.seed)
    device, amp_dtype = device_and_dtype()
    autocast, scaler, precision = mixed_precision(device, amp_dtype)
    task = "ultrafeedback" if args.data == "smoltalk" else "countdown"
    args = replace(args, out_dir=args.out_dir or SFT_RUNS[task])
    out_dir = run_dir(args.out_dir, args.resume)

    # 2. data
    tokenizer = load_tokenizer(args.model)
    train_rows, held_rows = load_data(args)
    train, skipped = encode_rows(tokenizer, train_rows, args.max_len)
    held, _ = encode_rows(tokenizer, held_rows, args.max_len)
    if not train:
        raise InputError(f"no training rows left in --data {args.data} (skipped: {skipped})")
    per_step = args.batch_size * args.grad_accum
    epochs = args.epochs or (50 if args.data == "warmstart" else 3)
    total = args.steps or max(1, math.ceil(epochs * len(train) / per_step))
    warmup_steps = max(1, int(args.warmup * total))
    print(f"{len(train)} training rows (skipped {skipped['empty']} empty, {skipped['too_long']} over {args.max_len} "
          f"tokens), {len(held)} held out | {args.batch_size} × {args.grad_accum} = {per_step} sequences per step"
          f"{f' over {world} processes' if world > 1 else ''} | planned: {total} steps ≈ "
          f"{total * per_step / len(train):.2f} epochs | {precision}")

    # 3. model, optimizer, schedule (resuming restores all three, the RNG and the data position)
    source, state = resume_point(out_dir, args) if args.resume else (args.model, None)
    start_step = state["step"] if state else 0
    model = load_model(str(source), tokenizer, dtype=torch.float32, device=device, seed=args.seed).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = training_forward(sequence_logprobs, model)   # DDP over the log-probs' forward with several processes
    optimizer = adamw(model, args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup_steps))
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"])
        print(f"resumed from {source} at step {start_step}")
    stream = micro_batches(train, args.batch_size, args.seed)
    for _ in range(start_step * args.grad_accum):
        next(stream)

    def save(step):
        return save_checkpoint(out_dir, step, model, tokenizer, args, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})

    def evaluate(step):
        model.eval()
        eval_loss = held_out_loss(model, held, tokenizer.pad_token_id, args.batch_size, autocast)
        prompt = held[0]["input_ids"][:held[0]["prompt_len"]]
        with autocast:
            sample = generate(model, tokenizer, [prompt], max_new_tokens=min(256, args.max_len), temperature=0)[0][0]
        model.train()
        log_metrics(out_dir, step, total, {"eval_loss": eval_loss})
        print(f"  greedy sample: {tokenizer.decode(sample)!r}")

    # 4. loop: a step is grad_accum micro-batches (each process takes its share), the loss normalised by the step's
    # completion tokens over all processes
    if rank == 0 and held and args.eval_every and start_step == 0:
        evaluate(0)
    tick = time.time()
    for step in range(start_step + 1, total + 1):
        batches = [collate(next(stream), tokenizer.pad_token_id) for _ in range(args.grad_accum)]
        n_tokens = step_tokens(batches)
        mine = my_share(batches, args.grad_accum, "--grad-accum")
        step_loss = 0.0
        for i, batch in enumerate(mine):
            batch = {k: v.to(device) for k, v in batch.items()}
            with sync_if(i == len(mine) - 1, policy):   # gradients all-reduced once, on the last micro-batch
                with autocast:                         # DDP averages them: each process divides by its 1/world share
                    loss = sft_loss(policy(**batch), n_tokens / world)
                scaler.scale(loss).backward()
            step_loss += loss.item()
        step_loss = all_sum(step_loss) / world
        if not math.isfinite(step_loss):
            saved = checkpoints(out_dir)
            sys.exit(f"sft.py: loss is {step_loss} at step {step}; stopped before the update. "   # rank 0 says it
                     f"Last good checkpoint: {saved[-1] if saved else 'none (nothing saved yet)'}" if rank == 0 else 1)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        lr = scheduler.get_last_lr()[0]   # the rate this step uses; scheduler.step() moves to the next
        scaler.step(optimizer)   # skipped when fp16 gradients overflowed; the scale then shrinks
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if step % args.log_every == 0 or step == total:
            log_metrics(out_dir, step, total, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                                               "time": time.time() - tick})
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
