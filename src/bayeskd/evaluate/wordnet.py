"""The parts of the WordNet 3.0 database (Debian's `wordnet-base`) that the suite's antonym and
category families read: adjectives' antonym pointers, nouns' hypernyms, and how often a sense
occurs in the sense-tagged corpus."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")


def wordnet_missing(folder: str | Path = WORDNET_DIR) -> str | None:
    """Why WordNet cannot be read from `folder` (a message naming the fix), or None if it can."""
    needed = ("data.adj", "data.noun", "index.noun", "cntlist.rev")
    missing = [n for n in needed if not (Path(folder) / n).is_file()]
    if not missing:
        return None
    return (
        f"WordNet's {', '.join(missing)} not found in {folder}: the antonym and category families need it "
        "(Debian/Ubuntu: apt-get install wordnet-base), or leave those families out"
    )


@dataclass(frozen=True)
class WordNet:
    """The parts of the WordNet 3.0 database files that the families read."""

    folder: Path

    def synsets(self, pos: str) -> dict[str, tuple[list[str], list[tuple[str, str, str]]]]:
        """offset -> (words, pointers as (symbol, target offset, source/target)) of data.{pos}."""
        return _read_synsets(self.folder / f"data.{pos}")

    def antonyms(self) -> dict[str, set[str]]:
        """Adjective -> its direct antonyms over all its senses (the `!` pointers of data.adj)."""
        synsets = self.synsets("adj")
        out: dict[str, set[str]] = defaultdict(set)
        for words, pointers in synsets.values():
            for symbol, target, st in pointers:
                if symbol == "!":
                    src, dst = int(st[:2], 16), int(st[2:], 16)
                    out[words[src - 1]].add(synsets[target][0][dst - 1])
        return out

    def hyponyms(self, lemma: str, sense: int) -> frozenset[str]:
        """The offsets of a noun synset and of everything below it (`~` pointers, transitively)."""
        synsets = self.synsets("noun")
        root = self.noun_senses()[lemma][sense]
        seen, stack = set(), [root]
        while stack:
            off = stack.pop()
            if off not in seen:
                seen.add(off)
                stack += [t for symbol, t, _ in synsets[off][1] if symbol == "~"]
        return frozenset(seen)

    def noun_senses(self) -> dict[str, list[str]]:
        """Noun lemma -> its synset offsets, most frequent sense first (index.noun's order)."""
        return _read_index(self.folder / "index.noun")

    def counts(self, pos: str) -> Counter:
        """Lemma -> occurrences in the sense-tagged corpus (cntlist.rev), over the senses of one part of speech."""
        return _read_counts(self.folder / "cntlist.rev", {"adj": "35", "noun": "1"}[pos])




@lru_cache(maxsize=4)
def _read_synsets(path: Path) -> dict[str, tuple[list[str], list[tuple[str, str, str]]]]:
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        f = line.partition(" | ")[0].split()
        n_words = int(f[3], 16)
        words = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]) for i in range(n_words)]  # "galore(ip)" -> "galore"
        i = 4 + 2 * n_words
        pointers = [(f[j], f[j + 1], f[j + 3]) for j in range(i + 1, i + 1 + 4 * int(f[i]), 4)]
        out[f[0]] = (words, pointers)
    return out


@lru_cache(maxsize=2)
def _read_index(path: Path) -> dict[str, list[str]]:
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if not line.startswith("  "):
            f = line.split()
            out[f[0]] = f[-int(f[2]) :]
    return out


@lru_cache(maxsize=4)
def _read_counts(path: Path, ss_types: str) -> Counter:
    counts: Counter = Counter()
    for line in path.read_text(encoding="latin-1").splitlines():
        key, _, count = line.split()
        lemma, _, rest = key.partition("%")
        if rest[:1] in ss_types:
            counts[lemma] += int(count)
    return counts
