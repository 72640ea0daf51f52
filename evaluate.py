"""Evaluation (spec §1.5, §2.3): Countdown scores and UltraFeedback win rates, every setting written beside them.

    python evaluate.py --model out/rloo                                      # Countdown-Tasks-3to4 rows 327 680…, greedy
    python evaluate.py --model out/rloo --samples 8 --temperature 1.0        # pass@1…8 from 8 samples
    python evaluate.py --model out/sft --best-of 1,3,5,10 --temperatures 0.3,0.7,1.0   # best-of-N sweep (report 001)
    python evaluate.py --model out/sft --tool                                # calculator answer in the prompt (report 000)
    python evaluate.py --responses leaderboard.jsonl                         # score a file of {num, target, response}
    python evaluate.py --task ultrafeedback --model out/dpo --judge out/rm   # win rate vs Qwen2.5-0.5B-Instruct
    NVIDIA_API_KEY=... python evaluate.py --task ultrafeedback --model out/dpo --judge nemotron

Countdown: per prompt the scores 0 / 0.1 / 1 of compute_score (a bare response scored as the original
evaluation did); mean score, accuracy (share of 1.0), format rate (share > 0), pass@k by the unbiased
estimator 1 − C(n−c, k)/C(n, k), each with a 95% interval. Best-of-N (keep the sample the rule
verifier scores highest) and tool-augmented numbers go in their own labelled rows, never mixed with
model-only ones. Writes results.json, results.md, per_prompt.jsonl and leaderboard.jsonl to --out-dir
(and per_prompt_tools.jsonl with --tools).

UltraFeedback: the policy and the reference model answer the same prompts with the same sampling
settings and the same chat template; a judge scores both; win rate = wins / prompts (spec §1.5: a tie
is not a win), beside it (wins + ½ ties) / prompts and the counts.
Nemotron judgements are cached on disk (an interrupted run never asks twice); the API key is read
from an environment variable and never printed or written.
"""
import hashlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from calculator import SHAPES, solve
from common import (InputError, check_args, encode, hub_dataset, load_puzzles, load_tokenizer, puzzle,
                    read_jsonl, run, run_dir, seed_everything)
from countdown_reward import score_response, warmstart_query
from sampling import make_sampler
from tools import tool_loop, tool_names, tool_query, uses_tool_answer


@dataclass
class Args:
    model: str = "out/rloo"           # the policy: hub id, model directory, run directory, or `tiny`
    task: str = "countdown"           # countdown | ultrafeedback
    out_dir: str = "out/eval"         # results.json, results.md, per_prompt.jsonl, leaderboard.jsonl
    puzzles: str = "hub"              # Countdown prompts: hub | a shape (3to4, easy, course; :train/:test/:sft/:rl) | a .json/.jsonl
    n: int = 1024                     # prompts
    skip: int = -1                    # first puzzle row; -1: 327 680 for hub (TinyZero's test rows follow its first
                                      # 327 680), 0 for a file
    seed: int = 0                     # seeds generated puzzle shapes and sampling
    responses: str = ""               # score this .jsonl of {num(s), target, response} instead of sampling a model
    samples: int = 1                  # samples per prompt (pass@k for k ≤ samples)
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0                # nucleus sampling
    repetition_penalty: float = 1.0   # > 1 discourages repeated tokens (report 000 evaluated with 1.1 at T 0)
    max_new_tokens: int = 1024        # completion length limit
    best_of: str = ""                 # best-of-N with the rule verifier, e.g. "1,3,5,10"
    temperatures: str = ""            # best-of-N sweep temperatures, e.g. "0.3,0.7,1.0" (default: --temperature)
    tool: bool = False                # also report tool-augmented rows: the calculator's answer in the prompt
    tools: str = ""                   # also report tool-loop rows (tools.py): calculate | calculate,solve
    max_calls: int = 4                # tool loop: calls per answer (a call beyond ends the answer)
    batch_size: int = 64              # prompts per generate call (transformers)
    vllm: bool = torch.cuda.is_available()  # sample with vLLM, when installed (default: on CUDA; on a CPU: --vllm)
    prompts: str = "ultrafeedback"    # UltraFeedback prompts: ultrafeedback (test_prefs) | a .jsonl with "prompt"
    reference: str = "Qwen/Qwen2.5-0.5B-Instruct"  # the model the policy is compared with
    judge: str = "nemotron"           # nemotron (API) | a reward model directory (reward_model.py)
    judge_url: str = "https://integrate.api.nvidia.com/v1"  # OpenAI-compatible base URL of the judge
    judge_model: str = "nvidia/llama-3.1-nemotron-70b-reward"  # model name sent to the judge
    api_key_env: str = "NVIDIA_API_KEY"  # environment variable holding the judge's API key
    collect: str = ""                 # run directories (comma-separated) of tiny_pipeline.sh: one table over their evals


# -------------------------------------------------------------------------------- Countdown metrics

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_ci(values):
    """Mean and a 95% normal-approximation interval half-width (0 for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(half)


def countdown_metrics(scores):
    """Metrics of a (prompts, samples) array of 0 / 0.1 / 1 scores, each as (value, 95% half-width).

    score, acc and format are averaged over all samples; pass@k per prompt, then over prompts.
    """
    scores = np.asarray(scores, dtype=float)
    n = scores.shape[1]
    correct = (scores == 1.0).sum(1)
    out = {"score": mean_ci(scores.mean(1)), "acc": mean_ci((scores == 1.0).mean(1)),
           "format": mean_ci((scores > 0).mean(1))}
    for k in sorted({1, 2, 4, 8, 16, 32, 64, n} & set(range(1, n + 1))):
        out[f"pass@{k}"] = mean_ci([pass_at_k(n, c, k) for c in correct])
    return out


def best_of_n(scores, n):
    """Best-of-N with the rule verifier: per prompt, the highest score among the first n draws."""
    return np.asarray(scores, dtype=float)[:, :n].max(1)


def tool_prompt(numbers, target):
    """The WarmStart prompt with the calculator's answer placed before the assistant turn (report 000)."""
    query = warmstart_query(numbers, target)
    head, tail = query.rsplit("\nAssistant:", 1)
    answer = solve(list(numbers), int(target), timeout=5)
    hint = f"The correct answer is <answer>{answer}</answer>." if answer else "The calculator found no answer."
    return f"{head}\n{hint}\nAssistant:{tail}"


# --------------------------------------------------------------------------------------- Countdown

def sample_responses(sample, tokenizer, prompts, args, n, temperature):
    """n responses per prompt text, as decoded strings: a (prompts, n) list of lists."""
    ids = [encode(tokenizer, p)["input_ids"] for p in prompts for _ in range(n)]
    completions, _ = sample(ids, max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    return [texts[i:i + n] for i in range(0, len(texts), n)]


def number_list(text, flag, kind, least):
    """'1,3,5' → [1, 3, 5]; a value that is not a `kind` ≥ least is one line naming the flag."""
    try:
        values = [kind(x) for x in text.split(",")] if text else []
    except ValueError:
        values = None
    if values is None or not all(least <= v < math.inf for v in values):
        raise InputError(f"{flag} {text}: a comma-separated list of {kind.__name__}s ≥ {least}")
    return values


def first_row(args):
    return args.skip if args.skip >= 0 else 327_680 if args.puzzles == "hub" else 0


def settings(args, temperature, samples):
    return {"temperature": temperature, "top_p": args.top_p if temperature > 0 else 1.0, "samples": samples,
            "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty,
            "decoding": "greedy" if temperature == 0 else "sampled"}


def countdown(args, out_dir):
    if args.responses:
        rows = read_jsonl(args.responses, required=("target", "response"))
        groups = {}
        for number, row in enumerate(rows, 1):
            p = puzzle(row, f"{args.responses}, row {number}")
            if not isinstance(row["response"], str):
                raise InputError(f"{args.responses}, row {number}: response is not text")
            groups.setdefault((tuple(p["nums"]), p["target"]), []).append(row["response"])
        puzzles = [{"nums": list(k[0]), "target": k[1]} for k in groups]
        responses = list(groups.values())
        if len({len(r) for r in responses}) != 1:
            raise InputError(f"{args.responses}: every puzzle needs the same number of responses")
        sample = tokenizer = None
    else:
        puzzles = load_puzzles(args.puzzles, args.n, seed=args.seed, skip=first_row(args))
        tokenizer = load_tokenizer(args.model)
        sample, _ = make_sampler(tokenizer, args.model, use_vllm=args.vllm, seed=args.seed,
                                  batch_size=args.batch_size)
        queries = [warmstart_query(p["nums"], p["target"]) for p in puzzles]
        responses = sample_responses(sample, tokenizer, queries, args, args.samples, args.temperature)
    scores = [[score_response(r, p) for r in rs] for p, rs in zip(puzzles, responses)]
    rows = [{"label": "model", **settings(args, args.temperature, len(scores[0])), **countdown_metrics(scores)}]

    if args.best_of and sample:
        for temperature in number_list(args.temperatures, "--temperatures", float, 0) or [args.temperature]:
            ns = sorted(number_list(args.best_of, "--best-of", int, 1))
            draws = sample_responses(sample, tokenizer, queries, args, max(ns), temperature)
            draw_scores = [[score_response(r, p) for r in rs] for p, rs in zip(puzzles, draws)]
            for n in ns:
                best = best_of_n(draw_scores, n)
                rows.append({"label": f"best-of-{n} (rule verifier)", **settings(args, temperature, n),
                             "score": mean_ci(best), "acc": mean_ci(best == 1.0), "format": mean_ci(best > 0)})
    if args.tool and sample:
        tool_responses = sample_responses(sample, tokenizer, [tool_prompt(p["nums"], p["target"]) for p in puzzles],
                                          args, args.samples, args.temperature)
        tool_scores = [[score_response(r, p) for r in rs] for p, rs in zip(puzzles, tool_responses)]
        rows.append({"label": "tool-augmented (calculator answer in prompt)",
                     **settings(args, args.temperature, args.samples), **countdown_metrics(tool_scores)})

    if args.tools and sample:
        rows.append(tool_loop_row(sample, tokenizer, puzzles, args, out_dir))

    with open(out_dir / "per_prompt.jsonl", "w") as f:
        for p, rs, ss in zip(puzzles, responses, scores):
            f.write(json.dumps({"nums": p["nums"], "target": p["target"], "responses": rs, "scores": ss}) + "\n")
    with open(out_dir / "leaderboard.jsonl", "w") as f:
        for p, rs in zip(puzzles, responses):
            f.write(json.dumps({"num": p["nums"], "target": p["target"], "response": rs[0]}) + "\n")
    generated = args.puzzles.partition(":")[0] in SHAPES
    source = args.responses or (f"{args.puzzles} (seed {args.seed})" if generated else f"{args.puzzles} rows {first_row(args)}…")
    return rows, {"prompts": len(puzzles), "source": source}


def tool_loop_row(sample, tokenizer, puzzles, args, out_dir=None):
    """The tool loop's row: the tools in the prompt, calls run as the model writes them (tools.tool_loop). Beside the
    score: calls per answer, the share of answers that called a tool, invalid calls per answer, and the share of
    answers written without checking (of all responses: an answer the calculator never confirmed, neither its value
    as the target nor its value minus the target as 0: tools.uses_tool_answer). With out_dir, every response (the
    harness's text in it), its score, calls and checks go to per_prompt_tools.jsonl."""
    try:
        names = tool_names(args.tools)
    except ValueError as e:
        raise InputError(str(e)) from None
    prompts = [p for p in puzzles for _ in range(args.samples)]
    runs = tool_loop(sample, tokenizer, [encode(tokenizer, tool_query(p["nums"], p["target"], names))["input_ids"]
                                         for p in prompts],
                     args.max_new_tokens, args.max_calls, names, temperature=args.temperature, top_p=args.top_p,
                     repetition_penalty=args.repetition_penalty)
    texts = [tokenizer.decode(r["ids"], skip_special_tokens=True) for r in runs]
    scores = [score_response(t, p) for t, p in zip(texts, prompts)]
    unchecked = [s > 0 and not uses_tool_answer(t, r["checked"], p["target"]) for s, t, r, p in zip(scores, texts, runs, prompts)]
    if out_dir is not None:
        with open(Path(out_dir) / "per_prompt_tools.jsonl", "w") as f:
            for n, p in enumerate(puzzles):
                mine = range(n * args.samples, (n + 1) * args.samples)
                f.write(json.dumps({"nums": p["nums"], "target": p["target"], "responses": [texts[i] for i in mine],
                                    "scores": [scores[i] for i in mine], "calls": [runs[i]["calls"] for i in mine],
                                    "checked": [runs[i]["checked"] for i in mine]}) + "\n")
    per_prompt = lambda values: np.asarray(values, dtype=float).reshape(len(puzzles), args.samples)
    return {"label": f"tool loop ({', '.join(names)}; ≤ {args.max_calls} calls)",
            **settings(args, args.temperature, args.samples), **countdown_metrics(per_prompt(scores)),
            "calls": mean_ci(per_prompt([r["calls"] for r in runs]).mean(1)),
            "used tool": mean_ci(per_prompt([r["calls"] > 0 for r in runs]).mean(1)),
            "invalid calls": mean_ci(per_prompt([r["invalid"] for r in runs]).mean(1)),
            "unchecked answers": mean_ci(per_prompt(unchecked).mean(1))}


# ------------------------------------------------------------------------------------ UltraFeedback

class NemotronJudge:
    """Rewards from an OpenAI-compatible chat-completions endpoint that answers "reward:<float>".

    Retries 429 and 5xx with exponential back-off; every judgement is appended to a JSONL cache at
    once, so an interrupted run resumes without asking twice. A request the endpoint refuses (HTTP 400,
    413, 422: Nemotron's takes at most 4 096 tokens) is recorded as unjudged (None), cached too, and the
    run goes on. The key lives only in the request header.
    """

    REPLY = re.compile(r"^\s*reward\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*$")

    def __init__(self, base_url, model, api_key, cache_path, retries=6, backoff=1.0):
        self.url, self.model, self.key = base_url.rstrip("/") + "/chat/completions", model, api_key
        self.cache_path, self.retries, self.backoff = Path(cache_path), retries, backoff
        self.cache = {}
        if self.cache_path.exists():
            lines = self.cache_path.read_text().splitlines()
            if lines and not _json_object(lines[-1]):   # torn by a kill mid-write: drop it, or the next append joins it
                print(f"{self.cache_path}: last line incomplete, dropped")
                self.cache_path.write_text("".join(line + "\n" for line in lines[:-1]))
            for row in read_jsonl(self.cache_path, required=("key", "reward")):
                self.cache[row["key"]] = row["reward"]

    def reward(self, prompt, response):
        key = hashlib.sha256(json.dumps([self.model, prompt, response]).encode()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self._ask(prompt, response)
            with open(self.cache_path, "a") as f:
                f.write(json.dumps({"key": key, "reward": self.cache[key]}) + "\n")
        return self.cache[key]

    def _ask(self, prompt, response):
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt},
                                                             {"role": "assistant", "content": response}]}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json",
                                                                        "Authorization": f"Bearer {self.key}"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=120) as reply:
                    content = json.loads(reply.read())["choices"][0]["message"]["content"]
                break
            except urllib.error.HTTPError as e:
                if e.code in (400, 413, 422):
                    print(f"judge at {self.url}: HTTP {e.code} {e.reason} (over its token limit?): recorded as unjudged")
                    return None
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    self._wait(f"HTTP {e.code} {e.reason}", attempt, e.headers.get("Retry-After"))
                    continue
                raise InputError(f"judge at {self.url}: HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                if attempt < self.retries:
                    self._wait(f"cannot connect ({e.reason})", attempt)
                    continue
                raise InputError(f"judge at {self.url}: cannot connect ({e.reason})") from None
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                raise InputError(f"judge at {self.url}: reply is not a chat completion") from None
        match = self.REPLY.match(content or "")
        if not match:
            raise InputError(f"judge at {self.url}: expected 'reward:<number>', got {str(content)[:80]!r}")
        return float(match.group(1))

    def _wait(self, why, attempt, retry_after=None):
        delay = float(retry_after or self.backoff * 2 ** attempt)
        print(f"judge at {self.url}: {why}; retrying in {delay:.3g} s ({attempt + 1} of {self.retries})", flush=True)
        time.sleep(delay)


def _json_object(line):
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def win_rate(policy_rewards, reference_rewards):
    """Spec §1.5: a prompt counts 1 when the policy's reward is higher than the reference's, else 0; the mean with a
    95% interval. Beside it the rate with ties counted ½, and the counts. A prompt either side of which the judge
    could not score (None) is left out, and counted."""
    judged = [(p, r) for p, r in zip(policy_rewards, reference_rewards) if p is not None and r is not None]
    if not judged:
        raise InputError(f"the judge scored none of the {len(policy_rewards)} prompts")
    p, r = np.array(judged, dtype=float).T
    return {"win_rate": mean_ci(p > r), "win_rate_ties_half": mean_ci((p > r) + 0.5 * (p == r)),
            "wins": int((p > r).sum()), "ties": int((p == r).sum()), "losses": int((p < r).sum()),
            "unjudged": len(policy_rewards) - len(judged)}


def ultrafeedback(args, out_dir):
    if args.prompts == "ultrafeedback":
        prompts = list(hub_dataset("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")["prompt"][:args.n])
    else:
        prompts = [r["prompt"] for r in read_jsonl(args.prompts, required=("prompt",))][:args.n]
    if args.judge == "nemotron":
        key = os.environ.get(args.api_key_env)
        if not key:
            raise InputError(f"the judge needs an API key in the environment variable {args.api_key_env}")
        judge = NemotronJudge(args.judge_url, args.judge_model, key, out_dir / "judge_cache.jsonl")
        rewards = lambda responses, stopped: [judge.reward(p, r) for p, r in zip(prompts, responses)]
    else:
        import reward_model
        rm, rm_tokenizer = reward_model.load(args.judge)
        rewards = lambda responses, stopped: reward_model.score(rm, rm_tokenizer, prompts, responses, ends=stopped).tolist()

    answers, stops = {}, {}
    for name in (args.model, args.reference):  # same prompts, template and sampling settings for both
        tokenizer = load_tokenizer(name)
        sample, _ = make_sampler(tokenizer, name, use_vllm=args.vllm, seed=args.seed, batch_size=args.batch_size)
        ids = [encode(tokenizer, p, chat=True)["input_ids"] for p in prompts]
        completions, stops[name] = sample(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p, repetition_penalty=args.repetition_penalty)
        answers[name] = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
        del sample
    policy, reference = (rewards(answers[name], stops[name]) for name in (args.model, args.reference))
    with open(out_dir / "per_prompt.jsonl", "w") as f:
        for row in zip(prompts, answers[args.model], answers[args.reference], policy, reference):
            f.write(json.dumps(dict(zip(("prompt", "response", "reference_response", "reward", "reference_reward"), row))) + "\n")
    with open(out_dir / "leaderboard.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, answers[args.model]))
    row = {"label": f"win rate vs {args.reference}", **settings(args, args.temperature, 1), **win_rate(policy, reference)}
    return [row], {"prompts": len(prompts), "judge": args.judge if args.judge != "nemotron" else args.judge_model}


# -------------------------------------------------------------------------------------------- main

def markdown(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r if isinstance(r[k], tuple)))
    counts = [k for k in ("wins", "ties", "losses", "unjudged") if any(k in r for r in rows)]
    head = ["label", "decoding", "T", "top-p", "rep. penalty", "samples", "max tokens", *keys, *counts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["decoding"], f"{r['temperature']:g}", f"{r['top_p']:g}", f"{r['repetition_penalty']:g}",
                 str(r["samples"]), str(r["max_new_tokens"])]
        cells += [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" if k in r else "" for k in keys]
        cells += [str(r.get(k, "")) for k in counts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_best_of(rows, path):
    """Accuracy against N, one line per temperature, when best-of-N rows exist and matplotlib is installed."""
    best = [r for r in rows if r["label"].startswith("best-of")]
    plt = _pyplot()
    if not best or plt is None:
        return
    for t in sorted({r["temperature"] for r in best}):
        line = [r for r in best if r["temperature"] == t]
        plt.errorbar([r["samples"] for r in line], [r["acc"][0] for r in line], [r["acc"][1] for r in line],
                     marker="o", capsize=3, label=f"T {t:g}")
    plt.xlabel("N (samples, best kept by the rule verifier)")
    plt.ylabel("accuracy")
    plt.legend()
    plt.savefig(path, dpi=120, bbox_inches="tight")
    plt.close()


def collect(run_dirs, out_dir):
    """One table of the evaluations under each run directory (RUN/eval/NAME/results.json).

    One run: each value ± its 95% interval. Several runs (seeds): mean ± standard deviation over runs.
    Also training curves (loss, reward, accuracy, KL against step) when matplotlib is installed.
    """
    runs = [Path(d) for d in run_dirs]
    found = [{p.parent.name for p in (r / "eval").glob("*/results.json")} for r in runs]
    names = sorted(set.intersection(*found), key=_stage_order)   # the evaluations every run has
    if not names:
        raise InputError(f"no eval/*/results.json common to {', '.join(map(str, runs))}")
    if set.union(*found) - set(names):
        print(f"left out (not in every run): {', '.join(sorted(set.union(*found) - set(names)))}")
    results = {name: [json.loads((r / "eval" / name / "results.json").read_text()) for r in runs] for name in names}
    tables = []   # (name, that row of every run): each evaluation's first row, and its tool-loop row if it has one
    for name, per_run in results.items():
        for i, row in enumerate(per_run[0]["rows"]):
            if i == 0 or row["label"].startswith("tool loop"):
                tables.append((name if i == 0 else f"{name} [{row['label']}]", [result["rows"][i] for result in per_run]))
    keys = ["score", "acc", "format"] + [k for k in ("calls", "unchecked answers") if any(k in rows[0] for _, rows in tables)]
    lines = [f"| model | decoding | T | samples | max tokens | {' | '.join(keys)} |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    acc = {}  # eval name -> accuracy of each run, for the changes from SFT below
    for name, rows in tables:
        acc[name] = [row["acc"][0] for row in rows] if all("acc" in row for row in rows) else None
        cells = []
        for k in keys:
            values = [row[k][0] for row in rows if k in row]
            cells.append("" if not values else f"{values[0]:.3f} ± {rows[0][k][1]:.3f}" if len(runs) == 1 else
                         f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}")
        r = rows[0]
        lines.append(f"| {name} | {r['decoding']} | {r['temperature']:g} | {r['samples']} | {r['max_new_tokens']} | "
                     f"{' | '.join(cells)} |")
    spread = "± 95% interval" if len(runs) == 1 else f"mean ± sd over {len(runs)} runs"
    sets = dict.fromkeys((result.get("source", ""), result["prompts"]) for per_run in results.values() for result in per_run)
    held_out = f"{results[names[0]][0]['prompts']} held-out prompts" if len({n for _, n in sets}) == 1 else \
        "held-out prompts: " + ", ".join(f"{n} of {source}" for source, n in sets)
    table = f"{spread}; {held_out}\n\n" + "\n".join(lines) + "\n"
    table += accuracy_changes(acc) if len(runs) > 1 else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(table)
    print(table, end="")
    plot_curves(runs[0], out_dir / "curves.png")
    return table


def accuracy_changes(acc):
    """Each stage's accuracy minus that of the SFT checkpoint it started from, run by run (the same seed, the same
    decoding), in points: per run, then mean ± sd, the figure to hold against the spread between seeds."""
    lines = []
    for name, values in acc.items():
        stage, _, decoding = name.partition("-")
        sft = acc.get(f"sft-{decoding}")
        if stage in ("base", "sft") or values is None or sft is None:
            continue
        change = 100 * (np.array(values) - np.array(sft))
        lines.append(f"| {name} | {', '.join(f'{c:+.1f}' for c in change)} | "
                     f"{change.mean():+.1f} ± {change.std(ddof=1):.1f} |")
    if not lines:
        return ""
    return ("\nchange in accuracy from the SFT checkpoint of the same run, points\n\n"
            "| model | per run | mean ± sd |\n|---|---|---|\n" + "\n".join(lines) + "\n")


def _stage_order(name):
    stage, _, decoding = name.partition("-")
    return (["base", "sft", "rloo", "dpo"].index(stage) if stage in ("base", "sft", "rloo", "dpo") else 9, decoding)


def plot_curves(run, path):
    """Loss, reward, accuracy and KL against step for the trainers of one run (needs matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return
    panels = [("loss", ["loss", "eval_loss"]), ("reward", ["reward", "eval_reward"]), ("accuracy", ["acc", "eval_acc"]),
              ("KL", ["kl"])]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for stage in ("sft", "rloo", "dpo"):
        path_ = run / stage / "metrics.jsonl"
        records = [json.loads(line) for line in path_.read_text().splitlines()] if path_.exists() else []
        for ax, (title, keys) in zip(axes, panels):
            for key in keys:
                points = [(m["step"], m[key]) for m in records if key in m]
                if points:
                    ax.plot(*zip(*points), marker="." if key.startswith("eval") else None, label=f"{stage} {key}")
            ax.set_title(title)
            ax.set_xlabel("step")
    for ax, (title, _) in zip(axes, panels):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # e.g. KL with β = 0: rloo.py then loads no reference model and measures no KL
            ax.text(0.5, 0.5, f"no {title} logged" + (" (β = 0)" if title == "KL" else ""), ha="center",
                    va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(args):
    if args.collect:
        return collect(args.collect.split(","), Path(args.out_dir))
    check_args(args)
    if args.task not in ("countdown", "ultrafeedback"):
        raise InputError(f"--task {args.task!r}: use countdown or ultrafeedback")
    number_list(args.best_of, "--best-of", int, 1)      # every flag checked now, not after the model has sampled
    number_list(args.temperatures, "--temperatures", float, 0)
    if args.tools:
        try:
            tool_names(args.tools)
        except ValueError as e:
            raise InputError(str(e)) from None
    if args.task == "ultrafeedback" and (args.tools or args.tool or args.best_of or args.max_calls != Args.max_calls):
        raise InputError("--tools, --tool, --max-calls and --best-of are Countdown's: they do nothing with "
                         "--task ultrafeedback")
    if not args.tools and args.max_calls != Args.max_calls:
        raise InputError(f"--max-calls {args.max_calls} without --tools does nothing: add --tools calculate")
    if args.responses and (args.best_of or args.tool or args.tools):
        raise InputError("--best-of, --tool and --tools sample a model: they do not combine with --responses")
    seed_everything(args.seed)
    out_dir = run_dir(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, about = (countdown if args.task == "countdown" else ultrafeedback)(args, out_dir)
    results = {"task": args.task, "model": None if args.responses else args.model, **about, "rows": rows,
               "args": asdict(args)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(rows)
    header = " | ".join(f"{k}: {v}" for k, v in {"task": args.task, "model": results["model"], **about}.items() if v)
    (out_dir / "results.md").write_text(f"{header}\n\n{table}")
    plot_best_of(rows, out_dir / "best_of.png")
    print(table, end="")
    return results


if __name__ == "__main__":
    run(main, Args)
