"""rloo.py: Eq. 8 advantages by hand and against a loop, KL folding, temperature, learning, smoke run."""
import json

import pytest
import torch

import rloo


@pytest.mark.math
def test_eq8_advantages_by_hand():
    a = rloo.rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(a, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))


@pytest.mark.math
def test_eq8_advantages_match_a_naive_loop_and_sum_to_zero_per_prompt():
    rewards = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    a = rloo.rloo_advantages(rewards)
    for p in range(5):
        for i in range(6):
            others = [rewards[p, j] for j in range(6) if j != i]
            assert a[p, i].item() == pytest.approx((rewards[p, i] - sum(others) / 5).item(), abs=1e-6)
    torch.testing.assert_close(a.sum(1), torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.math
def test_prompts_never_mix():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.1, 0.0]])
    changed = rewards.clone()
    changed[1] = torch.tensor([5.0, -3.0, 2.0, 0.0])
    assert (rloo.rloo_advantages(rewards)[0] == 0).all()
    torch.testing.assert_close(rloo.rloo_advantages(rewards)[0], rloo.rloo_advantages(changed)[0])


@pytest.mark.math
def test_equal_rewards_give_a_zero_gradient():
    logps = torch.tensor([[-3.0, -5.0, -2.0]], requires_grad=True)
    loss = rloo.rloo_loss(rloo.rloo_advantages(torch.full((1, 3), 0.7)), logps, n_sequences=3)
    loss.backward()
    assert (logps.grad == 0).all()


@pytest.mark.math
def test_only_prompts_with_differing_rewards_are_informative():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.1], [0.0, 0.0, 0.1]])
    assert rloo.informative_prompts(rewards).tolist() == [False, True, False, True]


@pytest.mark.parametrize("reward", ["mixed", "uniform"])
def test_skipping_uninformative_prompts_leaves_the_update_unchanged(tmp_path, monkeypatch, reward):
    def score(task, prompts, texts, reward_model=None, stopped=None):   # half the prompts: one reward for all K
        shares = digit_share(task, prompts, texts)
        return torch.tensor([0.5 if reward == "uniform" or p["target"] % 2 else s for p, s in zip(prompts, shares)])
    monkeypatch.setattr(rloo, "score_completions", score)
    args = dict(model="tiny", puzzles="3to4:train", n_prompts=16, eval_prompts=0, k=4, prompts_per_step=4, micro_prompts=2,
                steps=3, lr=1e-3, kl_coef=0.0, max_new_tokens=8, eval_every=0, sample_every=0)
    skipping, _ = rloo.main(rloo.Args(**args, out_dir=str(tmp_path / "skip")))
    live = [m["live"] for m in metrics(tmp_path / "skip") if "live" in m]
    monkeypatch.setattr(rloo, "informative_prompts", lambda r: torch.ones(len(r), dtype=torch.bool))
    full, _ = rloo.main(rloo.Args(**args, out_dir=str(tmp_path / "full")))
    assert any(0 < x < 1 for x in live) if reward == "mixed" else live == [0, 0, 0]   # some skipped, some kept
    tolerance = dict(atol=1e-6, rtol=1e-5) if reward == "mixed" else dict(atol=0, rtol=0)
    for p, q in zip(skipping.parameters(), full.parameters()):
        torch.testing.assert_close(p, q, **tolerance)


@pytest.mark.math
def test_loss_is_minus_the_advantage_weighted_logprob_per_sequence():
    logps = torch.tensor([[-2.0, -4.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0]])
    loss = rloo.rloo_loss(advantages, logps, n_sequences=4)   # this micro-batch holds 2 of the step's 4 sequences
    assert loss.item() == pytest.approx(-(1 * -2.0 + -1 * -4.0) / 4)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, 0.25]]))  # descent raises the better sample


@pytest.mark.math
def test_eq2_kl_is_folded_into_the_reward_without_gradient():
    rewards = torch.tensor([1.0, 0.0])
    policy = torch.tensor([-3.0, -6.0], requires_grad=True)
    same = rloo.kl_penalised_rewards(rewards, policy, policy.detach(), kl_coef=0.5)
    torch.testing.assert_close(same, rewards)                                  # KL 0 when policy = reference
    shaped = rloo.kl_penalised_rewards(rewards, policy, torch.tensor([-4.0, -5.0]), kl_coef=0.5)
    torch.testing.assert_close(shaped, torch.tensor([0.5, 0.5]))               # R − β (log π − log π_ref)
    assert not shaped.requires_grad


def digit_share(task, prompts, texts, reward_model=None, stopped=None):
    """A simple verifiable reward: the share of characters that are digits."""
    return torch.tensor([sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts])


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_penalties_take_the_cut_and_the_tool_calls_off_the_task_reward():
    runs = [{"stopped": True, "calls": 0, "invalid": 0}, {"stopped": False, "calls": 2, "invalid": 1}]
    args = rloo.Args(overlong_penalty=0.5, call_penalty=0.1, invalid_call_penalty=0.25)
    assert rloo.penalties(runs, args).tolist() == pytest.approx([0.0, 0.5 + 2 * 0.1 + 0.25])   # by hand


def test_rloo_raises_a_simple_verifiable_reward(tmp_path, monkeypatch):
    monkeypatch.setattr(rloo, "score_completions", digit_share)
    rloo.main(rloo.Args(model="tiny", puzzles="3to4:train", n_prompts=64, eval_prompts=0, k=8, prompts_per_step=4, micro_prompts=4, steps=40,
                        lr=2e-3, kl_coef=0.0, max_new_tokens=12, eval_every=0, sample_every=0, out_dir=str(tmp_path)))
    rewards = [m["reward"] for m in metrics(tmp_path) if "reward" in m]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.1 and end > 5 * start   # ~0.01 → ~0.3 in 40 steps


def test_kl_is_zero_at_the_start_and_logprobs_use_the_sampling_temperature(tmp_path, monkeypatch):
    temperatures = []
    real = rloo.sequence_logprobs

    def spy(*args, **kwargs):
        temperatures.append(kwargs.get("temperature"))
        return real(*args, **kwargs)
    monkeypatch.setattr(rloo, "sequence_logprobs", spy)
    rloo.main(rloo.Args(model="tiny", puzzles="3to4:train", n_prompts=8, eval_prompts=0, k=4, prompts_per_step=2, micro_prompts=1, steps=1,
                        lr=1e-3, kl_coef=0.1, temperature=0.7, max_new_tokens=8, eval_every=0, out_dir=str(tmp_path)))
    assert temperatures and set(temperatures) == {0.7}          # π_θ and π_ref, every call
    assert len(temperatures) == 4                               # 2 π_ref + 2 π_θ passes: no extra "old log-prob" pass
    assert abs(metrics(tmp_path)[-1]["kl"]) < 1e-5


def test_countdown_smoke_run_completes_with_every_metric(tmp_path):
    rloo.main(rloo.Args(model="tiny", puzzles="3to4:train", n_prompts=16, eval_prompts=4, k=4, prompts_per_step=2, micro_prompts=2,
                                   steps=2, lr=1e-4, max_new_tokens=16, eval_every=2, sample_every=1, save_every=1,
                                   out_dir=str(tmp_path)))
    logged = metrics(tmp_path)
    train = [m for m in logged if "reward" in m]
    assert len(train) == 2 and all({"loss", "reward", "acc", "format", "kl", "live", "len", "stopped", "time"} <= set(m) for m in train)
    assert [m["step"] for m in logged if "eval_acc" in m] == [0, 2]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-1", "step-2"]


def test_top_p_below_1_is_refused_in_training():
    with pytest.raises(rloo.InputError, match="--top-p 0.9: RLOO trains on log-probs of the full distribution"):
        rloo.main(rloo.Args(model="tiny", puzzles="3to4:train", top_p=0.9))


def test_k_below_2_is_a_clear_error():
    with pytest.raises(rloo.InputError, match="--k 1: must be ≥ 2"):
        rloo.main(rloo.Args(model="tiny", puzzles="3to4:train", k=1))


def test_ultrafeedback_task_scores_with_a_reward_model(tmp_path, tokenizer):
    import common
    rm = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=1, reward=True)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(10)))
    rloo.main(rloo.Args(model="tiny", puzzles="3to4:train", task="ultrafeedback", reward_model=str(tmp_path / "rm"), prompts=str(prompts),
                        n_prompts=8, eval_prompts=2, k=2, prompts_per_step=2, steps=1, max_new_tokens=8, eval_every=1,
                        out_dir=str(tmp_path / "o")))
    logged = metrics(tmp_path / "o")
    assert "eval_reward" in logged[0] and "acc" not in logged[1] and logged[1]["reward"] != 0


def test_the_reward_model_reads_a_cut_completion_without_an_end_of_turn(tmp_path, tokenizer, monkeypatch):
    import common
    import reward_model
    rm = common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=1, reward=True)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(6)))
    read, real = [], reward_model.rewards

    def spy(model, input_ids, attention_mask, **kw):   # the last real token of every sequence the RM scores
        read.extend(input_ids[range(len(input_ids)), attention_mask.sum(1) - 1].tolist())
        return real(model, input_ids, attention_mask, **kw)
    monkeypatch.setattr(reward_model, "rewards", spy)
    rloo.main(rloo.Args(model="tiny", task="ultrafeedback", reward_model=str(tmp_path / "rm"), prompts=str(prompts),
                        n_prompts=4, eval_prompts=0, k=2, prompts_per_step=2, steps=1, max_new_tokens=3,
                        out_dir=str(tmp_path / "o")))
    stopped = metrics(tmp_path / "o")[0]["stopped"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(read) == 4 and sum(t == im_end for t in read) == round(4 * stopped) < 4   # cut ones end without it


def test_resume_2_plus_2_steps_equals_4_steps(tmp_path):
    import shutil
    args = dict(model="tiny", puzzles="3to4:train", n_prompts=16, eval_prompts=0, k=4, prompts_per_step=2, steps=4, save_every=2, lr=1e-3,
                kl_coef=0.01, max_new_tokens=8, eval_every=0, sample_every=0)
    straight, _ = rloo.main(rloo.Args(**args, out_dir=str(tmp_path / "a")))
    rloo.main(rloo.Args(**args, out_dir=str(tmp_path / "b")))
    shutil.rmtree(tmp_path / "b" / "step-4")
    resumed, _ = rloo.main(rloo.Args(**args, out_dir=str(tmp_path / "b"), resume=True))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
