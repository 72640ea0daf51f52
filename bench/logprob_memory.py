"""Peak memory of common.sequence_logprobs against log_softmax(...).gather(...) at Qwen2.5's vocabulary.

    python bench/logprob_memory.py          # ~1 minute on 2 CPU cores, ~6 GB of RAM

Shape: 4 sequences × 512 tokens, hidden 896, vocabulary 151 936 (Qwen2.5-0.5B), fp32, every position a
completion token (the worst case). Each method runs in a fresh process; its peak resident memory
above the inputs (hidden states and the output layer) is read from the kernel (VmHWM, reset before
the method runs). The naive method first materialises the logits; the figure the issue targets is
what it adds above those logits, against everything ours adds (ours never holds the full logits).
Both in inference (no grad) and in training (forward + backward). Values are compared to 1e-5.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, T, H, V = 4, 512, 896, 151_936
LOGITS_MB = B * T * V * 4 / 2 ** 20


def _rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


class Stand_in(__import__("torch").nn.Module):
    """The two pieces of a causal LM that sequence_logprobs touches: a decoder and an output layer."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden, self.head = hidden, __import__("torch").nn.Linear(H, V, bias=False)

    def get_decoder(self):
        return lambda **_: SimpleNamespace(last_hidden_state=self.hidden)

    def get_output_embeddings(self):
        return self.head


def inputs():
    import torch
    torch.manual_seed(0)
    hidden = torch.randn(B, T, H, requires_grad=True)
    model = Stand_in(hidden)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    completion = torch.ones(B, T, dtype=torch.bool)
    completion[:, 0] = False
    return model, ids, mask, completion


def naive(model, ids, mask, completion, temperature):
    import torch
    logits = model.head(model.hidden)                                         # (B, T, V): the logits themselves
    logp = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(2, ids[:, 1:, None])[..., 0]
    return (logp * completion[:, 1:]).sum(1)


def ours(model, ids, mask, completion, temperature):
    from common import sequence_logprobs
    return sequence_logprobs(model, ids, mask, completion, temperature=temperature)


def child(method, grad):
    import torch
    torch.set_num_threads(2)
    model, ids, mask, completion = inputs()
    fn = {"naive": naive, "ours": ours}[method]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                            # reset the peak (VmHWM) to the current RSS
    base = _rss_mb("VmRSS")
    with torch.set_grad_enabled(grad):
        out = fn(model, ids, mask, completion, 0.7)
        if grad:
            out.sum().backward()
    print(_rss_mb("VmHWM") - base)


def main():
    if len(sys.argv) > 1:
        return child(sys.argv[1], sys.argv[2] == "grad")
    import torch
    model, ids, mask, completion = inputs()
    with torch.no_grad():
        a, b = naive(model, ids, mask, completion, 0.7), ours(model, ids, mask, completion, 0.7)
    per_token = ((a - b).abs() / completion[:, 1:].sum(1)).max().item()
    print(f"B×T×V = {B}×{T}×{V}, fp32 logits = {LOGITS_MB:.0f} MB; sums of {T - 1} token log-probs ≈ {a.mean():.0f}: "
          f"max |naive − ours| = {(a - b).abs().max():.1e} ({per_token:.1e} per token, fp32 summation order)")
    print(f"{'mode':<10} {'naive: above inputs':>20} {'above the logits':>17} {'ours: above inputs':>19} {'ours / naive':>13}")
    for mode in ("no-grad", "grad"):
        peak = {m: float(subprocess.run([sys.executable, __file__, m, mode], capture_output=True, text=True, check=True)
                         .stdout.split()[-1]) for m in ("naive", "ours")}
        added = peak["naive"] - LOGITS_MB
        print(f"{mode:<10} {peak['naive']:>17.0f} MB {added:>14.0f} MB {peak['ours']:>16.0f} MB {peak['ours'] / added:>12.1%}")
    print(f"(grad: ours includes the output layer's weight gradient, V×H fp32 = {V * H * 4 / 2 ** 20:.0f} MB, held twice "
          f"while a chunk's share is added to it; the naive peak comes before its backward pass)")


if __name__ == "__main__":
    main()
