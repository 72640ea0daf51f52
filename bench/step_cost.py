"""What a training step costs: seconds per step, tokens per second and peak memory of each trainer at its README
settings, with `--model qwen-random` (Qwen2.5-0.5B's shape and tokenizer, random weights: they cost what trained
ones cost); RLOO's step split into sampling, the π_ref pass and the update; and transformers' `generate` with its
dynamic KV cache beside a static cache (whose decode step transformers compiles with torch.compile on CUDA).

    python bench/step_cost.py            # on a GPU: full size, README settings (~6 minutes on an H100-class card)
    python bench/step_cost.py --small    # anywhere: the tiny model, small batches, in seconds (the tests run it)

Every sequence is as long as the settings allow: fixed-length rows (prompt + response = --length tokens), and
random weights never stop, so every RLOO completion runs to --max-new-tokens: the worst case, the one that
decides whether a run fits. Each trainer runs --steps steps; the first warms up and is left out of the figures.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402

FULL = dict(model="qwen-random", length=512, steps=3, sft=dict(batch_size=8, grad_accum=8),
            dpo=dict(batch_size=4, grad_accum=16), reward_model=dict(batch_size=8, grad_accum=4),
            rloo=dict(prompts_per_step=16, k=8, micro_prompts=1, max_new_tokens=1024), generate=(64, 256))
SMALL = dict(model="tiny", length=64, steps=3, sft=dict(batch_size=4, grad_accum=2), dpo=dict(batch_size=2, grad_accum=2),
             reward_model=dict(batch_size=2, grad_accum=2),
             rloo=dict(prompts_per_step=2, k=4, micro_prompts=1, max_new_tokens=16), generate=(8, 16))


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
    """n preference rows whose prompt + response is `length` tokens (one Qwen token per " a"; near it for tiny)."""
    prompt = "Write the letter a, again and again."
    room = length - len(common.encode(tokenizer, prompt, chat=True)["input_ids"]) - 1
    return [{"prompt": prompt, "chosen": " a" * room, "rejected": " a" * (room - 1 - i % 3)} for i in range(n)]


def run_trainer(name, cfg, workdir):
    """Run one trainer for cfg["steps"] steps; (seconds per step, tokens per step, peak GiB, RLOO split or None)."""
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
            f.write(json.dumps(r if name != "sft" else {"messages": [{"role": "user", "content": r["prompt"]},
                                                                   {"role": "assistant", "content": r["chosen"]}]}) + "\n")
    clock, common_args = Clock(), dict(model=cfg["model"], steps=steps, log_every=1, eval_every=0, save_every=10 ** 9,
                                       out_dir=out)
    module.save_checkpoint = lambda *a, **k: None   # the step, not the disk
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if name == "reward_model":
        module.rewards = clock.wrap("forward", module.rewards, count_tokens=True)
        module.main(module.Args(data=data, eval_rows=2, **settings, **common_args))
    elif name == "rloo":
        real_sampler = module.make_sampler

        def timed_sampler(*args, **kwargs):
            sample, engine = real_sampler(*args, **kwargs)
            return clock.wrap("sampling", sample), engine
        module.make_sampler = timed_sampler
        module.sequence_logprobs = clock.wrap("forward", common.sequence_logprobs, count_tokens=True)
        module._logps = clock.wrap(lambda *a, **k: "policy" if torch.is_grad_enabled() else "π_ref", module._logps)
        module.main(module.Args(puzzles="3to4:train", n_prompts=settings["prompts_per_step"] * steps, eval_prompts=0,
                                sample_every=0, **settings, **common_args))
    else:
        module.sequence_logprobs = clock.wrap("forward", common.sequence_logprobs, count_tokens=True)
        extra = dict(eval_rows=2) if name == "sft" else {}
        module.main(module.Args(data=data, **extra, **settings, **common_args))
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"time"' in line]
    seconds = statistics.mean(m["time"] for m in logged[1:])   # the first step warms up
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    split = None
    if name == "rloo":   # over all steps (the warm-up included): shares of the total
        total = sum(m["time"] for m in logged)
        split = {k: clock.seconds.get(k, 0.0) / total for k in ("sampling", "π_ref")}
        split["update"] = 1 - sum(split.values())
    return seconds, clock.tokens / steps, peak, split


def compare_generate(cfg):
    """Greedy decoding of a batch with transformers' dynamic cache and with a static cache (compiled on CUDA)."""
    from transformers import GenerationConfig
    device, dtype = common.device_and_dtype()
    tokenizer = common.load_tokenizer(cfg["model"])
    model = common.load_model(cfg["model"], tokenizer, device=device)
    batch, new = cfg["generate"]
    prompt = common.encode(tokenizer, "Using the numbers [95, 36, 32], create an equation that equals 91.", chat=True)
    ids = torch.tensor([prompt["input_ids"]] * batch, device=device)
    results = {}
    for cache in ("dynamic", "static"):
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  cache_implementation=None if cache == "dynamic" else "static")
        for attempt in range(2):   # the first call compiles (static on CUDA) and warms up
            synchronize()
            tick = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            synchronize()
            results[cache] = (time.perf_counter() - tick, out[:, ids.shape[1]:].tolist())
    return batch, new, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the tiny model at small batches (CPU, seconds)")
    parser.add_argument("--only", default="sft,dpo,reward_model,rloo,generate", help="comma-separated parts to run")
    args = parser.parse_args()
    cfg = SMALL if args.small else FULL
    device, dtype = common.device_and_dtype()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{name} | --model {cfg['model']} | {common.mixed_precision(device, dtype)[2]} | rows of {cfg['length']} tokens")
    print(f"{'trainer':<13} {'settings':<58} {'s/step':>7} {'tokens/s':>9} {'peak GiB':>9}  RLOO step")
    parts = args.only.split(",")
    with tempfile.TemporaryDirectory() as workdir:
        for trainer in ("sft", "dpo", "reward_model", "rloo"):
            if trainer not in parts:
                continue
            with contextlib.redirect_stdout(io.StringIO()):   # the trainers' own log lines
                seconds, tokens, peak, split = run_trainer(trainer, cfg, workdir)
            settings = " ".join(f"{k}={v}" for k, v in cfg[trainer].items())
            note = " ".join(f"{k} {v:.0%}" for k, v in split.items()) if split else ""
            print(f"{trainer:<13} {settings:<58} {seconds:7.2f} {tokens / seconds:9.0f} "
                  f"{'-' if peak is None else f'{peak:.1f}':>9}  {note}", flush=True)
    if "generate" in parts:
        batch, new, results = compare_generate(cfg)
        (dynamic, a), (static, b) = results["dynamic"], results["static"]
        verdict = "keep the static cache" if dynamic / static >= 1.5 else "keep transformers' default (dynamic)"
        print(f"generate, greedy, {batch} × {new} new tokens: dynamic cache {dynamic:.2f} s, static cache "
              f"{'+ torch.compile ' if torch.cuda.is_available() else ''}{static:.2f} s ({dynamic / static:.2f}×), "
              f"same tokens: {a == b} → {verdict}")


if __name__ == "__main__":
    main()
