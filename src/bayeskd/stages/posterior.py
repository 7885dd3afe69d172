"""Stage `posterior`: per response token, the prior updated with the aligned proxy's evidence.

For every example of the corpus (training prompts with the prior's leave-one-out when
`prior.leave_one_out`, held-out prompts as they are: their counts are not in the tables),
the proxy runs once over the sequence; at each response position the prior's top-K, tail
and kappa and the proxy's distribution combine as `posterior.mode` says (see
`distributions`), then the teacher's own top-k logprobs, where collect stored them, fix
their tokens' probabilities. Written to `posterior/targets/` (see `targets`): the `prior`,
`posterior` and `proxy` target sets, the posterior's entropy per token, and per record the
proxy's mean log-likelihood of the teacher's response (Proxy-KD's sample weights).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from bayeskd import distributions as D
from bayeskd import ngram
from bayeskd.artifacts import Run, fingerprint_file
from bayeskd.config import Config, PosteriorConfig
from bayeskd.data import Collator, is_heldout, render
from bayeskd.evidence import EvidenceMapper
from bayeskd.models import load_causal_lm
from bayeskd.stages.corpus import TokenizedCorpus, load_corpus
from bayeskd.stages.proxy import check_same_tokenizer
from bayeskd.targets import TargetWriter

SETS = ("prior", "posterior", "proxy")


def load_prior(cfg: Config, run: Run) -> ngram.NGramPrior:
    table = ngram.NGramTable.load(run.output("prior", "tables"))
    return ngram.NGramPrior(table, mu=cfg.prior.mu, order=cfg.prior.order, smoothing=cfg.prior.smoothing)


def estimate(
    prior: ngram.NGramPrior,
    contexts: np.ndarray,
    loo: np.ndarray | None,
    proxy_logits: torch.Tensor,
    cfg: PosteriorConfig,
    k_prior: int,
    evidence: tuple[np.ndarray, np.ndarray] | None = None,
    generator: torch.Generator | None = None,
    teacher_counts: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, D.SparseDist], np.ndarray]:
    """Prior, posterior and proxy targets at P positions, and the posterior's entropy.

    contexts [P, n-1]; loo [P] the positions' own tokens for leave-one-out (or None);
    proxy_logits [P, V]; evidence (ids [P, E], probs [P, E]) from the teacher's logprobs;
    teacher_counts (ids [P, S], counts [P, S], PAD / 0 where unused): the teacher's own samples
    at each prefix (stage `probe`), added to the Dirichlet before the logprob evidence.
    """
    pb = prior.query(contexts, k_prior, targets=loo)
    z = proxy_logits.float()
    logp = torch.log_softmax(z if cfg.proxy_temperature == 1.0 else z / cfg.proxy_temperature, dim=-1)
    top_lp, top_ids = logp.topk(cfg.top_k, dim=-1)
    sets = [pb.ids, top_ids.numpy()]
    if evidence is not None:
        sets.append(evidence[0])
    if teacher_counts is not None:
        sets.append(teacher_counts[0])
    cand = D.union_ids(*sets)
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    prior_c = np.where(valid, prior.prob(contexts, safe, targets=loo), 0.0)
    proxy_c = np.where(valid, logp.gather(1, torch.from_numpy(safe)).exp().double().numpy(), 0.0)
    if cfg.mode == "expected":
        post = D.expected(prior_c, proxy_c, pb.kappa, cfg.m)
    elif cfg.mode == "sampled":
        # M draws from the proxy, counted on the candidates: drawing over the candidates plus one
        # "any other token" bucket gives the candidates' counts exactly the same distribution as
        # drawing over the whole vocabulary, at the cost of C + 1 categories instead of V.
        m = int(cfg.m)
        counts = np.zeros_like(prior_c)
        if m:
            cats = torch.from_numpy(np.concatenate([proxy_c, np.clip(1 - proxy_c.sum(1, keepdims=True), 0, 1)], 1))
            draws = torch.multinomial(cats.clamp_min(0) + 1e-300, m, replacement=True, generator=generator)
            counts = torch.zeros(cats.shape, dtype=torch.float64).scatter_add_(1, draws, torch.ones(draws.shape, dtype=torch.float64))
            counts = counts[:, :-1].numpy()
        post = D.sampled(prior_c, counts, pb.kappa, m)
    else:
        post = D.product(prior_c, proxy_c, 1 - prior_c.sum(1), 1 - proxy_c.sum(1), cfg.a, cfg.b)
    if teacher_counts is not None:
        c_t = D.counts_on(cand, *teacher_counts)
        # (kappa p_prior + M p_P + c_T) / (kappa + M + n_T): the update above, with the teacher's
        # counts added; `product` has no pseudo-count of its own, so its strength is kappa alone.
        strength = pb.kappa + (0.0 if cfg.mode == "product" else cfg.m)
        post = D.add_counts(post, c_t, strength)
    if evidence is not None:
        post = D.apply_evidence(post, cand, *evidence)
    posterior = D.top_k(cand, post, cfg.top_k)
    top_p = top_lp.exp().double().numpy()
    dists = {
        "prior": D.SparseDist(pb.ids, pb.probs, pb.tail),
        "posterior": posterior,
        "proxy": D.SparseDist(top_ids.numpy().astype(np.int32), top_p, np.clip(1 - top_p.sum(1), 0, 1)),
    }
    return dists, D.entropy(posterior)


def response_spans(record: dict, tokenizer, template: str, n: int) -> list[tuple[int, int]]:
    """Character spans, relative to the response text, of the example's first n response tokens."""
    prompt, full = render(record, tokenizer, template)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    base = len(prompt)
    spans = [(a - base, b - base) for a, b in offsets if b > base]
    spans += [(len(record["text"]), len(record["text"]))] * max(0, n - len(spans))  # an appended EOS
    return spans[:n]


def run_posterior(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    proxy_dir = run.output("proxy", "final")
    check_same_tokenizer(str(proxy_dir), cfg.student_model, corpus.tokenizer_fp, "proxy")
    stage_cfg = {
        "posterior": asdict(cfg.posterior),
        "prior": cfg.prior.identity(),
        "data": cfg.data.identity(),
    }
    inputs = {
        "corpus": corpus.corpus_fp,
        "tokenizer": corpus.tokenizer_fp,
        "prior": (run.manifest("prior") or {}).get("fingerprint", ""),
        "proxy": fingerprint_file(proxy_dir / "model.safetensors"),
    }
    out = run.begin("posterior", stage_cfg, inputs, force)
    if out is None:
        return None
    summary = _compute(cfg, corpus, load_prior(cfg, run), load_causal_lm(str(proxy_dir)), out, inputs)
    run.finish("posterior", "done", summary, {"targets": corpus.tokenizer_fp})
    return summary


def _compute(cfg: Config, corpus: TokenizedCorpus, prior: ngram.NGramPrior, proxy, out, inputs: dict) -> dict:
    p = cfg.posterior
    data = corpus.dataset
    vocab = len(corpus.tokenizer)
    contexts, targets = ngram.corpus_contexts(corpus.docs(data), prior.order, vocab)
    starts = np.concatenate([[0], np.cumsum(data["n_response"])])
    mapper = EvidenceMapper(corpus.tokenizer) if p.use_logprobs else None
    writer = TargetWriter(out / "targets", SETS, p.top_k)
    collate = Collator(corpus.tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(p.seed)
    loglik = np.full(len(corpus.records), np.nan)
    t_proxy = t_total = 0.0
    entropies = []
    for lo in tqdm(range(0, len(data), p.batch_size), desc="posterior", unit="batch", dynamic_ncols=True):
        t0 = time.perf_counter()
        rows = [data[i] for i in range(lo, min(lo + p.batch_size, len(data)))]
        batch = collate(rows)
        with torch.inference_mode():
            logits = proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_proxy += time.perf_counter() - t0
        for b, row in enumerate(rows):
            pos = torch.nonzero(batch["labels"][b] != -100).squeeze(-1)
            z = logits[b, pos - 1]  # the logits at t-1 predict the token at t
            sl = slice(int(starts[lo + b]), int(starts[lo + b + 1]))
            record = corpus.records[row["index"]]
            train_pos = not is_heldout(row["prompt_id"], cfg.data.heldout_fraction)
            loo = targets[sl] if cfg.prior.leave_one_out and train_pos else None
            ev = None
            if mapper is not None and record.get("tokens"):
                spans = response_spans(record, corpus.tokenizer, cfg.data.template, len(pos))
                ev = mapper.evidence(record["text"], record["tokens"], spans)
            elif mapper is not None:
                mapper.stats["positions"] += len(pos)
            dists, ent = estimate(prior, contexts[sl], loo, z, p, cfg.prior.top_k, ev, generator)
            writer.add(row["index"], dists, ent)
            entropies.append(ent)
            labels = torch.from_numpy(targets[sl].astype(np.int64))
            zf = z.float()
            loglik[row["index"]] = float((zf.gather(1, labels[:, None]).squeeze(1) - zf.logsumexp(-1)).mean())
        t_total += time.perf_counter() - t0
    np.save(out / "proxy_loglik.npy", loglik)
    meta = {"tokenizer": corpus.tokenizer_fp, "corpus": corpus.corpus_fp, "mode": p.mode, "m": p.m, "k": p.top_k,
            "prior_tables": inputs["prior"], "proxy_checkpoint": inputs["proxy"]}
    writer.close(meta)
    from bayeskd.targets import TargetStore

    store = TargetStore.open(out / "targets")
    ent = np.concatenate(entropies) if entropies else np.zeros(0)
    return {
        "examples": len(data),
        "positions": int(len(targets)),
        "positions_per_s": len(targets) / max(t_total, 1e-9),
        "proxy_forward_share": t_proxy / max(t_total, 1e-9),
        "mean_posterior_entropy": float(ent.mean()) if len(ent) else 0.0,
        "bytes_per_entry": store.bytes_per_entry("posterior"),
        **({"evidence": mapper.summary()} if mapper else {}),
    }
