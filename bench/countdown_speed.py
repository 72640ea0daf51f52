"""How fast is calculator.solve on the puzzle shapes it must handle? Prints solved %, median, p99, total.

    python bench/countdown_speed.py            # about a minute on 2 CPU cores
    python bench/countdown_speed.py --n 5000

Three sets, all solvable by construction (calculator.make_puzzles):
  3to4        Countdown-Tasks-3to4 shape: 3–4 numbers in 1–99, targets 10–100
  course      course held-out shape: 3–6 numbers of 1 to 6 digits (log-uniform), targets up to 999 999
  six-digit   3–6 numbers uniform in 1–999 999 (almost all six digits), the slowest shape we know
  fraction    course-shaped puzzles that no integer-only expression solves (each checked by an
              exhaustive integer-only search), e.g. (1913 / 22 + 34) * 44 = 5322; n/10 of them
"""
import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from calculator import make_puzzles, solve  # noqa: E402
from countdown_reward import ANSWER_RE, compute_score, score_response  # noqa: E402

HOSTILE = {"9**9**9**9": "9**9**9**9", "10k nested (": "(" * 10_000 + "1" + ")" * 10_000,
           "100k-char sum": "1 + " * 25_000 + "1", "100k-char spaces": " " * 99_990 + "95 - (36 - 32)",
           "5000-digit literal": "9" * 5_000, "__import__": "__import__('os')", "100k unary -": "-" * 100_000 + "5"}

COURSE = dict(count=(3, 6), low=1, high=999_999, target=(1, 999_999), log_uniform=True)
SIX_DIGIT = dict(COURSE, log_uniform=False)


def fraction_only(n, seed):
    """Course-shaped puzzles whose every solution passes through a non-integer value (~2% of draws)."""
    found = []
    while len(found) < n:
        for p in make_puzzles(200, seed, **dict(COURSE, count=(3, 5)), fractional=True):
            if len(found) < n and solve(p["nums"], p["target"], fractions=False, timeout=2) is None:
                found.append(p)  # (a timeout would count a puzzle in; none happened at 3–5 numbers)
        seed += 1_000_003
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000, help="puzzles per set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'set':<11} {'n':>5} {'solved':>7} {'median ms':>10} {'p99 ms':>8} {'max ms':>8} {'total s':>8}")
    sets = {"3to4": make_puzzles(args.n, args.seed), "course": make_puzzles(args.n, args.seed, **COURSE),
            "six-digit": make_puzzles(args.n, args.seed, **SIX_DIGIT), "fraction": fraction_only(args.n // 10, args.seed)}
    for name, puzzles in sets.items():
        times, solved = [], 0
        for p in puzzles:
            t = time.perf_counter()
            answer = solve(p["nums"], p["target"], timeout=10)
            times.append(time.perf_counter() - t)
            solved += answer is not None and score_response(f"<answer>{answer}</answer>", p) == 1.0
        times.sort()
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        print(f"{name:<11} {len(puzzles):>5} {100 * solved / len(puzzles):>6.1f}% {statistics.median(times) * 1e3:>10.2f} "
              f"{p99 * 1e3:>8.1f} {times[-1] * 1e3:>8.1f} {sum(times):>8.2f}")
    print("\nscorer on hostile answers, ms (best of 5); ground truth = the puzzle [95, 36, 32] → 91,")
    print("or numbers that match the answer's literals, so the answer reaches the parser:")
    for name, answer in HOSTILE.items():
        literals = [int(d) for d in re.findall(r"\d+", answer) if len(d) < 100]
        cells = []
        for numbers in ([95, 36, 32], literals):
            gt = {"target": 91, "numbers": numbers}
            cells.append(min(_time(lambda: compute_score(f"Assistant: <answer>{answer}</answer>", gt)) for _ in range(5)))
        print(f"  {name:<20} {cells[0] * 1e3:8.2f} {cells[1] * 1e3:8.2f}")
    print("extraction from a line of unclosed '<answer>' (the reference's regex rescans the line from each one), ms:")
    for size in (8_192, 32_768):
        line = "Assistant: " + "<answer>" * size
        ours = min(_time(lambda: compute_score(line, {"target": 91, "numbers": [95, 36, 32]})) for _ in range(5))
        regex = _time(lambda: ANSWER_RE.findall(line)) if size <= 8_192 else float("nan")
        print(f"  {size * 8 // 1024:>4} KB  ours {ours * 1e3:8.2f}   regex {regex * 1e3:9.1f}")


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
