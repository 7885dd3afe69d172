"""Teacher logprob evidence: the API's top-k token strings, mapped onto the student's vocabulary.

The teacher's tokenizer is unknown; its tokens arrive as strings. They are aligned to the
student's tokens of the same response by character offsets:

- the teacher's token strings are laid end to end over the response text; alignment stops
  at the first token that does not match the text there (e.g. a byte-level fragment shown
  as U+FFFD), and the rest of that response carries no evidence;
- a student position gets evidence when its token starts exactly where a teacher token
  starts: the teacher's top-k alternatives there (and its sampled token) are then
  distributions over the same next piece of text;
- each alternative string is credited to the *first* student token of its own
  tokenization (special tokens such as the end-of-turn map by name). When the string is one
  student token the mapping is exact; when it is several, the first gets the string's whole
  probability (counted as `first_token_credited`); strings with no student token are
  dropped (`unmapped`). Alternatives that map to the same student token add up, and if the
  mapped mass exceeds one (it cannot for a consistent API) it is renormalised.

Counts of every case are returned so that the share of usable evidence can be reported.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from bayeskd.distributions import PAD


class EvidenceMapper:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
        self.cache: dict[str, tuple[int, int]] = {}
        self.stats: Counter = Counter()

    def student_first(self, s: str) -> tuple[int, int]:
        """(first student token id or PAD, number of student tokens) of a teacher token string."""
        if s not in self.cache:
            if s in self.special:
                self.cache[s] = (self.special[s], 1)
            else:
                ids = self.tokenizer.encode(s, add_special_tokens=False)
                self.cache[s] = (ids[0], len(ids)) if ids else (PAD, 0)
        return self.cache[s]

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
                 top: int | None = None, sampled: bool = True):  # fmt: skip
        """ev_ids [n, width] (PAD = none) and ev_probs [n, width] for the n student positions with `spans`.

        `top`: use only the API's `top` most probable alternatives per token (None: all it returned),
        as an API that offers fewer would. `sampled`: add the sampled token's own logprob when it is
        not among them; False for black-box scoring, where the scored token must not be in the estimate.
        """
        n = len(spans)
        ev_ids = np.full((n, width), PAD, dtype=np.int64)
        ev_probs = np.zeros((n, width))
        self.stats["positions"] += n
        if not tokens:
            return ev_ids, ev_probs
        starts = self.teacher_starts(text, tokens)
        for j, (a, _) in enumerate(spans):
            i = starts.get(a)
            if i is None:
                continue
            mass: dict[int, float] = {}
            alternatives = sorted(((a_s, a_lp) for a_s, a_lp in tokens[i]["top"]), key=lambda a: -a[1])[:top]
            if sampled and all(s != tokens[i]["token"] for s, _ in alternatives):
                alternatives.append((tokens[i]["token"], tokens[i]["logprob"]))
            for s, lp in alternatives:
                sid, length = self.student_first(s)
                if sid == PAD:
                    self.stats["unmapped"] += 1
                    continue
                self.stats["exact" if length == 1 else "first_token_credited"] += 1
                mass[sid] = mass.get(sid, 0.0) + math.exp(lp)
            if not mass:
                continue
            total = sum(mass.values())
            scale = 1.0 / total if total > 1.0 else 1.0
            for slot, (sid, p) in enumerate(sorted(mass.items(), key=lambda kv: -kv[1])[:width]):
                ev_ids[j, slot], ev_probs[j, slot] = sid, p * scale
            self.stats["with_evidence"] += 1
        return ev_ids, ev_probs

    def summary(self) -> dict:
        s = self.stats
        mapped = s["exact"] + s["first_token_credited"]
        return {
            "positions": s["positions"],
            "positions_with_evidence": s["with_evidence"],
            "share_with_evidence": s["with_evidence"] / max(s["positions"], 1),
            "alternatives_exact": s["exact"],
            "alternatives_first_token_credited": s["first_token_credited"],
            "share_first_token_credited": s["first_token_credited"] / max(mapped, 1),
            "alternatives_unmapped": s["unmapped"],
            "records_misaligned": s["records_misaligned"],
        }
