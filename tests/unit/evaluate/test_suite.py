"""The task suite: disjoint splits (by prompt, and by word for WordNet), determinism, gradable answers, JSONL."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from bayeskd.evaluate.answers import is_correct
from bayeskd.teachers.config import CollectConfig
from bayeskd.prompts import load_prompts
from bayeskd.evaluate.suite import SPLITS, SplitSizes, SuiteConfig, SuiteError, build_suite, grade, write_jsonl
from bayeskd.evaluate.wordnet import wordnet_missing

SMALL = SplitSizes(teacher=30, train=30, validation=10, heldout=20)
OFFLINE = ("add", "convert", "parity", "builtin")
WORDNET = ("antonym", "category")
needs_wordnet = pytest.mark.skipif(wordnet_missing() is not None, reason=str(wordnet_missing()))


def suite_of(families, seed: int = 0, sizes: SplitSizes = SMALL):
    return build_suite(SuiteConfig(seed=seed, families=tuple(families), sizes=sizes))


def check_disjoint(suite) -> None:
    sizes = suite.config.sizes
    seen_ids, seen_words = {}, {}
    for split in SPLITS:
        for family in suite.config.families:
            assert len(suite.items(split, family)) == getattr(sizes, split), (split, family)
        for it in suite.items(split):
            assert seen_ids.setdefault(it.id, split) == split, f"{it.id} in {seen_ids[it.id]} and {split}"
            for w in it.words:
                key = (it.family, w)
                assert seen_words.setdefault(key, split) == split, f"{key} in {seen_words[key]} and {split}"
    prompts = [it.prompt for s in SPLITS for it in suite.items(s)]
    assert len(prompts) == len(set(prompts))


def check_answers(suite) -> None:
    by_family = defaultdict(list)
    for it in (it for s in SPLITS for it in suite.items(s)):
        by_family[it.family].append(it)
    for family, items in by_family.items():
        for it in items:
            assert is_correct(it.answer, it.answer), it
            assert grade(it, it.answer), it
            other = next(o for o in items if o.answer != it.answer)
            assert not is_correct(other.answer, it.answer), (it, other.answer)
            assert not grade(it, other.answer), (it, other.answer)


@pytest.mark.parametrize("families", [OFFLINE, pytest.param(WORDNET, marks=needs_wordnet)], ids=["offline", "wordnet"])
def test_splits_are_disjoint_and_sized(families):
    check_disjoint(suite_of(families))


@pytest.mark.parametrize("families", [OFFLINE, pytest.param(WORDNET, marks=needs_wordnet)], ids=["offline", "wordnet"])
def test_answers_grade_right_against_themselves_and_wrong_against_others(families):
    check_answers(suite_of(families))


@pytest.mark.parametrize("families", [OFFLINE, pytest.param(WORDNET, marks=needs_wordnet)], ids=["offline", "wordnet"])
def test_deterministic_for_a_seed(families):
    a, b, c = suite_of(families, 0), suite_of(families, 0), suite_of(families, 1)
    assert a.splits == b.splits
    assert a.splits != c.splits


@needs_wordnet
def test_antonym_pairs_never_cross_splits():
    """hot -> cold in one split and cold -> hot in another would leak the answer: both words stay together."""
    suite = suite_of(["antonym"], sizes=SplitSizes(teacher=200, train=200, validation=50, heldout=100))
    split_of_word = {}
    for split in SPLITS:
        for it in suite.items(split):
            for w in it.words:
                assert split_of_word.setdefault(w, split) == split, w
    assert {it.answer for it in suite.items("heldout")} & {it.words[0] for it in suite.items("teacher")} == set()


@needs_wordnet
def test_category_options_and_chance():
    suite = suite_of(["category"])
    held = suite.items("heldout")
    assert all(it.answer in it.options and len(it.options) == 12 for it in held)
    assert suite.chance("category") == pytest.approx(1 / 12)
    listing = "It is a " + ", a ".join(held[0].options) + "."
    assert is_correct(listing, held[0].answer) and not grade(held[0], listing)  # naming every option is not an answer


def test_chance_of_open_and_option_families():
    suite = suite_of(["parity", "add"])
    assert suite.chance("parity") == 0.5
    assert 0.0 <= suite.chance("add") < 0.1  # always the most frequent train sum: rarely right


def test_additions_with_swapped_operands_share_a_split():
    suite = suite_of(["add"], sizes=SplitSizes(teacher=300, train=300, validation=100, heldout=200))
    split = {it.id: s for s in SPLITS for it in suite.items(s)}
    for item_id, s in split.items():
        a, b = item_id.split("/")[1].split("+")
        assert split.get(f"add/{b}+{a}", s) == s


def test_adding_a_family_keeps_the_others_splits():
    assert suite_of(["add"]).splits == {
        s: tuple(it for it in items if it.family == "add") for s, items in suite_of(["parity", "add"]).splits.items()
    }


def test_jsonl_round_trips_through_prompts(tmp_path):
    suite = suite_of(OFFLINE)
    items = suite.items("train")
    path = write_jsonl(items, tmp_path / "train.jsonl")
    loaded = load_prompts(CollectConfig(prompts=str(path), shuffle=False), seed=0)
    assert [(p["id"], p["answer"], p["messages"][-1]["content"]) for p in loaded] == [
        (it.id, it.answer, it.prompt) for it in items
    ]
    row = json.loads(path.read_text().splitlines()[0])
    assert row["family"] == items[0].family


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(SuiteError, match="nosuch"):
        SuiteConfig(families=("nosuch",))
    with pytest.raises(SuiteError, match="'builtin' holds 138 items"):
        suite_of(["builtin"], sizes=SplitSizes(teacher=200))
    with pytest.raises(SuiteError, match="apt-get install wordnet-base"):
        build_suite(SuiteConfig(families=("antonym",), wordnet=str(tmp_path)))
    with pytest.raises(SuiteError, match="heldout=-1"):
        SplitSizes(heldout=-1)


def test_items_are_unique_across_families():
    suite = suite_of(OFFLINE)
    ids = [it.id for s in SPLITS for it in suite.items(s)]
    assert len(ids) == len(set(ids))
