"""A short-answer task suite with gold answers, for the real-world benchmark (`bench/studies/realworld*.py`).

Every task is a prompt whose answer is one word or one number, graded by exact match
(`answers.is_correct`, made stricter by `grade` for multiple-choice items). It is built offline,
deterministically from a seed, from:

- `antonym`: adjective antonyms from WordNet 3.0 (Debian's `wordnet-base`, `data.adj`: the `!`
  pointer). Only words with exactly one antonym over all their senses, alphabetic, lower case,
  seen at least `min_count` times in WordNet's sense-tagged corpus (`cntlist.rev`); the most
  frequent pairs first. "Give the antonym of the adjective 'hot'. ..." -> "cold".
- `category`: which of 12 fixed categories (bird, fruit, tool, ...) a noun belongs to: its
  first (most frequent) WordNet sense is a hyponym of the category's synset, and no sense of
  it falls under another category. The options are in the prompt; categories take turns so
  that the answers are balanced; common words first.
- `add`: two-digit addition, "What is 47 + 38? ..." -> "85".
- `convert`: unit conversions with whole answers (km -> m, hours -> minutes, dozen -> items, ...).
- `parity` (opt-in): "Is 437 odd or even? ..." -> "odd".
- `builtin` (opt-in): the checkable tasks of the shipped prompt set, less those `add` or
  `convert` also make.

Splits: each family's items are cut into `teacher` (the private fine-tune of the teacher),
`train` (distillation prompts), `validation` and `heldout`, of the sizes asked for, disjoint by
prompt. Items that share a word go to one split: WordNet items are grouped by the connected
components of their words (hot -> cold and cold -> hot together, so no word is seen in two
splits, in either direction), additions by their unordered operands (47 + 38 with 38 + 47).
Families draw from their own seeded generator (`f"{seed}/{family}"`), so adding a family or
resizing one leaves the others' splits as they were.

Chance (`Suite.chance`): for families with options, uniform guessing, 1 / len(options); for open
families (antonym, add, convert, builtin), the held-out accuracy of always answering the most
frequent answer of the `train` split.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bayeskd.evaluate.answers import extract_answer, is_correct, normalize_text
from bayeskd.errors import BayeskdError
from bayeskd.evaluate.wordnet import WORDNET_DIR, WordNet, wordnet_missing

SPLITS = ("teacher", "train", "validation", "heldout")
FAMILIES = ("antonym", "category", "add", "convert")
"""The default families. Opt-in: `parity` (a 1-epoch fine-tune on 160 items stayed at chance,
55% for 50%) and `builtin` (under 180 items)."""
ALL_FAMILIES = (*FAMILIES, "parity", "builtin")
WORDNET_FAMILIES = frozenset({"antonym", "category"})

# Category label -> (WordNet lemma, sense index in index.noun) of the synset whose hyponyms it covers.
CATEGORIES: dict[str, tuple[str, int]] = {
    "bird": ("bird", 0),
    "building": ("building", 0),
    "clothing": ("garment", 0),
    "disease": ("disease", 0),
    "drink": ("beverage", 0),
    "fish": ("fish", 0),
    "fruit": ("edible_fruit", 0),
    "furniture": ("furniture", 0),
    "insect": ("insect", 0),
    "instrument": ("musical_instrument", 0),
    "tool": ("tool", 0),
    "vegetable": ("vegetable", 0),
}
# (from unit, to unit, factor): "How many {to} are in {n} {from}?"
CONVERSIONS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("years", "months", 12),
    ("feet", "inches", 12),
    ("dollars", "cents", 100),
    ("dozen", "items", 12),
)
ONE_WORD = "Answer with one word."
ONE_NUMBER = "Answer with just the number."


class SuiteError(BayeskdError):
    """The suite cannot be built as asked (missing data, sizes larger than a family holds)."""


@dataclass(frozen=True)
class Item:
    """One task: a prompt and its gold answer (one word or one number)."""

    id: str  # stable across seeds and sizes: "antonym/hot", "add/47+38"
    family: str
    prompt: str
    answer: str
    options: tuple[str, ...] = ()  # the choices named in the prompt (multiple choice), else empty
    words: tuple[str, ...] = ()  # what may not appear in two splits (the group key)


@dataclass(frozen=True)
class SplitSizes:
    """Items per split of one family."""

    teacher: int = 160
    train: int = 200
    validation: int = 40
    heldout: int = 100

    def __post_init__(self) -> None:
        for name in SPLITS:
            if getattr(self, name) < 0:
                raise SuiteError(f"split size {name}={getattr(self, name)} must be >= 0")

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in SPLITS)


@dataclass(frozen=True)
class SuiteConfig:
    """What a suite is built from; equal configs build equal suites."""

    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    sizes: SplitSizes = field(default_factory=SplitSizes)
    """Sizes of every family without its own entry in `family_sizes`."""
    family_sizes: Mapping[str, SplitSizes] = field(default_factory=dict)
    min_count: int = 1
    """Antonyms: both words seen at least this often in WordNet's tagged corpus."""
    wordnet: str = str(WORDNET_DIR)

    def __post_init__(self) -> None:
        unknown = [f for f in (*self.families, *self.family_sizes) if f not in ALL_FAMILIES]
        if unknown:
            raise SuiteError(f"unknown families {unknown}; expected some of {list(ALL_FAMILIES)}")
        if len(set(self.families)) != len(self.families):
            raise SuiteError(f"families {list(self.families)} name a family twice")

    def sizes_of(self, family: str) -> SplitSizes:
        return self.family_sizes.get(family, self.sizes)

    def identity(self) -> dict:
        """A JSON-able description, for cache keys and reports."""
        return {
            "seed": self.seed,
            "families": list(self.families),
            "sizes": {f: vars(self.sizes_of(f)) for f in self.families},
            "min_count": self.min_count,
        }


@dataclass(frozen=True)
class Suite:
    """Items by split (families in config order); what chance scores per family."""

    config: SuiteConfig
    splits: Mapping[str, tuple[Item, ...]]

    def items(self, split: str, family: str | None = None) -> list[Item]:
        if split not in SPLITS:
            raise SuiteError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [it for it in self.splits[split] if family is None or it.family == family]

    def chance(self, family: str) -> float:
        """Accuracy without skill: 1 / options, or always the train split's most frequent answer."""
        held = self.items("heldout", family)
        if held and all(it.options for it in held):
            return sum(1 / len(it.options) for it in held) / len(held)
        counts = Counter(it.answer for it in self.items("train", family))
        if not counts or not held:
            return 0.0
        top = min(counts, key=lambda a: (-counts[a], a))
        return sum(grade(it, top) for it in held) / len(held)


# ------------------------------------------------------------------------------ grading


def grade(item: Item, text: str) -> bool:
    """`answers.is_correct`, and for multiple choice no other option in the answer's sentence.

    Without the second rule a response that lists every option ("It is a fruit, a tree or a
    tool.") would be right for every item; answers.py likewise compares one number only."""
    if not is_correct(text, item.answer):
        return False
    others = [o for o in item.options if normalize_text(o) != normalize_text(item.answer)]
    if not others:
        return True
    seg = f" {extract_answer(text, 'word') or ''} "
    return not any(f" {normalize_text(o)} " in seg for o in others)


# ------------------------------------------------------------------------------ building


def build_suite(config: SuiteConfig = SuiteConfig()) -> Suite:
    """Every family's items, cut into the four splits (see the module docstring)."""
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for family in config.families:
        rng = random.Random(f"{config.seed}/{family}")
        groups = _BUILDERS[family](config, rng)
        for split, items in _assign(groups, config.sizes_of(family), rng, family).items():
            splits[split] += items
    return Suite(config, {s: tuple(v) for s, v in splits.items()})


def _assign(groups: list[list[Item]], sizes: SplitSizes, rng: random.Random, family: str) -> dict[str, list[Item]]:
    """Groups (in order of preference) -> splits of exactly `sizes` items; a group never straddles.

    The preferred groups that cover the total are shuffled, then each goes to a split still
    short of its size (drawn in proportion to what it lacks); a split that overshoots drops
    its last items (an antonym pair may so lose one direction, its words stay in one split)."""
    need = {s: getattr(sizes, s) for s in SPLITS}
    available = sum(len(g) for g in groups)
    if available < sizes.total:
        raise SuiteError(
            f"family {family!r} holds {available} items, fewer than the {sizes.total} its splits ask for ({need})"
        )
    pool, n = [], 0
    for g in groups:
        if n >= sizes.total:
            break
        pool.append(g)
        n += len(g)
    rest = groups[len(pool) :]
    rng.shuffle(pool)
    queue = pool + rest
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    while any(len(out[s]) < need[s] for s in SPLITS):
        if not queue:
            raise SuiteError(f"family {family!r}: its groups cannot fill the splits {need} exactly")
        short = [s for s in SPLITS if len(out[s]) < need[s]]
        split = rng.choices(short, weights=[need[s] - len(out[s]) for s in short])[0]
        out[split] += queue.pop(0)
    return {s: out[s][: need[s]] for s in SPLITS}


def _components(items: Sequence[Item]) -> list[list[Item]]:
    """Items grouped by the connected components of their `words` (union-find), in first-seen order."""
    parent: dict[str, str] = {}

    def find(w: str) -> str:
        while parent.setdefault(w, w) != w:
            parent[w] = parent[parent[w]]
            w = parent[w]
        return w

    for it in items:
        for w in it.words[1:]:
            parent[find(w)] = find(it.words[0])
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        groups[find(it.words[0])].append(it)
    return list(groups.values())


def _antonym(config: SuiteConfig, rng: random.Random) -> list[list[Item]]:
    wn = _wordnet(config.wordnet)
    counts = wn.counts("adj")
    pairs = {}
    for w, ants in wn.antonyms().items():
        a = next(iter(ants))
        if len(ants) == 1 and _plain(w) and _plain(a) and min(counts[w], counts[a]) >= config.min_count:
            pairs[w] = a
    items = [
        Item(f"antonym/{w}", "antonym", f"Give the antonym of the adjective '{w}'. {ONE_WORD}", a, (), (w, a))
        for w, a in sorted(pairs.items())
    ]
    groups = _components(items)
    rng.shuffle(groups)  # ties in frequency in random order, then the most frequent words first
    groups.sort(key=lambda g: -min(counts[w] for it in g for w in it.words))
    return groups


def _category(config: SuiteConfig, rng: random.Random) -> list[list[Item]]:
    wn = _wordnet(config.wordnet)
    counts = wn.counts("noun")
    below = {label: wn.hyponyms(lemma, sense) for label, (lemma, sense) in CATEGORIES.items()}
    options = tuple(sorted(CATEGORIES))
    listed = ", ".join(options)
    by_label: dict[str, list[str]] = defaultdict(list)
    for word, senses in sorted(wn.noun_senses().items()):
        if not _plain(word) or word in CATEGORIES or word in {lemma for lemma, _ in CATEGORIES.values()}:
            continue
        labels = {label for label, synsets in below.items() for s in senses if s in synsets}
        first = [label for label, synsets in below.items() if senses[0] in synsets]
        if len(labels) == 1 and first:
            by_label[first[0]].append(word)
    queues = []
    for label in options:
        words = by_label[label]
        rng.shuffle(words)
        words.sort(key=lambda w: -counts[w])
        queues.append(
            [Item(f"category/{w}", "category", f"Which category does '{w}' belong to: {listed}? {ONE_WORD}",
                  label, options, (w,)) for w in words]  # fmt: skip
        )
    return [[it] for turn in _round_robin(queues) for it in turn]


def _round_robin(queues: list[list[Item]]) -> Iterable[list[Item]]:
    for i in range(max(map(len, queues), default=0)):
        yield [q[i] for q in queues if i < len(q)]


def _add(config: SuiteConfig, rng: random.Random) -> list[list[Item]]:
    groups = []
    for a in range(10, 100):
        for b in range(a, 100):
            pair = {(a, b), (b, a)}
            groups.append(
                [Item(f"add/{x}+{y}", "add", f"What is {x} + {y}? {ONE_NUMBER}", str(x + y), (), (f"{a}+{b}",))
                 for x, y in sorted(pair)]  # fmt: skip
            )
    rng.shuffle(groups)
    return groups


def _convert(config: SuiteConfig, rng: random.Random) -> list[list[Item]]:
    items = [
        Item(f"convert/{n}-{src}-{dst}", "convert", f"How many {dst} are in {n} {src}? {ONE_NUMBER}", str(n * k))
        for src, dst, k in CONVERSIONS
        for n in range(2, 51)
    ]
    rng.shuffle(items)
    return [[it] for it in items]


def _parity(config: SuiteConfig, rng: random.Random) -> list[list[Item]]:
    items = [
        Item(f"parity/{n}", "parity", f"Is {n} odd or even? {ONE_WORD}", "odd" if n % 2 else "even", ("odd", "even"))
        for n in range(10, 1000)
    ]
    rng.shuffle(items)
    return [[it] for it in items]


def _builtin(config: SuiteConfig, rng: random.Random) -> list[list[Item]]:
    from bayeskd.prompts import load_builtin_prompts

    # Leave out the prompts that `add` and `convert` also make: one prompt in two splits would leak.
    templated = {it.prompt for gen in (_add, _convert) for g in gen(config, random.Random(0)) for it in g}
    items = [
        Item(f"builtin/{p['id']}", "builtin", p["prompt"], str(p["answer"]))
        for p in load_builtin_prompts()
        if p.get("answer") is not None and p["prompt"] not in templated
    ]
    rng.shuffle(items)
    return [[it] for it in items]


_BUILDERS: dict[str, Callable[[SuiteConfig, random.Random], list[list[Item]]]] = {
    "antonym": _antonym,
    "category": _category,
    "add": _add,
    "convert": _convert,
    "parity": _parity,
    "builtin": _builtin,
}


def _plain(word: str) -> bool:
    """A word the grader matches cleanly: lower-case letters only (no "ill-natured", no names)."""
    return word.isascii() and word.isalpha() and word.islower() and len(word) >= 3


def _wordnet(folder: str) -> WordNet:
    problem = wordnet_missing(folder)
    if problem:
        raise SuiteError(problem)
    return WordNet(Path(folder))


# ------------------------------------------------------------------------------ files


def write_jsonl(items: Iterable[Item], path: str | Path) -> Path:
    """Items as the prompt JSONL that `collect.prompts` reads: id, prompt, answer (+ family, options)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            row = {"id": it.id, "prompt": it.prompt, "answer": it.answer, "family": it.family}
            if it.options:
                row["options"] = list(it.options)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
