"""The tool loop (tools.py): the tools' answers, the loop in rounds and between tokens, masks that never score
what the harness wrote."""
import copy
import json
import re
import time

import numpy as np
import pytest
import torch

import calculator
import common
import evaluate
import rloo
import sampling
import tools
from countdown_reward import evaluate_expression, score_response


def call(expression):
    return json.dumps({"name": "calculate", "arguments": {"expression": expression}})


# ------------------------------------------------------------------------------------------- the tools

@pytest.mark.parametrize("body, response, valid", [
    (call("(9 + 1) * 5"), "50", True),
    (call("7 / 3"), "7/3", True),                      # exact: a fraction, not 2.333…
    (call("1 / 3 + 2 / 3"), "1", True),                # float arithmetic would not give exactly 1 here either way
    (call("5 / (3 - 3)"), "error: not an arithmetic expression over + - * / and numbers", False),
    (call("__import__('os')"), "error: not an arithmetic expression over + - * / and numbers", False),
    (call("2 ** 99999"), "error: not an arithmetic expression over + - * / and numbers", False),
    (call(" * ".join(["9" * 99] * 50)), "error: the value is too long to print", False),
    ('{"name": "calculate", "arguments": {"expr": "1"}}', "error: calculate takes expression", False),
    ('{"name": "python", "arguments": {}}', "error: unknown tool 'python'; the tools are calculate", False),
    ('{"name": "calculate"', "error: the call is not JSON", False),
    ('["calculate"]', 'error: a call is {"name": ..., "arguments": {...}}', False),
    ('{"name": "calculate", "arguments": {"expression": 7}}', "error: expression must be a string", False),
    ('{"name": "calculate", "arguments": {"expression": ' + "1" * 5000 + '}}', "error: the call is not JSON", False),
])
def test_a_call_gets_its_answer_or_an_error_string(body, response, valid):
    assert tools.run_call(body) == (response, valid)


def test_solve_answers_only_when_offered_and_its_answer_is_right():
    body = json.dumps({"name": "solve", "arguments": {"numbers": [9, 1, 5], "target": 2}})
    assert tools.run_call(body)[1] is False                               # not among the tools offered
    answer, valid = tools.run_call(body, tools=("calculate", "solve"))
    assert valid and evaluate_expression(answer) == 2 and sorted(map(int, answer.replace("(", " ").replace(")", " ").split()[::2])) == [1, 5, 9]
    assert tools.run_call(json.dumps({"name": "solve", "arguments": {"numbers": [2, 2], "target": 9}}),
                          tools=("calculate", "solve")) == ("no solution", True)
    assert tools.run_call(json.dumps({"name": "solve", "arguments": {"numbers": "12", "target": 9}}),
                          tools=("calculate", "solve"))[1] is False


def test_tool_names_accept_calculate_and_solve_only():
    assert tools.tool_names("calculate") == ("calculate",) and tools.tool_names("calculate, solve") == ("calculate", "solve")
    for bad in ("", "solve", "calculate,python"):
        with pytest.raises(ValueError, match="--tools"):
            tools.tool_names(bad)


# ------------------------------------------------------------------------------------------- the loop

def scripted(tokenizer, script):
    """A sampler that writes script[round] for every sequence of a round (cut to the budget, as a sampler is); a
    text ending in "!" ends on the end-of-text token instead."""
    rounds = []

    def sample(prompt_ids, max_new_tokens, stop_strings=(), **_):
        text = script[len(rounds)]
        rounds.append((len(prompt_ids), max_new_tokens, stop_strings))
        ends = text.endswith("!")   # "!": the answer ends on the end-of-text token
        ids = tokenizer(text.removesuffix("!"), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * ends
        stopped = (ends or text.endswith(tools.CALL_CLOSE)) and len(ids) <= max_new_tokens
        return [ids[:max_new_tokens] for _ in prompt_ids], [stopped for _ in prompt_ids]
    return sample, rounds


def test_the_loop_runs_each_call_and_appends_its_response_between_rounds(tokenizer):
    sample, rounds = scripted(tokenizer, [f" a {tools.CALL_OPEN}{call('6 * 7')}{tools.CALL_CLOSE}",
                                          f" b {tools.CALL_OPEN}{call('6 / 0')}{tools.CALL_CLOSE}",
                                          " <answer>6 * 7</answer>!"])
    prompts = [[5, 6, 7], [5, 6]]
    runs = tools.tool_loop(sample, tokenizer, prompts, max_new_tokens=500, max_calls=4)
    assert [r[0] for r in rounds] == [2, 2, 2] and all(r[2] == (tools.CALL_CLOSE,) for r in rounds)
    first = runs[0]
    text = tokenizer.decode(first["ids"])
    assert text.count("<tool_response>42</tool_response>") == 1 and "<tool_response>error:" in text
    assert (first["calls"], first["invalid"], first["stopped"], first["checked"]) == (2, 1, True, {"6 * 7": "42"})
    # the spans are exactly the model's three pieces: decoding them gives back what the sampler wrote
    pieces = [tokenizer.decode(first["ids"][s:e]) for s, e in first["spans"]]
    assert pieces == [f" a {tools.CALL_OPEN}{call('6 * 7')}{tools.CALL_CLOSE}",
                      f" b {tools.CALL_OPEN}{call('6 / 0')}{tools.CALL_CLOSE}", " <answer>6 * 7</answer>" + tokenizer.eos_token]
    gaps = [tokenizer.decode(first["ids"][e:s]) for (_, e), (s, _) in zip(first["spans"], first["spans"][1:])]
    assert gaps == ["<tool_response>42</tool_response>",
                    "<tool_response>error: not an arithmetic expression over + - * / and numbers</tool_response>"]
    assert tools.uses_tool_answer(text, first["checked"], 42)


def test_the_call_limit_and_the_token_budget_end_an_answer(tokenizer):
    calling = f" {tools.CALL_OPEN}{call('1 + 1')}{tools.CALL_CLOSE}"
    sample, rounds = scripted(tokenizer, [calling] * 10)
    run, = tools.tool_loop(sample, tokenizer, [[5]], max_new_tokens=10_000, max_calls=2)
    assert run["calls"] == 2 and len(rounds) == 3 and not run["stopped"]    # the third call ends it, unrun
    piece = len(tokenizer(calling, add_special_tokens=False)["input_ids"])
    sample, rounds = scripted(tokenizer, [calling] * 10)
    run, = tools.tool_loop(sample, tokenizer, [[5]], max_new_tokens=piece + 5, max_calls=4)
    assert len(run["ids"]) == piece + 5 and rounds[0][1] == piece + 5      # the response is cut to the budget
    assert run["spans"] == [(0, piece)] and len(rounds) == 1


def test_generate_stops_after_the_token_that_completes_a_stop_string(tokenizer, model):
    prompt = [common.encode(tokenizer, "Using the numbers [1, 2, 3], create")["input_ids"]]
    torch.manual_seed(0)
    free, _ = sampling.generate(model, tokenizer, prompt, max_new_tokens=24, temperature=1.0)
    text = tokenizer.decode(free[0])
    stop = text[60:64]                                # four characters the model does write, mid-completion
    torch.manual_seed(0)                              # the same draws up to the stop
    cut, stopped = sampling.generate(model, tokenizer, prompt, max_new_tokens=24, temperature=1.0, stop_strings=(stop,))
    first = next(n for n in range(1, len(free[0]) + 1) if stop in tokenizer.decode(free[0][:n]))
    assert 3 < first < len(free[0]) and cut[0] == free[0][:first] and stopped == [True]


@pytest.fixture(scope="module")
def chaotic(model):
    """The tiny model with large random weights: greedy text that varies with every token and position (the
    fixture's small weights decode greedily to one repeated token, which no cache or position bug would change)."""
    chaotic, generator = copy.deepcopy(model), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in chaotic.parameters():
            p.normal_(0, 0.3, generator=generator) if p.ndim == 2 else None
    return chaotic.eval()


PROMPTS = ["Using the numbers [1, 2, 3], create", "a longer prompt, with more words", "x", "Using the numbers [4, 9]"]


def transformers_generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0,
                          repetition_penalty=1.0, stop_strings=()):
    """transformers' own generate, as sampling.generate asks for it (left padding, every setting explicit), each row cut
    after its first stop token, or after the token that completes a stop string: the reference."""
    from transformers import GenerationConfig
    stops, sample = common.stop_token_ids(tokenizer), temperature > 0
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
                              top_p=top_p if sample else 1.0, top_k=0 if sample else 50, eos_token_id=stops,
                              repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                              suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)) or None,
                              stop_strings=list(stop_strings) or None)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=tokenizer)
    completions, stopped = [], []
    for row in out[:, width:].tolist():
        ends = [n for n in range(1, len(row) + 1) if row[n - 1] in stops
                or any(s in tokenizer.decode(row[:n]) for s in stop_strings)]
        completions.append(row[:ends[0]] if ends else row)
        stopped.append(bool(ends))
    return completions, stopped


def test_generate_samples_as_transformers_generate_does(tokenizer, chaotic):
    # our decoding loop (sampling._decode: one KV cache, a finished sequence leaving the batch, a harness that may
    # write between tokens) against transformers' generate: the same tokens. Sampled (temperature, top-p, repetition
    # penalty) from the same seed, the same draws while no sequence ends (one that ends leaves our batch, not
    # generate's: the draws part); greedy, with one that ends early; a prompt given twice is read once, and both
    # copies continue as generate continues them
    prompts = [common.encode(tokenizer, p)["input_ids"] for p in PROMPTS]
    free, _ = transformers_generate(chaotic, tokenizer, prompts, max_new_tokens=30, temperature=0)
    stop = tokenizer.decode(free[2])[12:15]     # ends the third sequence early, and perhaps others
    for settings, some in (({"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.3}, prompts[:2]),
                           ({"temperature": 0, "repetition_penalty": 1.3}, prompts),
                           ({"temperature": 0, "stop_strings": (stop,)}, prompts),
                           ({"temperature": 0}, [prompts[0], prompts[1], prompts[0], prompts[0]])):
        torch.manual_seed(1)
        ours = sampling.generate(chaotic, tokenizer, some, max_new_tokens=30, **settings)
        torch.manual_seed(1)
        assert ours == transformers_generate(chaotic, tokenizer, some, max_new_tokens=30, **settings)
        assert len(set(map(tuple, ours[0]))) == len(set(map(tuple, some)))
        if "stop_strings" in settings:
            assert ours[1][2] and 3 < len(ours[0][2]) < 30 and len(ours[0][0]) == 30
    torch.manual_seed(1)
    sampled, _ = sampling.generate(chaotic, tokenizer, [prompts[0]] * 3, max_new_tokens=30, temperature=1.0)
    assert len(set(map(tuple, sampled))) == 3    # copies of a prompt share its prefill, not their draws


def test_the_tool_loop_between_tokens_is_the_loop_in_rounds(tokenizer, chaotic, monkeypatch):
    # greedy, the harness answering between tokens (one KV cache, a finished sequence leaving the batch) writes
    # exactly what rounds write (each round re-reads its prefix): the same tokens, spans and calls. The model
    # writes no calls: "the" stands for </tool_call>, a "call" without <tool_call> gets an error back
    monkeypatch.setattr(tools, "CALL_CLOSE", "the")
    sample, _ = sampling.make_sampler(tokenizer, "tiny", chaotic, use_vllm=False)
    assert sample.responds
    prompts = [common.encode(tokenizer, p)["input_ids"] for p in PROMPTS]
    between = tools.tool_loop(sample, tokenizer, prompts, max_new_tokens=240, max_calls=2, temperature=0)
    rounds = tools.tool_loop(lambda ids, **kw: sample(ids, **kw), tokenizer, prompts, max_new_tokens=240, max_calls=2,
                             temperature=0)
    assert between == rounds
    assert [r["calls"] for r in rounds] == [2] * 4 and all(len(r["spans"]) == 3 for r in rounds)
    assert len({len(r["ids"]) for r in rounds}) == 4 and max(len(r["ids"]) for r in rounds) < 240   # the third call ends each


# ------------------------------------------------------------------------------------------- masks

TRACE = (" 6 * 7 <tool_call>" + call("6 * 7") + "</tool_call><tool_response>42</tool_response> found it."
         "\n</think>\n<answer>6 * 7</answer>")


def test_encode_leaves_tool_responses_out_of_the_model_s_spans(tokenizer):
    example = common.encode(tokenizer, "Q:", TRACE)
    mask = common.collate([example], tokenizer.pad_token_id)["completion_mask"][0]
    masked_out = tokenizer.decode([t for t, m in zip(example["input_ids"], mask) if not m][example["prompt_len"]:])
    assert masked_out == "<tool_response>42</tool_response>"
    assert mask[-1] and mask[example["prompt_len"]] and not mask[:example["prompt_len"]].any()   # the end token is the model's
    plain = common.encode(tokenizer, "Q:", " 6 * 7 = 42")
    assert "spans" not in plain   # a completion without tool responses: one span, as always


@pytest.mark.parametrize("end", [True, False])
def test_a_completion_that_is_one_tool_response_trains_on_none_of_it(tokenizer, end):
    example = common.encode(tokenizer, "Q:", "<tool_response>42</tool_response>", end=end)
    mask = common.collate([example], tokenizer.pad_token_id)["completion_mask"][0]
    assert mask.sum() == int(end) and (not end or mask[-1])   # the end token alone is the model's, if there is one


def test_tool_responses_are_cut_out_in_linear_time():
    text = "a<tool_response>1</tool_response>b<tool_response>x<tool_response>2</tool_response><tool_response>"
    assert tools.response_pieces(text) == [("a", False), ("<tool_response>1</tool_response>", True), ("b", False),
                                           ("<tool_response>x<tool_response>2</tool_response>", True),
                                           ("<tool_response>", False)]
    for n in (8_000, 64_000):   # the regex took 5.4 s at 8 000 unclosed openers and 24 s at 16 000
        start = time.perf_counter()
        pieces = tools.response_pieces("<tool_response>" * n)
        assert pieces == [("<tool_response>" * n, False)] and time.perf_counter() - start < 0.5


def test_no_gradient_comes_from_the_tokens_the_harness_wrote(tokenizer, model):
    """The SFT loss on a tool trace: the hidden states that predict a tool response's tokens get exactly zero
    gradient (those tokens are context, never labels); the mask that included them would train on them."""
    example = common.encode(tokenizer, "Q:", TRACE)
    batch = common.collate([example], tokenizer.pad_token_id)
    response = ~batch["completion_mask"][0] & (torch.arange(len(example["input_ids"])) >= example["prompt_len"])
    predicts_response = response[1:]                      # position t predicts token t + 1

    def hidden_grad(completion_mask):
        captured = {}

        def keep(module, inputs, out):
            out.last_hidden_state.retain_grad()
            captured["h"] = out.last_hidden_state
        handle = model.get_decoder().register_forward_hook(keep)
        loss = -common.sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], completion_mask).sum()
        loss.backward()
        handle.remove()
        model.zero_grad()
        return captured["h"].grad[0, :-1].abs().sum(-1)

    grad = hidden_grad(batch["completion_mask"])
    assert grad[predicts_response].max() == 0 and (grad[~predicts_response & batch["completion_mask"][0, 1:]] > 0).all()
    wrong = batch["attention_mask"].bool() & (torch.arange(batch["input_ids"].shape[1]) >= example["prompt_len"])
    assert hidden_grad(wrong)[predicts_response].min() > 0   # a mask from the prompt length on trains on them


def test_rloo_with_tools_scores_only_the_model_s_tokens(tokenizer, tmp_path, monkeypatch):
    script = [f" 6 * 7 {tools.CALL_OPEN}{call('6 * 7')}{tools.CALL_CLOSE}", " <answer>6 * 7</answer>!"]

    def make_sampler(tok, *a, **kw):
        def sample(prompt_ids, max_new_tokens, **kw):   # a call; once its response is there (the prompt shows one), the answer
            outs = []
            for ids in prompt_ids:
                text = script[int(tok.decode(ids).count(tools.RESPONSE_CLOSE) > 1)]
                piece = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if text.endswith("!") else [])
                outs.append(piece[:max_new_tokens])
            return outs, [True] * len(outs)
        return sample, None
    batches = []
    real_collate = rloo.collate
    monkeypatch.setattr(rloo, "make_sampler", make_sampler)
    monkeypatch.setattr(rloo, "collate", lambda examples, pad: batches.append((examples, real_collate(examples, pad))) or batches[-1][1])
    rloo.main(rloo.Args(model="tiny", puzzles="easy:train", n_prompts=4, eval_prompts=0, k=2, prompts_per_step=2, steps=1,
                        tools="calculate", kl_coef=0.0, lr=1e-3, max_new_tokens=300, eval_every=0, sample_every=0,
                        out_dir=str(tmp_path / "rloo")))
    examples, batch = batches[0]
    for example, mask in zip(examples, batch["completion_mask"]):
        ids = torch.tensor(example["input_ids"])
        written_by_harness = tokenizer.decode(ids[~mask[:len(ids)]][example["prompt_len"]:].tolist())
        assert written_by_harness == "<tool_response>42</tool_response>"
    logged = json.loads((tmp_path / "rloo" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["calls"] == 1 and logged["invalid"] == 0


def test_evaluate_reports_calls_and_unchecked_answers(tokenizer, tmp_path):
    puzzles = [{"nums": [6, 7, 1], "target": 42}]
    args = evaluate.Args(tools="calculate", max_calls=4, samples=2, max_new_tokens=400, temperature=1.0)
    checked, _ = scripted(tokenizer, [f" {tools.CALL_OPEN}{call('6 * 7 * 1')}{tools.CALL_CLOSE}",
                                      "\n</think>\n<answer>6 * 7 * 1</answer>!"])
    row = evaluate.tool_loop_row(checked, tokenizer, puzzles, args, out_dir=tmp_path)
    assert row["acc"][0] == 1 and row["calls"][0] == 1 and row["used tool"][0] == 1 and row["unchecked answers"][0] == 0
    kept, = [json.loads(line) for line in (tmp_path / "per_prompt_tools.jsonl").read_text().splitlines()]
    written = (f" {tools.CALL_OPEN}{call('6 * 7 * 1')}{tools.CALL_CLOSE}<tool_response>42</tool_response>"
               "\n</think>\n<answer>6 * 7 * 1</answer>")
    assert kept == {"nums": [6, 7, 1], "target": 42, "responses": [written] * 2, "scores": [1.0] * 2, "calls": [1] * 2,
                    "checked": [{"6 * 7 * 1": "42"}] * 2}
    for expression in ("6 * 7 * 1 - 42", "6 * 7 * 1 - 41"):   # the trace's check (0: a hit); a check that said 1 is none
        minus, _ = scripted(tokenizer, [f" {tools.CALL_OPEN}{call(expression)}{tools.CALL_CLOSE}",
                                        "\n</think>\n<answer>6 * 7 * 1</answer>!"])
        row = evaluate.tool_loop_row(minus, tokenizer, puzzles, args)
        assert row["acc"][0] == 1 and row["unchecked answers"][0] == (expression.endswith("41"))
    guessed, _ = scripted(tokenizer, ["\n</think>\n<answer>6 * 7 * 1</answer>!"])
    row = evaluate.tool_loop_row(guessed, tokenizer, puzzles, args)
    assert row["acc"][0] == 1 and row["calls"][0] == 0 and row["unchecked answers"][0] == 1
    assert np.isclose(row["invalid calls"][0], 0)


def test_a_tool_trace_is_the_model_only_search_with_every_hit_checked(tokenizer):
    call = lambda e: tools.call_text("calculate", expression=e)   # a check: the expression minus the target
    # The model-only chain's own made-up hit (seed 1's SFT on [9, 3, 7] → 36: "7 * 3 = 27"), as a slip: refuted,
    # then the line's next hit.
    assert tools.tool_completion([9, 3, 7], 36, mark=False, slip=(2, "makes", 2, 27)).split("\n")[4] == (
        f"7 3: 10 4 27 -; 9: 27 45 - 4 - -; 7 * 3 = 27, 27 + 9 = 36 {call('7 * 3 + 9 - 36')}<tool_response>-6</tool_response> "
        f"no; 7 - 3 = 4, 4 * 9 = 36 {call('(7 - 3) * 9 - 36')}<tool_response>0</tool_response> found it.")
    # A slip on a line without a hit: "no." and the next line. By hand: 9 + 9 = 18 ≠ 41 = 45 − 4 (the nearest slips).
    assert tools.tool_completion([9, 9, 4], 45, mark=True, slip=(0, "makes", 0, 41)) == (
        f"\n<think>\n9 9: 41 0 81 1; 4: 41! 49 - - - -; 9 + 9 = 41, 41 + 4 = 45 {call('9 + 9 + 4 - 45')}"
        f"<tool_response>-23</tool_response> no.\n9 4: 13 5 36 -; 9: 36! 54 - 5! - -; 9 * 4 = 36, 36 + 9 = 45 "
        f"{call('9 * 4 + 9 - 45')}<tool_response>0</tool_response> found it.\n</think>\n<answer>9 * 4 + 9</answer>")
    assert sorted(tools.slips([9, 9, 4], 45))[:3] == [(23, (0, "makes", 0, 41)), (23, (0, "needs", 0, 18)),
                                                     (31, (0, "makes", 0, 49))]
    assert tools.slips([4, 3, 9], 16) == []   # 4 + 3 = 7 = 16 − 9 is the first slot of the first line
    rows = tools.synthetic_tool_traces(400, seed=3, shape="easy:sft")
    slipped = 0
    for row in rows:
        nums, target = row["nums"], row["target"]
        assert "To check an expression, call the calculator" in row["query"]
        checks = re.findall(r'"expression": "(.*?) - (\d+)"}}</tool_call><tool_response>(.*?)</tool_response> (found it|no)',
                            row["completion"])
        for expression, minus, value, verdict in checks:   # the expression minus the target: 0 is a hit
            assert int(minus) == target and value == tools.calculate(f"{expression} - {target}")
            assert (verdict == "found it") == (value == "0") == (tools.calculate(expression) == str(target))
        assert checks[-1][3] == "found it" and row["completion"].endswith(f"<answer>{checks[-1][0]}</answer>")
        assert score_response(row["completion"], {"numbers": nums, "target": target}) == 1.0
        slipped += len(checks) > 1
        if len(checks) == 1:   # no slip: the model-only search, its one hit checked
            marked = "!" in row["completion"]
            plain = re.sub(r" <tool_call>.*?</tool_response> found it\.", ", found it.", row["completion"])
            assert plain == calculator.search_completion(nums, target, mark=marked)
    assert 0.15 < slipped / len(rows) < 0.35   # half the rows, where a slip can come before the answer (~half)


def test_tiny_tools_learns_the_call_format_and_leaves_tiny_as_it_was(tokenizer):
    tiny_tools = common.load_tokenizer("tiny-tools")
    call_text = tools.call_text("calculate", expression="9 * 3 + 5")
    n = lambda tok, text: len(tok(text, add_special_tokens=False)["input_ids"])
    assert n(tiny_tools, call_text) <= 12 < 40 <= n(tokenizer, call_text)   # a call: a few tokens, as in Qwen2.5
    assert tiny_tools.decode(tiny_tools(call_text, add_special_tokens=False)["input_ids"]) == call_text
    assert len(tokenizer) == 671   # the tiny chain's tokenizer (and so every figure of tiny_pipeline.sh) is unchanged
    line = "7 3: 10 4 21 -; 9: 27 45 - 4 - -; no.\n6 5: 11 1 30 -; 8: 30! 46 - - - -; 6 * 5 = 30, 30 + 8 = 38 "
    pieces = lambda tok: [tok.decode([i]) for i in tok(line, add_special_tokens=False)["input_ids"]]
    assert pieces(tiny_tools) == pieces(tokenizer)   # the search reads the same: the chains differ by the tool alone
    model = common.load_model("tiny-tools", tiny_tools)
    assert model.get_input_embeddings().weight.shape[0] > len(tiny_tools)
