"""dpo.py: Eq. 7 and Eq. 4 by hand, gradient direction, masks, learning, Countdown pair labelling."""
import json
import math

import pytest
import torch

import common
import dpo
from calculator import synthetic_warmstart


@pytest.mark.math
def test_eq7_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-12.0, -3.5, -40.0])
    loss, chosen, rejected = dpo.dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert chosen.tolist() == [0, 0, 0] and rejected.tolist() == [0, 0, 0]


@pytest.mark.math
def test_eq4_implicit_rewards_and_eq7_hand_value():
    # policy −10 / −20, reference −12 / −18, β 0.5: r_w = 0.5·2 = 1, r_l = 0.5·(−2) = −1
    loss, chosen, rejected = dpo.dpo_loss(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]),
                                          torch.tensor([-18.0]), beta=0.5)
    assert chosen.item() == pytest.approx(1.0) and rejected.item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)))  # −log σ(2)


@pytest.mark.math
def test_eq7_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-5.0], requires_grad=True), torch.tensor([-6.0], requires_grad=True)
    dpo.dpo_loss(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-6.0]), beta=0.1)[0].backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()   # descent raises log π(y_w), lowers log π(y_l)
    assert chosen.grad.item() == pytest.approx(-0.05)      # −β σ(0) = −0.1 · 0.5


@pytest.mark.math
def test_padding_and_prompt_tokens_never_change_the_loss(model, tokenizer):
    autocast = torch.autocast("cpu", enabled=False)
    pair = (common.encode(tokenizer, "Q: 2+2?", " 4"), common.encode(tokenizer, "Q: 2+2?", " 5"))
    longer = (common.encode(tokenizer, "a much longer prompt " * 5, " a long answer " * 3),
              common.encode(tokenizer, "a much longer prompt " * 5, " no"))
    with torch.no_grad():
        alone = dpo.pair_logprobs(model, [pair], tokenizer.pad_token_id, autocast)
        batched = dpo.pair_logprobs(model, [pair, longer], tokenizer.pad_token_id, autocast)
    ref = (torch.tensor([-3.0]), torch.tensor([-4.0]))
    a = dpo.dpo_loss(alone[0][:1], alone[1][:1], *ref, beta=0.1)[0]
    b = dpo.dpo_loss(batched[0][:1], batched[1][:1], *ref, beta=0.1)[0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # the prompt's tokens carry no log-prob: a different prompt length only moves where the mask starts
    batch = common.collate(list(pair), tokenizer.pad_token_id)
    assert batch["completion_mask"].sum(1).tolist() == [len(pair[0]["input_ids"]) - pair[0]["prompt_len"]] * 2


def test_dpo_on_the_tiny_model_separates_its_training_pairs(tmp_path):
    rows = synthetic_warmstart(48, seed=7)
    pairs = [{"prompt": r["query"], "chosen": r["completion"], "rejected": rows[(i + 1) % 48]["completion"], "chat": False}
             for i, r in enumerate(rows)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    args = dpo.Args(model="tiny", data=str(data), eval_rows=8, out_dir=str(tmp_path / "o"), lr=1e-3, beta=0.1,
                    batch_size=8, grad_accum=1, steps=40, log_every=10, eval_every=100)
    policy, tokenizer = dpo.main(args)
    policy = policy.cpu()   # trained on the GPU when there is one; compared on the CPU in float32
    reference = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=0)
    encoded, _ = dpo.encode_pairs(tokenizer, pairs[:40], 1024)
    autocast = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        pc, pr = dpo.pair_logprobs(policy.eval(), encoded, tokenizer.pad_token_id, autocast)
        rc, rr = dpo.pair_logprobs(reference, encoded, tokenizer.pad_token_id, autocast)
    _, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert (chosen > rejected).float().mean().item() > 0.9   # 0 at the start: policy = reference


def test_countdown_pairs_are_labelled_by_the_rule_reward_and_ties_dropped():
    puzzles = [{"target": 91, "nums": [95, 36, 32]}] * 4
    right, wrong, none = "<answer>95 - (36 - 32)</answer>", "<answer>95 - 36 - 32</answer>", "I give up"
    samples = [[(wrong, True), (right, True)],     # 0.1 vs 1.0: right is chosen
               [(right, True), (none, False)],     # 1.0 vs 0: right is chosen, the cut one rejected
               [(wrong, True), (wrong, True)],     # tie
               [(none, True), (none, False)]]      # tie at 0
    pairs, ties = dpo.label_countdown_pairs(puzzles, samples)
    assert ties == 2 and len(pairs) == 2
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(right, wrong), (right, none)]
    assert [(p["chosen_score"], p["rejected_score"]) for p in pairs] == [(1.0, 0.1), (1.0, 0.0)]
    assert pairs[1]["rejected_end"] is False and pairs[0]["chat"] is False
    assert pairs[0]["prompt"].endswith("Assistant: Let me solve this step by step.")


def test_countdown_pairs_from_more_samples_take_the_best_and_the_worst():
    puzzles = [{"target": 91, "nums": [95, 36, 32]}] * 2
    right, other_right = "<answer>95 - (36 - 32)</answer>", "<answer>95 - 36 + 32</answer>"
    wrong, none = "<answer>95 - 36 - 32</answer>", "I give up"
    samples = [[(wrong, True), (right, True), (none, False), (other_right, True)],   # 0.1, 1, 0, 1: the first best vs the worst
               [(wrong, True), (wrong, True), (wrong, True)]]                        # all 0.1: dropped
    pairs, ties = dpo.label_countdown_pairs(puzzles, samples)
    assert ties == 1 and [(p["chosen"], p["rejected"]) for p in pairs] == [(right, none)]
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"], pairs[0]["rejected_end"]) == (1.0, 0.0, False)


def test_countdown_pairs_are_built_from_samples_and_cached(tmp_path, capsys):
    args = dpo.Args(model="tiny", data="countdown", puzzles="3to4:train", pair_prompts=12, pair_max_tokens=24, eval_rows=2, batch_size=2,
                    grad_accum=1, steps=1, out_dir=str(tmp_path / "o"))
    tokenizer = common.load_tokenizer("tiny")
    model = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    pairs = dpo.build_countdown_pairs(model, tokenizer, args, tmp_path / "pairs.jsonl")
    cached = common.read_jsonl(tmp_path / "pairs.jsonl")
    assert cached == pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert "ties dropped" in capsys.readouterr().out


def test_countdown_pairs_cut_at_the_sampling_cap_are_trained_on(tmp_path, monkeypatch):
    # --max-len equal to --pair-max-tokens: every completion cut at the cap (prompt + cap tokens) is over the budget
    monkeypatch.setattr(dpo, "score_response", lambda text, puzzle: float(len(text) % 7))   # few ties
    args = dpo.Args(model="tiny", data="countdown", puzzles="3to4:train", pair_prompts=8, pair_max_tokens=24, max_len=24,
                    batch_size=2, grad_accum=1, steps=1, eval_every=0, out_dir=str(tmp_path / "o"))
    dpo.main(args)
    pairs = common.read_jsonl(tmp_path / "o" / "countdown_pairs.jsonl")
    cut = [p for p in pairs if not p["chosen_end"] or not p["rejected_end"]]
    assert len(pairs) >= 6 and cut   # a random tiny model rarely stops inside 24 tokens
    tokenizer = common.load_tokenizer("tiny")
    (chosen, rejected), = dpo.encode_pairs(tokenizer, cut[:1])[0]
    example = chosen if not cut[0]["chosen_end"] else rejected
    assert example["input_ids"][-1] != tokenizer.eos_token_id and len(example["input_ids"]) > args.max_len


def test_unencodable_preference_row_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(common.InputError, match="p.jsonl, row 2: missing column 'rejected'"):
        common.preference_pairs(str(path))


def test_rlaif_orders_pairs_by_the_reward_model_and_drops_low_ones(tmp_path, tokenizer):
    import reward_model
    untrained = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=1, reward=True)
    untrained.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rm, _ = reward_model.load(tmp_path / "rm")   # loaded as rlaif_relabel loads it: bf16 on a GPU, float32 on the CPU
    tol = 1e-6 if rm.dtype == torch.float32 else 2e-2   # batches differ in padding; bf16 keeps ~3 digits
    pairs = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Other {i * 7}!", "chat": True}
             for i in range(12)]
    kept = dpo.rlaif_relabel(pairs, str(tmp_path / "rm"))
    s = lambda ps, key: reward_model.score(rm, tokenizer, [p["prompt"] for p in ps], [p[key] for p in ps])
    assert len(kept) == 12 and (s(kept, "chosen") >= s(kept, "rejected") - tol).all()
    high = dpo.rlaif_relabel(pairs, str(tmp_path / "rm"), drop=0.25)   # a share: the same on any RM's scale
    dropped = [p for p in kept if p["prompt"] not in {h["prompt"] for h in high}]
    assert len(high) == 9 and len(dropped) == 3
    assert s(dropped, "chosen").max() <= s(high, "chosen").min() + tol
    with pytest.raises(common.InputError, match="--rlaif-drop 1"):
        dpo.rlaif_relabel(pairs, str(tmp_path / "rm"), drop=1)


def test_countdown_pairs_are_reused_only_for_the_recipe_that_made_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dpo, "score_response", lambda text, puzzle: float(len(text) % 7))
    built = []
    real = dpo.build_countdown_pairs
    monkeypatch.setattr(dpo, "build_countdown_pairs", lambda *a: built.append(1) or real(*a))
    cache = str(tmp_path / "pairs.jsonl")
    args = dict(model="tiny", data="countdown", puzzles="3to4:train", pair_prompts=6, pair_max_tokens=12, pairs_file=cache,
                batch_size=2, grad_accum=1, steps=1, eval_every=0)
    dpo.main(dpo.Args(**args, out_dir=str(tmp_path / "a")))
    dpo.main(dpo.Args(**args, out_dir=str(tmp_path / "b")))                           # the same recipe: reused
    assert len(built) == 1
    dpo.main(dpo.Args(**{**args, "pair_temperature": 0.7}, out_dir=str(tmp_path / "c")))   # sampled otherwise
    assert len(built) == 2 and "made with another pair_temperature" in capsys.readouterr().out
    (tmp_path / "pairs.jsonl").write_text("")                                         # a failed run's empty cache
    dpo.main(dpo.Args(**{**args, "pair_temperature": 0.7}, out_dir=str(tmp_path / "d")))
    assert len(built) == 3
