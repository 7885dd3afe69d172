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
    if np.isinf(m):  # the limit M -> inf: the proxy alone (inf / inf would be NaN)
        return np.asarray(proxy, dtype=np.float64).copy()
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
    with np.errstate(invalid="ignore"):
        out = (a * post + counts) / (a + counts.sum(1, keepdims=True))
    return np.where(np.isinf(a), post, out)  # infinite strength: finite counts do not move it


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


class Sampling(NamedTuple):
    """The distribution the teacher samples from, relative to the one its logprobs describe.

    The estimate targets one distribution: the teacher as `collect` sampled it, softmax(z / T)
    cut to its nucleus of mass `top_p` (what the corpus counts, the proxy's fine-tune and
    `probe`'s samples are drawn from, and what the oracle measures). An API that reports raw
    logprobs (vLLM's default, `bayeskd serve`) describes softmax(z) instead: `to_sampling`
    converts them. The identity (T = 1, top_p = 1, or logprobs already of the sampled
    distribution) changes nothing.
    """

    temperature: float = 1.0
    top_p: float = 1.0

    @property
    def identity(self) -> bool:
        return self.temperature == 1.0 and self.top_p >= 1.0


def to_sampling(ev_probs: np.ndarray, sampling: Sampling, tail_power: np.ndarray | float = 1.0) -> np.ndarray:
    """The API's raw top-k probabilities [N, E] (0 where unused) -> the same tokens' probabilities
    under the sampling distribution (`Sampling`).

    Temperature: q_w = p_w^(1/T) / Z with Z = sum over every token of p^(1/T). The listed tokens
    give A = sum_E p^(1/T); the unlisted ones, whose raw mass is r = 1 - sum_E p, are known only
    through an estimate's shape s of them in the sampling distribution (s sums to 1 over them):
    with q_w = Q s_w for them, sum_w p_w = sum_w (Z Q s_w)^T = r gives
    Z = A + (r / S)^(1/T), S = `tail_power` = sum over the unlisted of s_w^T [N]. S = 1 treats
    the unlisted mass as one token (an upper bound of its share for T < 1, so the listed values
    are lower bounds); T = 1 gives Z = 1 for any S. T = 0 (greedy): the top listed token gets 1.

    Top-p: the tokens, in decreasing q, are kept while the mass before them is below top_p
    (`teachers.decoding.sample`'s rule). If the listed tokens reach top_p, the nucleus closes
    among them: the kept ones are renormalised and every other token gets 0. Otherwise the
    nucleus runs into the unlisted tokens and its mass is taken as top_p (it lies in
    [top_p, top_p + the largest unlisted q]): q / top_p. Rows without evidence stay 0.
    """
    p = np.asarray(ev_probs, dtype=np.float64)
    if sampling.identity:
        return p.copy()
    has = p > 0
    any_ev = has.any(1)
    r = np.clip(1.0 - p.sum(1), 0.0, 1.0)
    t = sampling.temperature
    if t <= 0:
        q = np.where(p == p.max(1, keepdims=True), 1.0, 0.0) * has
        q = q / np.maximum(q.sum(1, keepdims=True), 1.0)
    else:
        with np.errstate(divide="ignore"):
            log_a = np.where(has, np.log(np.where(has, p, 1.0)) / t, -np.inf)
            log_tail = np.where(r > 0, (np.log(np.maximum(r, 1e-300)) - np.log(np.maximum(tail_power, 1e-300))) / t, -np.inf)
        top = np.maximum(log_a.max(1), log_tail)
        top = np.where(np.isfinite(top), top, 0.0)
        un = np.exp(log_a - top[:, None])
        z = un.sum(1) + np.exp(log_tail - top)
        q = un / np.maximum(z, 1e-300)[:, None]
    if sampling.top_p < 1.0:
        order = np.argsort(-q, axis=1, kind="stable")
        sq = np.take_along_axis(q, order, 1)
        cum = np.cumsum(sq, 1)
        before = cum - sq
        kept_sorted = (before < sampling.top_p) & (sq > 0)
        # A margin for the teacher's float32 arithmetic: a nucleus that closes within 1e-4 of
        # top_p is taken as open, so that no token the teacher may have sampled gets 0.
        closes = (cum >= sampling.top_p + 1e-4) & kept_sorted
        closed = closes.any(1)
        kept = np.zeros_like(kept_sorted)
        np.put_along_axis(kept, order, kept_sorted, 1)
        mass = np.where(closed, (q * kept).sum(1), sampling.top_p)
        q = np.where(kept, q, 0.0) / np.maximum(mass, 1e-300)[:, None]
    return np.where(any_ev[:, None], q, 0.0)


def tail_power(dense: np.ndarray, ev_ids: np.ndarray, temperature: float) -> np.ndarray:
    """S = sum over the tokens outside the evidence of s_w^T, with s the `dense` [N, V] estimate
    renormalised over them: the shape `to_sampling` gives the mass the API left unlisted."""
    s = np.array(dense, dtype=np.float64)
    rows = np.arange(len(s))[:, None]
    valid = ev_ids >= 0
    s[np.broadcast_to(rows, ev_ids.shape)[valid], ev_ids[valid]] = 0.0
    s /= np.maximum(s.sum(1, keepdims=True), 1e-300)
    return (s**temperature).sum(1) if temperature > 0 else np.ones(len(s))


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
