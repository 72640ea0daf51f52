"""Where does a tiny model's Countdown trace go wrong? Audits every attempt line of evaluate.py's output.

    python bench/trace_audit.py out/tiny/eval/sft-greedy            # one evaluation directory
    python bench/trace_audit.py out/tiny-s*/eval/sft-greedy         # several: one row each

Reads per_prompt.jsonl and checks each line of the synthetic WarmStart traces (calculator.py), either
attempts (warmstart_completion)
    8 * 5 = 40, 40 - 6 = 34, not 38.        a miss, verdict "not"
    6 * 5 = 30, 30 + 8 = 38, found it.      a hit, verdict "found it"
or search lines (search_completion; with or without the "!" marks)
    9 1: 10 8 9 9; 5: - 7 3 - 10! -; 9 + 1 = 10, 10 / 5 = 2, found it.
recomputing every step with exact fractions (parsed, never evaluated). Each line is honest (every step's
arithmetic right; for a search line, also both lists, and the marks where it has any) or not, and its
verdict is right or wrong for the values it wrote. Prints, per directory:
  solved        responses scored correct
  truncated     responses with no closing </think> (the token budget ran out)
  lines         trace lines; honest: % with every step right (step 1 / step 2 separately; for search
                lines, the pair's list / the list of what reaches the target)
  false found   honest lines that say "found it" but miss the target (a wrong verdict)
  faked hit     lines whose last step is wrong and whose written result is the target (a made-up hit)
  missed hit    honest lines that hit the target but say "not" / "no"
  marked        search lines saying "found it" that carry a "!" (the route a search-mixed model took)
"""
import json
import os
import re
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from calculator import _APPLY, _one_step_to  # noqa: E402  (the calculator's own arithmetic, exact on Fractions)

STEP = re.compile(r"\(?(\d+(?:/\d+)?)\)? ([-+*/]) \(?(\d+(?:/\d+)?)\)? = (-?\d+(?:/\d+)?)$")
LINE = re.compile(r"(?P<steps>.*), (?:not -?\d+|(?P<found>found it))\.$")
SEARCH = re.compile(r"(?P<y>\d+) (?P<z>\d+): (?P<makes>[-\d ]+); (?P<x>\d+): (?P<needs>[-\d! ]+); "
                    r"(?:no\.|(?P<steps>.*), found it\.)$")


def _number(text):
    """"34" or "9/5" as a Fraction; None for a zero denominator (a sampled "3/0")."""
    numerator, _, denominator = text.partition("/")
    return Fraction(int(numerator), int(denominator or 1)) if denominator != "0" else None


def audit_line(line, target):
    """A trace line → {"steps_ok": [bool per step], "value", "found", "hit"}, or None if it is not an attempt line."""
    m = LINE.match(line.strip())
    if not m:
        return None
    steps_ok, value = [], None
    for step in m["steps"].split(", "):
        s = STEP.match(step)
        if not s:
            return None
        a, b, value = _number(s[1]), _number(s[3]), _number(s[4])
        steps_ok.append(None not in (a, b, value) and not (s[2] == "/" and b == 0) and _APPLY[s[2]](a, b) == value)
    return {"steps_ok": steps_ok, "value": value, "found": m["found"] is not None, "hit": value == target}


def audit_search_line(line, target):
    """A search line → the keys of audit_line and "marked": steps_ok = [the pair's list right, the second
    list right (its values, and its marks unless it has none: the search-unmarked form), and the found
    line's two steps]; "hit": the two true lists share a value; "marked": the second list has a "!"."""
    m = SEARCH.match(line.strip())
    if not m:
        return None
    y, z, x = int(m["y"]), int(m["z"]), int(m["x"])
    makes = [y + z, y - z, y * z, y // z if z and y % z == 0 else None]
    made = {v for v in makes if v is not None}
    needs = _one_step_to(target, x, max(made))
    show = lambda v, mark: "-" if v is None else f"{v}!" if mark and v in made else str(v)
    marked = "!" in m["needs"]
    steps_ok = [m["makes"].split() == [show(v, False) for v in makes], m["needs"].split() == [show(v, marked) for v in needs]]
    value = None
    if m["steps"]:
        last = audit_line(m["steps"] + ", found it.", target)
        steps_ok += last["steps_ok"] if last else [False]
        value = last["value"] if last else None
    hit = any(v in made for v in needs if v is not None)
    return {"steps_ok": steps_ok, "value": value if m["steps"] else None, "found": m["steps"] is not None, "hit": hit,
            "marked": marked}


def audit(per_prompt_path):
    counts = dict.fromkeys(["responses", "solved", "truncated", "lines", "honest", "false_found", "faked_hit",
                            "missed_hit", "step1", "step1_ok", "step2", "step2_ok", "search_found", "marked"], 0)
    for row in map(json.loads, open(per_prompt_path)):
        for response, score in zip(row["responses"], row["scores"]):
            counts["responses"] += 1
            counts["solved"] += score == 1.0
            counts["truncated"] += "</think>" not in response
            think = response.split("<think>", 1)[-1].split("</think>", 1)[0]
            for line in think.strip().split("\n"):
                a = audit_line(line, row["target"]) or audit_search_line(line, row["target"])
                if a is None:
                    continue
                honest = all(a["steps_ok"])
                counts["lines"] += 1
                counts["honest"] += honest
                counts["false_found"] += honest and a["found"] and not a["hit"]
                counts["faked_hit"] += not a["steps_ok"][-1] and a["value"] == row["target"]
                counts["missed_hit"] += honest and a["hit"] and not a["found"]
                if a["found"] and "marked" in a:  # a search line's verdict: which route it took
                    counts["search_found"] += 1
                    counts["marked"] += a["marked"]
                for k, ok in enumerate(a["steps_ok"][:2], 1):
                    counts[f"step{k}"] += 1
                    counts[f"step{k}_ok"] += ok
    return counts


def main(paths):
    if not paths:
        sys.exit(__doc__)
    pct = lambda a, b: f"{100 * a / b:5.1f}" if b else "    -"
    print(f"{'directory':<40} {'solved':>6} {'trunc':>6} {'lines':>6} {'honest':>6} {'step1':>6} {'step2':>6} "
          f"{'false found':>11} {'faked hit':>9} {'missed hit':>10} {'marked':>6}   (% of responses, then % of lines)")
    for path in paths:
        file = Path(path) / "per_prompt.jsonl" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            sys.exit(f"trace_audit.py: error: {file}: no such file (give an evaluate.py output directory)")
        c = audit(file)
        n, lines = c["responses"], c["lines"]
        print(f"{str(path)[-40:]:<40} {pct(c['solved'], n):>6} {pct(c['truncated'], n):>6} {lines:>6} "
              f"{pct(c['honest'], lines):>6} {pct(c['step1_ok'], c['step1']):>6} {pct(c['step2_ok'], c['step2']):>6} "
              f"{pct(c['false_found'], lines):>11} {pct(c['faked_hit'], lines):>9} {pct(c['missed_hit'], lines):>10} "
              f"{pct(c['marked'], c['search_found']):>6}")


if __name__ == "__main__":
    main(sys.argv[1:])
