"""Peak memory of one training step of each trainer at Qwen2.5-0.5B's shape, measured, and a formula for the GPU.

    python bench/memory.py               # ~10 minutes on 2 CPU cores, up to ~14 GB of RAM
    python bench/memory.py --predict     # the formula's GPU table only (~1 minute)

Measured (`--model qwen-random`: Qwen2.5-0.5B's architecture, 494 M random parameters; on the CPU in fp32,
as the trainers run there): each trainer runs two optimizer steps in a fresh process, each step two
micro-batches; the peak resident memory of the second step (VmHWM, reset when the first step ends) is
split into
  weights      4 bytes × N (and a frozen model resident beside the policy: π_ref in rloo.py)
  AdamW        the two moments, 8 bytes × N (fused AdamW: no temporaries)
  gradients    4 bytes × N, held from the first micro-batch through the second, as at the defaults
  activations  the remainder: what the forward pass saves for backward, and the backward pass's transients
and set beside the formula's prediction of the same peak.

The formula (`predict_peak`): 16 N for weights, gradients and moments; autograd's saved activations, a
per-token slope and a constant fitted on qwen-random by counting the tensors autograd saves
(torch.autograd.graph.saved_tensors_hooks) at two batch sizes, in fp32 or under bf16 autocast (whose constant
is its bf16 copies of the weights); for a causal LM the output layer's weight gradient, built one chunk at a
time while all activations are still held (2 × V × H fp32); a frozen model's pass, when that is larger.
Predicted: peak GPU memory of each trainer at the README's default settings, the card it needs, and with
activation checkpointing (--gradient-checkpointing).
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 2 ** 30
N = 494_032_768                 # Qwen2.5-0.5B's parameters
V, H, LAYERS = 151_936, 896, 24
HEAD_GRADIENT = 2 * V * H * 4   # the tied output layer's fp32 gradient: a chunk's share and the running sum
MEASURE = dict(batch=4, tokens=256, accum=2, k=4, new_tokens=64)   # the measured runs' shape


# ----------------------------------------------------------------------------------------- the formula

def activations(costs, tokens, dtype="bf16", checkpointing=False, reward=False):
    """Bytes autograd holds for the backward pass of a micro-batch of `tokens` tokens (costs: `measure_costs`).

    Checkpointed, the layers keep only their inputs, and the backward pass recomputes one layer at a time in full.
    """
    kind = f"{'rm' if reward else 'lm'}-{dtype}"
    slope, constant = costs[f"{kind}-full"]
    if checkpointing:
        slope = costs[f"{kind}-ckpt"][0] + slope / LAYERS
        constant = costs[f"{kind}-ckpt"][1]
    return slope * tokens + constant


def predict_peak(costs, tokens, dtype="bf16", checkpointing=False, reward=False, resident=0, visiting=0, cuda=True):
    """Peak bytes of one training step, the larger of its two phases:
    train   fp32 weights + gradients + AdamW moments (16 N), the largest micro-batch's activations and, for a
            causal LM, the output layer's gradient transient;
    visit   a frozen model's pass (π_ref, a reward model; no gradient) beside weights + moments (12 N: zero_grad
            freed the gradients);
    plus what stays throughout (resident: a vLLM engine's share, a frozen model kept beside the policy) and on
    CUDA the context and allocator reserve (~1 GiB, typical for PyTorch)."""
    train = 16 * N + activations(costs, tokens, dtype, checkpointing, reward) + (0 if reward else HEAD_GRADIENT)
    return max(train, 12 * N + visiting) + resident + (GB if cuda else 0)


def saved_bytes(model, batch, tokens, autocast, reward):
    """Bytes of the distinct tensors autograd saves for backward in one forward pass (parameters excluded)."""
    import torch

    import common
    import reward_model
    ids = torch.randint(0, V - 1000, (batch, tokens))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    completion = torch.ones(batch, tokens, dtype=torch.bool)
    completion[:, :tokens // 4] = False
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if reward:
            reward_model.rewards(model, ids, mask)
        else:
            common.sequence_logprobs(model, ids, mask, completion)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in params)


def measure_costs():
    """{kind-dtype-full|ckpt: (bytes per token, constant bytes)} of saved activations, fitted at 1 and 3 × 64 tokens."""
    import torch

    import common
    torch.manual_seed(0)
    tokenizer = common.load_tokenizer("qwen-random")
    costs = {}
    for kind in ("lm", "rm"):
        model = common.load_model("qwen-random", tokenizer, dtype=torch.float32, device="cpu", reward=kind == "rm").train()
        for checkpointing in (False, True):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for dtype in ("fp32", "bf16"):
                small, large = (saved_bytes(model, b, 64, dtype == "bf16", kind == "rm") for b in (1, 3))
                slope = (large - small) / (2 * 64)
                costs[f"{kind}-{dtype}-{'ckpt' if checkpointing else 'full'}"] = (slope, small - slope * 64)
        del model
    return costs


# ----------------------------------------------------------------------------------- the measured runs

def _rss(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def child(trainer, workdir):
    """Run two steps of `trainer` at MEASURE's shape; print a JSON record of memory at the step boundaries."""
    if trainer == "costs":
        return print(json.dumps(measure_costs()))
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import common
    torch.set_num_threads(2)
    libc = ctypes.CDLL("libc.so.6")
    record = {"trainer": trainer}
    largest = [0]

    def spy(fn):   # the largest micro-batch the step passes through the model with a gradient
        def wrapped(model, input_ids, *args, **kwargs):
            if torch.is_grad_enabled():
                largest[0] = max(largest[0], input_ids.numel())
            return fn(model, input_ids, *args, **kwargs)
        return wrapped

    def after_step(optimizer, *_):
        libc.malloc_trim(0)
        if "after_step_1" not in record:
            record["after_step_1"] = _rss()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # the peak (VmHWM) restarts at the current RSS
        else:
            record["peak_step_2"] = _rss("VmHWM")
    register_optimizer_step_post_hook(after_step)
    b, t, a = MEASURE["batch"], MEASURE["tokens"], MEASURE["accum"]
    tokenizer = common.load_tokenizer("qwen-random")
    prompt = "Write the letter a, again and again."
    filler = lambda n: " a" * n   # one Qwen token per " a"
    plen = len(common.encode(tokenizer, prompt, chat=True)["input_ids"])
    rows = [{"prompt": prompt, "chosen": filler(t - plen - 1), "rejected": filler(t - plen - 1 - i % 3)} for i in range(18)]
    data = os.path.join(workdir, "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    sft_data = os.path.join(workdir, "sft.jsonl")
    with open(sft_data, "w") as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                              {"role": "assistant", "content": r["chosen"]}]}) + "\n" for r in rows)
    common_args = dict(model="qwen-random", steps=2, log_every=1, eval_every=0, save_every=10 ** 9,
                       out_dir=os.path.join(workdir, trainer))
    libc.malloc_trim(0)
    record["base"] = _rss()   # Python, torch, transformers, the tokenizer, the data
    if trainer == "sft":
        import sft
        sft.sequence_logprobs, sft.save_checkpoint = spy(common.sequence_logprobs), lambda *a, **k: None
        sft.main(sft.Args(data=sft_data, batch_size=b, grad_accum=a, eval_rows=2, **common_args))
    elif trainer == "dpo":
        import dpo
        dpo.sequence_logprobs, dpo.save_checkpoint = spy(common.sequence_logprobs), lambda *a, **k: None
        dpo.main(dpo.Args(data=data, batch_size=b // 2, grad_accum=a, **common_args))
    elif trainer == "reward_model":
        import reward_model
        reward_model.rewards, reward_model.save_checkpoint = spy(reward_model.rewards), lambda *a, **k: None
        reward_model.main(reward_model.Args(data=data, batch_size=b // 2, grad_accum=a, eval_rows=2, **common_args))
    elif trainer == "rloo":
        import rloo
        rloo.sequence_logprobs, rloo.save_checkpoint = spy(common.sequence_logprobs), lambda *a, **k: None
        rloo.main(rloo.Args(puzzles="3to4:train", n_prompts=4, eval_prompts=0, k=MEASURE["k"], prompts_per_step=a,
                            micro_prompts=1, max_new_tokens=MEASURE["new_tokens"], kl_coef=0.001, sample_every=0,
                            **common_args))
    record["tokens"] = largest[0]
    print(json.dumps(record))


# ------------------------------------------------------------------------------------------------ main

# The README's defaults, per micro-batch: sequences × the longest allowed (prompt + completion) length.
DEFAULTS = {
    "sft.py": dict(tokens=8 * 1024),                                    # batch 8, --max-len 1024
    "dpo.py": dict(tokens=2 * 4 * 1024),                                # 4 pairs, chosen + rejected, 1024
    "reward_model.py": dict(tokens=2 * 8 * 1024, reward=True),          # 8 pairs, 1024
    "rloo.py (Countdown)": dict(tokens=8 * (140 + 1024), visiting=4 * N),   # K 8 × (prompt + 1024 new); π_ref fp32
    "rloo.py (UltraFeedback)": dict(tokens=8 * (400 + 1024), visiting=4 * N),  # + a bf16 RM visiting after π_ref
}


def run_child(what, workdir):
    """A fresh process (its peak is its own, and what it frees never stays in ours); its last stdout line, as JSON."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))   # big tensors are mmapped: freed memory leaves RSS
    out = subprocess.run([sys.executable, __file__, "--child", what, "--workdir", workdir], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{what}: exit {out.returncode} (-9: killed, out of memory?)\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predict", action="store_true", help="print the GPU predictions only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="/tmp/bench-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    tick = time.time()
    costs = run_child("costs", args.workdir)
    print(f"activations autograd saves, qwen-random (fitted at 1 and 3 × 64 tokens, {time.time() - tick:.0f} s):")
    for key, (slope, constant) in costs.items():
        print(f"  {key:<13} {slope / 1024:7.1f} KiB per token + {constant / GB:4.2f} GiB")
    if not args.predict:
        measured_table(costs, args.workdir)
    predicted_table(costs)


def measured_table(costs, workdir):
    print(f"\nmeasured on the CPU (fp32, qwen-random; micro-batches of {MEASURE['batch']} sequences × {MEASURE['tokens']} "
          f"tokens, {MEASURE['accum']} a step; RLOO: K {MEASURE['k']} × (prompt + {MEASURE['new_tokens']} new), π_ref "
          f"resident), GiB:")
    print(f"{'trainer':<13} {'tokens':>6} {'base':>5} {'weights':>7} {'AdamW':>5} {'grads':>5} "
          f"{'activations':>11} {'peak':>6} {'predicted':>9} {'error':>6} {'time':>5}")
    for trainer in ("sft", "dpo", "reward_model", "rloo"):
        tick = time.time()
        r = run_child(trainer, workdir)
        resident = 4 * N if trainer == "rloo" else 0    # π_ref, fp32 on the CPU
        weights, adam, grads = 4 * N + resident, 8 * N, 4 * N
        remainder = r["peak_step_2"] - r["base"] - weights - adam - grads
        predicted = r["base"] + predict_peak(costs, r["tokens"], "fp32", reward=trainer == "reward_model",
                                             resident=resident, cuda=False)
        print(f"{trainer:<13} {r['tokens']:>6} {r['base'] / GB:5.2f} {weights / GB:7.2f} {adam / GB:5.2f} "
              f"{grads / GB:5.2f} {remainder / GB:11.2f} {r['peak_step_2'] / GB:6.2f} {predicted / GB:9.2f} "
              f"{(predicted - r['peak_step_2']) / r['peak_step_2']:+6.1%} {time.time() - tick:4.0f}s")


CARDS = (16, 24, 40, 48, 80, 141)   # GiB: T4/V100, A10G/L4/RTX 4090, A100-40, L40S/A6000, A100/H100-80, H200


def card(peak, vllm_share=0.0):
    """The smallest common card that holds `peak` bytes with 10% to spare (fragmentation), after vLLM's share."""
    return next((c for c in CARDS if peak <= (0.9 - vllm_share) * c * GB), None)


def predicted_table(costs):
    print("\npredicted peak GPU memory at the README's defaults (fp32 weights + AdamW, bf16 autocast), GiB, and the "
          "smallest card that holds it:")
    print(f"{'trainer':<24} {'tokens':>6} {'activations':>11} {'peak':>5} {'card':>5} "
          f"{'--gradient-checkpointing':>25} {'card':>5}")
    for name, d in DEFAULTS.items():
        reward, visiting = d.get("reward", False), d.get("visiting", 0)
        share = 0.3 if name.startswith("rloo") else 0.0   # rloo.py's --vllm-memory, when vLLM samples
        peak = predict_peak(costs, d["tokens"], reward=reward, visiting=visiting)
        ckpt = predict_peak(costs, d["tokens"], checkpointing=True, reward=reward, visiting=visiting)
        print(f"{name:<24} {d['tokens']:>6} {activations(costs, d['tokens'], reward=reward) / GB:11.1f} "
              f"{peak / GB:5.1f} {card(peak, share) or '-':>5} {ckpt / GB:25.1f} {card(ckpt, share) or '-':>5}")
    print("rloo.py: the card also holds vLLM's share (--vllm-memory 0.3 of it); without vLLM, transformers' generate "
          "needs less than the training pass")


if __name__ == "__main__":
    main()
