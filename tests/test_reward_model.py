"""reward_model.py: Eq. 9 by hand, rewards read from lengths, batch-invariant scoring, learning."""
import json
import math
import random

import pytest
import torch

import common
import reward_model


def synthetic_preferences(n, seed):
    """Helpful vs unhelpful answers of mixed lengths: the chosen side is not simply the longer one."""
    rng = random.Random(seed)
    topics = ["eggs", "rivers", "trains", "music", "stars", "bread", "chess", "rain", "cats", "paper", "glass", "maps"]
    good = ["Sure: {t}.", "Happy to help! Here is how {t} work, step by step, with an example.",
            "Great question. In short, {t} work like this."]
    bad = ["No.", "I don't know anything about {t}, and I will not look it up for you either.", "Go away, {t} are boring."]
    rows = []
    for _ in range(n):
        t = rng.choice(topics)
        rows.append({"prompt": f"Tell me about {t}.", "chosen": rng.choice(good).format(t=t),
                     "rejected": rng.choice(bad).format(t=t)})
    return rows


@pytest.mark.math
def test_eq9_bt_loss_is_log2_at_equality_and_matches_a_hand_value():
    r = torch.tensor([0.3, -2.0, 5.0])
    assert reward_model.bt_loss(r, r).item() == pytest.approx(math.log(2))
    # r_w − r_l = 2 and 0: (log(1 + e^−2) + log 2) / 2
    value = reward_model.bt_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0])).item()
    assert value == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2)


@pytest.fixture(scope="module")
def rm(tokenizer):
    return common.load_model("tiny", tokenizer, dtype=torch.float32, device="cpu", seed=0, reward=True)


@pytest.mark.math
def test_score_is_the_same_batched_and_one_at_a_time(rm, tokenizer):
    prompts = ["Tell me about eggs.", "A much longer question about trains and rivers and maps?", "Hi"]
    responses = ["Sure.", "A long answer " * 10, "Hello! <|endoftext|>"]
    batched = reward_model.score(rm, tokenizer, prompts, responses, batch_size=3)
    single = torch.cat([reward_model.score(rm, tokenizer, [p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.math
def test_reward_is_read_at_the_last_real_token_even_when_it_is_the_pad_id(rm, tokenizer):
    # a response that ends in the pad id itself: a pad-id search would read the wrong position
    e = reward_model.encode_pair(tokenizer, "Q", "A")
    ids = e["input_ids"] + [tokenizer.pad_token_id]
    one = common.collate([{"input_ids": ids, "prompt_len": e["prompt_len"]}], tokenizer.pad_token_id)
    padded = common.collate([{"input_ids": ids, "prompt_len": e["prompt_len"]},
                             {"input_ids": ids + [5] * 6, "prompt_len": e["prompt_len"]}], tokenizer.pad_token_id)
    with torch.no_grad():
        a, b = reward_model.rewards(rm, **one), reward_model.rewards(rm, **padded)
        hidden = rm.base_model(input_ids=one["input_ids"]).last_hidden_state[0, -1]
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[0], rm.score(hidden)[0], atol=1e-5, rtol=1e-5)


def test_score_formats_text_as_training_does(tokenizer):
    e = reward_model.encode_pair(tokenizer, "How?", "Like this.")
    assert tokenizer.decode(e["input_ids"]).endswith("<|im_start|>assistant\nLike this.<|im_end|>")
    assert "You are a helpful assistant." in tokenizer.decode(e["input_ids"])


def test_reward_model_on_the_tiny_trunk_separates_held_out_preferences(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(128, seed=0)))
    held.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(64, seed=1)))
    reward_model.main(reward_model.Args(model="tiny", data=str(train), eval_data=str(held), out_dir=str(tmp_path / "o"),
                                        lr=1e-3, batch_size=16, grad_accum=1, steps=40, log_every=10, eval_every=40))
    evals = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines() if "eval_acc" in line]
    assert evals[-1]["eval_acc"] > 0.9
    assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]
    rm, tok = reward_model.load(tmp_path / "o")          # the saved model scores as it trained
    rows = synthetic_preferences(32, seed=2)
    chosen = reward_model.score(rm, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = reward_model.score(rm, tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (chosen > rejected).float().mean() > 0.9


def test_an_encoder_reward_model_reads_its_own_pooling(tmp_path):
    """An encoder (DistilBERT here, DeBERTa in report 001) has no chat template: pairs use its own format."""
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification
    words = sorted({w.strip(".,!:?'") for r in synthetic_preferences(200, 0) for k in r.values() for w in k.lower().split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=2,
                                                                 n_heads=2, num_labels=1, pad_token_id=0))
    model.save_pretrained(tmp_path / "encoder")
    tok.save_pretrained(tmp_path / "encoder")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(96, seed=0)))
    reward_model.main(reward_model.Args(model=str(tmp_path / "encoder"), data=str(data), eval_rows=32, lr=1e-3,
                                        batch_size=16, grad_accum=1, steps=30, out_dir=str(tmp_path / "o")))
    rm, tok = reward_model.load(tmp_path / "o")
    e = reward_model.encode_pair(tok, "Tell me about eggs.", "Sure: eggs.")
    assert e["input_ids"][0] == tok.cls_token_id and e["input_ids"][-1] == tok.sep_token_id
    rows = synthetic_preferences(32, seed=3)
    chosen = reward_model.score(rm, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], batch_size=7)
    one = torch.cat([reward_model.score(rm, tok, [r["prompt"]], [r["chosen"]]) for r in rows])
    torch.testing.assert_close(chosen, one, atol=1e-5, rtol=1e-5)
    rejected = reward_model.score(rm, tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (chosen > rejected).float().mean() > 0.9


def test_a_causal_lm_is_not_taken_for_a_reward_model(tmp_path, tokenizer, model):
    model.save_pretrained(tmp_path / "sft")   # an SFT checkpoint: loading it as a classifier gives a random head
    tokenizer.save_pretrained(tmp_path / "sft")
    with pytest.raises(common.InputError, match=r"sft: not a reward model \(Qwen2ForCausalLM\)"):
        reward_model.load(tmp_path / "sft")
