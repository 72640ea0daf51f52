"""How long does the tool loop take with transformers, between tokens (one KV cache) against in rounds? Prints seconds,
tokens per second and calls per answer for both, and whether greedy decoding gives the same completions.

    bash tiny_tools.sh && python bench/tool_loop_speed.py             # a tool-trained checkpoint: out/tiny-tools/sft
    python bench/tool_loop_speed.py --model out/tiny-tools/rloo --n 64 --temperature 1.0

Between tokens (what make_sampler's transformers sampler does, sampling.generate's `respond`): every sequence takes one
token a step, the harness's response is fed in as context, a finished sequence leaves the batch. In rounds (what
vLLM does, and what the loop did before): each round samples every unfinished sequence to the end of its piece,
re-reading its prefix, and waits for the round's longest piece. A model that never calls a tool has one round and
nothing to gain: use a checkpoint trained on tool traces.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import encode, load_puzzles, load_tokenizer  # noqa: E402
from sampling import make_sampler  # noqa: E402
from tools import tool_loop, tool_query  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="out/tiny-tools/sft")
    parser.add_argument("--puzzles", default="easy:test")
    parser.add_argument("--n", type=int, default=256, help="prompts")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--max-calls", type=int, default=4)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    sample, _ = make_sampler(tokenizer, args.model, use_vllm=False)
    ids = [encode(tokenizer, tool_query(p["nums"], p["target"]))["input_ids"] for p in load_puzzles(args.puzzles, args.n, seed=1)]
    runs = {}
    for name, sampler in (("between tokens", sample), ("in rounds", lambda prompt_ids, **kw: sample(prompt_ids, **kw))):
        torch.manual_seed(0)
        start = time.perf_counter()
        runs[name] = tool_loop(sampler, tokenizer, ids, args.max_new_tokens, args.max_calls, temperature=args.temperature)
        seconds = time.perf_counter() - start
        tokens = sum(len(r["ids"]) for r in runs[name])
        calls = sum(r["calls"] for r in runs[name]) / len(ids)
        print(f"{name:>15}: {seconds:6.1f} s | {tokens / seconds:6.0f} completion tokens/s | {calls:.2f} calls per answer")
    same = sum(a == b for a, b in zip(*runs.values()))
    print(f"same completions: {same} of {len(ids)}" + (" (sampled: the draws differ)" if args.temperature > 0 else ""))


if __name__ == "__main__":
    main()
