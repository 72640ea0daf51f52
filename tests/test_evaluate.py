"""evaluate.py: hand-computed Countdown metrics, best-of-N, the tool prompt, the judge client, output files."""
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

import common
import evaluate
import sampling
from countdown_reward import score_response

RIGHT91, WRONG91 = "<think>\n36 - 32 = 4\n</think>\n<answer>95 - (36 - 32)</answer>", "<answer>95 - 36 - 32</answer>"


def test_pass_at_k_by_hand():
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)   # 1 − C(3,2)/C(5,2)
    assert evaluate.pass_at_k(5, 0, 3) == 0 and evaluate.pass_at_k(5, 4, 2) == 1
    assert evaluate.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_metrics_of_a_fixed_response_file_match_hand_values(tmp_path):
    rows = [{"num": [95, 36, 32], "target": 91, "response": RIGHT91},                     # 1
            {"num": [95, 36, 32], "target": 91, "response": WRONG91},                     # 0.1
            {"num": [6, 1, 3, 4], "target": 24, "response": "<answer>6 / (1 - 3 / 4)</answer>"},  # 1
            {"num": [6, 1, 3, 4], "target": 24, "response": "<answer>(6 / (1 - 3 / 4))</answer>\n"},  # 1 (stripped)
            {"num": [1, 2, 3], "target": 6, "response": "no idea"},                       # 0
            {"num": [1, 2, 3], "target": 6, "response": "<answer>1 + 2</answer>"}]         # 0.1
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = evaluate.main(evaluate.Args(responses=str(path), out_dir=str(tmp_path / "o")))
    m = results["rows"][0]
    per_prompt = [0.55, 1.0, 0.05]
    assert m["score"][0] == pytest.approx(sum(per_prompt) / 3)
    mean = sum(per_prompt) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / 2)
    assert m["score"][1] == pytest.approx(1.96 * sd / math.sqrt(3))
    assert m["acc"][0] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["format"][0] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["pass@1"][0] == pytest.approx(0.5)
    assert m["pass@2"][0] == pytest.approx(2 / 3)
    assert m["samples"] == 2 and results["prompts"] == 3
    leaderboard = [json.loads(line) for line in (tmp_path / "o" / "leaderboard.jsonl").read_text().splitlines()]
    assert leaderboard[0] == {"num": [95, 36, 32], "target": 91, "response": RIGHT91}


def test_best_of_n_is_never_below_the_first_sample_and_grows_with_n():
    rng = np.random.default_rng(0)
    scores = rng.choice([0.0, 0.1, 1.0], size=(200, 8))
    previous = scores[:, 0]
    for n in range(1, 9):
        best = evaluate.best_of_n(scores, n)
        assert (best >= scores[:, 0]).all() and (best >= previous).all()
        previous = best
    assert (evaluate.best_of_n(scores, 8) == scores.max(1)).all()


def test_tool_prompt_carries_a_solution_that_scores_one():
    prompt = evaluate.tool_prompt([6, 1, 3, 4], 24)
    hint = re.search(r"The correct answer is (<answer>.*</answer>)\.", prompt).group(1)
    assert score_response(hint, {"target": 24, "nums": [6, 1, 3, 4]}) == 1.0
    assert prompt.endswith("\nAssistant: Let me solve this step by step.")
    assert prompt.index("The correct answer") < prompt.index("Assistant:")


def test_win_rate_is_the_specs_with_ties_half_beside_it():
    r = evaluate.win_rate([1.0, 2.0, 3.0, 5.0, None], [0.0, 2.0, 4.0, 1.0, 7.0])
    assert (r["wins"], r["ties"], r["losses"], r["unjudged"]) == (2, 1, 1, 1)
    assert r["win_rate"][0] == pytest.approx(2 / 4)              # spec §1.5: 1 if the policy's reward is higher, else 0
    assert r["win_rate_ties_half"][0] == pytest.approx(2.5 / 4)


def test_repetition_penalty_reaches_generation(model, tokenizer):
    prompt = common.encode(tokenizer, "Q: 1 1 1 1 ?")["input_ids"]
    plain, _ = sampling.generate(model, tokenizer, [prompt], max_new_tokens=12, temperature=0)
    penalised, _ = sampling.generate(model, tokenizer, [prompt], max_new_tokens=12, temperature=0, repetition_penalty=1e6)
    assert len(set(plain[0])) < len(plain[0])                            # greedy repeats itself here …
    assert len(set(penalised[0])) == len(penalised[0]) and not set(penalised[0]) & set(prompt)   # … penalised, never


# -------------------------------------------------------------------------------- the judge client

class Judge(BaseHTTPRequestHandler):
    plan, seen = [], []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.seen.append((self.headers.get("Authorization"), body))
        status, content = Judge.plan.pop(0)
        payload = content if isinstance(content, bytes) else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy set in the environment must not see this traffic
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = HTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Judge.plan, Judge.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


SECRET = "nvapi-test-secret-do-not-leak"


def test_judge_parses_retries_caches_and_never_leaks_the_key(judge_server, tmp_path, capsys):
    cache = tmp_path / "cache.jsonl"
    Judge.plan = [(200, "reward:-19.875"), (429, "slow down"), (200, "reward:3.5"), (200, "I think it is good")]
    judge = evaluate.NemotronJudge(judge_server, "nemotron", SECRET, cache, backoff=0.01)
    assert judge.reward("p1", "r1") == -19.875                 # a normal reply
    assert judge.reward("p1", "r1") == -19.875                 # cached: not asked twice
    assert judge.reward("p2", "r2") == 3.5                     # a 429, then success
    with pytest.raises(common.InputError, match="expected 'reward:<number>'"):
        judge.reward("p3", "r3")                               # a malformed reply: a clear error
    assert len(Judge.seen) == 4
    assert Judge.seen[0][0] == f"Bearer {SECRET}"
    assert Judge.seen[0][1]["messages"] == [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "r1"}]
    resumed = evaluate.NemotronJudge(judge_server, "nemotron", SECRET, cache)
    assert resumed.reward("p1", "r1") == -19.875 and resumed.reward("p2", "r2") == 3.5   # earlier judgements kept
    assert len(Judge.seen) == 4
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and SECRET not in cache.read_text()


def test_server_errors_after_retries_are_one_clear_error(judge_server, tmp_path):
    Judge.plan = [(503, "down")] * 3
    judge = evaluate.NemotronJudge(judge_server, "nemotron", SECRET, tmp_path / "c.jsonl", retries=2, backoff=0.01)
    with pytest.raises(common.InputError, match="HTTP 503") as e:
        judge.reward("p", "r")
    assert SECRET not in str(e.value)


def test_a_refused_request_is_unjudged_cached_and_the_run_goes_on(judge_server, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    reference = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=5)   # answers otherwise
    reference.save_pretrained(tmp_path / "ref")
    tokenizer.save_pretrained(tmp_path / "ref")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "short"}\n{"prompt": "very long"}\n')
    # policy's two answers, then the reference's: the second prompt's policy answer is refused (over 4 096 tokens)
    Judge.plan = [(200, "reward:2.0"), (400, "too long"), (200, "reward:1.0"), (200, "reward:0.0")]
    args = evaluate.Args(task="ultrafeedback", model="tiny", reference=str(tmp_path / "ref"), prompts=str(prompts),
                         judge_url=judge_server,
                         api_key_env="JUDGE_KEY", max_new_tokens=4, repetition_penalty=1.1, out_dir=str(tmp_path / "o"))
    row = evaluate.main(args)["rows"][0]
    assert (row["wins"], row["unjudged"], row["win_rate"][0], row["repetition_penalty"]) == (1, 1, 1.0, 1.1)
    assert "| 1.1 |" in (tmp_path / "o" / "results.md").read_text()
    cached = common.read_jsonl(tmp_path / "o" / "judge_cache.jsonl")
    assert [r["reward"] for r in cached] == [2.0, None, 1.0, 0.0]
    evaluate.main(args)                                          # a rerun asks nothing again
    assert len(Judge.seen) == 4


def test_missing_api_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    with pytest.raises(common.InputError, match="NO_SUCH_KEY_VAR"):
        evaluate.main(evaluate.Args(task="ultrafeedback", prompts=str(prompts), api_key_env="NO_SUCH_KEY_VAR",
                                    out_dir=str(tmp_path / "o")))


# ---------------------------------------------------------------------------------- whole paths

def test_collect_averages_runs_and_keeps_each_rows_settings(tmp_path):
    def write(run, name, acc, samples, temperature):
        row = {"label": "model", "decoding": "greedy" if temperature == 0 else "sampled", "temperature": temperature,
               "samples": samples, "max_new_tokens": 128, "score": [acc, 0.04], "acc": [acc, 0.05], "format": [1.0, 0.0]}
        path = tmp_path / run / "eval" / name
        path.mkdir(parents=True)
        (path / "results.json").write_text(json.dumps({"prompts": 500, "rows": [row]}))
    for run, greedy, sampled in (("s0", 0.50, 0.40), ("s1", 0.60, 0.44)):
        write(run, "sft-greedy", greedy, 1, 0.0)
        write(run, "sft-sampled", sampled, 2, 1.0)
    write("s0", "rloo-greedy", 0.56, 1, 0.0)
    write("s1", "rloo-greedy", 0.62, 1, 0.0)
    one = evaluate.collect([tmp_path / "s0"], tmp_path / "one")
    assert "± 95% interval; 500 held-out prompts" in one and "| sft-greedy | greedy | 0 | 1 | 128 | 0.500 ± 0.040 |" in one
    assert "change in accuracy" not in one  # one run has no spread to hold a change against
    table = evaluate.collect([tmp_path / "s0", tmp_path / "s1"], tmp_path / "both")
    # mean and sample sd by hand: (0.50, 0.60) → 0.550 ± 0.0707; (0.40, 0.44) → 0.420 ± 0.0283
    assert table.startswith("mean ± sd over 2 runs; 500 held-out prompts")
    assert "| sft-greedy | greedy | 0 | 1 | 128 | 0.550 ± 0.071 | 0.550 ± 0.071 | 1.000 ± 0.000 |" in table
    assert "| sft-sampled | sampled | 1 | 2 | 128 | 0.420 ± 0.028 |" in table
    # RLOO minus the same run's SFT, greedy: 0.56 − 0.50 and 0.62 − 0.60 → +6.0, +2.0 points: +4.0 ± 2.8
    assert "| rloo-greedy | +6.0, +2.0 | +4.0 ± 2.8 |" in table
    assert (tmp_path / "both" / "results.md").read_text() == table
    write("s0", "base-greedy", 0.01, 1, 0.0)   # an evaluation one run lacks is left out, said so, not a crash
    assert "base-greedy" not in evaluate.collect([tmp_path / "s0", tmp_path / "s1"], tmp_path / "both")


def test_tiny_countdown_run_writes_every_output(tmp_path):
    results = evaluate.main(evaluate.Args(model="tiny", puzzles="3to4:test", n=6, samples=2, temperature=1.0,
                                          max_new_tokens=12, best_of="1,2", tool=True, out_dir=str(tmp_path)))
    for name in ("results.json", "results.md", "per_prompt.jsonl", "leaderboard.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    labels = [r["label"] for r in results["rows"]]
    assert labels == ["model", "best-of-1 (rule verifier)", "best-of-2 (rule verifier)",
                      "tool-augmented (calculator answer in prompt)"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["temperature"] == 1.0 and saved["rows"][0]["max_new_tokens"] == 12
    assert len((tmp_path / "leaderboard.jsonl").read_text().splitlines()) == 6


def test_tiny_ultrafeedback_run_with_a_local_judge(tmp_path, tokenizer):
    policy = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=1)
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    rm = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=2, reward=True)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(5)))
    results = evaluate.main(evaluate.Args(task="ultrafeedback", model=str(tmp_path / "policy"), reference="tiny",
                                          judge=str(tmp_path / "rm"), prompts=str(prompts), temperature=1.0,
                                          max_new_tokens=8, out_dir=str(tmp_path / "o")))
    row = results["rows"][0]
    assert row["wins"] + row["ties"] + row["losses"] == 5 and 0 <= row["win_rate"][0] <= 1
    per_prompt = [json.loads(line) for line in (tmp_path / "o" / "per_prompt.jsonl").read_text().splitlines()]
    assert len(per_prompt) == 5 and {"response", "reference_response", "reward", "reference_reward"} <= set(per_prompt[0])


def test_batch_size_reaches_generate_and_a_puzzle_file_starts_at_its_first_row(tmp_path, monkeypatch):
    seen = []
    real = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **kw: seen.append(kw["batch_size"]) or real(*a, **kw))
    puzzles = tmp_path / "p.jsonl"
    puzzles.write_text('{"target": 3, "num": [1, 2]}\n{"target": 10, "num": [2, 5]}\n')
    results = evaluate.main(evaluate.Args(model="tiny", puzzles=str(puzzles), n=2, batch_size=1, max_new_tokens=4,
                                          out_dir=str(tmp_path / "o")))   # the hub's --skip 327 680 is not a file's
    assert seen == [1] and results["prompts"] == 2 and "rows 0…" in results["source"]


def test_the_judge_says_it_is_retrying_and_survives_a_torn_cache_line(judge_server, tmp_path, capsys):
    cache = tmp_path / "cache.jsonl"
    Judge.plan = [(200, "reward:1.5")]
    evaluate.NemotronJudge(judge_server, "nemotron", SECRET, cache).reward("p1", "r1")
    with open(cache, "a") as f:
        f.write('{"key": "abc", "rew')                  # killed mid-write
    Judge.plan = [(503, "busy"), (200, "reward:2.5")]
    judge = evaluate.NemotronJudge(judge_server, "nemotron", SECRET, cache, backoff=0.01)
    assert judge.reward("p1", "r1") == 1.5 and judge.reward("p2", "r2") == 2.5
    out = capsys.readouterr().out
    assert "last line incomplete, dropped" in out and "HTTP 503" in out and "retrying in 0.01 s (1 of 6)" in out
    assert [r["reward"] for r in common.read_jsonl(cache)] == [1.5, 2.5]
