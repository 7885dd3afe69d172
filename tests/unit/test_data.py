"""bayeskd.data on a real tiny tokenizer (ChatML template): labels, truncation, packing, targets, split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from bayeskd.corpus import TokenizedCorpus
from bayeskd.data import (
    Collator,
    build_dataset,
    is_heldout,
    pack,
    split_of,
    tokenize_record,
)
from bayeskd.estimate.distributions import SparseDist
from bayeskd.errors import BayeskdError
from bayeskd.data import IGNORE_INDEX
from bayeskd.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_lm):
    return load_tokenizer(str(tiny_lm))


@pytest.fixture(scope="module")
def dataset(tok, corpus_records):
    return build_dataset(corpus_records, tok, "chat", max_length=128)


def test_tokenizing_in_processes_gives_the_same_dataset(tok, corpus_records, dataset):
    parallel = build_dataset(corpus_records, tok, "chat", max_length=128, num_proc=2)
    assert parallel.to_dict() == dataset.to_dict()


def response_text(tok, labels) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


# ----------------------------------------------------------------------------- labels


def test_labels_cover_exactly_the_response_and_its_end_of_turn(tok, corpus_records, dataset):
    for ex in dataset:
        record = corpus_records[ex["index"]]
        ids, labels = ex["input_ids"], ex["labels"]
        n_prompt = labels.index(next(t for t in labels if t != IGNORE_INDEX))
        assert all(t == IGNORE_INDEX for t in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]  # every token after the prompt is a target
        assert ex["n_response"] == len(ids) - n_prompt
        prompt = tok.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
        assert tok.decode(ids[:n_prompt]) == prompt
        if record["finish_reason"] == "stop":
            assert response_text(tok, labels) == record["text"] + tok.eos_token
        else:  # an unfinished response must not teach the student to stop there
            assert response_text(tok, labels) == record["text"]
            assert tok.eos_token_id not in labels


def test_plain_template(tok, corpus_records):
    ex = tokenize_record(corpus_records[0], tok, "plain", max_length=512)
    contents = "\n".join(m["content"] for m in corpus_records[0]["messages"])
    assert tok.decode(ex["input_ids"]) == contents + "\n" + corpus_records[0]["text"] + tok.eos_token
    assert response_text(tok, ex["labels"]) == corpus_records[0]["text"] + tok.eos_token


def test_truncation_cuts_the_response_end_and_drops_prompt_only_examples(tok, corpus_records):
    full = tokenize_record(corpus_records[1], tok, "chat", max_length=512)
    n_prompt = len(full["input_ids"]) - full["n_response"]
    cut = tokenize_record(corpus_records[1], tok, "chat", max_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert cut["labels"] == full["labels"][: n_prompt + 3] and cut["n_response"] == 3
    short = build_dataset(corpus_records, tok, "chat", max_length=n_prompt)
    assert len(short) == 0  # no response token left anywhere: nothing to train on
    some = build_dataset(corpus_records, tok, "chat", max_length=n_prompt + 2)
    assert all(len(ex["input_ids"]) <= n_prompt + 2 and ex["n_response"] >= 1 for ex in some)


# ----------------------------------------------------------------------------- packing


def test_packing_keeps_every_target_token_and_resets_positions(dataset):
    packed = pack(dataset, max_length=160, seed=3)
    assert len(packed) < len(dataset)
    seen = Counter()
    for row in packed:
        assert len(row["input_ids"]) <= 160
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == len(row["index"])
        for seg, (start, idx) in enumerate(zip(starts, row["index"])):
            end = starts[seg + 1] if seg + 1 < len(starts) else len(row["input_ids"])
            ex = dataset[[i for i, x in enumerate(dataset["index"]) if x == idx][0]]
            assert row["input_ids"][start:end] == ex["input_ids"] and row["labels"][start:end] == ex["labels"]
            assert row["position_ids"][start:end] == list(range(end - start))
            seen[idx] += 1
    assert seen == Counter(dataset["index"])  # every example exactly once


def test_packed_rows_do_not_attend_across_examples(tiny_lm, tok, dataset, one_thread):
    """Logits of a packed row equal those of its examples run alone (no cross-contamination)."""
    model = load_causal_lm(str(tiny_lm))
    row = pack(dataset.select(range(3)), max_length=512)[0]
    batch = Collator(tok.pad_token_id)([row])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for i in range(3):
            ids = torch.tensor([dataset[i]["input_ids"]])
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + ids.shape[1]], alone, rtol=1e-5, atol=1e-5)
            start += ids.shape[1]


# ----------------------------------------------------------------------------- collation and sparse targets


def label_aligned_targets(dataset, k: int = 3) -> dict[int, SparseDist]:
    """Targets whose first id is the label token itself and whose second id encodes (record, position)."""
    out = {}
    for ex in dataset:
        i, labels = ex["index"], [t for t in ex["labels"] if t != IGNORE_INDEX]
        ids = np.array([[label, 1000 * i + j] + [-1] * (k - 2) for j, label in enumerate(labels)], np.int32)
        probs = np.tile(np.array([0.5, 0.25] + [0.0] * (k - 2)), (len(labels), 1))
        out[i] = SparseDist(ids, probs, np.full(len(labels), 0.25))
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_sparse_targets_land_exactly_on_label_positions(tok, corpus_records, dataset, target_set, packed):
    table = target_set(label_aligned_targets(dataset), k=3)
    weights = np.linspace(0.1, 1.0, len(corpus_records))
    rows = pack(dataset, 200) if packed else dataset
    collate = Collator(tok.pad_token_id, {"target": table}, weights=weights)
    batch = collate([rows[i] for i in range(min(4, len(rows)))])
    labels, ids = batch["labels"], batch["target_ids"]
    is_label = labels != IGNORE_INDEX
    assert ids.shape[:2] == labels.shape
    assert torch.equal(ids[..., 0][is_label], labels[is_label])
    assert (ids[~is_label] == -1).all() and (batch["target_probs"][~is_label] == 0).all()
    assert (batch["target_tail"][is_label] == 0.25).all() and (batch["target_tail"][~is_label] == 0).all()
    # The second id says which record and which response position each target came from.
    code = ids[..., 1][is_label]
    record, pos = code // 1000, code % 1000
    for r in record.unique():
        assert torch.equal(pos[record == r], torch.arange(int((record == r).sum())))
    if packed:
        assert "position_ids" in batch and "attention_mask" not in batch
        assert batch["weights"].shape == labels.shape
        assert torch.allclose(batch["weights"][is_label], torch.tensor(weights, dtype=torch.float32)[record])
    else:
        assert (batch["attention_mask"].sum(1) == torch.tensor([len(rows[i]["input_ids"]) for i in range(4)])).all()
        assert torch.allclose(batch["weights"], torch.tensor(weights, dtype=torch.float32)[batch["index"]])


def test_misaligned_targets_are_an_error(tok, dataset, target_set):
    """A record with fewer target rows than response labels (targets of another corpus) is refused."""
    short = {ex["index"]: SparseDist(np.zeros((ex["n_response"] - 1, 2), np.int32), np.zeros((ex["n_response"] - 1, 2)),
                                     np.ones(ex["n_response"] - 1)) for ex in dataset}  # fmt: skip
    with pytest.raises(BayeskdError, match="target rows"):
        Collator(tok.pad_token_id, {"prior": target_set(short, k=2, name="prior")})([dataset[0]])
    with pytest.raises(ValueError, match="unknown targets"):
        Collator(tok.pad_token_id, {"posterior": target_set(short, k=2, name="prior")})


# ----------------------------------------------------------------------------- held-out split


def test_heldout_split_is_deterministic_and_disjoint_by_prompt(tok, corpus_records, dataset):
    corpus = TokenizedCorpus(corpus_records, dataset, tok, "tok", "corpus", heldout_fraction=0.3)
    train, held = corpus.subset("train"), corpus.subset("heldout")
    assert train["index"] == corpus.subset("train")["index"] and held["index"] == corpus.subset("heldout")["index"]
    assert len(train) + len(held) == len(dataset) and len(held) > 0 and len(train) > 0
    assert not set(train["prompt_id"]) & set(held["prompt_id"]) and not corpus.indices("validation")
    # The verdict depends on the prompt id alone: not on the order or the size of the corpus.
    reordered = build_dataset(corpus_records[::-1][:10], tok, "chat", 128)
    for ex in TokenizedCorpus(corpus_records, reordered, tok, "tok", "corpus", 0.3).subset("heldout"):
        assert ex["prompt_id"] in set(held["prompt_id"])
    ids = [f"prompt-{i}" for i in range(4000)]
    share = sum(is_heldout(p, 0.1) for p in ids) / len(ids)
    assert 0.08 < share < 0.12
    assert not TokenizedCorpus(corpus_records, dataset, tok, "tok", "corpus", 0.0).indices("heldout")
    # A validation split takes its prompts from the training ones only: the held-out set stays.
    three = TokenizedCorpus(corpus_records, dataset, tok, "tok", "corpus", 0.3, validation_fraction=0.4)
    assert three.indices("heldout") == corpus.indices("heldout")
    assert three.indices("validation") and set(three.indices("validation")) < set(corpus.indices("train"))
    splits = [split_of(f"prompt-{i}", 0.1, 0.2) for i in range(4000)]
    assert 0.17 < splits.count("validation") / (splits.count("validation") + splits.count("train")) < 0.23


def test_corpus_selection_cuts_training_prompts_and_samples_but_keeps_the_heldout_set():
    from bayeskd.config import Config
    from bayeskd.train.config import DataConfig
    from bayeskd.data import is_heldout
    from bayeskd.corpus import select_records

    records = [{"prompt_id": f"p{i}", "sample_index": s, "text": "x"} for i in range(40) for s in range(3)]
    cfg = Config(data=DataConfig(heldout_fraction=0.25, train_prompts=5, samples=2))
    kept = select_records(records, cfg)
    held = [r for r in records if is_heldout(r["prompt_id"], 0.25)]
    assert held and all(r in kept for r in held)  # every held-out sample stays
    train = [r for r in kept if not is_heldout(r["prompt_id"], 0.25)]
    train_ids = [r["prompt_id"] for r in records if not is_heldout(r["prompt_id"], 0.25)]
    assert {r["prompt_id"] for r in train} == set(list(dict.fromkeys(train_ids))[:5])  # the first five, in corpus order
    assert sorted({r["sample_index"] for r in train}) == [0, 1] and len(train) == 10
    assert select_records(records, Config()) == records


def test_a_suites_own_splits_or_a_clear_error():
    from bayeskd.data import record_split, split_of
    from bayeskd.errors import BayeskdError

    r = {"prompt_id": "add/3", "split": "validation"}
    assert record_split(r, "prompts", 0.5, 0.5) == "validation"
    assert record_split(r, "hash", 0.3, 0.2) == split_of("add/3", 0.3, 0.2)  # the field is ignored by hash
    with pytest.raises(BayeskdError, match="data.split=prompts: prompt 'add/4' has split None"):
        record_split({"prompt_id": "add/4"}, "prompts", 0.1, 0.0)
