"""What a training step costs: seconds per step, tokens per second and peak memory of each trainer, RLOO's step split
into sampling, the π_ref pass and the update, and sampling itself: transformers' `generate` against ours
(sampling.generate), greedy, and at RLOO's shape (P prompts × K samples).

    python bench/step_cost.py               # --model qwen-random at the README's settings (on a GPU: ~6 minutes)
    python bench/step_cost.py --smollm2     # --model smollm2 at smol_pipeline.sh's settings (CPU: ~15 minutes)
    python bench/step_cost.py --small       # anywhere: the tiny model, small batches, in seconds (the tests run it)
    python bench/step_cost.py --smollm2 --vllm   # RLOO and sampling through the vLLM engine (installed: README, vLLM)

qwen-random is Qwen2.5-0.5B's shape and tokenizer with random weights (they cost what trained ones cost): fixed-length
rows (prompt + response = --length tokens), and a random model never stops, so every RLOO completion runs to
--max-new-tokens: the worst case. smollm2 is a real model: its rows are the chain's (Countdown prompts and "sums"
traces), and its samples stop where it stops them. Each trainer runs --steps steps; the first warms up and is left
out of the figures. Peak memory: the GPU's allocator peak, or on the CPU the peak resident memory of a process of
its own per trainer.
"""
import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402
import sampling  # noqa: E402

FULL = dict(model="qwen-random", length=512, steps=3, sft=dict(batch_size=8, grad_accum=8),
            dpo=dict(batch_size=4, grad_accum=16), reward_model=dict(batch_size=8, grad_accum=4),
            rloo=dict(prompts_per_step=16, k=8, micro_prompts=1, max_new_tokens=1024), generate=(64, 256))
SMALL = dict(model="tiny", length=64, steps=3, sft=dict(batch_size=4, grad_accum=2), dpo=dict(batch_size=2, grad_accum=2),
             reward_model=dict(batch_size=2, grad_accum=2),
             rloo=dict(prompts_per_step=2, k=4, micro_prompts=1, max_new_tokens=16), generate=(8, 16))
SMOLLM2 = dict(model="smollm2", length=0, steps=3, sft=dict(batch_size=8, grad_accum=2), dpo=dict(batch_size=4, grad_accum=2),
               reward_model=dict(batch_size=4, grad_accum=2),
               rloo=dict(prompts_per_step=4, k=8, micro_prompts=1, max_new_tokens=256), generate=(64, 96))


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """Seconds spent inside wrapped functions, by label; tokens (attention-mask sums) through the model with a gradient."""

    def __init__(self):
        self.seconds, self.tokens = {}, 0

    def wrap(self, label, fn, count_tokens=False):
        def timed(*args, **kwargs):
            if count_tokens and torch.is_grad_enabled():
                self.tokens += int(kwargs.get("attention_mask", args[2] if len(args) > 2 else None).sum())
            synchronize()
            tick = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize()
            key = label(*args, **kwargs) if callable(label) else label
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - tick
            return out
        return timed


def rows(tokenizer, length, n):
    """n preference rows whose prompt + response is `length` tokens (one Qwen token per " a"; near it for tiny); or,
    with length 0, the smol chain's: a Countdown prompt, its "sums" trace chosen, an "attempts" trace rejected."""
    if length == 0:
        from calculator import synthetic_warmstart
        chosen, rejected = (synthetic_warmstart(n, 0, "3to4:sft", trace=t) for t in ("sums", "attempts"))
        return [{"prompt": c["query"], "chosen": c["completion"], "rejected": r["completion"], "chat": False}
                for c, r in zip(chosen, rejected)]
    prompt = "Write the letter a, again and again."
    room = length - len(common.encode(tokenizer, prompt, chat=True)["input_ids"]) - 1
    return [{"prompt": prompt, "chosen": " a" * room, "rejected": " a" * (room - 1 - i % 3)} for i in range(n)]


def run_trainer(name, cfg, workdir, vllm=False):
    """Run one trainer for cfg["steps"] steps; (seconds per step, tokens per step, peak GiB, RLOO split or None).
    vllm: RLOO samples with the engine; its start (outside the steps) joins the split as seconds."""
    import dpo
    import reward_model
    import rloo
    import sft
    module = {"sft": sft, "dpo": dpo, "reward_model": reward_model, "rloo": rloo}[name]
    settings, steps, out = cfg[name], cfg["steps"], os.path.join(workdir, name)
    tokenizer = common.load_tokenizer(cfg["model"])
    per_step = settings.get("batch_size", 1) * settings.get("grad_accum", 1)
    data = os.path.join(workdir, f"{name}.jsonl")
    with open(data, "w") as f:
        for r in rows(tokenizer, cfg["length"], per_step * steps + 2):
            sft_row = {"query": r["prompt"], "completion": r["chosen"]} if not r.get("chat", True) else \
                {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            f.write(json.dumps(r if name != "sft" else sft_row) + "\n")
    clock, common_args = Clock(), dict(model=cfg["model"], steps=steps, log_every=1, eval_every=0, save_every=10 ** 9,
                                       out_dir=out)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with contextlib.ExitStack() as patches:   # the trainer's functions are put back after (the bench may run in-process)
        def patch(attribute, value):
            patches.enter_context(mock.patch.object(module, attribute, value))
        patch("save_checkpoint", lambda *a, **k: None)   # the step, not the disk
        if name == "reward_model":
            patch("rewards", clock.wrap("forward", module.rewards, count_tokens=True))
            module.main(module.Args(data=data, eval_rows=2, **settings, **common_args))
        elif name == "rloo":
            real_sampler = module.make_sampler

            def timed_sampler(*args, **kwargs):
                tick = time.perf_counter()
                sample, engine = real_sampler(*args, **kwargs)
                clock.seconds["start"] = time.perf_counter() - tick
                return clock.wrap("sampling", sample), engine
            patch("make_sampler", timed_sampler)
            patch("sequence_logprobs", clock.wrap("forward", common.sequence_logprobs, count_tokens=True))
            patch("_logps", clock.wrap(lambda *a, **k: "policy" if torch.is_grad_enabled() else "π_ref", module._logps))
            module.main(module.Args(puzzles="3to4:train", n_prompts=settings["prompts_per_step"] * steps,
                                    eval_prompts=0, sample_every=0, vllm=vllm, **settings, **common_args))
        else:
            patch("sequence_logprobs", clock.wrap("forward", common.sequence_logprobs, count_tokens=True))
            extra = dict(eval_rows=2) if name == "sft" else {}
            module.main(module.Args(data=data, **extra, **settings, **common_args))
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"time"' in line]
    seconds = statistics.mean(m["time"] for m in logged[1:])   # the first step warms up
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # the CPU: this process's peak resident memory
    peak /= 2 ** 30
    split = None
    if name == "rloo":   # over all steps (the warm-up included): shares of the total
        total = sum(m["time"] for m in logged)
        split = {k: clock.seconds.get(k, 0.0) / total for k in ("sampling", "π_ref")}
        split["update"] = 1 - sum(split.values())
        if vllm:
            split["engine start s"] = clock.seconds["start"]
    return seconds, clock.tokens / steps, peak, split


def compare_generate(cfg, vllm=False):
    """Greedy decoding of `batch` Countdown prompts with transformers' generate (its own "sdpa" attention) and with
    sampling.generate (our loop; on the CPU, grouped key/value heads read in place), then RLOO's sampling shape at T 1:
    P prompts × K copies, each prompt read once. (seconds, tokens) of each, and whether the greedy tokens agree.
    vllm: both again through the engine (sampling.make_sampler), and the engine's start."""
    from calculator import make_puzzles
    from countdown_reward import warmstart_query
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_tools import transformers_generate
    device, dtype = common.device_and_dtype()
    tokenizer = common.load_tokenizer(cfg["model"])
    model = common.load_model(cfg["model"], tokenizer, device=device)
    ours_attention = model.config._attn_implementation
    batch, new = cfg["generate"]
    prompts = [common.encode(tokenizer, warmstart_query(p["nums"], p["target"]))["input_ids"]
               for p in make_puzzles(batch, seed=0)]
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def timed(fn, *args, **kwargs):
        synchronize()
        tick = time.perf_counter()
        completions, _ = fn(*args, **kwargs)
        synchronize()
        return time.perf_counter() - tick, completions
    results = {}
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), autocast:
        results["transformers"] = timed(transformers_generate, model, tokenizer, prompts, new, temperature=0)
    model.set_attn_implementation(ours_attention)
    results["ours"] = timed(sampling.generate, model, tokenizer, prompts, new, temperature=0)
    p, k = cfg["rloo"]["prompts_per_step"], cfg["rloo"]["k"]
    results["rloo"] = timed(sampling.generate, model, tokenizer, [q for q in prompts[:p] for _ in range(k)], new)
    if vllm:
        tick = time.perf_counter()
        sample, _ = sampling.make_sampler(tokenizer, cfg["model"], model, use_vllm=True)
        results["start"] = time.perf_counter() - tick
        results["vllm"] = timed(sample, prompts, new, temperature=0)
        results["vllm rloo"] = timed(sample, [q for q in prompts[:p] for _ in range(k)], new)
    return batch, new, p, k, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the tiny model at small batches (CPU, seconds)")
    parser.add_argument("--smollm2", action="store_true", help="the real smollm2 at smol_pipeline.sh's settings")
    parser.add_argument("--vllm", action="store_true", help="RLOO and sampling through the vLLM engine too")
    parser.add_argument("--only", default="sft,dpo,reward_model,rloo,generate", help="comma-separated parts to run")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)   # one part, its row alone
    args = parser.parse_args()
    cfg = SMALL if args.small else SMOLLM2 if args.smollm2 else FULL
    parts = args.only.split(",")
    device, dtype = common.device_and_dtype()
    if not args.row:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        length = f"rows of {cfg['length']} tokens" if cfg["length"] else "rows of the smol chain"
        print(f"{name} | --model {cfg['model']} | {common.mixed_precision(device, dtype)[2]} | {length}")
        print(f"{'trainer':<13} {'settings':<58} {'s/step':>7} {'tokens/s':>9} {'peak GiB':>9}  RLOO step")
    if device == "cpu" and not args.row:   # a process per trainer: its own peak resident memory
        for part in (p for p in ("sft", "dpo", "reward_model", "rloo", "generate") if p in parts):
            flags = [f"--{flag}" for flag in ("small", "smollm2", "vllm") if getattr(args, flag)]
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, "--only", part, "--row"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"step_cost.py: {part} failed:\n{done.stderr[-2000:]}")
            print(done.stdout, end="", flush=True)
        return
    with tempfile.TemporaryDirectory() as workdir:
        for trainer in ("sft", "dpo", "reward_model", "rloo"):
            if trainer not in parts:
                continue
            with contextlib.redirect_stdout(io.StringIO()):   # the trainers' own log lines
                seconds, tokens, peak, split = run_trainer(trainer, cfg, workdir, args.vllm and trainer == "rloo")
            settings = " ".join(f"{k}={v}" for k, v in cfg[trainer].items())
            note = " ".join(f"{k} {v:.1f}" if k.endswith(" s") else f"{k} {v:.0%}" for k, v in split.items()) if split else ""
            trainer += " (vLLM)" if args.vllm and trainer == "rloo" else ""
            print(f"{trainer:<13} {settings:<58} {seconds:7.2f} {tokens / seconds:9.0f} "
                  f"{'-' if peak is None else f'{peak:.1f}':>9}  {note}", flush=True)
    if "generate" in parts:
        batch, new, p, k, results = compare_generate(cfg, args.vllm)
        (theirs, a), (ours, b), (rloo, c) = results["transformers"], results["ours"], results["rloo"]
        print(f"generate, greedy, {batch} prompts × ≤ {new} new tokens: transformers {theirs:.1f} s "
              f"({sum(map(len, a)) / theirs:.0f} tokens/s), ours {ours:.1f} s ({sum(map(len, b)) / ours:.0f} tokens/s, "
              f"{theirs / ours:.2f}×), same tokens: {a == b}")
        print(f"generate, RLOO's sampling, {p} prompts × K {k} at T 1, ≤ {new} new tokens: ours {rloo:.1f} s "
              f"({sum(map(len, c)) / rloo:.0f} tokens/s)")
        if args.vllm:
            (greedy, d), (sampled, e) = results["vllm"], results["vllm rloo"]
            print(f"vLLM engine: start {results['start']:.1f} s; greedy {greedy:.1f} s ({sum(map(len, d)) / greedy:.0f} "
                  f"tokens/s, {ours / greedy:.2f}× ours), same tokens as ours: {d == b}; RLOO's sampling {sampled:.1f} s "
                  f"({sum(map(len, e)) / sampled:.0f} tokens/s)")


if __name__ == "__main__":
    main()
