"""bayeskd.train.preference on a real tiny model: which prompts the pairs come from, what each side holds, the reference."""

from __future__ import annotations

import math

import pytest
import torch

from bayeskd.corpus import TokenizedCorpus
from bayeskd.data import build_dataset, split_of
from bayeskd.data import IGNORE_INDEX
from bayeskd.train.preference import make_dpo_loss_fn
from bayeskd.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint
from bayeskd.train.preference import PairCollator, build_pairs, score_reference, training_prompts

HELDOUT, VALIDATION = 0.25, 0.25


@pytest.fixture(scope="module")
def corpus(tiny_lm, corpus_records):
    tok = load_tokenizer(str(tiny_lm))
    data = build_dataset(corpus_records, tok, "chat", 128)
    return TokenizedCorpus(corpus_records, data, tok, tokenizer_fingerprint(tok), "test", HELDOUT, VALIDATION)


@pytest.fixture(scope="module")
def model(tiny_lm):
    return load_causal_lm(str(tiny_lm))


def test_pairs_come_from_the_training_prompts_only_with_the_teacher_preferred(corpus, model, one_thread):
    splits = {r["prompt_id"]: split_of(r["prompt_id"], HELDOUT, VALIDATION) for r in corpus.records}
    assert {"train", "heldout", "validation"} <= set(splits.values())  # the fixture has every split
    pairs = build_pairs(corpus, model, samples=2, max_tokens=6, max_length=128, temperature=1.0, seed=0)
    train_prompts = {p for p, s in splits.items() if s == "train"}
    assert {p["prompt_id"] for p in pairs} == train_prompts
    by_index = {row["index"]: row for row in corpus.dataset}
    for p in pairs:
        record, example = corpus.records[p["index"]], by_index[p["index"]]
        assert record["prompt_id"] == p["prompt_id"]
        # chosen: the teacher's response as the SFT proxy trained on it
        assert p["chosen_ids"] == example["input_ids"] and p["chosen_labels"] == example["labels"]
        # rejected: the same prompt prefix, then the model's own tokens (labels on them only)
        n_prefix = len(example["input_ids"]) - example["n_response"]
        assert p["rejected_ids"][:n_prefix] == example["input_ids"][:n_prefix]
        assert p["rejected_labels"][:n_prefix] == [IGNORE_INDEX] * n_prefix
        sampled = p["rejected_ids"][n_prefix:]
        assert 1 <= len(sampled) <= 6 and p["rejected_labels"][n_prefix:] == sampled
        assert (p["rejected_finish"] == "stop") == (sampled[-1] == corpus.tokenizer.eos_token_id)
    # every teacher response of a training prompt against each of the 2 samples (none equal here)
    n_train_examples = sum(splits[r["prompt_id"]] == "train" for r in corpus.records)
    assert len(pairs) == 2 * n_train_examples
    # the same seed samples the same (a resumed stage rebuilds the same pairs); another seed does not
    again = build_pairs(corpus, model, samples=2, max_tokens=6, max_length=128, temperature=1.0, seed=0)
    assert [p["rejected_ids"] for p in again] == [p["rejected_ids"] for p in pairs]
    other = build_pairs(corpus, model, samples=2, max_tokens=6, max_length=128, temperature=1.0, seed=1)
    assert [p["rejected_ids"] for p in other] != [p["rejected_ids"] for p in pairs]


def test_training_prompts_share_one_prefix_per_prompt(corpus):
    prompts = training_prompts(corpus)
    for pid, entry in prompts.items():
        assert split_of(pid, HELDOUT, VALIDATION) == "train"
        assert len(entry["examples"]) == 2  # the fixture's two samples per prompt


def test_max_length_caps_the_rejected_sequence(corpus, model, one_thread):
    longest_prefix = max(len(e["prefix"]) for e in training_prompts(corpus).values())
    pairs = build_pairs(corpus, model, 1, max_tokens=50, max_length=longest_prefix + 2, temperature=1.0, seed=0)
    assert pairs and all(len(p["rejected_ids"]) <= longest_prefix + 2 for p in pairs)


def test_the_reference_scores_make_the_first_dpo_loss_log_two(corpus, model, one_thread):
    pairs = build_pairs(corpus, model, samples=1, max_tokens=6, max_length=128, temperature=1.0, seed=0)
    scored = score_reference(model, pairs, corpus.tokenizer.pad_token_id, batch_size=3)
    assert all(math.isfinite(p["ref_chosen"]) and p["ref_chosen"] < 0 and p["ref_rejected"] < 0 for p in scored)
    batch = PairCollator(corpus.tokenizer.pad_token_id)(scored[:5])
    assert batch["input_ids"].shape[0] == 10 and int(batch["loss_units"]) == 5
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = make_dpo_loss_fn(beta=0.1)(logits, batch)  # the policy is still the reference: every margin is 0
    assert out.loss.item() == pytest.approx(5 * math.log(2), abs=1e-4)
