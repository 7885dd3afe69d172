"""Exact-match scoring of free-form model responses against short reference answers.

The built-in prompt set (``bayeskd/builtin/prompts.jsonl``, see :func:`bayeskd.prompts.load_builtin_prompts`)
holds task prompts whose ``answer`` is a short string: a number (``"42"``, ``"0"``) or a
word (``"Paris"``). Small chat models rarely answer with the bare string, so responses
are normalised and the answer is looked for in a fixed, documented place.

Numeric answers (the reference parses as a number)
    1. Normalise the response: Unicode NFKC, typographic minus to ``-``, bullet markers
       dropped, and line-leading "1." / "2." ... dropped when the response is a numbered
       list (it has lines starting "1." and "2."). If it holds no digit at all, spelled-out numbers ("seven",
       "forty-two", 0..99) are turned into digits.
    2. Pick a *segment*:
       * if the response has an explicit answer marker -- "answer", "result" or "total"
         followed by ``:`` / ``=`` or, within the same sentence, by "is" / "are" /
         "equals" / "would be" / "will be" -- the segment runs from the *first* such
         marker to the end of that sentence ("The answer to 17 + 25 is 42." -> "42.");
       * otherwise the segment is the first sentence that contains a number -- or, if
         that sentence has "so" / "therefore" / "thus" / "hence" followed by a number,
         the part after the last of them ("Lucy had 13 and bought 12 more, so she has
         25 marbles." -> "she has 25 marbles.").
       Sentences end at a newline or at ``.``, ``!``, ``?`` followed by a space or the end
       (so ``3.5`` is not split).
    3. In the segment, take the number after the *last* ``=`` / "equals" / "equal to"
       ("It's 40 + 2 = 42" -> 42, "3 meters is equal to 300 centimeters" -> 300);
       if there is none, the *first* number ("There are 300 centimeters in 3 meters" -> 300).
    4. Numbers are canonicalised before comparison: thousands separators dropped
       (``1,000`` -> ``1000``), trailing zeros after the point dropped (``42.0`` -> ``42``,
       ``2.50`` -> ``2.5``), ``-0`` -> ``0``. The response is correct iff the picked number
       equals the canonical reference.

    Only one number is ever compared, so hedging ("41 or 42") and restating the
    question's numbers are not rewarded, while the common shapes "42", "The answer is
    42.", "17 + 25 = 42", "It's 40 + 2 = 42" and "Tom has 7 apples." are accepted.

Word answers (anything else)
    The response's *first sentence* is taken, skipping leading filler sentences such as
    "Sure!" or "Here's the answer:"; if the response has an explicit answer marker
    ("The answer is ..."), the text after the first marker is used instead. Both it and
    the reference are normalised (Unicode NFKD without accents, case-folded, every run
    of non-alphanumeric characters -> one space) and the response is correct iff the
    reference appears in it as a whole word (or whole word sequence): "Paris." and
    "The capital of France is Paris" match "Paris"; "Parisian" does not, and neither
    does a correct word that only shows up in a later sentence.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

__all__ = [
    "NUMERIC_KINDS",
    "WORD_KINDS",
    "answer_type",
    "canonical_number",
    "extract_answer",
    "is_correct",
    "normalize_text",
]

# Prompt kinds (from prompts.jsonl) whose answers are always numbers, plus the generic "number".
NUMERIC_KINDS = frozenset({"number", "arithmetic", "word_problem", "unit_conversion"})
# Generic kinds asking for word extraction.
WORD_KINDS = frozenset({"word", "text"})

# A number: optional sign (not when glued to a preceding word/number, as in "40-2"),
# digits with optional thousands groups, optional decimals.
_NUM = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUM_RE = re.compile(_NUM)
_DIGIT_RE = re.compile(r"\d")

_MARKER_RE = re.compile(
    r"\b(?:answer|result|total)\b(?:\s*[:=]|[^.!?\n]{0,40}?\b(?:is|are|equals|would be|will be)\b)[\s*_`:$]*",
    re.IGNORECASE,
)
_EQUALS_RE = re.compile(r"(?:=|\bequals?\b|\bequal to\b)[\s*_`$]*(" + _NUM + ")", re.IGNORECASE)
_CONCLUSION_RE = re.compile(r"\b(?:so|therefore|thus|hence)\b", re.IGNORECASE)
_ENUM_RE = re.compile(r"^[ \t]*\d+[.)][ \t]+", re.MULTILINE)
_LIST_ONE_RE = re.compile(r"^[ \t]*1[.)][ \t]+", re.MULTILINE)
_LIST_TWO_RE = re.compile(r"^[ \t]*2[.)][ \t]+", re.MULTILINE)
_SENTENCE_END_RE = re.compile(r"\n|[.!?](?=\s|$)")
_BULLET_RE = re.compile(r"^[ \t]*(?:[-*\u2022]|#+)[ \t]+", re.MULTILINE)
_FILLER_RE = re.compile(
    r"^(?:sure|of course|certainly|okay|ok|absolutely|yes|great question|good question|hello|hi|"
    r"(?:sure|ok|okay)?[\s,]*here(?: is|'s| are)?(?: the| my| your)? answers?)\W*$",
    re.IGNORECASE,
)

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_NUM_RE = re.compile(
    r"\b(?:(" + "|".join(_TENS) + r")(?:[\s-](" + "|".join(_UNITS[1:10]) + r"))?|(" + "|".join(_UNITS) + r"))\b",
    re.IGNORECASE,
)


def _word_number(m: re.Match) -> str:
    tens, unit, single = m.group(1), m.group(2), m.group(3)
    if single:
        return str(_UNITS.index(single.lower()))
    value = 10 * (_TENS.index(tens.lower()) + 2)
    if unit:
        value += _UNITS.index(unit.lower())
    return str(value)


def canonical_number(s: str) -> str | None:
    """Canonical form of a number written as ``s`` (whole string), or None if it is not one.

    ``"1,000"`` -> ``"1000"``, ``"42.0"`` -> ``"42"``, ``" -3 "`` -> ``"-3"``, ``"2.50"`` -> ``"2.5"``.
    """
    s = s.strip().replace("\u2212", "-")
    if not re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", s):
        return None
    try:
        d = Decimal(s.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex already rules this out
        return None
    if d == 0:
        return "0"
    return format(d.normalize(), "f")


def answer_type(answer: str) -> str:
    """``"number"`` if the reference answer is a number, else ``"word"``."""
    return "number" if canonical_number(answer) is not None else "word"


def normalize_text(text: str) -> str:
    """Accents stripped, case-folded, non-alphanumeric runs -> one space, trimmed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def _prepare(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-").replace("\r\n", "\n")
    text = _BULLET_RE.sub("", text)
    if _LIST_ONE_RE.search(text) and _LIST_TWO_RE.search(text):  # a numbered list: drop "1." "2." ...
        text = _ENUM_RE.sub("", text)
    return text


def _sentences(text: str) -> list[str]:
    """Non-empty sentences, in order (split at newlines and at ``.!?`` before whitespace/end)."""
    out, start = [], 0
    for m in _SENTENCE_END_RE.finditer(text):
        out.append(text[start : m.end()])
        start = m.end()
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def _sentence_end(text: str, start: int) -> int:
    m = _SENTENCE_END_RE.search(text, start)
    return m.end() if m else len(text)


def _number_segment(text: str) -> str | None:
    m = _MARKER_RE.search(text)
    if m and _NUM_RE.search(text, m.end(), _sentence_end(text, m.end())):
        return text[m.end() : _sentence_end(text, m.end())]
    for sentence in _sentences(text):
        if _NUM_RE.search(sentence):
            for c in reversed(list(_CONCLUSION_RE.finditer(sentence))):
                if _NUM_RE.search(sentence, c.end()):
                    return sentence[c.end() :]
            return sentence
    return None


def _extract_number(text: str) -> str | None:
    text = _prepare(text)
    if not _DIGIT_RE.search(text):
        text = _WORD_NUM_RE.sub(_word_number, text)
    segment = _number_segment(text)
    if segment is None:
        return None
    eq = list(_EQUALS_RE.finditer(segment))
    raw = eq[-1].group(1) if eq else _NUM_RE.search(segment).group(0)
    return canonical_number(raw)


def _extract_words(text: str) -> str | None:
    text = _prepare(text)
    m = _MARKER_RE.search(text)
    if m:
        seg = normalize_text(text[m.end() : _sentence_end(text, m.end())])
        if seg:
            return seg
    for sentence in _sentences(text):
        if _FILLER_RE.match(sentence):
            continue
        seg = normalize_text(sentence)
        if seg:
            return seg
    return None


def extract_answer(text: str, kind: str | None = None) -> str | None:
    """The answer found in a model response, normalised, or None if there is none.

    ``kind`` picks the rule (see the module docstring): a numeric kind (``"number"``,
    ``"arithmetic"``, ``"word_problem"``, ``"unit_conversion"``) returns the canonical
    number (``"42"``); ``"word"`` / ``"text"`` returns the normalised sentence a word answer
    is looked for in; anything else (None, ``"fact"``, ...) returns the number if the
    response has one, else the normalised sentence.
    """
    if not text:
        return None
    if kind in NUMERIC_KINDS:
        return _extract_number(text)
    if kind in WORD_KINDS:
        return _extract_words(text)
    number = _extract_number(text)
    return number if number is not None else _extract_words(text)


def is_correct(text: str, answer: str) -> bool:
    """Exact-match check of a free-form response against a reference answer (see module doc).

    A numeric reference (``"42"``, ``"1,000"``) must equal the one number extracted from the
    response; a word reference must appear as a whole word in the response's first
    (non-filler) sentence, or right after an explicit "the answer is".
    """
    if answer is None:
        raise ValueError("is_correct needs a reference answer (this prompt has none)")
    if not text:
        return False
    number = canonical_number(answer)
    if number is not None:
        return _extract_number(text) == number
    ref = normalize_text(answer)
    if not ref:
        return False
    seg = _extract_words(text)
    return seg is not None and f" {ref} " in f" {seg} "
