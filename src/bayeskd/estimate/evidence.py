"""Teacher logprob evidence: the API's top-k token strings, mapped onto the student's vocabulary.

The teacher's tokenizer is unknown; its tokens arrive as strings. They are aligned to the
student's tokens of the same response by character offsets, and the teacher's probabilities of
strings become probabilities of student tokens by the chain rule over text:

- the teacher's token strings are laid end to end over the response text; alignment stops at
  the first token that does not match the text there (e.g. a byte-level fragment shown as
  U+FFFD), and the rest of that response carries no evidence;
- **at a teacher boundary** (a student token starts where a teacher token starts), each of the
  teacher's alternatives there is a continuation of the same text; it is credited to the first
  student token of its own tokenization. One student token: `exact`. Several: the first gets the
  string's probability (`prefix`), the first factor of the chain rule; the deeper factors
  come from the next rule, where the realised text went that way;
- **inside a teacher token** (the student token starts at offset u into teacher token i), the
  teacher's distribution of what follows is its alternatives at i that begin with the realised
  u, conditioned on it: p(s) / Z, with Z their summed probability plus whatever the API left
  unlisted (so that every value is a lower bound, as the first rule's sums are). Each is
  credited to the first student token of its remainder s[len(u):]; one that ends with u
  exactly has no known continuation and is dropped;
- **a student token that straddles** a teacher boundary: the realised teacher token's
  probability is split by the teacher's alternatives at the next position (p(t_i) p(s' | ..t_i)),
  each credited to the first student token of t_i's remainder + s'. This reads the API's answer
  at a later position, which contains the scored token's own text: with `sampled=False` (black-
  box scoring) that mass is dropped instead;
- alternatives with no student token, or holding a byte fragment (U+FFFD: the API's string is
  not the text it stands for), are dropped. Special tokens (the end of the turn) map by name;
- a server that renders special tokens as "" (llama.cpp) shows the end of the turn as an
  alternative "" (and leaves the final end-of-turn token out of the token list). In a response
  that ended its turn (`finish_reason` "stop"), "" is read as the student's end of turn (its
  EOS), at any position; elsewhere it is dropped. The final position then has no evidence (its
  token is not listed), and a byte fragment that such a server also shows as "" would be
  credited to the end of turn: the largest "" only is kept (next rule), which bounds that error;
- the API's alternatives are taken at most k (`top`), the largest, and a string listed twice
  (two tokens that decode alike) counts once, at its larger value: a lower bound of its mass.

Alternatives that map to the same student token add up; the mapped probabilities are a partition
of (part of) the teacher's mass, so they sum to at most 1 (if an inconsistent API makes them
exceed it, they are renormalised). When student and teacher share a tokenizer, every student
token starts at a teacher boundary and every alternative is one student token: the mapping is
the identity.

`summary()` reports the positions with evidence and the share of the API's mass mapped exactly,
by prefix (first-token credit) and dropped.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from bayeskd.estimate.distributions import PAD

FRAGMENT = "\ufffd"
MAX_STRADDLE = 4
"""The most teacher tokens one student token may span and still get evidence by the chain rule."""


class EvidenceMapper:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
        self.cache: dict[str, tuple[int, ...]] = {}
        self.stats: Counter = Counter()

    def student_ids(self, s: str) -> tuple[int, ...]:
        """The student's tokens of a string (special tokens by name; a string ending in one keeps it last)."""
        if s not in self.cache:
            if s in self.special:
                self.cache[s] = (self.special[s],)
            else:
                self.cache[s] = tuple(self.tokenizer.encode(s, add_special_tokens=False))
        return self.cache[s]

    def student_first(self, s: str) -> tuple[int, int]:
        """(first student token id or PAD, number of student tokens) of a teacher token string."""
        ids = self.student_ids(s)
        return (ids[0], len(ids)) if ids else (PAD, 0)

    def word_start(self, text: str, a: int) -> int:
        """Where the student pre-tokenizer's piece (a word, with its leading space) holding offset a starts.

        No student token crosses it, and an API's tokens rarely do: a prefix cut there does not end
        inside a teacher token. Without a pre-tokenizer, `a` itself."""
        pre = getattr(self.tokenizer, "backend_tokenizer", None)
        pre = pre.pre_tokenizer if pre is not None else None
        if pre is None or a <= 0:
            return a
        starts = [lo for _, (lo, _) in pre.pre_tokenize_str(text[: a + 1])]
        return max([lo for lo in starts if lo <= a], default=a)

    def first_after(self, prefix: str, continuation: str, complete: bool) -> int:
        """The first student token of `continuation` after `prefix` (the student's tokenization of both
        together), or PAD when a longer continuation could still change it.

        It is settled when the continuation runs past the end of the pre-tokenizer piece (the word)
        that token starts, or the turn ended there (`complete`). A continuation cut inside that word
        (a few teacher tokens that end mid-word) would otherwise be counted as a shorter token
        than the teacher's text really begins with. PAD too when no student token starts at the
        prefix's end (the prefix's last token merges into the continuation)."""
        full = prefix + continuation
        if not continuation:
            return PAD
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        a = len(prefix)
        tid = next((i for i, (lo, hi) in zip(enc["input_ids"], enc["offset_mapping"]) if lo == a and hi > lo), None)
        if tid is None:
            return PAD
        if complete:
            return tid
        pre = self.tokenizer.backend_tokenizer.pre_tokenizer if hasattr(self.tokenizer, "backend_tokenizer") else None
        if pre is None:  # no pieces: settled once another student token follows it
            return tid if sum(lo >= a for lo, _ in enc["offset_mapping"]) >= 2 else PAD
        ends = [hi for _, (lo, hi) in pre.pre_tokenize_str(full) if lo <= a < hi]
        return tid if ends and ends[0] < len(full) else PAD

    def teacher_starts(self, text: str, tokens: Sequence[dict]) -> dict[int, int]:
        """Character offset in `text` -> index of the teacher token starting there (aligned prefix only)."""
        starts, pos = {}, 0
        for i, t in enumerate(tokens):
            s = t["token"]
            if text.startswith(s, pos) and s:
                starts[pos] = i
                pos += len(s)
            elif pos == len(text) and s in self.special:  # the end-of-turn token after the text
                starts[pos] = i
                break
            else:
                self.stats["records_misaligned"] += 1
                break
        return starts

    def evidence(self, text: str, tokens: Sequence[dict] | None, spans: Sequence[tuple[int, int]], width: int = 21,
                 top: int | None = None, sampled: bool = True, ended: bool = False):  # fmt: skip
        """ev_ids [n, width] (PAD = none) and ev_probs [n, width] for the n student positions with `spans`.

        `top`: use only the API's `top` most probable alternatives per token (None: all it returned),
        as an API that offers fewer would; the k the request asked for bounds it (a server may add
        the sampled token as a k + 1-th). `sampled`: add the sampled token's own logprob when it is
        not among them, and split it across a straddled boundary; False for black-box scoring,
        where nothing that contains the scored token may be in the estimate. `ended`: the response
        ended its turn (finish reason "stop"), so that "" is the end of the turn (module docstring).
        """
        n = len(spans)
        ev_ids = np.full((n, width), PAD, dtype=np.int64)
        ev_probs = np.zeros((n, width))
        self.stats["positions"] += n
        if not tokens:
            return ev_ids, ev_probs
        if ended and self.tokenizer.eos_token is not None:  # "" is the end of the turn: give it the EOS's name
            tokens = [_renamed(t, "", self.tokenizer.eos_token) for t in tokens]
        record = _Record(text, tokens, self.teacher_starts(text, tokens), top, sampled)
        for j, (a, b) in enumerate(spans):
            mass = self._position(record, a, b)
            if not mass:
                continue
            total = sum(mass.values())
            scale = 1.0 / total if total > 1.0 else 1.0
            ranked = sorted(mass.items(), key=lambda kv: -kv[1])
            for slot, (sid, p) in enumerate(ranked[:width]):
                ev_ids[j, slot], ev_probs[j, slot] = sid, p * scale
            self.stats["mass_dropped"] += sum(p for _, p in ranked[width:])
            self.stats["with_evidence"] += 1
        return ev_ids, ev_probs

    # ---------------------------------------------------------------- one student position

    def _position(self, rec: _Record, a: int, b: int) -> dict[int, float]:
        """Student token id -> the teacher's probability of it, at the student token spanning text[a:b]."""
        k = bisect.bisect_right(rec.offsets, a) - 1
        if k < 0:
            return {}
        c, i = rec.offsets[k], rec.index[k]
        if a != c and a >= rec.next_start(k):  # after the aligned text
            return {}
        b = min(b, len(rec.text))  # a special token after the text (the end of the turn) spans none of it
        mass: dict[int, float] = {}
        if a == c:
            self._credit(rec, k, "", 1.0, b, mass, MAX_STRADDLE)
            return mass
        # Inside teacher token i: its alternatives that continue the realised text[c:a], conditioned on it.
        u = rec.text[c:a]
        alts = rec.alternatives(i)
        consistent = [(s, p) for s, p in alts if s.startswith(u)]
        z = sum(p for _, p in consistent) + max(0.0, 1.0 - sum(p for _, p in alts))
        if z <= 0 or not consistent:
            return {}
        self.stats["positions_inside_teacher_token"] += 1
        for s, p in consistent:
            if s == u:  # the teacher's token ends here: what follows it is not known
                self._drop(p / z)
            elif s == rec.tokens[i]["token"] and rec.next_start(k) < b:
                self._straddle(rec, k, s[len(u):], p / z, b, mass, MAX_STRADDLE)
            else:
                self._to_first(s[len(u):], p / z, mass)
        return mass

    def _credit(self, rec: _Record, k: int, head: str, weight: float, b: int, mass: dict, depth: int) -> None:
        """Credit the alternatives of the k-th aligned teacher token, each after the string `head`."""
        i = rec.index[k]
        for s, p in rec.alternatives(i):
            if s == rec.tokens[i]["token"] and rec.next_start(k) < b:
                self._straddle(rec, k, head + s, weight * p, b, mass, depth)
            elif s in self.special:
                self._to_first(head or s, weight * p, mass)  # the turn ends: after `head`, if any
            else:
                self._to_first(head + s, weight * p, mass)

    def _straddle(self, rec: _Record, k: int, head: str, weight: float, b: int, mass: dict, depth: int) -> None:
        """The realised teacher token ends inside the student token: continue at the next teacher token."""
        if not rec.sampled or depth <= 1 or k + 1 >= len(rec.offsets):
            self._drop(weight)  # the next position's answer is not to be read, or not there
            return
        self.stats["straddles"] += 1
        self._credit(rec, k + 1, head, weight, b, mass, depth - 1)

    def _to_first(self, s: str, p: float, mass: dict) -> None:
        ids = self.student_ids(s) if FRAGMENT not in s else ()
        if not ids:
            self._drop(p)
            return
        self.stats["exact" if len(ids) == 1 else "first_token_credited"] += 1
        self.stats["mass_exact" if len(ids) == 1 else "mass_prefix"] += p
        mass[ids[0]] = mass.get(ids[0], 0.0) + p

    def _drop(self, p: float) -> None:
        self.stats["unmapped"] += 1
        self.stats["mass_dropped"] += p

    def summary(self) -> dict:
        s = self.stats
        mapped = s["exact"] + s["first_token_credited"]
        total = s["mass_exact"] + s["mass_prefix"] + s["mass_dropped"]
        return {
            "positions": s["positions"],
            "positions_with_evidence": s["with_evidence"],
            "share_with_evidence": s["with_evidence"] / max(s["positions"], 1),
            "positions_inside_teacher_token": s["positions_inside_teacher_token"],
            "straddles": s["straddles"],
            "alternatives_exact": s["exact"],
            "alternatives_first_token_credited": s["first_token_credited"],
            "share_first_token_credited": s["first_token_credited"] / max(mapped, 1),
            "alternatives_unmapped": s["unmapped"],
            "share_mass_exact": s["mass_exact"] / total if total else 0.0,
            "share_mass_prefix": s["mass_prefix"] / total if total else 0.0,
            "share_mass_dropped": s["mass_dropped"] / total if total else 0.0,
            "records_misaligned": s["records_misaligned"],
        }


class _Record:
    """One response's aligned teacher tokens: their character offsets and (filtered) alternatives."""

    def __init__(self, text: str, tokens: Sequence[dict], starts: dict[int, int], top: int | None, sampled: bool):
        self.text, self.tokens, self.top, self.sampled = text, tokens, top, sampled
        self.offsets = sorted(starts)
        self.index = [starts[c] for c in self.offsets]
        self.end = 0  # where the aligned text ends; an end-of-turn token after the text covers none of it
        if self.index:
            last = tokens[self.index[-1]]["token"]
            self.end = self.offsets[-1] + (0 if self.offsets[-1] == len(text) else len(last))
        self._alts: dict[int, list[tuple[str, float]]] = {}

    def next_start(self, k: int) -> int:
        """Where the k-th aligned teacher token ends (the next one starts)."""
        return self.offsets[k + 1] if k + 1 < len(self.offsets) else self.end

    def alternatives(self, i: int) -> list[tuple[str, float]]:
        """(string, probability) of teacher token i's top alternatives, and its own when `sampled` adds it."""
        if i not in self._alts:
            t = self.tokens[i]
            alts, seen = [], set()
            for s, lp in sorted(((s, lp) for s, lp in t["top"]), key=lambda a: -a[1]):
                if s not in seen:  # two tokens that decode alike: the likelier only, never their sum
                    seen.add(s)
                    alts.append((s, lp))
            alts = alts[: self.top]
            if self.sampled and all(s != t["token"] for s, _ in alts):
                alts.append((t["token"], t["logprob"]))
            self._alts[i] = [(s, math.exp(lp)) for s, lp in alts]
        return self._alts[i]


def _renamed(token: dict, old: str, new: str) -> dict:
    """A teacher token with the string `old` renamed `new`, in itself and its alternatives."""
    return {**token, "token": new if token["token"] == old else token["token"],
            "top": [(new if s == old else s, lp) for s, lp in token["top"]]}  # fmt: skip
