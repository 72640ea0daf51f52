"""Countdown calculator: an exact, complete solver, a puzzle generator, synthetic WarmStart data.

    python calculator.py 95 36 32 --target 91                 # prints 95 + 32 - 36
    python calculator.py --warmstart data/warmstart.jsonl --n 2000 --seed 0
    python calculator.py --warmstart data/search.jsonl --shape easy:train --trace search

The "calculator tool" of report 000 (§3.4.2), done exactly: values are rationals (int pairs p/q in
lowest terms), so `6 / (1 - 3 / 4)` = 24 is found, and the search is complete: `solve` returns None
only when no expression over all the numbers reaches the target.

Search (depth-first, target-directed): every expression's last operation splits the numbers into
two groups, t = op(s, l). For each split, enumerate every value s of the smaller group (a table built
bottom-up, one tree per value), and ask the larger group, recursively, for each l that some op needs
(l = t − s, t + s, s − t, t / s, t · s, s / t). What keeps it small, with completeness intact:
  * only non-negative intermediates are needed when the target is ≥ 0: flipping signs through a
    tree turns x ± y into |x| + |y| or ||x| − |y||, and x·y, x/y into |x|·|y|, |x|/|y|;
  * whether a group of numbers can make a value does not depend on how the question arose, so each
    (group, value) query that failed is remembered; groups of ≤ 3 numbers are table look-ups.
Answers use plain non-negative integer literals and the fewest parentheses, and each is checked
with the scorer's own float evaluation before it is returned, so it always scores 1.0.
Speed (bench/countdown_speed.py, 2 CPU cores): p99 under 3 ms on course-shaped puzzles.
"""
import argparse
import ast
import itertools
import json
import math
import operator
import random
import sys
import time
import zlib
from fractions import Fraction
from math import gcd

from countdown_reward import evaluate_expression, warmstart_query

MAX_NUMBERS = 8  # beyond this an exhaustive search is hopeless; the course uses 3–6
_ATOM, _MUL, _ADD = 3, 2, 1  # operator precedence of an expression's top node
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}  # on Fractions: exact


class _OutOfTime(Exception):
    pass


def _check_puzzle(numbers, target):
    if isinstance(numbers, (str, bytes)) or not hasattr(numbers, "__len__"):
        raise ValueError(f"numbers must be a list of integers, got {numbers!r}")
    if not 2 <= len(numbers) <= MAX_NUMBERS:
        raise ValueError(f"need 2 to {MAX_NUMBERS} numbers, got {len(numbers)}")
    for x in list(numbers) + [target]:
        if isinstance(x, bool) or not isinstance(x, int) and not hasattr(x, "__index__"):
            raise ValueError(f"numbers and target must be integers, got {x!r}")
    if any(int(n) < 0 for n in numbers):
        raise ValueError(f"numbers must be non-negative, got {list(numbers)}")


def _rational(p, q):
    """p/q in lowest terms with q > 0: one canonical pair per value, so pairs compare and hash exactly."""
    if q < 0:
        p, q = -p, -q
    g = gcd(p, q)
    return p // g, q // g


def _combine(a, b, signed, fractions):
    """Every (p, q, tree) that one operation makes of two items; a value is the exact rational p/q.

    Plain int pairs instead of `Fraction` objects: most divisions of six-digit numbers are inexact,
    and Fraction's constructor made up a third of the search time.
    """
    (xp, xq, tx), (yp, yq, ty) = (a, b) if a[0] * b[1] >= b[0] * a[1] else (b, a)  # x ≥ y
    if xq == 1 and yq == 1:  # two integers, the common case
        out = [(xp + yp, 1, ("+", tx, ty)), (xp - yp, 1, ("-", tx, ty)), (xp * yp, 1, ("*", tx, ty))]
        if signed and xp != yp:
            out.append((yp - xp, 1, ("-", ty, tx)))
        for n, tn, d, td in ((xp, tx, yp, ty), (yp, ty, xp, tx)) if xp != yp else ((xp, tx, yp, ty),):
            if d != 0 and (fractions or n % d == 0):  # no division by zero; x / x once
                out.append((*_rational(n, d), ("/", tn, td)))
        return out
    out = [(*_rational(xp * yq + yp * xq, xq * yq), ("+", tx, ty)),
           (*_rational(xp * yq - yp * xq, xq * yq), ("-", tx, ty)),
           (*_rational(xp * yp, xq * yq), ("*", tx, ty))]
    if signed:
        out.append((*_rational(yp * xq - xp * yq, xq * yq), ("-", ty, tx)))
    if yp != 0:
        out.append((*_rational(xp * yq, xq * yp), ("/", tx, ty)))
    if xp != 0:
        out.append((*_rational(yp * xq, yq * xp), ("/", ty, tx)))
    return out


def _format(tree, minimal=True):
    """The expression string: fewest parentheses (a - (b + c), a / (b * c)), or all of them.

    Dropping parentheses regroups a + (b - c) as (a + b) - c: equal in exact arithmetic, a few ulps
    apart in the scorer's floats, so a caller checks the result and falls back to minimal=False.
    """
    if not isinstance(tree, tuple):
        return str(tree), _ATOM
    op, left, right = tree
    (el, pl), (er, pr) = _format(left, minimal), _format(right, minimal)
    mine = _ADD if op in "+-" else _MUL
    right_needs = {"+": _ADD, "-": _MUL, "*": _MUL, "/": _ATOM}[op] if minimal else _ATOM
    el = f"({el})" if pl < mine else el
    er = f"({er})" if pr < right_needs else er
    return f"{el} {op} {er}", mine


def _checked(tree, target):
    """The tree as a string whose float value (the scorer's arithmetic) is within 1e-5 of target."""
    for minimal in (True, False):
        expression = _format(tree, minimal)[0]
        value = evaluate_expression(expression)
        if value is not None and abs(value - target) < 1e-5:
            return expression
    return None


def _needed(s, t, signed, fractions):
    """Every l with op(s, l) = t or op(l, s) = t, and how to build that tree from s's and l's trees."""
    (sp, sq), (tp, tq) = s, t
    out = [(_rational(tp * sq - sp * tq, tq * sq), lambda ts, tl: ("+", tl, ts)),      # t = l + s
           (_rational(tp * sq + sp * tq, tq * sq), lambda ts, tl: ("-", tl, ts)),      # t = l − s
           (_rational(sp * tq - tp * sq, tq * sq), lambda ts, tl: ("-", ts, tl))]      # t = s − l
    if sp != 0:
        out += [(_rational(tp * sq, tq * sp), lambda ts, tl: ("*", ts, tl)),           # t = s · l
                (_rational(tp * sp, tq * sq), lambda ts, tl: ("/", tl, ts))]           # t = l / s
        if tp != 0:
            out.append((_rational(sp * tq, sq * tp), lambda ts, tl: ("/", ts, tl)))    # t = s / l
    return [(l, make) for l, make in out if (signed or l[0] >= 0) and (fractions or l[1] == 1)]


def _popcount(mask):
    return bin(mask).count("1")


def _solve_exact(numbers, target, clock, signed, fractions):
    """Trees over all the numbers whose exact value is target, generated lazily (cheapest first).

    reach(mask): every value the numbers in `mask` make, with one tree each, built bottom-up.
    find(mask, t): trees of `mask` worth exactly t. It splits mask into two groups, enumerates the
    smaller group's values s, and asks the larger group for each l that op(s, l) = t needs; a query
    that found nothing is remembered. Small groups are looked up in their reach table.
    """
    reach_memo, failed = {}, set()

    def reach(mask):
        if mask not in reach_memo:
            if mask & (mask - 1) == 0:
                n = numbers[mask.bit_length() - 1]
                reach_memo[mask] = {(n, 1): n}
            else:
                table = {}
                for a, b in _splits(mask):
                    for (xp, xq), tx in reach(a).items():
                        for (yp, yq), ty in reach(b).items():
                            for p, q, tree in _combine((xp, xq, tx), (yp, yq, ty), signed, fractions):
                                table.setdefault((p, q), tree)
                reach_memo[mask] = table
        return reach_memo[mask]

    def find(mask, t):
        if _popcount(mask) <= 3:
            if t in reach(mask):
                yield reach(mask)[t]
            return
        if (mask, t) in failed:
            return
        clock()
        found = False
        for a, b in sorted(_splits(mask), key=lambda ab: -min(map(_popcount, ab))):  # balanced first
            small, large = (a, b) if _popcount(a) <= _popcount(b) else (b, a)
            for s, ts in reach(small).items():
                if s == (0, 1) and t == (0, 1):  # 0 · anything = 0
                    found = True
                    yield ("*", ts, _sum_tree([numbers[i] for i in range(len(numbers)) if large >> i & 1]))
                for l, make in _needed(s, t, signed, fractions):
                    for tl in find(large, l):
                        found = True
                        yield make(ts, tl)
        if not found:
            failed.add((mask, t))

    return find((1 << len(numbers)) - 1, (target, 1))


def _sum_tree(leaves):
    tree = leaves[0]
    for leaf in leaves[1:]:
        tree = ("+", tree, leaf)
    return tree


def _splits(mask):
    """Each way to cut mask into two non-empty groups, once (the first group holds mask's lowest bit)."""
    low, sub = mask & -mask, (mask - 1) & mask
    while sub:
        if sub & low:
            yield sub, mask ^ sub
        sub = (sub - 1) & mask


def solve(numbers, target, timeout=None, fractions=True):
    """An expression that uses every number once with + − × ÷ and equals target, or None.

    None means no such expression exists, or (with `timeout`, seconds) none was found in time.
    fractions=False forbids non-integer intermediate values (to find puzzles that need them).
    """
    _check_puzzle(numbers, target)
    if timeout is not None and not timeout > 0:   # nan would never fire
        raise ValueError(f"timeout {timeout}: must be > 0 seconds, or None")
    numbers, target = [int(n) for n in numbers], int(target)
    deadline = None if timeout is None or timeout == math.inf else time.monotonic() + timeout
    calls = 0

    def clock():
        nonlocal calls
        calls += 1
        if deadline is not None and calls % 64 == 0 and time.monotonic() > deadline:
            raise _OutOfTime

    try:
        for tree in _solve_exact(numbers, target, clock, signed=target < 0, fractions=fractions):
            expression = _checked(tree, target)
            if expression is not None:
                return expression
    except _OutOfTime:
        pass
    return None


# ----------------------------------------------------------------------------------------- puzzles

SHAPES = {  # named puzzle distributions for make_puzzles; "NAME:SPLIT" picks a split (see SPLITS)
    "3to4": dict(),                                                              # Jiayi-Pan/Countdown-Tasks-3to4
    "easy": dict(count=(3, 3), low=1, high=9, target=(1, 50)),                   # the tiny pipeline's puzzles
    "course": dict(count=(3, 6), low=1, high=999_999, target=(1, 999_999), log_uniform=True),  # course held-out
}

SPLITS = {  # the tenths of the puzzle space (puzzle_tenth) each split keeps
    "test": {0},                  # held out for evaluation
    "train": set(range(1, 10)),   # everything else, which is cut in two:
    "sft": set(range(3, 10)),     #   the WarmStart (SFT) puzzles
    "rl": {1, 2},                 #   the RL and DPO puzzles, unseen by SFT (as in the course)
}


def puzzle_tenth(nums, target):
    """A stable hash of (sorted numbers, target), 0–9: which tenth of the puzzle space a puzzle is in."""
    return zlib.crc32(f"{sorted(int(n) for n in nums)}|{int(target)}".encode()) % 10


def make_puzzles(n, seed, count=(3, 4), low=1, high=99, target=(10, 100), log_uniform=False, fractional=False,
                 split=None):
    """n solvable puzzles {"target", "nums"}, like Jiayi-Pan/Countdown-Tasks-3to4 by default.

    Each puzzle is `count` numbers uniform in [low, high] combined by a random expression tree of
    + − × ÷, kept when the tree's value is an integer in [target[0], target[1]]: every puzzle is
    solvable with all its numbers. log_uniform=True draws numbers log-uniformly in [low, high]
    (as many 2-digit as 6-digit numbers, like the course's held-out set). fractional=True keeps only trees with a non-integer intermediate
    value (most of those puzzles also have an integer-only solution; `solve(..., fractions=False)`
    tells which do not). split (a key of SPLITS) keeps only the puzzles of that split, so a test set
    is disjoint from any training set drawn with any seed, and "sft" from "rl".
    Deterministic in `seed`; the global `random` state is left alone.
    """
    rng = random.Random(seed)
    puzzles = []
    while len(puzzles) < n:
        draw = (lambda: int(math.exp(rng.uniform(math.log(low), math.log(high + 1))))) if log_uniform \
            else (lambda: rng.randint(low, high))
        nums = [min(high, draw()) for _ in range(rng.randint(*count))]
        values, saw_fraction = [Fraction(v) for v in nums], False
        while len(values) > 1:
            a, b = (values.pop(rng.randrange(len(values))) for _ in range(2))
            op = rng.choice("+-*/") if b != 0 else rng.choice("+-*")
            values.append(_APPLY[op](a, b))
            saw_fraction |= values[-1].denominator != 1
        value = values[0]
        if value.denominator == 1 and target[0] <= value <= target[1] and saw_fraction >= fractional:
            if split is None or puzzle_tenth(nums, value) in SPLITS[split]:
                puzzles.append({"target": int(value), "nums": nums})
    return puzzles


def puzzles_from_spec(spec, n, seed):
    """make_puzzles from a name: "3to4", "easy", "course", optionally with a split: ":train", ":test", ":sft", ":rl"."""
    name, _, split = spec.partition(":")
    if name not in SHAPES or split not in ("", *SPLITS):
        raise ValueError(f"puzzle shape {spec!r}: use one of {sorted(SHAPES)}, optionally with :{' / :'.join(SPLITS)}")
    return make_puzzles(n, seed, **SHAPES[name], split=split or None)


def _fmt(q, operand=False):
    return str(q) if q.denominator == 1 else f"({q})" if operand else str(q)


def solution_steps(expression):
    """The steps of an expression, innermost first: "36 - 32 = 4", "95 - 4 = 91" (exact values;
    a fraction reads 3/4, and (3/4) where it is an operand)."""
    steps = []

    def walk(node):
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        a, b = walk(node.left), walk(node.right)
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
        value = _APPLY[op](a, b)
        steps.append(f"{_fmt(a, operand=True)} {op} {_fmt(b, operand=True)} = {_fmt(value)}")
        return value

    walk(ast.parse(expression, mode="eval").body)
    return steps


def _random_attempt(numbers, rng):
    """The steps of a random expression over all the numbers (a wrong guess to try first), and its value."""
    values, steps = [Fraction(n) for n in numbers], []
    while len(values) > 1:
        a, b = (values.pop(rng.randrange(len(values))) for _ in range(2))
        a, b = max(a, b), min(a, b)                     # subtract and divide the larger by the smaller
        op = rng.choice("+-*/" if b != 0 else "+-*")
        value = _APPLY[op](a, b)
        steps.append(f"{_fmt(a, operand=True)} {op} {_fmt(b, operand=True)} = {_fmt(value)}")
        values.append(value)
    return steps, values[0]


def warmstart_completion(expression, numbers=(), target=None, wrong=0, rng=None):
    """A WarmStart-style completion: a <think> trace of attempts, each checked against the target, then the answer.

    `wrong` random attempts that miss come first (like the real WarmStart data's backtracking and
    verification), each with honest arithmetic and its verdict; then the solution's steps:
        <think>
        8 * 5 = 40, 40 - 6 = 34, not 38.
        8 * 6 = 48, 48 - 5 = 43, not 38.
        6 * 5 = 30, 30 + 8 = 38, found it.
        </think>
        <answer>6 * 5 + 8</answer>
    """
    lines = []
    for _ in range(wrong):
        for _ in range(20):  # skip the rare right guess and repeated guesses
            steps, value = _random_attempt(numbers, rng)
            line = f"{', '.join(steps)}, not {target}."
            if value != target and line not in lines:
                lines.append(line)
                break
    lines.append(f"{', '.join(solution_steps(expression))}, found it.")
    think = "\n".join(lines)
    return f"\n<think>\n{think}\n</think>\n<answer>{expression}</answer>"


def _one_step_to(t, x, most):
    """The values v that reach t with x in one step, a slot per operation (None: no whole v ≥ 0):
    v + x = t, v − x = t, x − v = t, v · x = t, v / x = t (v = t · x, kept up to `most`), x / v = t."""
    return [t - x if t >= x else None, t + x, x - t if x >= t else None, t // x if x and t % x == 0 else None,
            t * x if t * x <= most else None, x // t if t and x % t == 0 else None]


_SLOT_OPS = (("+", False), ("-", False), ("-", True), ("*", False), ("/", False), ("/", True))  # (op, x first)


def search_completion(numbers, target, mark=True):
    """A completion that searches instead of guessing (three numbers), or None if the puzzle has no answer.

    Every expression over three numbers is (y op z) op' x: a pair, then the number left over. One
    line per pair, in the prompt's order, until one works:
        <think>
        9 5: 14 4 45 -; 1: 1 3 - 2 2 -; no.
        9 1: 10 8 9 9; 5: - 7 3 - 10! -; 9 + 1 = 10, 10 / 5 = 2, found it.
        </think>
        <answer>(9 + 1) / 5</answer>
    After the pair (larger first), what it makes: y + z, y − z, y · z, y / z. After the number x left
    over, what would reach the target t in one more step (_one_step_to): t − x, t + x, x − t, t / x,
    t · x, x / t. Every slot is one operation, "-" where there is no whole number ≥ 0, and "!" marks
    a value the pair makes: the first one is the answer. With three numbers no answer needs a
    negative or fractional intermediate, so the search is complete: it answers exactly when `solve`
    does (tests/test_calculator.py checks every easy puzzle). mark=False leaves out the "!" marks: the
    verdict must then compare the two lists itself (the harder "search-unmarked" trace).
    """
    lines = []
    for y, z, x, makes, needs in search_pairs(numbers, target):
        hits = pair_hits(makes, needs)
        line = pair_line(y, z, x, makes, needs, mark)
        if not hits:
            lines.append(f"{line} no.")
            continue
        claim, tree = pair_claim(y, z, x, makes, needs, hits[0], target)
        lines.append(f"{line} {claim}, found it.")
        think = "\n".join(lines)
        return f"\n<think>\n{think}\n</think>\n<answer>{_checked(tree, target)}</answer>"
    return None


def search_pairs(numbers, target):
    """The search's three lines as data: (y, z, x, makes, needs) per pair, in the prompt's order (search_completion)."""
    if len(numbers) != 3:
        raise ValueError(f"the search trace is for 3 numbers, got {len(numbers)}: {list(numbers)}")
    (a, b, c), t = (int(n) for n in numbers), int(target)
    for (p, q), x in (((a, b), c), ((a, c), b), ((b, c), a)):
        y, z = max(p, q), min(p, q)
        makes = [y + z, y - z, y * z, y // z if z and y % z == 0 else None]
        yield y, z, x, makes, _one_step_to(t, x, max(v for v in makes if v is not None))


def pair_hits(makes, needs):
    """The slots of `needs` whose value the pair makes, in order: the line's hits."""
    return [i for i, v in enumerate(needs) if v is not None and v in makes]


def pair_line(y, z, x, makes, needs, mark=True):
    """ "9 1: 10 8 9 9; 5: - 7 3 - 10! -;" — a pair's line up to its verdict."""
    plain = lambda v: "-" if v is None else str(v)
    show = lambda v: f"{v}!" if mark and v is not None and v in makes else plain(v)
    return f"{y} {z}: {' '.join(map(plain, makes))}; {x}: {' '.join(map(show, needs))};"


def pair_claim(y, z, x, makes, needs, slot, target):
    """ ("9 + 1 = 10, 10 / 5 = 2", tree): the hit at `slot` of a line, as the line's values say (not checked)."""
    v, (op, x_first) = needs[slot], _SLOT_OPS[slot]
    pair = ("+-*/"[makes.index(v)], y, z)   # the first operation that makes v
    last, tree = (f"{x} {op} {v}", (op, x, pair)) if x_first else (f"{v} {op} {x}", (op, pair, x))
    return f"{y} {pair[0]} {z} = {v}, {last} = {int(target)}", tree


def expression_text(tree, target):
    """The tree as the answer writes it: checked against the target when it reaches it, else the fewest parentheses."""
    return _checked(tree, target) or _format(tree)[0]


def sums_completion(numbers, target):
    """A completion that finds a + / − answer by arithmetic a small model can do (any count of numbers):
    add every number, and the excess over the target is twice what the numbers taken away add up to:
        <think>
        75 + 8 = 83, 83 + 45 = 128, 128 + 16 = 144, 144 - 96 = 48, 48 / 2 = 24: take away numbers that add up to 24.
        75 + 8 = 83, 75 + 45 = 120, 75 + 16 = 91, 8 + 45 = 53, 8 + 16 = 24, found it: 75 + 45 - 8 - 16 = 96.
        </think>
        <answer>75 + 45 - 8 - 16</answer>
    A single number is compared at sight ("24 is one of the numbers"); then pairs, then threes, in the prompt's
    order, until one adds up. Complete for + and −: it answers with them exactly when some signs reach the target.
    Puzzles that need × or ÷ (about one in eight of 3to4's) say why the sums fail, then give the solver's answer's
    steps, as the "attempts" trace does. None if the puzzle has no answer at all.
    """
    nums, t = [int(n) for n in numbers], int(target)
    total, excess = sum(nums), sum(nums) - t
    partial = [sum(nums[:i + 1]) for i in range(len(nums))]   # one addition at a time: 22 + 33 = 55, 55 + 71 = 126
    head = ", ".join(f"{a} + {b} = {c}" for a, b, c in zip(partial, nums[1:], partial[1:]))
    found = None
    if excess == 0:
        think = f"{head}, found it."
        found = ()
    elif excess < 0:
        think = f"{head}, less than {t}: + and - cannot reach it."
    elif excess % 2:
        think = f"{head}, {total} - {t} = {excess}, which is odd: + and - cannot reach it."
    else:
        half = excess // 2
        think = f"{head}, {total} - {t} = {excess}, {excess} / 2 = {half}: take away numbers that add up to {half}."
        if half in nums:
            found = (nums.index(half),)
            think += f"\n{half} is one of the numbers, found it"
        else:
            tries = []
            for size in range(2, len(nums)):
                for group in itertools.combinations(range(len(nums)), size):
                    value = sum(nums[i] for i in group)
                    tries.append(f"{' + '.join(str(nums[i]) for i in group)} = {value}")
                    if value == half:
                        found = group
                        break
                if found:
                    break
            think += "\n" + ", ".join(tries) + (", found it" if found else f", none adds up to {half}.")
    if found is not None:
        kept = [str(n) for i, n in enumerate(nums) if i not in found]
        answer = " + ".join(kept) + "".join(f" - {nums[i]}" for i in found)
        if found:
            think += f": {answer} = {t}."
        return f"\n<think>\n{think}\n</think>\n<answer>{answer}</answer>"
    expression = solve(nums, t)
    if expression is None:
        return None
    think += f"\n{', '.join(solution_steps(expression))}, found it."
    return f"\n<think>\n{think}\n</think>\n<answer>{expression}</answer>"


TRACES = ("attempts", "search", "search-unmarked", "search-mixed", "sums")
MIXED_MARKED = 0.25  # "search-mixed": the share of rows whose search carries the "!" marks (README compares 0.25 and 0.75)


def synthetic_warmstart(n, seed, shape="3to4", max_wrong=2, trace="attempts"):
    """n rows {"query", "completion"} in the WarmStart format (the offline cog_behav_all_strategies).

    trace "attempts": each completion tries 0 to max_wrong wrong guesses (uniformly) before the
    solution (warmstart_completion). "search": a complete search, one line per pair of numbers
    (search_completion; 3-number shapes only, such as easy). "search-unmarked": the same search
    without the "!" marks, so a hit is seen only by comparing the two lists. "search-mixed": a coin
    per row, marked with probability MIXED_MARKED: two ways to the verdict, for RL to choose between. "sums": add
    every number, then find the numbers to take away (sums_completion; any count of numbers, as 3to4 needs).
    """
    if trace not in TRACES:
        raise ValueError(f"trace {trace!r}: use one of {', '.join(TRACES)}")
    rng, rows = random.Random(seed), []
    for p in puzzles_from_spec(shape, n, seed):
        if trace.startswith("search"):
            mark = trace == "search" or (trace == "search-mixed" and rng.random() < MIXED_MARKED)
            completion = search_completion(p["nums"], p["target"], mark=mark)
        elif trace == "sums":
            completion = sums_completion(p["nums"], p["target"])
        else:
            completion = warmstart_completion(solve(p["nums"], p["target"]), p["nums"], p["target"],
                                              wrong=rng.randint(0, max_wrong), rng=rng)
        rows.append({"query": warmstart_query(p["nums"], p["target"]), "completion": completion,
                     "nums": p["nums"], "target": p["target"]})
    return rows


# ---------------------------------------------------------------------------------------------- CLI

def main(argv=None):
    parser = argparse.ArgumentParser(description="Solve a Countdown puzzle, or write synthetic WarmStart data.")
    parser.add_argument("numbers", nargs="*", help="the numbers, e.g. 95 36 32")
    parser.add_argument("--target", help="the target, e.g. 91")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="give up after this many seconds (8 numbers can take minutes); inf: never")
    parser.add_argument("--warmstart", metavar="FILE", help="write synthetic WarmStart JSONL rows here")
    parser.add_argument("--n", type=int, default=1000, help="rows for --warmstart")
    parser.add_argument("--seed", type=int, default=0, help="seed for --warmstart")
    parser.add_argument("--shape", default="3to4", help="puzzle shape for --warmstart: 3to4, easy, course (:train/:test/:sft/:rl)")
    parser.add_argument("--trace", default="attempts", choices=TRACES,
                        help="--warmstart traces: attempts (guesses, then the solution), search, "
                             "search-unmarked or search-mixed (3 numbers), sums (+ and - first, any count)")
    args = parser.parse_args(argv)

    def fail(message):
        print(f"calculator.py: error: {message}", file=sys.stderr)
        sys.exit(2)

    if not args.timeout > 0:   # nan and negatives too: a deadline that never fires, or fires at once
        fail(f"--timeout {args.timeout}: must be > 0 seconds (inf: never)")
    if args.warmstart:
        if args.n < 1:
            fail(f"--n must be positive, got {args.n}")
        try:
            rows = synthetic_warmstart(args.n, args.seed, args.shape, trace=args.trace)
        except ValueError as e:
            fail(str(e))
        with open(args.warmstart, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {args.warmstart}")
        return
    try:
        numbers = [int(x) for x in args.numbers]
        target = int(args.target) if args.target is not None else fail("--target is required")
    except ValueError as e:
        fail(f"numbers and --target must be integers ({e})")
    try:
        answer = solve(numbers, target, timeout=args.timeout)
    except ValueError as e:
        fail(str(e))
    if answer is None:
        print("no solution" if args.timeout == math.inf else f"no solution found in {args.timeout:g} s")
        sys.exit(1)
    print(answer)


if __name__ == "__main__":
    main()
