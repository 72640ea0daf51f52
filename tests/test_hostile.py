"""A hostile tester's inputs: each is refused in one line that names the flag, file or row, exit 2, before any work.

One table: the next flag or file check is added as a row. Files named `{name}` in an argument are written into
the test's directory from FILES first.
"""
import importlib
import json
import sys

import pytest

import common

ROWS = lambda *rows: "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
PUZZLE = {"target": 3, "nums": [1, 2]}
FILES = {
    "number.jsonl": ROWS("5"), "string.jsonl": ROWS('"a row"'), "null.jsonl": ROWS("null"),
    "messages.jsonl": ROWS({"messages": "hi"}), "contents.jsonl": ROWS({"messages": [{"role": "user", "content": 5}]}),
    "latin1.jsonl": b'{"query": "caf\xe9", "completion": "x"}\n',
    "target_text.jsonl": ROWS({"target": "abc", "nums": [1, 2]}), "target_null.jsonl": ROWS({"target": None, "nums": [1]}),
    "target_nan.jsonl": ROWS('{"target": NaN, "nums": [1, 2]}'), "target_inf.jsonl": ROWS('{"target": Infinity, "nums": [1]}'),
    "target_huge.jsonl": ROWS('{"target": ' + "9" * 5000 + ', "nums": [1]}'),
    "target_float.jsonl": ROWS({"target": 3.9, "nums": [1, 2], "response": "<answer>1 + 2</answer>"}),
    "num_string.jsonl": ROWS({"target": 3, "num": "12", "response": "<answer>1 + 2</answer>"}),
    "no_numbers.jsonl": ROWS({"target": 3, "response": "<answer>3</answer>"}),
    "prompt_number.jsonl": ROWS({"prompt": 7}),
    "puzzles.jsonl": ROWS(PUZZLE, PUZZLE),
    "a_file": "not a directory",
}
CASES = [   # script, arguments, what the one line says
    # every numeric flag against its range (inputs.FLAG_RANGES)
    ("sft", "--model tiny --grad-clip -1", "--grad-clip -1.0: must be > 0"),
    ("sft", "--model tiny --grad-clip 0", "--grad-clip 0.0: must be > 0"),
    ("sft", "--model tiny --grad-accum 0", "--grad-accum 0: must be ≥ 1"),
    ("sft", "--model tiny --batch-size -1", "--batch-size -1: must be ≥ 1"),
    ("sft", "--model tiny --batch-size 0", "--batch-size 0: must be ≥ 1"),
    ("sft", "--model tiny --steps -5", "--steps -5: must be ≥ 0"),
    ("sft", "--model tiny --lr -1", "--lr -1.0: must be > 0"),
    ("sft", "--model tiny --lr nan", "--lr nan: must be > 0"),
    ("sft", "--model tiny --weight-decay -1", "--weight-decay -1.0: must be ≥ 0"),
    ("sft", "--model tiny --warmup 1", "--warmup 1.0: must be in [0, 1)"),
    ("sft", "--model tiny --seed -1", "--seed -1: must be in [0, 2³²)"),
    ("dpo", "--model tiny --beta -1", "--beta -1.0: must be > 0"),
    ("dpo", "--model tiny --beta 0", "--beta 0.0: must be > 0"),
    ("dpo", "--model tiny --pair-samples 1", "--pair-samples 1: must be ≥ 2"),
    ("reward_model", "--model tiny --eval-rows -1", "--eval-rows -1: must be ≥ 0"),
    ("rloo", "--model tiny --kl-coef -1", "--kl-coef -1.0: must be ≥ 0"),
    ("rloo", "--model tiny --top-p 0", "--top-p 0.0: must be in (0, 1]"),
    ("rloo", "--model tiny --top-p 2", "--top-p 2.0: must be in (0, 1]"),
    ("rloo", "--model tiny --temperature -1", "--temperature -1.0: must be ≥ 0"),
    ("rloo", "--model tiny --temperature 0", "--temperature 0: RLOO samples"),
    ("rloo", "--model tiny --max-new-tokens 0", "--max-new-tokens 0: must be ≥ 1"),
    ("rloo", "--model tiny --prompts-per-step 0", "--prompts-per-step 0: must be ≥ 1"),
    ("rloo", "--model tiny --micro-prompts 0", "--micro-prompts 0: must be ≥ 1"),
    ("rloo", "--model tiny --k 1", "--k 1: must be ≥ 2"),
    ("rloo", "--model tiny --vllm-memory 1.5", "--vllm-memory 1.5: must be in (0, 1)"),
    ("evaluate", "--model tiny --temperature -1", "--temperature -1.0: must be ≥ 0"),
    ("evaluate", "--model tiny --samples 0", "--samples 0: must be ≥ 1"),
    ("evaluate", "--model tiny --n 0", "--n 0: must be ≥ 1"),
    ("evaluate", "--model tiny --best-of a", "--best-of a: a comma-separated list of ints ≥ 1"),
    ("evaluate", "--model tiny --best-of 0", "--best-of 0: a comma-separated list of ints ≥ 1"),
    ("evaluate", "--model tiny --temperatures x", "--temperatures x: a comma-separated list of floats ≥ 0"),
    ("evaluate", "--model tiny --tools bogus", "--tools 'bogus': calculate, or calculate,solve"),
    ("sft", "--model tiny --data synthetic --trace bogus", "--trace 'bogus': use one of attempts, search, "),
    ("sft", "--model tiny --data synthetic --trace bogus", ", sums, tools, tools-solve"),
    # flags that would do nothing
    ("rloo", "--model tiny --max-calls 3", "--max-calls 3: a setting of the tool loop, which does nothing without"),
    ("rloo", "--model tiny --call-penalty 1", "--call-penalty 1.0: a setting of the tool loop"),
    ("evaluate", "--model tiny --max-calls 2", "--max-calls 2 without --tools does nothing"),
    ("evaluate", "--model tiny --task ultrafeedback --tools calculate", "do nothing with --task ultrafeedback"),
    ("evaluate", "--model tiny --task ultrafeedback --tool", "do nothing with --task ultrafeedback"),
    ("evaluate", "--model tiny --task ultrafeedback --best-of 1,2", "do nothing with --task ultrafeedback"),
    ("evaluate", "--model tiny --task ultrafeedback --max-calls 2", "do nothing with --task ultrafeedback"),
    # rows that are not what their file's schema says
    ("sft", "--model tiny --data {number.jsonl}", "number.jsonl, row 1: not a JSON object (a int)"),
    ("sft", "--model tiny --data {string.jsonl}", "string.jsonl, row 1: not a JSON object (a str)"),
    ("sft", "--model tiny --data {null.jsonl}", "null.jsonl, row 1: not a JSON object (a NoneType)"),
    ("sft", "--model tiny --data {messages.jsonl}", "messages.jsonl, row 1: messages must be a list of {role, content}"),
    ("sft", "--model tiny --data {contents.jsonl}", "contents.jsonl, row 1: messages must be a list of {role, content}"),
    ("sft", "--model tiny --data {latin1.jsonl}", "latin1.jsonl: not UTF-8 text"),
    ("evaluate", "--model tiny --puzzles {target_text.jsonl}", "target_text.jsonl, row 1: target 'abc' is not a whole number"),
    ("evaluate", "--model tiny --puzzles {target_null.jsonl}", "target_null.jsonl, row 1: target 'None' is not a whole"),
    ("evaluate", "--model tiny --puzzles {target_nan.jsonl}", "target_nan.jsonl, row 1: target 'nan' is not a whole number"),
    ("evaluate", "--model tiny --puzzles {target_inf.jsonl}", "target_inf.jsonl, row 1: target 'inf' is not a whole number"),
    ("evaluate", "--model tiny --puzzles {target_huge.jsonl}", "target_huge.jsonl, row 1: not valid JSON"),
    ("evaluate", "--responses {target_float.jsonl}", "target_float.jsonl, row 1: target '3.9' is not a whole number"),
    ("evaluate", "--responses {num_string.jsonl}", "num_string.jsonl, row 1: nums '12' is not a list of whole numbers"),
    ("evaluate", "--responses {no_numbers.jsonl}", "no_numbers.jsonl, row 1: needs 'target' and 'nums'"),
    ("evaluate", "--model tiny --puzzles {puzzles.jsonl} --skip 5", "puzzles.jsonl: 2 rows; --skip 5 leaves none"),
    ("rloo", "--model tiny --task ultrafeedback --prompts {prompt_number.jsonl}", "prompt_number.jsonl, row 1: prompt must be text"),
    # models, directories and the hub
    ("sft", "--model ./no/such/dir", "./no/such/dir: no such directory"),
    ("sft", "--model {.}", ": not a model directory (no config.json) and no step-N checkpoint inside"),
    ("sft", "--model {a_file}", "a_file: a file, not a model directory"),
    ("sft", "--model NoSuchOrg/no-such-model-xyz", "no-such-model-xyz: no such directory, and the hub cannot be reached"),
    ("sft", "--model tiny --out-dir {a_file}", "a_file: a file, not a directory"),
    ("sft", "--model tiny --data synthetic --resume --out-dir {.}", "--resume: no checkpoint (step-N) in"),
    ("dpo", "--model tiny --data {puzzles.jsonl} --out-dir ''", "--out-dir is empty"),
    ("evaluate", "--model tiny --out-dir {a_file}", "a_file: a file, not a directory"),
]


@pytest.mark.parametrize("module_name, argv, message", CASES, ids=[f"{s}: {a}" for s, a, _ in CASES])
def test_refused_in_one_line(module_name, argv, message, tmp_path, monkeypatch, capsys):
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    args = [a.replace("''", "") for a in argv.split()]
    args = [str(tmp_path / a[1:-1]) if a.startswith("{") else a for a in args]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{module_name}.py", *args])
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as e:
        common.run(module.main, module.Args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"{module_name}.py: error: ") and message in err, err


@pytest.mark.parametrize("module_name, argv", [("evaluate", "--model tiny --tools bogus"),
                                               ("evaluate", "--model tiny --task ultrafeedback --best-of 2"),
                                               ("evaluate", "--responses r.jsonl --tool"),
                                               ("sft", "--model tiny --data synthetic --trace bogus"),
                                               ("rloo", "--model tiny --max-calls 3")])
def test_flags_are_checked_before_any_model_is_loaded(module_name, argv, tmp_path, monkeypatch):
    module = importlib.import_module(module_name)

    def too_late(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")
    for name in ("load_model", "load_tokenizer", "make_sampler"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, too_late)
    monkeypatch.setattr(sys, "argv", [f"{module_name}.py", *argv.split(), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        common.run(module.main, module.Args)
    assert e.value.code == 2 and not (tmp_path / "out").exists()


def test_under_torchrun_only_rank_0_says_why(monkeypatch, capsys):
    import sft
    monkeypatch.setattr(sys, "argv", ["sft.py", "--model", "tiny", "--lr", "-1"])
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            common.run(sft.main, sft.Args)
        assert e.value.code == 2 and len(capsys.readouterr().err.splitlines()) == lines
