"""What we measure (method.md, section 5): pure functions over texts, tensors and arrays."""

from __future__ import annotations

import math
import re

import numpy as np
import torch

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased word and punctuation tokens (longest common subsequence)."""
    a, b = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) of a text over its UTF-8 bytes, in bits per byte."""
    return nll_nats / (math.log(2) * max(n_bytes, 1))


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[token] per position. logits [P, V], tokens [P] -> [P]."""
    return -torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1)


def kl_dense(p: np.ndarray | torch.Tensor, q: np.ndarray | torch.Tensor, eps: float = 1e-30) -> np.ndarray:
    """KL(p || q) per row, in nats, of dense distributions [P, V] (0 log 0 = 0)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(eps)) - torch.log(q.clamp_min(eps))), 0.0)
    return terms.sum(-1).numpy()


def smoothed_one_hot(tokens: np.ndarray, vocab_size: int, eps: float) -> np.ndarray:
    """(1 - eps) on the realised token, eps spread evenly over the others. [P, V]."""
    out = np.full((len(tokens), vocab_size), eps / (vocab_size - 1))
    out[np.arange(len(tokens)), tokens] = 1.0 - eps
    return out


def fidelity(p_teacher: np.ndarray, p_hat: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: KL(p_T || p_hat), whether the argmaxes agree, and -log p_hat(realised token)."""
    rows = np.arange(len(tokens))
    return {
        "kl": kl_dense(p_teacher, p_hat),
        "top1": (np.argmax(p_teacher, 1) == np.argmax(p_hat, 1)).astype(np.float64),
        "nll": -np.log(np.maximum(np.asarray(p_hat)[rows, tokens], 1e-30)),
    }
