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

from calculator import MIXED_MARKED, expression_text, pair_claim, pair_hits, pair_line, puzzles_from_spec, search_pairs, solve
from countdown_reward import evaluate_expression, warmstart_query

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOL_EXCHANGE = re.compile(f"{re.escape(CALL_OPEN)}.*?{re.escape(RESPONSE_CLOSE)}", re.DOTALL)   # a call and its answer


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
    except (ValueError, RecursionError):   # not JSON, nested too deep, or an integer of more than 4 300 digits
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


def response_pieces(text):
    """A completion cut around the harness's tool responses: [(piece, is_response)], the non-empty pieces in order.
    A response runs from <tool_response> to the first </tool_response> after it. Linear time: an opening tag with
    no closing one after it has none after any later opening either, so the rest is the model's text."""
    pieces, pos = [], 0
    while (start := text.find(RESPONSE_OPEN, pos)) >= 0:
        end = text.find(RESPONSE_CLOSE, start + len(RESPONSE_OPEN))
        if end < 0:
            break
        end += len(RESPONSE_CLOSE)
        pieces += [(text[pos:start], False), (text[start:end], True)]
        pos = end
    pieces.append((text[pos:], False))
    return [(piece, response) for piece, response in pieces if piece]


# ------------------------------------------------------------------------------------------- the loop

def tool_loop(sample, tokenizer, prompt_ids, max_new_tokens, max_calls=4, tools=("calculate",), **sampling):
    """Sample every prompt's completion with tool calls run in between, all sequences together.

    sample(ids, max_new_tokens, stop_strings, **sampling) → (completions, stopped) is sampling.make_sampler's
    sampler. A piece of the model's ends at the end of a call, a stop token or the budget; a call is run and its
    response appended (cut to the budget); a sequence finishes on a stop token, a budget spent, or a call beyond
    `max_calls` (it is not run). max_new_tokens counts every completion token, the model's and the harness's.
    With transformers (`sample.responds`) the harness answers between tokens (sampling.generate's `respond`); with
    vLLM in rounds: each round samples every unfinished sequence to the end of its piece (its prefix is cached).

    Returns one dict per prompt: "ids" (the completion: model and harness tokens), "spans" ([start, end) of
    the model's tokens within ids), "stopped" (ended on a stop token), "calls", "invalid" (calls that got an
    error), "checked" (expressions the calculator evaluated, with their results).
    """
    out = [{"ids": [], "spans": [], "stopped": False, "calls": 0, "invalid": 0, "checked": {}} for _ in prompt_ids]

    def respond(i, piece, stop):
        """Sequence i's piece has ended (stop: on a stop token or </tool_call>): the response's tokens, or None."""
        seq = out[i]
        seq["spans"].append((len(seq["ids"]), len(seq["ids"]) + len(piece)))
        seq["ids"] += piece
        text = tokenizer.decode(piece, skip_special_tokens=False)
        if not stop or CALL_CLOSE not in text or len(seq["ids"]) >= max_new_tokens:
            seq["stopped"] = bool(stop) and CALL_CLOSE not in text
            return None
        if seq["calls"] == max_calls:
            return None
        body = text[:text.rindex(CALL_CLOSE)]
        body = body[body.rindex(CALL_OPEN) + len(CALL_OPEN):] if CALL_OPEN in body else None
        result, valid = run_call(body, tools) if body is not None else (f"error: {CALL_CLOSE} without {CALL_OPEN}", False)
        seq["calls"] += 1
        seq["invalid"] += not valid
        call = json.loads(body) if valid else None
        if valid and call["name"] == "calculate":
            seq["checked"][" ".join(call["arguments"]["expression"].split())] = result
        response = tokenizer(response_text(result), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        response = response[:max_new_tokens - len(seq["ids"])]
        seq["ids"] += response
        return response if len(seq["ids"]) < max_new_tokens else None

    if getattr(sample, "responds", False):
        sample(prompt_ids, max_new_tokens=max_new_tokens, stop_strings=(CALL_CLOSE,), respond=respond, **sampling)
        return out
    active = list(range(len(prompt_ids)))
    while active:
        budget = max(max_new_tokens - len(out[i]["ids"]) for i in active)
        pieces, stopped = sample([list(prompt_ids[i]) + out[i]["ids"] for i in active], max_new_tokens=budget,
                                 stop_strings=(CALL_CLOSE,), **sampling)
        still = []
        for i, piece, stop in zip(active, pieces, stopped):
            room = max_new_tokens - len(out[i]["ids"])   # the round's budget is the largest: cut to this one's
            if respond(i, piece[:room], stop and len(piece) <= room) is not None:
                still.append(i)
        active = still
    return out


# ------------------------------------------------------------------------------------ Countdown with tools

def tool_query(numbers, target, tools=("calculate",)):
    """The WarmStart prompt with the tools described before the assistant turn (the base model has no chat tools)."""
    query = warmstart_query(numbers, target)
    head, tail = query.rsplit("\nAssistant:", 1)
    lines = [f"To check an expression, call the calculator on it minus the target: "
             f"{call_text('calculate', expression='1 + 2 - 3')} comes back as {response_text(0)} when it is right."]
    if "solve" in tools:
        lines.append(f"To find an answer, call the solver: {call_text('solve', numbers=[1, 2, 3], target=6)}.")
    return f"{head}\n{' '.join(lines)}\nAssistant:{tail}"


SLIPPED = 0.5   # the share of tool traces with one slip: a wrong value that makes a hit, refuted by the calculator


def tool_completion(numbers, target, mark=True, slip=None):
    """A tool-use trace (sft.py's data): calculator.search_completion's search, every hit a line claims checked with
    the calculator (check_text: the expression minus the target, a hit if 0 comes back); after a "no", the line's
    next hit ("no;") or the next line ("no."):
        <think>
        8 5: 13 3 40 -; 6: 32 44 - - - -; no.
        8 6: 14 2 48 -; 5: 33 43 - - - -; no.
        6 5: 11 1 30 -; 8: 30 46 - - - -; 6 * 5 = 30, 30 + 8 = 38 <tool_call>…"6 * 5 + 8 - 38"…</tool_call><tool_response>0</tool_response> found it.
        </think>
        <answer>6 * 5 + 8</answer>
    slip (line, "makes" or "needs", position, value): that line writes one value wrong, the way the model makes up a
    hit ("7 3: 10 4 27 -; 9: 27 45 - 4 - -; 7 * 3 = 27, 27 + 9 = 36" → -6, "no; 7 - 3 = 4, …"); the calculator
    refutes it and the search goes on. None if the search finds no answer (or the slip hides it)."""
    lines = []
    for n, (y, z, x, makes, needs) in enumerate(search_pairs(numbers, target)):
        if slip and slip[0] == n:
            (makes if slip[1] == "makes" else needs)[slip[2]] = slip[3]
        checks, found = [], False
        for slot in pair_hits(makes, needs):
            claim, tree = pair_claim(y, z, x, makes, needs, slot, target)
            expression = expression_text(tree, target)
            check, found = check_text(expression, target)
            checks.append(f"{claim} {check} {'found it' if found else 'no'}")
            if found:
                break
        lines.append(f"{pair_line(y, z, x, makes, needs, mark)} {'; '.join(checks) or 'no'}.")
        if found:
            return "\n<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>{expression}</answer>"
    return None


def check_text(expression, target):
    """(text, hit): a check as the trace writes it, the expression minus the target sent to the calculator and what
    came back, and whether that is 0. The verdict after it reads one value, 0 or not, not two numbers to compare."""
    result = calculate(f"{expression} - {target}")
    return call_text("calculate", expression=f"{expression} - {target}") + response_text(result), result == "0"


def slips(numbers, target):
    """Every slip (tool_completion) that makes a false hit before the answer and keeps the answer, with its size:
    [(|written − true|, (line, list, position, value)), …]. A "needs" slip writes a value the pair makes in a
    slot of what the line needs; a "makes" slip writes a needed value as one the pair makes."""
    out = []
    for n, (y, z, x, makes, needs) in enumerate(search_pairs(numbers, target)):
        hits = pair_hits(makes, needs)
        before = hits[0] if hits else len(needs)   # a false hit must come before the line's true one
        made = [v for v in makes if v is not None]
        for i in range(before):   # before the first hit, no needed value is one the pair makes
            if needs[i] is None:
                continue
            out += [(abs(m - needs[i]), (n, "needs", i, m)) for m in made]
            out += [(abs(needs[i] - v), (n, "makes", j, needs[i])) for j, v in enumerate(makes)
                    if v is not None and not (hits and v == needs[hits[0]])]
        if hits:
            return out
    return out


def synthetic_tool_traces(n, seed, shape="easy", tools=("calculate",), slipped=SLIPPED):
    """n rows {"query", "completion", "nums", "target"}: tool_query prompts and tool_completion traces, the "!" marks
    on a share MIXED_MARKED of them (as sft.py --trace search-mixed), and a share `slipped` with one of the three
    smallest slips (sft.py --trace tools). With "solve" among the tools the trace asks the solver and checks its
    answer with the calculator (report 000's setting, in a loop; sft.py --trace tools-solve)."""
    rng, rows = random.Random(seed), []
    for p in puzzles_from_spec(shape, n, seed):
        if "solve" in tools:
            expression = solve(p["nums"], p["target"])
            completion = (f"\n<think>\n{call_text('solve', numbers=list(p['nums']), target=p['target'])}"
                          f"{response_text(expression)}\n{expression} "
                          f"{check_text(expression, p['target'])[0]} found it."
                          f"\n</think>\n<answer>{expression}</answer>")
        else:
            mark = rng.random() < MIXED_MARKED
            nearest = sorted(slips(p["nums"], p["target"]))[:3]
            slip = rng.choice(nearest)[1] if nearest and rng.random() < slipped else None
            completion = tool_completion(p["nums"], p["target"], mark, slip)
        rows.append({"query": tool_query(p["nums"], p["target"], tools), "completion": completion,
                     "nums": p["nums"], "target": p["target"]})
    return rows


def uses_tool_answer(response, checked, target):
    """Whether the final answer was checked: the calculator got its expression and said the target, or its expression
    minus the target and said 0."""
    if "<answer>" not in response:
        return False
    answer = " ".join(response.rsplit("<answer>", 1)[-1].split("</answer>", 1)[0].split())
    return checked.get(answer) == str(target) or checked.get(f"{answer} - {target}") == "0"

