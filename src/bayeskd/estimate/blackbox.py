"""Fidelity without an oracle, and the posterior's hyperparameters fitted by it (docs/method.md, section 5).

A closed teacher shows no distribution, but its sampled tokens are draws from it. For an
estimate q built without the scored token,

    E_{y ~ p_T}[-log q(y)] = H(p_T) + KL(p_T || q)

and H(p_T) is the same for every estimate, so the mean NLL of the teacher's own tokens on
positions nothing was trained on ranks estimates as the oracle KL does, up to sampling noise.
"Without the scored token" rules out the one-hot and the control, and the sampled token's own
logprob, which an API adds when it is not among the top-k (`EvidenceMapper.evidence(sampled=False)`
leaves it out); the top-k itself depends on the prefix only, so it may stay. The identity also
assumes that the student's tokens of the teacher's text are the path the teacher sampled: true
when they share a tokenizer and the teacher's samples tokenize canonically (a trained model's
nearly always do; an untrained tiny model's often do not), approximate across tokenizers.

`fit` chooses the prior's order and mu, the proxy's strength M and temperature tau_P of the
posterior by this NLL on the validation split (`data.validation_fraction`: prompts neither
trained on nor evaluated), over the grids `posterior.fit_*`. The posterior is exact at the
realised token and the API's top-k ids, so each grid point costs O(P (E + 1)):

    q(y) = p_T(y)                                    if y is one of the API's top-k
    q(y) = p_post(y) (1 - sum_k p_T) / (1 - sum_k p_post)   otherwise (`distributions.apply_evidence`)
    p_post = (kappa p_prior + M p_P) / (kappa + M)    (the `expected` update; `sampled` has the same mean)
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from bayeskd.estimate import distributions as D
from bayeskd.estimate import ngram
from bayeskd.estimate.prior import NGramPrior
from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.corpus import TokenizedCorpus
from bayeskd.errors import BayeskdError
from bayeskd.estimate.update import evidence_in_target, evidence_top, record_evidence, sampling_of
from bayeskd.estimate.evidence import EvidenceMapper

FLOOR = 1e-30


def nll(q_y: np.ndarray) -> float:
    """Mean -log q(y) over positions: the black-box fidelity of an estimate (lower is closer)."""
    return float(-np.log(np.maximum(np.asarray(q_y, dtype=np.float64), FLOOR)).mean()) if len(q_y) else float("nan")


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Rank agreement of two scorings of the same estimates: 1 when they order every pair alike."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        return float("nan")
    return sum(float(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])) for i, j in pairs) / len(pairs)


@dataclasses.dataclass
class Positions:
    """The validation positions as black-box scoring reads them: no oracle, only the teacher's samples."""

    contexts: np.ndarray  # [P, n-1]
    cand: np.ndarray  # [P, 1 + E]: the realised token, then the API's top-k ids (PAD where none)
    ev_probs: dict[float, np.ndarray]  # tau_P -> [P, E]: those ids' probabilities in the sampled
    #   distribution (0 where none); raw logprobs converted with the proxy at tau_P shaping the
    #   unlisted mass, as the posterior stage does (`estimate.evidence_in_target`)
    proxy: dict[float, np.ndarray]  # tau_P -> p_P at `cand` [P, 1 + E]


def gather(cfg: Config, corpus: TokenizedCorpus, proxy, split: str = "validation") -> Positions:
    """Contexts, candidates, evidence and the proxy's probabilities at up to `posterior.fit_positions` positions."""
    p = cfg.posterior
    indices = corpus.indices(split)
    if not indices:
        raise BayeskdError(
            f"posterior.fit=auto needs a {split} split: set data.validation_fraction > 0 (e.g. 0.1)"
        )
    mapper = EvidenceMapper(corpus.tokenizer) if p.use_logprobs else None
    vocab, width = len(corpus.tokenizer), 21
    taus = sorted(set(p.fit_proxy_temperature) | {p.proxy_temperature})
    sampling = sampling_of(cfg)
    ctx, cand, ev_p, prox = [], [], {t: [] for t in taus}, {t: [] for t in taus}
    n = 0
    for rb in corpus.batches(indices, p.batch_size, f"posterior: fit ({split})"):
        if n >= p.fit_positions:
            break
        for row, y, z in zip(rb.rows, rb.labels(), rb.logits(proxy)):
            y = y.numpy()
            ids = np.asarray(row["input_ids"])
            ctx.append(ngram.contexts(ids[: len(ids) - len(y)], y, cfg.prior.order, vocab))
            ev = record_evidence(mapper, corpus.records[row["index"]], corpus.tokenizer, cfg.data.template, len(y),
                                 evidence_top(cfg), sampled=False)  # fmt: skip
            e_ids = np.full((len(y), width), -1, np.int64)
            if ev is not None:
                e_ids[:, : ev[0].shape[1]] = ev[0]
            c = np.concatenate([y[:, None].astype(np.int64), e_ids], 1)
            cand.append(c)
            safe = torch.from_numpy(np.where(c >= 0, c, 0))
            for t in taus:
                dense = torch.softmax(z / t, -1)
                prox[t].append(dense.gather(1, safe).double().numpy())
                e_p = np.zeros((len(y), width))
                if ev is not None:
                    e_p[:, : ev[1].shape[1]] = evidence_in_target(ev, sampling, None if sampling.identity else dense)[1]
                ev_p[t].append(e_p)
            n += len(y)
    cut = slice(0, p.fit_positions)
    return Positions(np.concatenate(ctx)[cut], np.concatenate(cand)[cut], {t: np.concatenate(v)[cut] for t, v in ev_p.items()},
                     {t: np.concatenate(v)[cut] for t, v in prox.items()})  # fmt: skip


def posterior_at_y(prior_c: np.ndarray, kappa: np.ndarray, m: float, tau: float, pos: Positions) -> np.ndarray:
    """q(y) [P] of the expected update (proxy at temperature tau) with the API's top-k applied, from values at `pos.cand`."""
    return evidence_at_y(D.expected(prior_c, pos.proxy[tau], kappa, m), pos.cand, pos.ev_probs[tau])


def evidence_at_y(post: np.ndarray, cand: np.ndarray, ev_probs: np.ndarray) -> np.ndarray:
    """q(y) [P] once the API's top-k fix their tokens, from any estimate `post` [P, 1 + E] at
    `cand` (the realised token, then the evidence ids; PAD where none) and the API's `ev_probs` [P, E]."""
    valid = cand >= 0
    post = np.where(valid, post, 0.0)
    ev = valid[:, 1:]
    s_teacher = ev_probs.sum(1)
    s_post = post[:, 1:].sum(1)
    y_in_topk = (cand[:, 1:] == cand[:, :1]) & ev
    teacher_y = (ev_probs * y_in_topk).sum(1)
    scale = np.where(ev.any(1), (1.0 - s_teacher) / np.maximum(1.0 - s_post, 1e-12), 1.0)
    return np.where(y_in_topk.any(1), teacher_y, post[:, 0] * scale)


def fit(cfg: Config, corpus: TokenizedCorpus, table: ngram.NGramTable, proxy) -> dict:
    """The (order, mu, M, tau_P) with the lowest black-box NLL on the validation split, and the grid's scores."""
    p = cfg.posterior
    if p.mode == "product":
        raise BayeskdError("posterior.fit=auto fits the expected (and sampled) update; with mode product set fit=none")
    orders = p.fit_orders or list(range(1, table.order + 1))
    if max(orders) > table.order:
        raise BayeskdError(f"posterior.fit_orders={orders}: the prior's tables hold orders up to {table.order} (prior.order)")
    # The configured values are always a grid point: the fit never chooses worse than them on validation.
    orders, mus, ms = (sorted(set(g) | {v}) for g, v in ((orders, cfg.prior.order), (p.fit_mu, cfg.prior.mu), (p.fit_m, p.m)))
    pos = gather(cfg, corpus, proxy)
    safe = np.where(pos.cand >= 0, pos.cand, 0)
    grid = []
    for order, mu in itertools.product(orders, mus):
        prior = NGramPrior(table, mu=mu, order=order)
        prior_c = prior.prob(pos.contexts, safe)
        kappa = prior.query(pos.contexts, 1).kappa
        for tau, m in itertools.product(sorted(pos.proxy), ms):
            q = posterior_at_y(prior_c, kappa, m, tau, pos)
            grid.append({"order": order, "mu": mu, "proxy_temperature": tau, "m": m, "nll": nll(q)})
    best = min(grid, key=lambda g: g["nll"])
    default = {"order": cfg.prior.order, "mu": cfg.prior.mu, "proxy_temperature": p.proxy_temperature, "m": p.m}
    at_default = [g for g in grid if all(g[k] == v for k, v in default.items())]  # one: it is a grid point
    return {
        "chosen": {k: best[k] for k in ("order", "mu", "m", "proxy_temperature")},
        "nll": best["nll"],
        "nll_at_configured": at_default[0]["nll"],
        "positions": int(len(pos.cand)),
        "with_logprobs": bool((pos.cand[:, 1:] >= 0).any()),
        "grid": sorted(grid, key=lambda g: g["nll"]),
    }


def effective(cfg: Config, run: Run) -> Config:
    """The config with the values `posterior.fit: auto` chose (recorded in the posterior's manifest), if any."""
    chosen = ((run.manifest("posterior") or {}).get("summary") or {}).get("fit", {}).get("chosen")
    return with_values(cfg, chosen) if chosen else cfg


def with_values(cfg: Config, chosen: dict) -> Config:
    prior = dataclasses.replace(cfg.prior, order=int(chosen["order"]), mu=float(chosen["mu"]))
    posterior = dataclasses.replace(cfg.posterior, m=float(chosen["m"]), proxy_temperature=float(chosen["proxy_temperature"]))
    return dataclasses.replace(cfg, prior=prior, posterior=posterior)
