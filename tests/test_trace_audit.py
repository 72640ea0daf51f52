"""bench/trace_audit.py: each attempt line of a trace is recomputed exactly and its verdict checked."""
import json
import random
import sys
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from calculator import search_completion, solve, warmstart_completion  # noqa: E402
from trace_audit import audit, audit_line, audit_search_line  # noqa: E402


@pytest.mark.parametrize("line, target, steps_ok, value, found", [
    ("8 * 5 = 40, 40 - 6 = 34, not 38.", 38, [True, True], 34, False),
    ("6 * 5 = 30, 30 + 8 = 38, found it.", 38, [True, True], 38, True),
    ("9 * 3 = 27, 27 + 7 = 36, found it.", 36, [True, False], 36, True),        # 27 + 7 is 34: a made-up hit
    ("9 / 5 = 9/5, (9/5) * 1 = 9/5, not 2.", 2, [True, True], Fraction(9, 5), False),
    ("3 / 0 = 3/0, 3/0 + 1 = 4, not 4.", 4, [False, False], 4, False),        # no zero denominators
])
def test_audit_line_recomputes_every_step(line, target, steps_ok, value, found):
    a = audit_line(line, target)
    assert (a["steps_ok"], a["value"], a["found"], a["hit"]) == (steps_ok, value, found, value == target)


@pytest.mark.parametrize("line", ["</answer>", "8 * 5 = 40, 40 - 6 = 34", "eight times five, not 38."])
def test_non_attempt_lines_are_skipped(line):
    assert audit_line(line, 38) is None


def test_the_calculators_traces_audit_clean_and_a_model_trace_is_classified(tmp_path):
    rng, rows = random.Random(0), []
    for nums, target in [([8, 5, 6], 38), ([9, 5, 1], 2), ([7, 1, 5], 35)]:
        completion = warmstart_completion(solve(nums, target), nums, target, wrong=2, rng=rng)
        rows.append({"target": target, "responses": [completion], "scores": [1.0]})
    model = "\n<think>\n5 + 6 = 11, 11 * 8 = 88, not 38.\n8 * 5 = 40, 40 - 6 = 36, found it.\n</think>\n<answer>8 * 5 - 6</answer>"
    rows.append({"target": 36, "responses": [model, "\n<think>\n8 * 5 = 40, 40 - 6 = 34, found it.\n8 *"], "scores": [0.1, 0.0]})
    path = tmp_path / "per_prompt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = audit(path)
    assert (c["responses"], c["solved"], c["truncated"], c["lines"]) == (5, 3, 1, 9 + 3)
    assert (c["honest"], c["false_found"], c["faked_hit"], c["missed_hit"]) == (9 + 2, 1, 1, 0)
    assert (c["step2"], c["step2_ok"]) == (12, 11)


@pytest.mark.parametrize("line, target, steps_ok, found, hit", [
    ("9 5: 14 4 45 -; 1: 1 3 - 2 2 -; no.", 2, [True, True], False, False),
    ("9 1: 10 8 9 9; 5: - 7 3 - 10! -; 9 + 1 = 10, 10 / 5 = 2, found it.", 2, [True, True, True, True], True, True),
    ("9 1: 10 8 9 9; 5: - 7 3 - 10 -; no.", 2, [True, True], False, True),               # unmarked: a missed hit
    ("9 5: 14 4 45 -; 1: 1 3 - 2! 2 -; no.", 2, [True, False], False, False),             # 9, 5 do not make 2
    ("8 5: 13 3 40 -; 6: 32 44 - - - -; 8 * 5 = 40, 40 - 6 = 38, found it.", 38,
     [True, True, True, False], True, False),                                              # 40 − 6 is 34: made up
    ("9 3: 12 6 27 -; 7: 29 43 - - - -; no.", 36, [False, True], False, False),            # 9 / 3 = 3 is left out
])
def test_audit_search_line_recomputes_both_lists(line, target, steps_ok, found, hit):
    a = audit_search_line(line, target)
    assert (a["steps_ok"], a["found"], a["hit"]) == (steps_ok, found, hit)
    assert audit_line(line, target) is None


def test_search_traces_audit_clean(tmp_path):
    rows = [{"target": t, "responses": [search_completion(nums, t)], "scores": [1.0]}
            for nums, t in [([8, 5, 6], 38), ([9, 5, 1], 2), ([7, 1, 5], 35), ([4, 2, 9], 7)]]
    path = tmp_path / "per_prompt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = audit(path)
    assert c["lines"] == sum(r["responses"][0].count("\n") - 3 for r in rows)
    assert c["honest"] == c["lines"] and c["false_found"] == c["faked_hit"] == c["missed_hit"] == 0
    assert c["search_found"] == 4 and c["marked"] == 4
    unmarked = [{**r, "responses": [r["responses"][0].replace("!", "")]} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in unmarked[:3] + rows[3:]))
    c = audit(path)
    assert c["honest"] == c["lines"] and (c["search_found"], c["marked"]) == (4, 1)
