"""The Countdown scorer: the reference's semantics case by case, hostile inputs, and parity checks.

`reference_compute_score` below is the reference scorer (cognitive-behaviors countdown.py) restated
for the test, `eval` included, without its printing and random draws. Tests may use eval on strings
they build themselves; the scorer under test never does.
"""
import random
import re
import time
from fractions import Fraction

import numpy as np
import pytest

from countdown_reward import (compute_score, evaluate_expression, extract_solution, score_response,
                              tinyzero_prompt, warmstart_query)

GT = {"target": 91, "numbers": [95, 36, 32]}


def reference_compute_score(solution_str, ground_truth, format_score=0.1, score=1.0):
    if "Assistant:" in solution_str:
        solution_str = solution_str.split("Assistant:", 1)[1]
    elif "<|im_start|>assistant" in solution_str:
        solution_str = solution_str.split("<|im_start|>assistant", 1)[1]
    else:
        return 0
    matches = list(re.finditer(r"<answer>(.*?)</answer>", solution_str.split("\n")[-1]))
    if not matches:
        return 0
    equation = matches[-1].group(1).strip()
    try:
        if sorted(int(n) for n in re.findall(r"\d+", equation)) != sorted(ground_truth["numbers"]):
            return format_score
    except Exception:
        return format_score
    try:
        if not re.match(r"^[\d+\-*/().\s]+$", equation):
            return format_score
        result = eval(equation, {"__builtins__": None}, {})
    except Exception:
        return format_score
    try:
        return score if abs(result - ground_truth["target"]) < 1e-5 else format_score
    except Exception:
        return format_score


# (solution_str, ground_truth, expected score, why)
CASES = [
    ("Assistant: <answer>95 - (36 - 32)</answer>", GT, 1.0, "correct"),
    ("<|im_start|>assistant\n<answer>95 - (36 - 32)</answer>", GT, 1.0, "chat marker"),
    ("<answer>95 - (36 - 32)</answer>", GT, 0.0, "no marker: nothing extracted"),
    ("assistant: <answer>95 - (36 - 32)</answer>", GT, 0.0, "the marker is case-sensitive"),
    ("Assistant: <answer>95 - (36 - 32)</answer>\n", GT, 0.0, "trailing newline: empty last line"),
    ("Assistant: <answer>95 - (36 - 32)</answer>\nDone.", GT, 0.0, "text on a line after the answer"),
    ("Assistant: <answer>95 - (36\n - 32)</answer>", GT, 0.0, "multi-line answer"),
    ("Assistant: think\n<answer>95 - (36 - 32)</answer>", GT, 1.0, "answer on the last line"),
    ("Assistant: <answer>95 - 36 - 32</answer>", GT, 0.1, "wrong value"),
    ("Assistant: <answer>95 - (36 - 32)</answer> <answer>1</answer>", GT, 0.1, "the last answer counts"),
    ("Assistant: <answer>1</answer> <answer>95 - (36 - 32)</answer>", GT, 1.0, "the last answer counts"),
    ("Assistant: <answer></answer>", GT, 0.1, "empty answer is a format score"),
    ("Assistant: <answer>   95-(36-32)   </answer>", GT, 1.0, "stripped"),
    ("Assistant: <answer>95 - (36 - 32) + 0</answer>", GT, 0.1, "an extra literal"),
    ("Assistant: <answer>95 - (36 - 36)</answer>", GT, 0.1, "a number used twice, one missing"),
    ("Assistant: <answer>95 - 4</answer>", GT, 0.1, "numbers missing"),
    ("Assistant: <answer>(8 - 4) * 6</answer>", {"target": 24, "numbers": [4, 6]}, 0.1, "8 not given"),
    ("Assistant: <answer>3.5 * 2</answer>", {"target": 7, "numbers": [3, 5, 2]}, 1.0, "3.5 reads as 3 and 5"),
    ("Assistant: <answer>95 − (36 − 32)</answer>", GT, 0.1, "unicode minus is not allowed"),
    ("Assistant: <answer>95 - (36 - 32) = 91</answer>", GT, 0.1, "an equation, not an expression"),
    ("Assistant: <answer>6 / (1 - 3 / 4)</answer>", {"target": 24, "numbers": [6, 1, 3, 4]}, 1.0, "true division"),
    ("Assistant: <answer>7 / 2</answer>", {"target": 3, "numbers": [7, 2]}, 0.1, "3.5 is not 3"),
    ("Assistant: <answer>5 / (3 - 3)</answer>", {"target": 5, "numbers": [5, 3, 3]}, 0.1, "division by zero"),
    ("Assistant: <answer>-3 + 5</answer>", {"target": 2, "numbers": [3, 5]}, 1.0, "unary minus"),
    ("Assistant: <answer>095 - (36 - 32)</answer>", GT, 0.1, "leading zero is a syntax error"),
    ("Assistant: <answer>(95) (36 - 32)</answer>", GT, 0.1, "a call is not arithmetic"),
    ("Assistant: <answer>2 ** 3</answer>", {"target": 8, "numbers": [2, 3]}, 0.1, "** rejected (deviation 2)"),
    ("Assistant: <answer>7 // 2</answer>", {"target": 3, "numbers": [7, 2]}, 0.1, "// rejected (deviation 2)"),
    ("Assistant: <answer>95 - (36 - 32)</answer>", {"target": 91, "nums": np.array([95, 36, 32])}, 1.0, "nums key"),
    ("Assistant: <answer>6 / (1 - 3 / 4)</answer>", {"target": 24.000009, "numbers": [6, 1, 3, 4]}, 1.0,
     "within 1e-5"),
    ("Assistant: <answer>6 / (1 - 3 / 4)</answer>", {"target": 24.00002, "numbers": [6, 1, 3, 4]}, 0.1,
     "outside 1e-5"),
    ("Assistant: Assistant: <answer>95 - (36 - 32)</answer>", GT, 1.0, "split at the first marker"),
]


@pytest.mark.parametrize("solution, ground_truth, expected, why", CASES, ids=[c[3] for c in CASES])
def test_reference_cases(solution, ground_truth, expected, why):
    assert compute_score(solution, ground_truth) == expected


@pytest.mark.parametrize("solution, ground_truth, expected, why",
                         [c for c in CASES if "deviation" not in c[3]], ids=[c[3] for c in CASES if "deviation" not in c[3]])
def test_cases_agree_with_the_reference_scorer(solution, ground_truth, expected, why):
    gt = {"target": ground_truth["target"], "numbers": [int(n) for n in ground_truth.get("numbers", ground_truth.get("nums"))]}
    assert compute_score(solution, ground_truth) == reference_compute_score(solution, gt)


def test_format_and_score_values_are_parameters():
    assert compute_score("Assistant: <answer>95 - (36 - 32)</answer>", GT, format_score=0.0, score=2.0) == 2.0
    assert compute_score("Assistant: <answer>1</answer>", GT, format_score=0.3) == 0.3


def test_extract_solution():
    assert extract_solution("Assistant: x\n<answer> 1 + 2 </answer>") == "1 + 2"
    assert extract_solution("Assistant: <answer>1</answer>\n") is None
    assert extract_solution("no marker <answer>1</answer>") is None


HOSTILE = [
    ("9**9**9**9", [9, 9, 9, 9], 0.1),
    ("(" * 10_000 + "1" + ")" * 10_000, [1], 0.1),                 # the tokenizer's nesting limit
    ("1 + " * 25_000 + "1", [1] * 25_001, 0.1),                   # 100 000 characters, deep tree
    (" " * 99_990 + "95 - (36 - 32)", [95, 36, 32], 1.0),         # 100 000 characters, all fine
    ("9" * 5_000, [9], 0.1),                                      # 5 000-digit literal
    ("__import__('os').system('true')", [], 0.1),
    ("-" * 100_000 + "5", [5], 0.1),                              # too deep for Python's parser
    ("-" * 2_000 + "5", [5], 1.0),                                # deep, but parses: --…-5 = 5
    ("((((((((((" * 20 + "5" + "))))))))))" * 20, [5], 1.0),      # 200 levels: allowed
    ("1e5", [1, 5], 0.1),
    ("5 if 1 else 5", [5, 1, 5], 0.1),
    ("\x00", [], 0.1),
]


@pytest.mark.parametrize("answer, numbers, expected", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_answers_return_a_score_quickly(answer, numbers, expected):
    start = time.perf_counter()
    score = compute_score(f"Assistant: <answer>{answer}</answer>", {"target": 5 if numbers == [5] else 91, "numbers": numbers})
    assert score == expected
    assert time.perf_counter() - start < 1.0  # a hang guard, not a speed target (bench/countdown_speed.py)


def test_scorer_leaves_global_random_state_alone(capsys):
    random.seed(1234)
    state = random.getstate()
    for case in CASES:
        compute_score(case[0], case[1])
    assert random.getstate() == state
    assert capsys.readouterr().out == ""


def test_malformed_ground_truth_names_itself():
    with pytest.raises(ValueError, match="ground_truth"):
        compute_score("Assistant: <answer>1</answer>", {"target": 1})


# ------------------------------------------------------------------ random expressions, exact check

def exact_value(text):
    """An independent evaluator: recursive descent over + − × ÷, unary ±, parentheses, in Fractions."""
    tokens = re.findall(r"\d+\.\d*|\d+|[-+*/()]", text)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr():
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term():
        value = factor()
        while peek() in ("*", "/"):
            value = value * factor() if take() == "*" else value / factor()
        return value

    def factor():
        token = take()
        if token == "-":
            return -factor()
        if token == "+":
            return factor()
        if token == "(":
            value = expr()
            assert take() == ")"
            return value
        return Fraction(token)

    value = expr()
    assert pos == len(tokens)
    return value


def random_expression(rng, depth=0):
    if depth > 3 or rng.random() < 0.3:
        return str(rng.randint(0, 999))
    left, right = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
    text = f"{left} {rng.choice('+-*/')} {right}"
    text = f"({text})" if rng.random() < 0.6 else text
    return f"-{text}" if rng.random() < 0.1 else text


def test_random_expressions_match_an_exact_evaluator_and_python():
    rng = random.Random(0)
    checked = 0
    for _ in range(2000):
        text = random_expression(rng)
        try:
            exact = exact_value(text)
        except ZeroDivisionError:
            assert evaluate_expression(text) is None
            continue
        value = evaluate_expression(text)
        assert value == eval(text)                          # bit-identical to the reference's eval
        assert abs(value - exact) <= 1e-9 * max(1, abs(exact))
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        if exact.denominator == 1:
            assert compute_score(f"Assistant: <answer>{text}</answer>", {"target": int(exact), "numbers": numbers}) == 1.0
            checked += 1
    assert checked > 500


def test_random_strings_agree_with_the_reference_scorer():
    rng = random.Random(1)
    alphabet = "0123456789+-*/(). \n<>answer/"
    gt = {"target": 7, "numbers": [3, 4]}
    for _ in range(3000):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        if "**" in body or "//" in body:
            continue
        solution = f"Assistant: <answer>{body}</answer>" if rng.random() < 0.7 else "Assistant:" + body
        assert compute_score(solution, gt) == reference_compute_score(solution, gt), solution


# ------------------------------------------------------------------------------------------ prompts

def test_prompts_print_numbers_as_a_python_list():
    prompt = tinyzero_prompt(np.array([95, 36, 32]), np.int64(91))
    assert "Using the numbers [95, 36, 32], create an equation that equals 91." in prompt
    assert prompt.startswith("A conversation between User and Assistant.")
    assert prompt.endswith("Assistant: Let me solve this step by step.\n<think>")
    assert tinyzero_prompt([1, 2, 3], 6) == warmstart_query([1, 2, 3], 6) + "\n<think>"


def test_score_response_adds_the_marker_and_strips():
    gt = {"target": 91, "nums": [95, 36, 32]}
    response = " I think.\n</think>\n<answer>95 - (36 - 32)</answer>\n"
    assert compute_score(response, gt) == 0.0           # the trap: no marker, trailing newline
    assert score_response(response, gt) == 1.0
    assert score_response("<answer>95 - 36</answer>", gt) == 0.1
    assert score_response("no answer at all", gt) == 0.0


def test_last_answer_is_the_regexs_last_match_on_random_lines():
    import random
    from countdown_reward import ANSWER_RE, last_answer
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "<answer", "answer>", "</", "<", ">", "/", " 1 + 2 ", "x", "\r", "\t"]
    for _ in range(5000):
        line = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        matches = ANSWER_RE.findall(line)
        assert last_answer(line) == (matches[-1] if matches else None), line


def test_a_line_of_unclosed_answer_tags_is_scored_quickly():
    line = "Assistant: " + "<answer>" * 32_768   # 256 KB: the reference's regex takes ~40 s (quadratic)
    start = time.perf_counter()
    assert compute_score(line, GT) == 0 and compute_score(line + "9</answer>", GT) == 0.1
    assert time.perf_counter() - start < 1.0  # a hang guard, not a speed target (bench/countdown_speed.py)
