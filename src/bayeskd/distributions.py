"""Sparse top-K distributions with a tail bucket, and the Dirichlet updates of the posterior.

A sparse distribution over a vocabulary of V tokens is, per position, K token ids with
their probabilities and the tail mass r = 1 - sum(top-K) that the other V - K tokens share.
The posterior (method.md, section 2) is computed exactly on a candidate set C per position
(the union of the prior's and the proxy's top candidates, plus any teacher evidence), from
the prior's and the proxy's exact probabilities on C:

    expected:  p_post = (kappa * p_prior + M * p_P) / (kappa + M)
    sampled:   p_post = (kappa * p_prior + c) / (kappa + M),   c ~ Multinomial(M, p_P)
    product:   p_post proportional to p_prior^a * p_P^b   (normalised over C and one tail bucket)
    teacher:   p_post = (kappa * p_prior + M * p_P + c_T) / (kappa + M + n_T)

`expected`, `sampled` and the teacher-count update are linear in the two distributions, so
their value on C is exact and the tail is exactly 1 - sum over C. `product` is not linear:
its normaliser needs every token, and the prior is known on C only, so it is normalised
over the coarsened distributions (C plus one tail bucket whose mass is each side's tail).

Shapes: N positions, C candidates per position (id -1 marks an unused slot, probability 0).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

PAD = -1


class SparseDist(NamedTuple):
    """A top-K distribution with the rest of its mass as one tail bucket, at each position.

    ids [..., K] int (PAD where unused; distinct within a position), probs [..., K], tail [...] =
    1 - sum(probs). numpy arrays where the estimate is made and stored, torch tensors where the
    losses read it (`losses`, `data.Collator`): one idea, one type.
    """

    ids: Any
    probs: Any
    tail: Any

    def dense(self, vocab_size: int) -> np.ndarray:
        """[N, V] with the tail spread uniformly over the other tokens (for tests and small V)."""
        n, k = self.ids.shape
        out = np.zeros((n, vocab_size))
        valid = self.ids >= 0
        rows = np.repeat(np.arange(n), k).reshape(n, k)
        np.add.at(out, (rows[valid], self.ids[valid]), self.probs[valid])
        others = vocab_size - valid.sum(1)
        fill = np.where(others > 0, self.tail / np.maximum(others, 1), 0.0)
        mask = np.ones_like(out, dtype=bool)
        mask[rows[valid], self.ids[valid]] = False
        out += mask * fill[:, None]
        return out


def union_ids(*id_sets: np.ndarray) -> np.ndarray:
    """Row-wise union of id arrays ([N, K1], [N, K2], ...) -> [N, K1 + K2 + ...], duplicates set to PAD.

    The first occurrence of each id is kept, so the order of the first set is preserved.
    """
    ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in id_sets], axis=1)
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    dup_sorted = np.zeros_like(sorted_ids, dtype=bool)
    dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return np.where(dup | (ids < 0), PAD, ids)


def expected(prior: np.ndarray, proxy: np.ndarray, kappa: np.ndarray, m: float) -> np.ndarray:
    """E[p | prior Dir(kappa p_prior), M proxy pseudo-observations] on the candidates. [N, C]."""
    kappa = np.asarray(kappa, dtype=np.float64)[:, None]
    if m == 0:
        return np.asarray(prior, dtype=np.float64).copy()
    return (kappa * prior + m * proxy) / (kappa + m)


def sample_counts(proxy_dense: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """c ~ Multinomial(M, p_P) per row of a dense [N, V] proxy distribution -> counts [N, V]."""
    p = np.asarray(proxy_dense, dtype=np.float64)
    p = p / p.sum(1, keepdims=True)
    return rng.multinomial(m, p)


def sampled(prior: np.ndarray, counts: np.ndarray, kappa: np.ndarray, m: int) -> np.ndarray:
    """The paper's continued sampling: (kappa p_prior + c) / (kappa + M) on the candidates. [N, C]."""
    kappa = np.asarray(kappa, dtype=np.float64)[:, None]
    return (kappa * prior + counts) / (kappa + m)


def with_teacher_counts(
    prior: np.ndarray, proxy: np.ndarray, counts: np.ndarray, kappa: np.ndarray, m: float
) -> np.ndarray:
    """(kappa p_prior + M p_P + c_T) / (kappa + M + n_T), with c_T the teacher's own samples at the prefix.

    `counts` [N, C] must hold all n_T samples on the candidates (make them candidates first).
    """
    return add_counts(expected(prior, proxy, kappa, m), counts, np.asarray(kappa, dtype=np.float64) + m)


def counts_on(cand_ids: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Counts [N, S] at ids [N, S] (PAD where unused) placed on the candidates [N, C] -> [N, C].

    Every counted id must be among its row's candidates (make them candidates first)."""
    out = np.zeros(cand_ids.shape, dtype=np.float64)
    for j in range(ids.shape[1]):
        hit = (cand_ids == ids[:, j : j + 1]) & (ids[:, j : j + 1] >= 0)
        out += hit * counts[:, j : j + 1]
    return out


def add_counts(post: np.ndarray, counts: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """(A p + c) / (A + n): observed counts c [N, C] on top of a Dirichlet mean p of strength A [N].

    With p = (kappa p_prior + M p_P) / (kappa + M) and A = kappa + M this is exactly
    `with_teacher_counts`."""
    a = np.asarray(strength, dtype=np.float64)[:, None]
    return (a * post + counts) / (a + counts.sum(1, keepdims=True))


def product(
    prior: np.ndarray, proxy: np.ndarray, prior_tail: np.ndarray, proxy_tail: np.ndarray, a: float, b: float
) -> np.ndarray:
    """p proportional to p_prior^a p_P^b over the candidates plus one tail bucket. [N, C]; tail = 1 - sum."""
    with np.errstate(divide="ignore"):
        log_c = a * np.log(prior) + b * np.log(proxy)
        log_t = a * np.log(np.maximum(prior_tail, 0)) + b * np.log(np.maximum(proxy_tail, 0))
    top = np.maximum(log_c.max(1), log_t)
    top = np.where(np.isfinite(top), top, 0.0)
    unnorm = np.exp(log_c - top[:, None])
    tail = np.exp(log_t - top)
    return unnorm / (unnorm.sum(1) + tail)[:, None]


def apply_evidence(post: np.ndarray, cand_ids: np.ndarray, ev_ids: np.ndarray, ev_probs: np.ndarray) -> np.ndarray:
    """Fix the teacher's own probabilities on its top-k tokens; spread the rest in proportion to `post`.

    post, cand_ids: [N, C]; ev_ids, ev_probs: [N, E] (PAD / 0 where a row has less or no evidence).
    Every evidence id must be among the row's candidates. Rows without evidence are unchanged.
    Tokens outside the evidence (the tail included) keep their relative sizes and share
    1 - sum(teacher top-k).
    """
    post = np.asarray(post, dtype=np.float64)
    ev_mass = np.zeros_like(post)
    is_ev = np.zeros(post.shape, dtype=bool)
    for j in range(ev_ids.shape[1]):  # E <= 20: a loop over evidence slots, vectorised over rows
        hit = (cand_ids == ev_ids[:, j : j + 1]) & (ev_ids[:, j : j + 1] >= 0)
        ev_mass += hit * ev_probs[:, j : j + 1]
        is_ev |= hit
    has = is_ev.any(1)
    s_teacher = ev_mass.sum(1)
    s_post = np.where(is_ev, post, 0.0).sum(1)
    scale = np.where(has, (1.0 - s_teacher) / np.maximum(1.0 - s_post, 1e-12), 1.0)
    return np.where(is_ev, ev_mass, post * scale[:, None])


def top_k(cand_ids: np.ndarray, probs: np.ndarray, k: int) -> SparseDist:
    """Keep the K most probable candidates per row (sorted, descending); the rest joins the tail."""
    probs = np.where(cand_ids >= 0, probs, -1.0)
    k = min(k, probs.shape[1])
    part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    p = np.take_along_axis(probs, part, 1)
    order = np.argsort(-p, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    ids = np.take_along_axis(cand_ids, idx, 1)
    p = np.take_along_axis(probs, idx, 1)
    ids = np.where(p >= 0, ids, PAD).astype(np.int32)
    p = np.maximum(p, 0.0)
    return SparseDist(ids=ids, probs=p, tail=np.clip(1.0 - p.sum(1), 0.0, 1.0))


def entropy(dist: SparseDist) -> np.ndarray:
    """Entropy (nats) of the coarsened distribution (top-K plus the tail as one bucket). [N].

    A lower bound on the full distribution's entropy; it is what the student is trained on.
    """
    p = np.concatenate([dist.probs, dist.tail[:, None]], axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(1)
