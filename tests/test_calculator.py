"""The Countdown calculator: answers always score 1.0, completeness against brute force, the CLI."""
import itertools
import json
import random
import subprocess
import sys
import time
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import pytest

from calculator import (MIXED_MARKED, make_puzzles, puzzles_from_spec, search_completion, solution_steps, solve,
                        sums_completion, synthetic_warmstart)
from countdown_reward import score_response, warmstart_query

ROOT = Path(__file__).resolve().parents[1]


def scores(answer, numbers, target):
    return score_response(f"<answer>{answer}</answer>", {"target": target, "numbers": numbers})


@lru_cache(maxsize=None)
def brute_force_values(numbers):
    """Every value of every expression over all of `numbers` (a sorted tuple): no pruning, signs kept."""
    if len(numbers) == 1:
        return {Fraction(numbers[0])}
    values = set()
    n = len(numbers)
    for mask in range(1, 2 ** n - 1):
        left = tuple(sorted(numbers[i] for i in range(n) if mask >> i & 1))
        right = tuple(sorted(numbers[i] for i in range(n) if not mask >> i & 1))
        for a in brute_force_values(left):
            for b in brute_force_values(right):
                values |= {a + b, a - b, a * b}
                if b != 0:
                    values.add(a / b)
    return values


def test_known_answers():
    assert scores(solve([95, 36, 32], 91), [95, 36, 32], 91) == 1.0
    assert solve([6, 1, 3, 4], 24) is not None and scores(solve([6, 1, 3, 4], 24), [6, 1, 3, 4], 24) == 1.0


def test_fraction_only_puzzles_are_solved_through_fractions():
    assert solve([1, 3, 4, 6], 24, fractions=False) is None  # 6 / (1 - 3/4) is the only way
    answer = solve([1, 3, 4, 6], 24)
    assert scores(answer, [1, 3, 4, 6], 24) == 1.0
    for numbers, target in [([34, 1913, 22, 44], 5322), ([880, 20, 480, 37542], 682013)]:
        assert solve(numbers, target, fractions=False) is None
        assert scores(solve(numbers, target), numbers, target) == 1.0


@pytest.mark.parametrize("numbers, target", [([1, 1], 7), ([1, 1, 1], 10), ([2, 3, 5], 100), ([13, 17, 19, 23, 29, 31], 99999989)])
def test_unsolvable_returns_none(numbers, target):
    assert solve(numbers, target) is None


def test_complete_against_brute_force():
    rng = random.Random(0)
    solvable = 0
    for _ in range(60):
        numbers = tuple(sorted(rng.randint(0, 9) for _ in range(rng.randint(2, 4))))
        reachable = brute_force_values(numbers)
        for target in range(-15, 80):
            answer = solve(list(numbers), target)
            assert (answer is not None) == (Fraction(target) in reachable), (numbers, target, answer)
            if answer is not None:
                assert scores(answer, list(numbers), target) == 1.0
                solvable += 1
    assert solvable > 1000


@pytest.mark.parametrize("kwargs", [dict(), dict(count=(3, 6), low=1, high=999_999, target=(1, 999_999), log_uniform=True)],
                         ids=["3to4", "course"])
def test_generated_puzzles_are_solved_and_answers_score_one(kwargs):
    for p in make_puzzles(150, seed=3, **kwargs):
        assert scores(solve(p["nums"], p["target"]), p["nums"], p["target"]) == 1.0


def test_splits_are_disjoint_and_sft_rl_cut_train():
    def drawn(split, seed):
        return {(tuple(sorted(p["nums"])), p["target"]) for p in puzzles_from_spec(f"easy:{split}", 6_000, seed)}
    test, train, sft, rl = (drawn(split, seed) for seed, split in enumerate(["test", "train", "sft", "rl"]))
    assert not test & train and not test & sft and not test & rl and not sft & rl
    assert len(sft & train) > 0.8 * len(sft) and len(rl & train) > 0.8 * len(rl)   # both are parts of train
    assert 0.2 < len(rl) / len(sft) < 0.4                                             # 2 tenths against 7
    with pytest.raises(ValueError, match="easy:dev"):
        puzzles_from_spec("easy:dev", 1, seed=0)


def test_timeout_is_honoured():
    start = time.perf_counter()
    assert solve([2, 3, 5, 7, 11, 13, 17, 19], 9999991, timeout=0.2) is None  # exhaustive would take minutes
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("numbers, target", [([1.5, 2], 3), ([5], 5), ([], 1), (list(range(9)), 3), ([3, -4], 1),
                                             ("12", 3), ([True, 2], 3), ([1, 2], 2.5)])
def test_bad_puzzles_raise_value_error(numbers, target):
    with pytest.raises(ValueError):
        solve(numbers, target)


def test_make_puzzles_is_seeded_in_range_and_leaves_global_random_alone():
    random.seed(7)
    state = random.getstate()
    a = make_puzzles(300, seed=11)
    assert random.getstate() == state
    assert a == make_puzzles(300, seed=11) and a != make_puzzles(300, seed=12)
    for p in a:
        assert 3 <= len(p["nums"]) <= 4 and all(1 <= n <= 99 for n in p["nums"]) and 10 <= p["target"] <= 100
    assert {len(p["nums"]) for p in a} == {3, 4}
    b = make_puzzles(50, seed=1, count=(5, 5), low=100, high=999, target=(1000, 2000))
    assert all(len(p["nums"]) == 5 and all(100 <= n <= 999 for n in p["nums"]) and 1000 <= p["target"] <= 2000 for p in b)


def test_solution_steps_are_exact_arithmetic():
    assert solution_steps("95 - (36 - 32)") == ["36 - 32 = 4", "95 - 4 = 91"]
    assert solution_steps("6 / (1 - 3 / 4)") == ["3 / 4 = 3/4", "1 - (3/4) = 1/4", "6 / (1/4) = 24"]


def test_synthetic_warmstart_rows():
    rows = synthetic_warmstart(40, seed=5)
    assert len(rows) == 40
    for row in rows:
        gt = {"target": row["target"], "nums": row["nums"]}
        assert row["query"] == warmstart_query(row["nums"], row["target"])
        assert row["completion"].startswith("\n<think>\n") and "</think>\n<answer>" in row["completion"]
        assert score_response(row["completion"], gt) == 1.0
        assert score_response(row["query"] + row["completion"], gt) == 1.0


def test_synthetic_traces_are_honest():
    """Every attempt's arithmetic is exact and its verdict true; the misses are distinct."""
    for row in synthetic_warmstart(300, seed=2, shape="easy"):
        *misses, found = row["completion"].split("</think>")[0].split("<think>\n")[1].strip().split("\n")
        for line in misses + [found]:
            *steps, verdict = line.split(", ")
            for step in steps:
                left, value = step.split(" = ")
                a, op, b = (x if x in ("+", "-", "*", "/") else Fraction(x.strip("()")) for x in left.split(" "))
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op] == Fraction(value), line
            reached = Fraction(steps[-1].split(" = ")[1]) == row["target"]
            assert verdict == ("found it." if reached else f"not {row['target']}."), line
        assert len(set(misses)) == len(misses) and found not in misses


def test_search_trace_by_hand():
    # (9, 5) makes 14 4 45, 9 / 5 is not whole; 1 needs 2 − 1 = 1, 2 + 1 = 3, 1 − 2 < 0, 2 / 1 = 2,
    # 2 · 1 = 2 (≤ 45), 1 / 2 not whole: no value in both lists. (9, 1) makes 10 8 9 9; 5 needs
    # 2 − 5 < 0, 7, 3, 2 / 5 no, 2 · 5 = 10 (≤ 10), 5 / 2 no: 10 is made by 9 + 1, and 10 / 5 = 2.
    assert search_completion([9, 5, 1], 2) == (
        "\n<think>\n9 5: 14 4 45 -; 1: 1 3 - 2 2 -; no.\n"
        "9 1: 10 8 9 9; 5: - 7 3 - 10! -; 9 + 1 = 10, 10 / 5 = 2, found it.\n</think>\n<answer>(9 + 1) / 5</answer>")
    # x − v = t, the pair on the right: 9 needs 7 − 9 < 0, 16, 9 − 7 = 2 (made by 4 − 2), 7 / 9 no, 63 > 8, 9 / 7 no.
    assert search_completion([4, 2, 9], 7).split("\n")[2] == "4 2: 6 2 8 2; 9: - 16 2! - - -; 4 - 2 = 2, 9 - 2 = 7, found it."
    assert search_completion([4, 2, 9], 7).endswith("<answer>9 - (4 - 2)</answer>")
    assert search_completion([1, 1, 1], 50) is None
    # mark=False: the same lists without the "!"; the verdict and the answer do not change.
    assert search_completion([9, 5, 1], 2, mark=False).split("\n")[3] == (
        "9 1: 10 8 9 9; 5: - 7 3 - 10 -; 9 + 1 = 10, 10 / 5 = 2, found it.")
    row, = synthetic_warmstart(1, seed=0, shape="easy:sft", trace="search-unmarked")
    marked = search_completion(row["nums"], row["target"])
    assert "!" in marked and row["completion"] == marked.replace("!", "")
    # search-mixed: each row is one of the two, marked with probability MIXED_MARKED (400 rows: sd ≤ 0.025).
    rows = synthetic_warmstart(400, seed=0, shape="easy:sft", trace="search-mixed")
    both = [(r["completion"], search_completion(r["nums"], r["target"])) for r in rows]
    assert all(c in (m, m.replace("!", "")) for c, m in both)
    n_marked = sum(c == m for c, m in both)
    assert 0 < n_marked < len(both) and abs(n_marked / len(both) - MIXED_MARKED) < 0.1
    with pytest.raises(ValueError, match="3 numbers, got 4"):
        search_completion([1, 2, 3, 4], 10)


def test_search_trace_is_complete_on_every_easy_puzzle():
    """It answers exactly when the exhaustive solver does, over all 3 numbers in 1–9 and targets 1–50."""
    for nums in itertools.combinations_with_replacement(range(1, 10), 3):
        for target in range(1, 51):
            completion = search_completion(list(nums), target)
            assert (completion is None) == (solve(list(nums), target) is None), (nums, target)
            if completion:
                assert score_response(completion, {"target": target, "numbers": list(nums)}) == 1.0


def test_search_traces_are_honest():
    """Each line's lists, marks and verdict recomputed independently; one line per pair, in the prompt's order."""
    for row in synthetic_warmstart(300, seed=3, shape="easy:train", trace="search"):
        a, b, c = row["nums"]
        t = row["target"]
        lines = row["completion"].split("</think>")[0].split("<think>\n")[1].strip().split("\n")
        for line, ((p, q), x) in zip(lines, [((a, b), c), ((a, c), b), ((b, c), a)]):
            pair, rest = line.split(": ", 1)
            makes, rest = rest.split("; ", 1)
            left, needs, verdict = rest.split(": ", 1)[0], *rest.split(": ", 1)[1].split("; ", 1)
            y, z = max(p, q), min(p, q)
            assert pair == f"{y} {z}" and left == str(x)
            made = {y + z, y - z, y * z} | ({Fraction(y, z)} if z else set())
            whole = [Fraction(v) for v in made if Fraction(v).denominator == 1]
            assert makes.split() == [str(v) if Fraction(v).denominator == 1 else "-"
                                     for v in (y + z, y - z, y * z, Fraction(y, z))]
            # v + x, v − x, x − v, v · x, v / x, x / v = t, solved for v (v / x only up to what the pair makes)
            want = [t - x, t + x, x - t, Fraction(t, x), t * x if t * x <= max(whole) else None, Fraction(x, t)]
            shown = ["-" if v is None or v < 0 or Fraction(v).denominator != 1 else f"{v}!" if v in whole else str(v)
                     for v in want]
            assert needs.split() == shown, line
            assert verdict.endswith("found it.") == any(s.endswith("!") for s in shown), line
        assert lines[-1].endswith("found it.") and all(line.endswith("no.") for line in lines[:-1])
        steps = lines[-1].split("; ")[-1].split(", ")[:2]
        for step in steps:
            left, value = step.split(" = ")
            u, op, v = left.split()
            assert {"+": Fraction(u) + Fraction(v), "-": Fraction(u) - Fraction(v), "*": Fraction(u) * Fraction(v),
                    "/": Fraction(u) / Fraction(v)}[op] == Fraction(value), line
        assert steps[1].endswith(f"= {t}")
        assert score_response(row["completion"], {"target": t, "nums": row["nums"]}) == 1.0


def test_sums_trace_by_hand():
    # 75 + 8 + 45 + 16 = 144 exceeds 96 by 48: the numbers taken away add up to 24. No single number is 24;
    # pairs in the prompt's order: 75 + 8, 75 + 45, 75 + 16, 8 + 45, then 8 + 16 = 24.
    assert sums_completion([75, 8, 45, 16], 96) == (
        "\n<think>\n75 + 8 = 83, 83 + 45 = 128, 128 + 16 = 144, 144 - 96 = 48, 48 / 2 = 24: take away numbers that "
        "add up to 24.\n75 + 8 = 83, 75 + 45 = 120, 75 + 16 = 91, 8 + 45 = 53, 8 + 16 = 24, found it: "
        "75 + 45 - 8 - 16 = 96.\n</think>\n<answer>75 + 45 - 8 - 16</answer>")
    assert sums_completion([95, 36, 32], 91).split("\n")[3] == "36 is one of the numbers, found it: 95 + 32 - 36 = 91."
    assert sums_completion([10, 1, 4], 15).split("\n")[2] == "10 + 1 = 11, 11 + 4 = 15, found it."
    # + and − cannot: a sum below the target, or an odd excess; then the solver's answer, step by step
    assert sums_completion([19, 3, 1], 58).split("\n")[2:4] == [
        "19 + 3 = 22, 22 + 1 = 23, less than 58: + and - cannot reach it.", "19 * 3 = 57, 57 + 1 = 58, found it."]
    assert sums_completion([8, 3, 2], 2).split("\n")[2:4] == [
        "8 + 3 = 11, 11 + 2 = 13, 13 - 2 = 11, which is odd: + and - cannot reach it.", "8 - 2 = 6, 6 / 3 = 2, found it."]
    assert sums_completion([1, 1, 1], 50) is None


def test_sums_trace_uses_plus_and_minus_exactly_when_some_signs_reach_the_target():
    """Against every sign pattern: a + / − answer exactly when one exists; the answer scores 1 whenever one exists."""
    for p in puzzles_from_spec("3to4:train", 1500, seed=4) + [{"nums": [4, 5, 6, 9], "target": t} for t in range(30)]:
        nums, t = p["nums"], p["target"]
        signs = any(sum(s * n for s, n in zip(pattern, nums)) == t and 1 in pattern
                    for pattern in itertools.product((1, -1), repeat=len(nums)))
        completion = sums_completion(nums, t)
        answer = completion.split("<answer>")[1].split("</answer>")[0] if completion else ""
        assert (set(answer) <= set("0123456789 +-") and bool(answer)) == signs, (nums, t, completion)
        if completion:
            assert score_response(completion, {"target": t, "nums": nums}) == 1.0
        else:
            assert solve(nums, t) is None


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "calculator.py"), *args], capture_output=True, text=True, timeout=60)


def test_cli_solves():
    out = run_cli("95", "36", "32", "--target", "91")
    assert out.returncode == 0
    assert scores(out.stdout.strip(), [95, 36, 32], 91) == 1.0


@pytest.mark.parametrize("args", [["3.5", "2", "--target", "1"], ["5", "--target", "5"], ["--target", "5"],
                                  [*map(str, range(1, 20)), "--target", "5"], ["1", "2", "--target", "x"],
                                  ["1", "2"], ["--warmstart", "x.jsonl", "--n", "0"],
                                  ["1", "2", "--target", "3", "--timeout", "nan"],
                                  ["1", "2", "--target", "3", "--timeout", "-1"]])
def test_cli_bad_input_is_one_line_and_exit_2(args):
    out = run_cli(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_writes_warmstart_jsonl(tmp_path):
    path = tmp_path / "ws.jsonl"
    out = run_cli("--warmstart", str(path), "--n", "5", "--seed", "2")
    assert out.returncode == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and all(set(r) >= {"query", "completion"} for r in rows)


def test_the_cli_gives_up_after_a_minute_by_default_and_a_nan_timeout_is_refused(monkeypatch, capsys):
    import calculator
    seen = []
    monkeypatch.setattr(calculator, "solve", lambda numbers, target, timeout=None: seen.append(timeout) or "1 + 2")
    calculator.main(["1", "2", "--target", "3"])
    assert seen == [60.0]   # 8 numbers without a solution take minutes to rule out
    with pytest.raises(ValueError, match="timeout nan"):
        solve([1, 2], 3, timeout=float("nan"))   # a deadline of nan never fires
