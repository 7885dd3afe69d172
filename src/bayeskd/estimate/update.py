"""The estimate of the teacher's token distributions: the prior, the proxy's evidence and the update.

At a response position t (docs/method.md, sections 1-2) the prior is Dir(kappa_t p_prior,t),
the proxy's distribution p_P,t = softmax(z_P / tau_P) is worth M pseudo-observations, and

    expected:  p_post = (kappa p_prior + M p_P) / (kappa + M)
    sampled:   p_post = (kappa p_prior + c) / (kappa + M),    c ~ Multinomial(M, p_P)
    product:   p_post proportional to p_prior^a p_P^b
    + teacher: p_post = (A p_post + c_T) / (A + n_T),        A = kappa + M (kappa for `product`)

after which the teacher's own top-k logprobs, where the API returned them, fix their tokens
(`distributions.apply_evidence`). `update` is the one switch over the modes; it works on any
candidate set: the sparse candidates of `estimate` (the posterior stage and probe) or the
whole vocabulary (the dense fidelity measures of `eval`).
"""

from __future__ import annotations

import numpy as np
import torch

from bayeskd.estimate import distributions as D
from bayeskd.estimate import ngram
from bayeskd.estimate.prior import NGramPrior
from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.estimate.config import PosteriorConfig
from bayeskd.data import render
from bayeskd.estimate.evidence import EvidenceMapper

TARGET_SETS = ("prior", "posterior", "proxy", "topk")
"""The sparse target sets a target store holds, per response token (`topk`: the API's own top-k)."""


def sampling_of(cfg: Config) -> D.Sampling:
    """The conversion the API's logprobs need to describe the distribution `collect` sampled from
    (the estimate's target, `distributions.Sampling`): none when the API reports that one."""
    if cfg.teacher.logprobs_are == "sampled":
        return D.Sampling()
    return D.Sampling(cfg.collect.temperature, cfg.collect.top_p)


def evidence_in_target(
    evidence: tuple[np.ndarray, np.ndarray] | None, sampling: D.Sampling, shape: np.ndarray | torch.Tensor | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The API's top-k (ids, probs) with its probabilities moved to the sampling distribution.

    `shape` [P, V]: a dense estimate whose values outside the top-k give the unlisted mass its
    shape (the proxy's, for the posterior); None treats that mass as one token (`topk-kd`, which
    reads no proxy). See `distributions.to_sampling`."""
    if evidence is None or sampling.identity:
        return evidence
    ids, probs = evidence
    if shape is None:
        power = np.ones(len(ids))
    else:
        dense = shape.double().numpy() if isinstance(shape, torch.Tensor) else shape
        power = D.tail_power(dense, ids, sampling.temperature)
    return ids, D.to_sampling(probs, sampling, power)


def load_prior(cfg: Config, run: Run) -> NGramPrior:
    """The prior of a run: its `prior` stage's tables, queried with `prior.*`."""
    table = ngram.NGramTable.load(run.output("prior", "tables"))
    return NGramPrior(table, mu=cfg.prior.mu, order=cfg.prior.order, smoothing=cfg.prior.smoothing)


def proxy_strength(cfg: PosteriorConfig) -> float:
    """M, the proxy's pseudo-counts in the Dirichlet; `product` has none (its strength is kappa alone)."""
    return 0.0 if cfg.mode == "product" else float(cfg.m)


def response_spans(record: dict, tokenizer, template: str, n: int) -> list[tuple[int, int]]:
    """Character spans, relative to the response text, of the example's first n response tokens."""
    prompt, full = render(record, tokenizer, template)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    base = len(prompt)
    spans = [(a - base, b - base) for a, b in offsets if b > base]
    spans += [(len(record["text"]), len(record["text"]))] * max(0, n - len(spans))  # an appended EOS
    return spans[:n]


def record_evidence(
    mapper: EvidenceMapper | None, record: dict, tokenizer, template: str, n: int, top: int | None = None,
    sampled: bool = True,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The teacher's top-k logprobs of a record on its first n response tokens (ids, probs [n, E]), or None.

    None when logprobs are not used (no mapper), `top` is 0, or the API returned none for this
    record; the mapper still counts the positions, so that its summary's shares are of all
    positions. `top` and `sampled`: see `EvidenceMapper.evidence`."""
    if mapper is None:
        return None
    if not record.get("tokens") or top == 0:
        mapper.stats["positions"] += n
        return None
    spans = response_spans(record, tokenizer, template, n)
    ended = record.get("finish_reason") == "stop"
    return mapper.evidence(record["text"], record["tokens"], spans, top=top, sampled=sampled, ended=ended)


def evidence_top(cfg: Config) -> int | None:
    """How many of the API's alternatives per token the evidence reads: `posterior.top_logprobs`, or
    (null) the k that collect asked for. A server may list more (llama.cpp adds the sampled token
    as a k + 1-th, which must not count as one of the top k); the client cuts them since, but
    corpora collected before were stored with it."""
    top = cfg.posterior.top_logprobs
    return top if top is not None else (cfg.collect.top_logprobs or None)


def topk_targets(evidence: tuple[np.ndarray, np.ndarray] | None, n: int, sampling: D.Sampling = D.Sampling()) -> D.SparseDist:
    """The API's own top-k at each of n positions, the rest of its mass as the tail: `topk-kd`'s target.

    No prior, no proxy: what sparse-logit KD toolkits train on. Its probabilities are those of
    the sampling distribution (`sampling`; the unlisted mass counted as one token, since no
    estimate gives it a shape). A position without evidence gets an empty target (no ids, tail
    1), whose KL to any student is 0: it adds no loss there."""
    if evidence is None:
        return D.SparseDist(np.full((n, 1), D.PAD, np.int32), np.zeros((n, 1)), np.ones(n))
    ids, probs = evidence_in_target(evidence, sampling, None)
    return D.SparseDist(ids.astype(np.int32), probs, np.clip(1 - probs.sum(1), 0, 1))


def record_generator(seed: int, record_index: int) -> torch.Generator:
    """The generator of `sampled` mode's draws for one corpus record: seeded by (seed, record), so
    that a record gets the same draws whichever process scores it and whatever came before it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + record_index) % 2**63)


def update(
    prior: np.ndarray, proxy: np.ndarray, kappa: np.ndarray, cfg: PosteriorConfig, generator: torch.Generator | None
) -> np.ndarray:
    """The posterior mean on a candidate set, from the prior's and the proxy's exact probabilities there.

    prior, proxy [N, C] (0 on unused slots); kappa [N]. The candidates may be the whole
    vocabulary (C = V) or a subset; whatever mass a side has outside them is its tail.
    """
    if cfg.mode == "expected" or (cfg.mode == "sampled" and np.isinf(cfg.m)):  # infinitely many draws: their mean
        return D.expected(prior, proxy, kappa, cfg.m)
    if cfg.mode == "sampled":
        # M draws from the proxy, counted on the candidates: drawing over the candidates plus one
        # "any other token" bucket gives the candidates' counts exactly the same distribution as
        # drawing over the whole vocabulary, at the cost of C + 1 categories instead of V.
        m = int(cfg.m)
        counts = np.zeros_like(prior)
        if m:
            other = np.clip(1 - proxy.sum(1, keepdims=True), 0, 1)
            cats = torch.from_numpy(np.concatenate([proxy, other], 1))
            draws = torch.multinomial(cats.clamp_min(0) + 1e-300, m, replacement=True, generator=generator)
            counts = torch.zeros(cats.shape, dtype=torch.float64).scatter_add_(1, draws, torch.ones(draws.shape, dtype=torch.float64))
            counts = counts[:, :-1].numpy()
        return D.sampled(prior, counts, kappa, m)
    return D.product(prior, proxy, 1 - prior.sum(1), 1 - proxy.sum(1), cfg.a, cfg.b)


def estimate(
    prior: NGramPrior,
    contexts: np.ndarray,
    loo: np.ndarray | None,
    proxy_logits: torch.Tensor | D.SparseDist,
    cfg: PosteriorConfig,
    k_prior: int,
    evidence: tuple[np.ndarray, np.ndarray] | None = None,
    generator: torch.Generator | None = None,
    teacher_counts: tuple[np.ndarray, np.ndarray] | None = None,
    sampling: D.Sampling = D.Sampling(),
) -> tuple[dict[str, D.SparseDist], np.ndarray]:
    """Prior, posterior and proxy targets at P positions (sparse, `TARGET_SETS`), and the posterior's entropy.

    contexts [P, n-1]; loo [P] the positions' own tokens for leave-one-out (or None);
    proxy_logits [P, V], or a served proxy's top-k (`served`: its unlisted mass stays the
    proxy's tail, so that it adds nothing to any candidate it did not list); evidence (ids [P, E], probs [P, E]) from the teacher's logprobs;
    teacher_counts (ids [P, S], counts [P, S], PAD / 0 where unused): the teacher's own samples
    at each prefix (stage `probe`), added to the Dirichlet before the logprob evidence.
    `sampling`: how the API's logprobs relate to the distribution the teacher sampled (and the
    estimate targets); the proxy's distribution shapes the mass the API left unlisted.
    The posterior is exact on the candidates: the union of the prior's top `k_prior`, the
    proxy's top `cfg.top_k` and every evidence and counted id.
    """
    pb = prior.query(contexts, k_prior, targets=loo)
    if isinstance(proxy_logits, D.SparseDist):  # a served proxy's top-k: unlisted tokens are its tail
        proxy = _sparse_proxy(proxy_logits, cfg.top_k)
        top_ids = torch.from_numpy(proxy.ids.astype(np.int64))
        vocab = max(int(prior.V), int(np.max(proxy_logits.ids, initial=0)) + 1)
        probs = _dense_of_sparse(proxy_logits, vocab, spread=False)
        shape = None if sampling.identity else _dense_of_sparse(proxy_logits, vocab, spread=True)
    else:
        z = proxy_logits.float()
        logp = torch.log_softmax(z if cfg.proxy_temperature == 1.0 else z / cfg.proxy_temperature, dim=-1)
        top_lp, top_ids = logp.topk(cfg.top_k, dim=-1)
        top_p = top_lp.exp().double().numpy()
        proxy = D.SparseDist(top_ids.numpy().astype(np.int32), top_p, np.clip(1 - top_p.sum(1), 0, 1))
        probs = logp.exp()
        shape = None if sampling.identity else probs
    sets = [pb.ids, top_ids.numpy()]
    if evidence is not None:
        sets.append(evidence[0])
    if teacher_counts is not None:
        sets.append(teacher_counts[0])
    cand = D.union_ids(*sets)
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    prior_c = np.where(valid, prior.prob(contexts, safe, targets=loo), 0.0)
    proxy_c = np.where(valid, probs.gather(1, torch.from_numpy(safe)).double().numpy(), 0.0)
    post = update(prior_c, proxy_c, pb.kappa, cfg, generator)
    if teacher_counts is not None:
        post = D.add_counts(post, D.counts_on(cand, *teacher_counts), pb.kappa + proxy_strength(cfg))
    if evidence is not None:
        post = D.apply_evidence(post, cand, *evidence_in_target(evidence, sampling, shape))
    posterior = D.top_k(cand, post, cfg.top_k)
    dists = {"prior": D.SparseDist(pb.ids, pb.probs, pb.tail), "posterior": posterior, "proxy": proxy}
    return dists, D.entropy(posterior)


def _sparse_proxy(dist: D.SparseDist, k: int) -> D.SparseDist:
    """A served proxy's listed tokens, its K likeliest (sorted), as the `proxy` target: the rest is its tail."""
    ids, probs = np.asarray(dist.ids), np.asarray(dist.probs, dtype=np.float64)
    order = np.argsort(-np.where(ids >= 0, probs, -1.0), axis=1, kind="stable")[:, :k]
    ids, probs = np.take_along_axis(ids, order, 1), np.take_along_axis(probs, order, 1)
    probs = np.where(ids >= 0, probs, 0.0)
    return D.SparseDist(ids.astype(np.int32), probs, np.clip(1 - probs.sum(1), 0, 1))


def _dense_of_sparse(dist: D.SparseDist, vocab: int, spread: bool) -> torch.Tensor:
    """[P, V] of a sparse proxy: its listed probabilities, and elsewhere 0 (`spread` False: the
    candidates' values, the unlisted mass left in the tail) or the tail spread evenly (True: the
    shape the API's unlisted mass takes in `evidence_in_target`)."""
    ids, probs = np.asarray(dist.ids), np.asarray(dist.probs, dtype=np.float64)
    if spread:
        return torch.from_numpy(dist.dense(vocab))
    out = np.zeros((len(ids), vocab))
    rows, cols = np.nonzero(ids >= 0)
    out[rows, ids[rows, cols]] = probs[rows, cols]
    return torch.from_numpy(out)
