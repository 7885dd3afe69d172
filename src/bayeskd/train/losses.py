"""Distillation losses: pure functions over student logits and sparse or dense targets.

Conventions, shared by every function here:

- `logits` [..., V] are the student's raw scores; V is the student vocabulary.
- Targets are *aligned*: position i of a target tensor is compared with position i of the
  logits. Only `objective` (and the `make_loss_fn` built on it) takes a model's logits and a
  batch in the Hugging Face convention (labels aligned with `input_ids`, -100 = no target)
  and does the causal shift itself.
- Sparse targets (`distributions.SparseDist` of tensors): `ids` [..., K] (int; -1 marks an
  unused slot), `probs` [..., K] and `tail` [...] = 1 - sum(probs), the teacher's mass on every
  other token, kept as one bucket. Ids must be distinct within a position.
- Per-token functions return [...]; `masked_sum` / `masked_mean` reduce them over response
  tokens, with optional per-sample ([B]) or per-token ([B, T]) weights. In `objective` the
  weights scale the KL terms only; the cross-entropy on the teacher's tokens is never weighted.
- Temperature `tau` divides the student's logits (and a dense teacher's); KL terms are then
  multiplied by tau^2 so that gradient magnitudes do not shrink as tau grows.

The sparse KL is the exact KL of the coarsened distributions {K tokens, one tail bucket}
(method.md, section 3):

    KL(p || q) = sum_{w in K} p_w (log p_w - log q_w) + r (log r - log(1 - sum_{w in K} q_w))

with 0 log 0 = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from bayeskd.data import IGNORE_INDEX
from bayeskd.estimate.distributions import SparseDist

# log(1 - sum q_K) from the K gathered values is cheap but loses digits to cancellation when
# the student puts almost all its mass on K; below this tail mass the tail is summed exactly
# over the non-K logits instead. float32 log-probs carry an absolute error of a few 1e-6, so
# the cheap path keeps about 4 significant digits of u (float64: about 13).
_EXACT_TAIL_BELOW = 1e-2
# Floor of log u: u underflows to 0 when the student's non-K logits sit ~100 below the others
# (or K covers the vocabulary). The floor keeps the tail term r (log r - log u) and its
# gradient factor r / u finite; it changes nothing until u < 2e-35.
_MIN_LOG_TAIL = -80.0


class LossOutput(NamedTuple):
    """What a training loss returns: a SUM over target tokens, so that the loop can normalise globally."""

    loss: Tensor  # scalar, sum over target tokens of the (weighted) per-token loss
    n_tokens: Tensor  # scalar int64, number of target tokens
    parts: dict[str, Tensor]  # detached sums of each term (same weighting), for logging


# ---------------------------------------------------------------- reductions


def _broadcast_weights(weights: Tensor, like: Tensor) -> Tensor:
    """[B] per-sample or [B, T] per-token weights -> the shape of `like` ([B, T, ...])."""
    w = weights.to(like.dtype)
    while w.dim() < like.dim():
        w = w.unsqueeze(-1)
    return w.expand_as(like)


def masked_sum(values: Tensor, mask: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum of `values` [B, T] over `mask` [B, T] (bool), optionally weighted; returns (sum, n_tokens).

    `weights` is [B] (one per sample) or [B, T] (one per token). Masked positions contribute
    nothing, even when their value is nan or inf.
    """
    mask = mask.bool()
    v = values if weights is None else values * _broadcast_weights(weights, values)
    return torch.where(mask, v, torch.zeros((), dtype=v.dtype, device=v.device)).sum(), mask.sum()


def masked_mean(values: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of `values` [B, T] over the response tokens in `mask` [B, T]; weights as in `masked_sum`.

    Weights scale each token's loss; the mean is still over tokens (not over the weights), so
    weights in (0, 1] down-weight examples. An empty mask gives 0.
    """
    total, n = masked_sum(values, mask, weights)
    return total / n.clamp_min(1)


# ---------------------------------------------------------------- sparse targets


def _upcast(x: Tensor) -> Tensor:
    """Losses on half-precision logits are computed in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _row_chunks(z: Tensor) -> list[slice]:
    """Row slices of z [N, V] for the dense passes: about 2 MiB each on CPU, 512 MiB elsewhere.

    No [N, V] temporary is built but the gradient: peak memory stays at the logits plus their
    gradient. On CPU small chunks also stay in cache and spare the page faults of fresh large
    allocations, which cost more than the arithmetic; on GPUs large chunks keep launches few.
    """
    elements = 1 << 19 if z.device.type == "cpu" else 1 << 27
    step = max(1, elements // max(1, z.shape[-1]))
    return [slice(i, i + step) for i in range(0, z.shape[0], step)]


def _scaled(z: Tensor, tau: float) -> Tensor:
    return z / tau if tau != 1.0 else z


def _logsumexp(z: Tensor, tau: float) -> Tensor:
    """logsumexp(z / tau) over the last axis, [N, V] -> [N], chunk by chunk."""
    if z.shape[0] == 0:
        return z.new_zeros(0)
    return torch.cat([torch.logsumexp(_scaled(z[sl], tau), -1) for sl in _row_chunks(z)])


def _log_tail_mass(z: Tensor, tau: float, lse: Tensor, cols: Tensor, valid: Tensor, q_k: Tensor) -> Tensor:
    """log u = log(1 - sum_{w in K} q_w) [N], exact, from z [N, V], lse = logsumexp(z / tau) [N] and q_k [N, K].

    1 - sum(q_K) costs K values per row; rows where it falls below a threshold (where
    float cancellation would eat the digits) are summed over their non-K logits instead.
    """
    u = (1.0 - q_k.sum(-1).double()).clamp_min(0.0)
    log_u = u.log().to(z.dtype)
    tight = (u < _EXACT_TAIL_BELOW).nonzero().squeeze(-1)
    if tight.numel():
        # A spare -inf column takes the unused slots' scatter, so that they mask nothing.
        rows = torch.cat([_scaled(z.index_select(0, tight), tau), z.new_full((tight.numel(), 1), -math.inf)], -1)
        slots = torch.where(valid.index_select(0, tight), cols.index_select(0, tight), z.shape[-1])
        rows.scatter_(-1, slots, -math.inf)
        log_u = log_u.index_copy(0, tight, torch.logsumexp(rows, -1) - lse.index_select(0, tight))
    return log_u


def _lookup(cols: Tensor, ids: Tensor, valid: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """For each column cols [N, M]: is it one of the valid `ids` [N, K], and its prob there ([N, M] each)."""
    key = torch.where(valid, ids, -1)
    sorted_ids, order = key.sort(-1)
    pos = torch.searchsorted(sorted_ids, cols.contiguous()).clamp_max(ids.shape[-1] - 1)
    hit = sorted_ids.gather(-1, pos) == cols
    return hit, torch.where(hit, probs.gather(-1, order.gather(-1, pos)), torch.zeros((), dtype=probs.dtype))


def _sparse_kl_forward(z: Tensor, tau: float, lse: Tensor, ids: Tensor, probs: Tensor, tail: Tensor):
    """tau^2 KL per row [N] and what the backward needs (cols, valid, p, r, log u)."""
    zero = torch.zeros((), dtype=z.dtype)
    ids = ids.long()
    valid = ids >= 0
    cols = ids.clamp_min(0)
    logq = _scaled(z.gather(-1, cols), tau) - lse.unsqueeze(-1)
    q_k = torch.where(valid, logq.exp(), zero)
    p = torch.where(valid, probs.to(z.dtype), zero)
    r = tail.to(z.dtype).clamp_min(0.0)  # 1 - sum(probs) may round below 0
    log_u = _log_tail_mass(z, tau, lse, cols, valid, q_k).clamp_min(_MIN_LOG_TAIL)
    # 0 log 0 = 0 throughout; u = 0 (all of q on K) only matters if the teacher has a tail.
    kl = (torch.xlogy(p, p) - p * logq).sum(-1) + torch.xlogy(r, r) - torch.where(r > 0, r * log_u, zero)
    return kl * tau**2, [cols, valid, p, r, log_u]


def _kl_grad_columns(z: Tensor, tau: float, lse: Tensor, base: Tensor, terms: list) -> tuple[Tensor, Tensor]:
    """Exact gradient values at every column that lies in some K: (columns [N, M], values [N, M]).

        value(v) = q_v (base + sum_i tg_i (a_i - [v not in K_i] r_i / u_i)) - sum_i tg_i [v in K_i] p_i,v
    """
    zero = torch.zeros((), dtype=z.dtype)
    cols_all = torch.cat([t[0] for t in terms], -1)
    q_at = (_scaled(z.gather(-1, cols_all), tau) - lse.unsqueeze(-1)).exp()
    scale = base.unsqueeze(-1).expand_as(q_at).clone()
    sub = torch.zeros_like(q_at)
    for cols, valid, p, tg, a, r_over_u in terms:
        hit, p_at = _lookup(cols_all, cols, valid, p)
        scale += tg.unsqueeze(-1) * (a.unsqueeze(-1) - torch.where(hit, zero, r_over_u.unsqueeze(-1)))
        sub += tg.unsqueeze(-1) * p_at
    return cols_all, q_at * scale - sub


class _SparseKD(torch.autograd.Function):
    """Cross-entropy and sparse forward KLs over the same logits rows, with a hand-written backward.

    forward(z [N, V], labels [N] or None, tau, *(ids [N, K], probs [N, K], tail [N]) per target
    set) -> per-row losses [N]: CE first when labels are given (-1 = no label), then one tau^2 KL
    per set. Autograd through gather + log-softmax would build an extra [N, V] gradient per
    gather and, worse, route the tail term's gradient through -r q_w / u at the K ids, whose
    cancellation against the log-softmax's q_v * sum(.) loses every digit once u is tiny. Here
    the gradient is written directly (q = softmax(z / tau), a = sum(p) + r, nominally 1):

        d(tau^2 KL)/dz_v = tau (a q_v - p_v)          for v in K
                         = tau (a - r / u) q_v         for v not in K
        d CE / dz_v      = softmax(z)_v - [v = y]

    as one dense pass (q times a per-row coefficient) and an overwrite of the K columns. The
    forward saves only per-row statistics besides z; no [N, V] tensor is built but the gradient.
    """

    @staticmethod
    def forward(ctx, z: Tensor, labels: Tensor | None, tau: float, *targets: Tensor) -> tuple[Tensor, ...]:
        lse = _logsumexp(z, tau)
        outputs, saved, lse1 = [], [], None
        if labels is not None:
            lse1 = lse if tau == 1.0 else _logsumexp(z, 1.0)
            ce = lse1 - z.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            outputs.append(torch.where(labels >= 0, ce, torch.zeros((), dtype=z.dtype)))
        for i in range(0, len(targets), 3):
            kl, keep = _sparse_kl_forward(z, tau, lse, *targets[i : i + 3])
            outputs.append(kl)
            saved += keep
        ctx.tau, ctx.has_ce = tau, labels is not None
        ctx.save_for_backward(z, lse, lse1, labels, *saved)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        z, lse, lse1, labels, *saved = ctx.saved_tensors
        tau, grads = ctx.tau, list(grads)
        g_ce = torch.where(labels >= 0, grads.pop(0), torch.zeros((), dtype=z.dtype)) if ctx.has_ce else None
        # Per-row coefficient of q_v for the columns outside every K; the columns inside some K
        # are overwritten afterwards with their exact value (no huge r/u terms cancelling there).
        base = g_ce if (g_ce is not None and tau == 1.0) else torch.zeros_like(lse)
        coef, terms = base.clone(), []
        for i in range(0, len(saved), 5):
            cols, valid, p, r, log_u = saved[i : i + 5]
            tg, a = tau * grads[i // 5], p.sum(-1) + r
            r_over_u = r * torch.exp(-log_u)
            coef += tg * (a - r_over_u)
            terms.append((cols, valid, p, tg, a, r_over_u))
        grad = torch.empty_like(z)
        for sl in _row_chunks(z):
            torch.sub(_scaled(z[sl], tau), lse[sl].unsqueeze(-1), out=grad[sl]).exp_().mul_(coef[sl].unsqueeze(-1))
        if terms:
            grad.scatter_(-1, *_kl_grad_columns(z, tau, lse, base, terms))
        if g_ce is not None and tau != 1.0:  # CE's softmax is at tau = 1: its own dense pass, after the overwrite
            for sl in _row_chunks(z):
                grad[sl].add_((z[sl] - lse1[sl].unsqueeze(-1)).exp_().mul_(g_ce[sl].unsqueeze(-1)))
        if g_ce is not None:
            grad.scatter_add_(-1, labels.clamp_min(0).unsqueeze(-1), -g_ce.unsqueeze(-1))
        return (grad, None, None, *([None] * (3 * len(terms))))


def sparse_kl(logits: Tensor, targets: SparseDist, tau: float = 1.0) -> Tensor:
    """Forward KL(p_teacher || q_student) with the tail bucket, per position.

    logits [..., V]; targets.ids / probs [..., K], tail [...]  ->  [...]. tau divides the
    student's logits (the sparse teacher is already a distribution) and the KL is scaled by tau^2.
    """
    shape, vocab, k = logits.shape[:-1], logits.shape[-1], targets.ids.shape[-1]
    flat = _upcast(logits.reshape(-1, vocab))
    (kl,) = _SparseKD.apply(
        flat, None, tau, targets.ids.reshape(-1, k), targets.probs.reshape(-1, k), targets.tail.reshape(-1)
    )
    return kl.reshape(shape)


# ---------------------------------------------------------------- dense targets


def _log_probs(logits: Tensor, tau: float) -> Tensor:
    x = _upcast(logits)
    return F.log_softmax(x / tau if tau != 1.0 else x, -1)


def _kl_logspace(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last axis from log-probabilities; 0 log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def dense_kl(logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    """Forward KL(p_teacher || q_student) per position: logits, teacher_logits [..., V] -> [...], times tau^2."""
    return _kl_logspace(_log_probs(teacher_logits, tau), _log_probs(logits, tau)) * tau**2


def reverse_kl(logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    """Reverse KL(q_student || p_teacher) per position: [..., V] -> [...], times tau^2 (mode seeking)."""
    return _kl_logspace(_log_probs(logits, tau), _log_probs(teacher_logits, tau)) * tau**2


def generalized_jsd(logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, tau: float = 1.0) -> Tensor:
    """Generalized Jensen-Shannon divergence per position: [..., V] -> [...], times tau^2.

    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, with p the
    teacher and q the student; beta = 0.5 is the symmetric JSD. Both ends (beta -> 0 or 1)
    vanish, so beta must lie strictly inside (0, 1): use `dense_kl` / `reverse_kl` for the
    limits' directions.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized_jsd: beta={beta!r} must be in (0, 1)")
    log_p = _log_probs(teacher_logits, tau)
    log_q = _log_probs(logits, tau)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return (beta * _kl_logspace(log_p, log_m) + (1 - beta) * _kl_logspace(log_q, log_m)) * tau**2


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """-log q(label) per position: logits [..., V], labels [...] -> [...]; 0 where label == -100."""
    flat = _upcast(logits.reshape(-1, logits.shape[-1]))
    ce = F.cross_entropy(flat, labels.reshape(-1).long(), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.reshape(labels.shape)


# ---------------------------------------------------------------- the objective


def _shift(x: Tensor, fill: float) -> Tensor:
    """Move aligned-with-input tensors [B, T, ...] one step left: position t gets t+1's value."""
    pad = x.new_full((x.shape[0], 1, *x.shape[2:]), fill)
    return torch.cat([x[:, 1:], pad], 1)


def _flat_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    flat = x.reshape(-1, *x.shape[2:])
    return flat if rows is None else flat.index_select(0, rows)


def objective(
    logits: Tensor,
    labels: Tensor,
    prior: SparseDist | None = None,
    target: SparseDist | None = None,
    *,
    lambda_ce: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.0,
    tau: float = 1.0,
    weights: Tensor | None = None,
) -> LossOutput:
    """L = lambda_ce * CE + alpha * KL(p_prior || p_S) + beta * KL(p_target || p_S), summed over response tokens.

    logits [B, T, V] straight from the model; labels [B, T] aligned with input_ids (-100: no
    target); prior / target sparse targets aligned with the labels (ids / probs [B, T, K],
    tail [B, T]: the distribution of the token at that label position); weights [B] or [B, T]
    scale the KL terms (Proxy-KD's per-sample weights), never the CE. The causal shift (logits
    at t predict the label at t+1) happens here.

    Every term goes through one fused autograd function (`_SparseKD`): one logsumexp pass over
    the rows in the forward, one softmax pass writing the gradient in the backward, and O(K)
    work per row for the targets; the only [N, V] tensor it builds is the gradient. A KD step
    therefore costs what an SFT step costs (bench/train.py). With tau != 1 and lambda_ce > 0,
    CE's softmax at tau = 1 adds a second pass each way. Returns the SUM over target tokens
    (divide by n_tokens for the mean) and, in `parts`, each term's sum.
    """
    batch, length, _ = logits.shape
    next_labels = _shift(labels, IGNORE_INDEX)
    mask = next_labels != IGNORE_INDEX
    # Selecting the target rows costs a copy of them (and its backward); worth it only when
    # many positions are prompt or padding. Otherwise compute every row and mask afterwards.
    rows = mask.reshape(-1).nonzero().squeeze(-1) if mask.float().mean() < 0.5 else None
    z = _upcast(_flat_rows(logits, rows))
    row_mask = _flat_rows(mask, rows)
    names, coefs, flat_targets = [], [], []
    if lambda_ce:
        names.append("ce")
        coefs.append(lambda_ce)
    for name, coef, t in (("prior", alpha, prior), ("target", beta, target)):
        if coef and t is None:
            raise ValueError(f"objective: {name} weight {coef} is non-zero but no {name} targets were given")
        if coef:
            names.append(name)
            coefs.append(coef)
            flat_targets += [_flat_rows(_shift(x, fill), rows) for x, fill in zip(t, (-1, 0.0, 0.0))]
    y = _flat_rows(next_labels, rows).long().clamp_min(-1) if lambda_ce else None
    per_token = _SparseKD.apply(z, y, tau, *flat_targets) if names else ()

    w = None
    if weights is not None:
        # Per-sample weights need no shift; per-token ones are aligned with the labels.
        w = weights.reshape(batch, 1).expand(batch, length) if weights.dim() == 1 else _shift(weights, 0.0)
        w = _flat_rows(w, rows)
    loss = z.new_zeros(())
    parts: dict[str, Tensor] = {}
    for name, coef, values in zip(names, coefs, per_token):
        # Weights scale the distillation terms only: CE on the teacher's own tokens is the hard
        # label every mode keeps whole (Proxy-KD: "hard labels and weighted soft logits").
        total, _ = masked_sum(values, row_mask, None if name == "ce" else w)
        loss = loss + coef * total
        parts[name] = total.detach()
    return LossOutput(loss, mask.sum(), parts)


def sparse_targets_from_batch(batch: Mapping[str, Tensor], name: str) -> SparseDist | None:
    """The `name` target set of a batch (keys `{name}_ids`, `{name}_probs`, `{name}_tail`), if present."""
    if f"{name}_ids" not in batch:
        return None
    return SparseDist(batch[f"{name}_ids"], batch[f"{name}_probs"], batch[f"{name}_tail"])


def make_loss_fn(
    lambda_ce: float = 1.0, alpha: float = 0.0, beta: float = 0.0, tau: float = 1.0
) -> Callable[[Tensor, Mapping[str, Tensor]], LossOutput]:
    """The training loop's `loss_fn(logits, batch) -> LossOutput` for `objective`.

    Reads `labels` [B, T], optional `weights` [B] or [B, T], and the `prior_*` / `target_*`
    sparse targets [B, T, K] that `data.Collator` places at the label positions.
    """

    def loss_fn(logits: Tensor, batch: Mapping[str, Tensor]) -> LossOutput:
        return objective(
            logits,
            batch["labels"],
            sparse_targets_from_batch(batch, "prior"),
            sparse_targets_from_batch(batch, "target"),
            lambda_ce=lambda_ce,
            alpha=alpha,
            beta=beta,
            tau=tau,
            weights=batch.get("weights"),
        )

    return loss_fn
