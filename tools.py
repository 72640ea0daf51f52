"""Tool use (spec §2.7): the model calls a tool in Qwen2.5's format, the harness runs it and writes the result back.

    ...<tool_call>{"name": "calculate", "arguments": {"expression": "9 + 1"}}</tool_call><tool_response>10</tool_response>...

Generation stops at </tool_call>; `tool_loop` runs the call, appends <tool_response>…</tool_response> and lets the
model continue, every sequence of a batch together, until it stops, makes `max_calls` calls or fills its token
budget. What the harness wrote is context, never a label: a sequence's `spans` are the token ranges the model
wrote, and common.collate's completion_mask covers those alone (SFT's loss, DPO's and RLOO's log-probs, the KL).
common.encode cuts a training text the same way: a <tool_response>…</tool_response> in it is the harness's.

Tools: `calculate` (exact + − × ÷ through the Countdown scorer's own evaluator, never eval) and `solve` (the DFS
solver of calculator.py: report 000's "calculator tool" inside a real loop). A malformed call, an unknown tool or a
bad expression gets an error string back, never an exception.
"""
import json
import random
import re

from calculator import puzzles_from_spec, solve
from countdown_reward import evaluate_expression, warmstart_query

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOL_RESPONSE = re.compile(f"({re.escape(RESPONSE_OPEN)}.*?{re.escape(RESPONSE_CLOSE)})", re.DOTALL)   # the harness's


# ------------------------------------------------------------------------------------------- the tools

def calculate(expression):
    """The exact value of + − × ÷ over numbers: "10", "7/3"; an error string for anything else."""
    if not isinstance(expression, str):
        return "error: expression must be a string"
    value = evaluate_expression(expression, exact=True)
    if value is None:
        return "error: not an arithmetic expression over + - * / and numbers"
    try:
        return str(value)   # a Fraction prints 10 or 7/3
    except ValueError:      # Python prints no integer of over 4 300 digits
        return "error: the value is too long to print"


def solve_tool(numbers, target):
    """An expression over `numbers` that equals `target` (calculator.solve), or "no solution"."""
    if not (isinstance(numbers, list) and 2 <= len(numbers) <= 6 and all(type(n) is int and 0 <= n < 10 ** 6 for n in numbers)
            and type(target) is int and abs(target) < 10 ** 9):
        return "error: solve needs 2 to 6 whole numbers below 1 000 000 and a whole target"
    return solve(numbers, target, timeout=5) or "no solution"


TOOLS = {"calculate": (calculate, ("expression",)), "solve": (solve_tool, ("numbers", "target"))}


def tool_names(flag_value, flag="--tools"):
    """("calculate",) or ("calculate", "solve") from a flag's comma list; ValueError naming the flag otherwise."""
    names = tuple(dict.fromkeys(n.strip() for n in flag_value.split(",") if n.strip()))
    if "calculate" not in names or not set(names) <= set(TOOLS):
        raise ValueError(f"{flag} {flag_value!r}: calculate, or calculate,solve")
    return names


def call_text(name, **arguments):
    """A call as the model writes it: <tool_call>{"name": …, "arguments": {…}}</tool_call>."""
    return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{CALL_CLOSE}"


def run_call(body, tools=("calculate",)):
    """(response text, valid) for the JSON between <tool_call> and </tool_call>. Never raises."""
    try:
        call = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return "error: the call is not JSON", False
    if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
        return 'error: a call is {"name": ..., "arguments": {...}}', False
    name = call.get("name")
    if name not in tools:
        return f"error: unknown tool {name!r}; the tools are {', '.join(tools)}", False
    function, parameters = TOOLS[name]
    if sorted(call["arguments"]) != sorted(parameters):
        return f"error: {name} takes {', '.join(parameters)}", False
    result = function(**call["arguments"])
    return result, not result.startswith("error")


def response_text(result):
    return f"{RESPONSE_OPEN}{result}{RESPONSE_CLOSE}"


# ------------------------------------------------------------------------------------------- the loop

def tool_loop(sample, tokenizer, prompt_ids, max_new_tokens, max_calls=4, tools=("calculate",), **sampling):
    """Sample every prompt's completion with tool calls run in between, all sequences of a round together.

    sample(ids, max_new_tokens, stop_strings, **sampling) → (completions, stopped) is common.make_sampler's
    sampler. A round samples each unfinished sequence up to the end of a call, a stop token or its budget;
    a call is run and its response appended (cut to the budget); a sequence finishes on a stop token, a
    budget spent, or a call beyond `max_calls` (it is not run). max_new_tokens counts every completion token,
    the model's and the harness's.

    Returns one dict per prompt: "ids" (the completion: model and harness tokens), "spans" ([start, end) of
    the model's tokens within ids), "stopped" (ended on a stop token), "calls", "invalid" (calls that got an
    error), "checked" (expressions the calculator evaluated, with their results).
    """
    out = [{"ids": [], "spans": [], "stopped": False, "calls": 0, "invalid": 0, "checked": {}} for _ in prompt_ids]
    active = list(range(len(prompt_ids)))
    while active:
        budget = max(max_new_tokens - len(out[i]["ids"]) for i in active)
        pieces, stopped = sample([list(prompt_ids[i]) + out[i]["ids"] for i in active], max_new_tokens=budget,
                                 stop_strings=(CALL_CLOSE,), **sampling)
        still = []
        for i, piece, stop in zip(active, pieces, stopped):
            seq, room = out[i], max_new_tokens - len(out[i]["ids"])
            piece, stop = piece[:room], stop and len(piece) <= room   # the round's budget is the largest: cut to this one
            seq["spans"].append((len(seq["ids"]), len(seq["ids"]) + len(piece)))
            seq["ids"] += piece
            text = tokenizer.decode(piece, skip_special_tokens=False)
            if not stop or CALL_CLOSE not in text or len(seq["ids"]) >= max_new_tokens:
                seq["stopped"] = bool(stop) and CALL_CLOSE not in text
                continue
            if seq["calls"] == max_calls:
                continue
            body = text[:text.rindex(CALL_CLOSE)]
            body = body[body.rindex(CALL_OPEN) + len(CALL_OPEN):] if CALL_OPEN in body else None
            result, valid = run_call(body, tools) if body is not None else (f"error: {CALL_CLOSE} without {CALL_OPEN}", False)
            seq["calls"] += 1
            seq["invalid"] += not valid
            call = json.loads(body) if valid else None
            if valid and call["name"] == "calculate":
                seq["checked"][" ".join(call["arguments"]["expression"].split())] = result
            response = tokenizer(response_text(result), add_special_tokens=False, split_special_tokens=True)["input_ids"]
            seq["ids"] += response[:max_new_tokens - len(seq["ids"])]
            if len(seq["ids"]) < max_new_tokens:
                still.append(i)
        active = still
    return out


def stop_string_end(tokenizer, row, stop_strings, end):
    """The index of the token of `row` that completes the first of stop_strings (common.generate stops there, as
    vLLM does), else `end`: a binary search over decoded prefixes, which hold a stop string from that token on."""
    def holds(n):
        text = tokenizer.decode(row[:n], skip_special_tokens=False)
        return any(s in text for s in stop_strings)
    if not holds(len(row)):
        return end
    low, high = 1, len(row)   # holds(high); find the least n with holds(n)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if holds(mid) else (mid + 1, high)
    return low - 1


# ------------------------------------------------------------------------------------ Countdown with tools

def tool_query(numbers, target, tools=("calculate",)):
    """The WarmStart prompt with the tools described before the assistant turn (the base model has no chat tools)."""
    query = warmstart_query(numbers, target)
    head, tail = query.rsplit("\nAssistant:", 1)
    lines = [f"To check an expression, call the calculator: {call_text('calculate', expression='1 + 2')} and its "
             f"value comes back as {response_text(3)}."]
    if "solve" in tools:
        lines.append(f"To find an answer, call the solver: {call_text('solve', numbers=[1, 2, 3], target=6)}.")
    return f"{head}\n{' '.join(lines)}\nAssistant:{tail}"


def tool_completion(numbers, target, expression, wrong=0, rng=None):
    """A tool-use trace (sft.py's data): guesses checked with the calculator, then the answer, WarmStart-style:
        <think>
        8 * 5 - 6 <tool_call>…"8 * 5 - 6"…</tool_call><tool_response>34</tool_response> not 38.
        6 * 5 + 8 <tool_call>…"6 * 5 + 8"…</tool_call><tool_response>38</tool_response> found it.
        </think>
        <answer>6 * 5 + 8</answer>
    `wrong` random guesses that miss come first (each checked honestly), then the solution's expression."""
    rng = rng or random.Random(0)
    guesses = []
    for _ in range(wrong):
        for _ in range(20):   # skip the rare right guess and repeats
            guess = _random_expression(numbers, rng)
            value = evaluate_expression(guess, exact=True)
            if value is not None and value != target and guess not in guesses:
                guesses.append(guess)
                break
    lines = [f"{g} {call_text('calculate', expression=g)}{response_text(calculate(g))} not {target}." for g in guesses]
    lines.append(f"{expression} {call_text('calculate', expression=expression)}{response_text(calculate(expression))} "
                 f"found it.")
    return "\n<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>{expression}</answer>"


def synthetic_tool_traces(n, seed, shape="easy", max_wrong=2, tools=("calculate",)):
    """n rows {"query", "completion", "nums", "target"}: tool_query prompts and tool_completion traces with 0 to
    max_wrong checked guesses (uniformly) before the solution (sft.py --trace tools). With "solve" among the tools,
    the trace asks the solver first and checks its answer with the calculator (report 000's setting, in a loop)."""
    rng, rows = random.Random(seed), []
    for p in puzzles_from_spec(shape, n, seed):
        expression = solve(p["nums"], p["target"])
        if "solve" in tools:
            asked = call_text("solve", numbers=list(p["nums"]), target=p["target"]) + response_text(expression)
            completion = tool_completion(p["nums"], p["target"], expression).replace("<think>\n", f"<think>\n{asked}\n", 1)
        else:
            completion = tool_completion(p["nums"], p["target"], expression, wrong=rng.randint(0, max_wrong), rng=rng)
        rows.append({"query": tool_query(p["nums"], p["target"], tools), "completion": completion,
                     "nums": p["nums"], "target": p["target"]})
    return rows


def _random_expression(numbers, rng):
    """A random expression over all the numbers (a guess to check)."""
    parts = [str(n) for n in numbers]
    while len(parts) > 1:
        a, b = (parts.pop(rng.randrange(len(parts))) for _ in range(2))
        op = rng.choice("+-*/")
        parts.append(f"({a} {op} {b})" if len(parts) else f"{a} {op} {b}")
    return parts[0]


def uses_tool_answer(response, checked, target):
    """Whether the final answer was checked: its expression went to the calculator and came back as the target."""
    answer = response.rsplit("<answer>", 1)[-1].split("</answer>", 1)[0] if "<answer>" in response else None
    return answer is not None and checked.get(" ".join(answer.split())) == str(target)

