"""The next byte: a fidelity measure defined across vocabularies (docs/method.md, "Across tokenizers").

Two models with different tokenizers have no common next-token space, but at a character offset
where both tokenizations of a text start a token, each model's distribution of the next *byte*
is exact from its own next-token distribution:

    p(next byte = b | text[:c]) = sum over tokens w whose string starts with byte b of p(w)

with one more symbol for the end of the turn (the EOS token). KL(p_T || p_S) over these 257
symbols, averaged over the offsets both models start a token at, compares a teacher and a
student whatever their tokenizers. It is a coarsening of the next-token distribution, so with a
shared tokenizer it is at most the token-level KL (data processing), and 0 when that is.
"""

from __future__ import annotations

import numpy as np
import torch

from bayeskd.data import render

EOS = 256
SYMBOLS = 257


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (as in `tokenizers`' ByteLevel): the printable character that
    stands for each byte, inverted. Printable Latin-1 bytes stand for themselves; the others are
    shifted past 255 in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def first_bytes(tokenizer) -> np.ndarray:
    """[V] the first byte (0..255) of each token's string, EOS for the end-of-turn token, -1 for other
    special tokens and empty strings. Byte-level vocabularies are read exactly; others through decode."""
    vocab = len(tokenizer)
    out = np.full(vocab, -1, dtype=np.int64)
    dec = _byte_decoder()
    specials = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    byte_level = all(p is None or i in specials or all(ch in dec for ch in p) for i, p in enumerate(pieces))
    for i, piece in enumerate(pieces):
        if i in specials or not piece:
            continue
        if byte_level:
            out[i] = dec[piece[0]]
        else:
            b = tokenizer.decode([i]).encode()
            out[i] = b[0] if b else -1
    if tokenizer.eos_token_id is not None:
        out[tokenizer.eos_token_id] = EOS
    return out


def next_byte(probs: torch.Tensor, firsts: np.ndarray) -> np.ndarray:
    """[P, 257] next-byte distributions from next-token ones [P, V], renormalised over the symbols
    (the mass of special tokens other than the EOS, tiny in a trained model, is left out)."""
    keep = torch.from_numpy(firsts >= 0)
    idx = torch.from_numpy(np.where(firsts >= 0, firsts, 0))
    p = probs.double() * keep
    out = torch.zeros(p.shape[0], SYMBOLS, dtype=torch.float64).index_add_(1, idx, p)
    return (out / out.sum(1, keepdim=True).clamp_min(1e-300)).numpy()


def token_starts(record: dict, tokenizer) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """([(row, response offset)], input ids [1, L]) of a record in the teacher's own tokenization and
    chat template (how the teacher read it): the logits at `row - 1` are its next-token distribution
    at that offset. The end-of-turn token after the text is at offset len(text); the second of two
    tokens that start in the same character (bytes of one character) is left out."""
    prompt, full = render(record, tokenizer, "chat")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    base, end = len(prompt), len(prompt) + len(record["text"])
    out, seen = [], set()
    for k, (lo, _) in enumerate(enc["offset_mapping"][0].tolist()):
        if k == 0 or lo < base or lo - base in seen:
            continue
        out.append((k, lo - base))
        seen.add(lo - base)
        if lo >= end:  # the end of the turn: what the template puts after it is not the teacher's
            break
    return out, enc["input_ids"]


def teacher_next_bytes(record: dict, model, tokenizer, firsts: np.ndarray, to_probs) -> dict[int, np.ndarray]:
    """Response offset -> the teacher's next-byte distribution there (at every token start of its own).

    `to_probs`: logits [P, V] -> the teacher's next-token distribution (`oracle.teacher_probs`)."""
    starts, ids = token_starts(record, tokenizer)
    if not starts:
        return {}
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    probs = to_probs(logits[[k - 1 for k, _ in starts]])
    return dict(zip([o for _, o in starts], next_byte(probs, firsts)))
