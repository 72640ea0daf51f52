"""Countdown reward: the TinyZero / cognitive-behaviors rule scorer, without `eval`.

    from countdown_reward import compute_score, score_response
    compute_score("Assistant: <answer>95 - (36 - 32)</answer>", {"target": 91, "numbers": [95, 36, 32]})  # 1.0
    score_response("<think>…</think>\\n<answer>95 - (36 - 32)</answer>", {"target": 91, "nums": [95, 36, 32]})

Reference: kanishkg/cognitive-behaviors, verl/utils/reward_score/countdown.py (itself TinyZero's).
The spec (§1.3, §1.5) scores Countdown with it: 0 when no answer can be extracted, `format_score`
(0.1) when an answer was extracted but is wrong, and `score` (1.0) when it reaches the target.

What the reference does, step by step (and so do we):
  1. keep what follows the first "Assistant:" (else the first "<|im_start|>assistant"; else score 0);
  2. keep only the text after the last "\\n" (an answer followed by a newline scores 0);
  3. take the last `<answer>(.*?)</answer>` on that line, stripped;
  4. the sorted integers matched by `\\d+` must equal the sorted given numbers ("3.5" reads as 3, 5);
  5. only the characters `\\d + - * / ( ) . whitespace` are allowed;
  6. evaluate with Python semantics (true division); |value − target| < 1e-5 scores `score`,
     anything else, an error included, scores `format_score`.

Deviations from the reference (each deliberate):
  1. No `eval`. The answer is parsed with `ast` and computed over a whitelist of nodes: int and float
     literals, unary + and −, binary + − × ÷. Python applies the same operations in the same order,
     so every value the reference accepts is computed to the same bit.
  2. `**` and `//` are rejected (format score). The reference lets both through, and `9**9**9**9`
     hangs it forever; no Countdown solution needs either.
  3. It never prints and never draws from the global `random` state (the reference calls
     `random.randint` on every call to decide whether to print).
  4. The score is always a float (the reference returns the int 0 when nothing is extracted).
Every input string returns a score, quickly (hostile cases are in tests/test_countdown_reward.py);
only a malformed `ground_truth` raises, with a message that names it.
"""
import ast
import re
from fractions import Fraction

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>")   # the reference's pattern: last_answer gives its last match
ALLOWED_RE = re.compile(r"^[\d+\-*/().\s]+$")
MAX_LITERAL_DIGITS = 100  # a longer digit run can never equal a given number; int() of 5 000 digits raises

_BINARY_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
               ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}  # no Pow, no FloorDiv

SYSTEM_LINE = ("A conversation between User and Assistant. The user asks a question, and the Assistant "
               "solves it. The assistant first thinks about the reasoning process in the mind and then "
               "provides the user with the answer.")


# ---------------------------------------------------------------------------------------------- prompts

def warmstart_query(numbers, target):
    """The prompt of the WarmStart SFT data (Asap7772/cog_behav_all_strategies, column `query`)."""
    nums = [int(n) for n in numbers]  # str() of numpy ints would print "np.int64(95)"
    return (f"{SYSTEM_LINE}\n"
            f"User: Using the numbers {nums}, create an equation that equals {int(target)}. You can use "
            f"basic arithmetic operations (+, -, *, /) and each number can only be used once. Show your "
            f"work in <think> </think> tags. And return the final answer in <answer> </answer> tags, "
            f"for example <answer> (1 + 2) / 3 </answer>.\n"
            f"Assistant: Let me solve this step by step.")


def tinyzero_prompt(numbers, target):
    """TinyZero's base-model prompt: the WarmStart query, then an open `<think>` for the model to fill."""
    return warmstart_query(numbers, target) + "\n<think>"


# ---------------------------------------------------------------------------------------------- scoring

def extract_solution(solution_str):
    """The reference's extraction: marker, last line, last <answer> on it. None when there is none."""
    if "Assistant:" in solution_str:
        solution_str = solution_str.split("Assistant:", 1)[1]
    elif "<|im_start|>assistant" in solution_str:
        solution_str = solution_str.split("<|im_start|>assistant", 1)[1]
    else:
        return None
    last = last_answer(solution_str.split("\n")[-1])
    return last.strip() if last is not None else None


def last_answer(line):
    """The last match of `<answer>(.*?)</answer>` in a line (what ANSWER_RE.findall(line)[-1] gives), in linear time:
    the regex rescans to the end of the line from every unclosed `<answer>`, quadratic on '<answer>' × N."""
    last, pos = None, 0
    while (start := line.find("<answer>", pos)) >= 0:
        end = line.find("</answer>", start + len("<answer>"))
        if end < 0:   # no closing tag after this opening one, so none after any later one either
            break
        last, pos = line[start + len("<answer>"):end], end + len("</answer>")
    return last


def uses_numbers_exactly(equation, numbers):
    """Every given number used exactly once and no other integer literal (sorted multisets equal)."""
    found = re.findall(r"\d+", equation)
    if len(found) != len(numbers) or any(len(d) > MAX_LITERAL_DIGITS for d in found):
        return False
    return sorted(int(d) for d in found) == sorted(int(n) for n in numbers)


def evaluate_expression(equation, exact=False):
    """The value of an arithmetic expression, computed without eval; None if it is not one we allow.

    Allowed: int and float literals, unary + and −, binary + − * / with Python's true division.
    Anything else (names, calls, **, //, tuples, syntax errors, division by zero) gives None.
    exact=True computes over fractions (a Fraction comes back: 7 / 3 stays 7/3), as the calculate tool does.
    """
    if not ALLOWED_RE.match(equation):
        return None
    try:
        return _value(ast.parse(equation.strip(), mode="eval").body, Fraction if exact else lambda v: v)
    except (SyntaxError, ValueError, ArithmeticError, MemoryError, RecursionError):
        return None


def _value(node, number):
    sign = 1
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        sign = -sign if isinstance(node.op, ast.USub) else sign  # a loop: `-----5` nests thousands deep
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return sign * number(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        return sign * _BINARY_OPS[type(node.op)](_value(node.left, number), _value(node.right, number))
    raise ValueError(f"not allowed in a Countdown answer: {type(node).__name__}")


def _ground_truth(ground_truth):
    try:
        numbers = ground_truth["numbers"] if "numbers" in ground_truth else ground_truth["nums"]
        return [int(n) for n in numbers], ground_truth["target"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"ground_truth needs 'target' and 'numbers' (or 'nums'); got {ground_truth!r}") from e


def compute_score(solution_str, ground_truth, format_score=0.1, score=1.0):
    """The reference Countdown reward: 0 (no answer), format_score (wrong answer) or score (correct).

    `solution_str` is the prompt plus the response, or anything containing the "Assistant:" marker;
    to score a bare model response use `score_response`.
    """
    numbers, target = _ground_truth(ground_truth)
    equation = extract_solution(solution_str)
    if equation is None:
        return 0.0
    if not uses_numbers_exactly(equation, numbers):
        return float(format_score)
    value = evaluate_expression(equation)
    if value is None or not abs(value - target) < 1e-5:
        return float(format_score)
    return float(score)


def score_response(response, ground_truth, format_score=0.1, score=1.0):
    """Score a model's response alone, as the original evaluation did: "Assistant:\\n" + response.strip().

    The marker makes extraction start inside the response, and strip() drops the trailing newline
    that would otherwise leave an empty last line (and a score of 0).
    """
    return compute_score("Assistant:\n" + response.strip(), ground_truth, format_score, score)
