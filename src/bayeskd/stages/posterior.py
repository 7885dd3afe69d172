"""Stage `posterior`: per response token, the prior updated with the aligned proxy's evidence.

For every example of the corpus (training prompts with the prior's leave-one-out when
`prior.leave_one_out`, held-out prompts as they are: their counts are not in the tables),
the proxy runs once over the sequence; at each response position the prior's top-K, tail
and kappa and the proxy's distribution combine as `posterior.mode` says (see
`estimate`), then the teacher's own top-k logprobs, where collect stored them, fix
their tokens' probabilities (`posterior.use_logprobs`). Written to `posterior/targets/` (see
`targets`): the `prior`, `posterior` and `proxy` target sets, `topk` (the API's own top-k
alone, `topk-kd`'s target), the posterior's entropy per token, and per record the proxy's mean
log-likelihood of the teacher's response (Proxy-KD's sample weights).

With `posterior.proxy_backend: openai` the proxy is not the run's checkpoint but a model behind a
completions endpoint that echoes prompt logprobs (`estimate/served.py`): its top-k at each
response token, the rest its tail; the `proxy` stage's output is then not read.

Under `accelerate launch` each rank takes a consecutive slice of the examples (about equal
response positions) and writes its part under `posterior/.parts/rank-<k>/`; rank 0 waits for
every part and merges them into `posterior/targets/` (`targets.merge_stores`): the store one
process writes, record for record. `sampled` mode's draws are seeded per record
(`record_generator`), so they do not depend on the split either. `posterior.fit: auto` runs on
rank 0 alone; the other ranks wait for its choice.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter

import numpy as np
import torch

from bayeskd.estimate import blackbox, ngram
from bayeskd.estimate.prior import NGramPrior
from bayeskd.artifacts import Run, fingerprint_file, write_json_atomic
from bayeskd.config import Config
from bayeskd.corpus import TokenizedCorpus, load_corpus
from bayeskd.estimate.update import (
    TARGET_SETS,
    estimate,
    evidence_top,
    load_prior,
    record_evidence,
    record_generator,
    sampling_of,
    topk_targets,
)
from bayeskd.estimate.evidence import EvidenceMapper
from bayeskd.estimate.served import ServedProxy, ServedRow
from bayeskd.models import check_same_tokenizer, load_causal_lm
from bayeskd.stages import proxy_model
from bayeskd.estimate.targets import TargetStore, TargetWriter, merge_stores


def run_posterior(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    served = cfg.posterior.proxy_backend == "openai"
    if not served:
        proxy_dir = proxy_model(cfg, run)
        check_same_tokenizer(str(proxy_dir), cfg.student_model, corpus.tokenizer_fp, "proxy")
    stage_cfg = {
        "posterior": cfg.posterior.identity(),
        "prior": cfg.prior.identity(),
        "data": cfg.data.identity(),
    }
    if not sampling_of(cfg).identity:  # the API's logprobs are converted to the sampled distribution
        stage_cfg["sampling"] = sampling_of(cfg)._asdict()
    inputs = {
        "corpus": corpus.corpus_fp,
        "tokenizer": corpus.tokenizer_fp,
        "prior": (run.manifest("prior") or {}).get("fingerprint", ""),
        # A served proxy's weights are out of reach: its endpoint and name stand for them.
        "proxy": f"{cfg.posterior.proxy_base_url}#{cfg.posterior.proxy_model}" if served
        else fingerprint_file(proxy_dir / "model.safetensors"),
    }
    out = run.begin("posterior", stage_cfg, inputs, force)
    if out is None:
        return None
    launch = run.launch
    if served:  # each rank asks the endpoint for its own slice
        proxy = ServedProxy(cfg.posterior, corpus.tokenizer)
        try:
            proxy.check()
            summary = _compute(cfg, corpus, load_prior(cfg, run), proxy, out, inputs, launch)
        finally:
            proxy.close()
        if not launch.main:
            return None
        summary = {**summary, "served_proxy": proxy.summary()}
        run.finish("posterior", "done", summary, {"targets": corpus.tokenizer_fp})
        return summary
    proxy = load_causal_lm(str(proxy_dir))
    fitted = {}
    if cfg.posterior.fit == "auto":  # no oracle: the teacher's own tokens on the validation split
        result = None
        if launch.main:
            result = blackbox.fit(cfg, corpus, ngram.NGramTable.load(run.output("prior", "tables")), proxy)
            write_json_atomic(out / "fit.json", result)
        result = launch.broadcast("posterior fit", result)
        cfg = blackbox.with_values(cfg, result["chosen"])
        fitted = {"fit": {k: v for k, v in result.items() if k != "grid"}}
    computed = _compute(cfg, corpus, load_prior(cfg, run), proxy, out, inputs, launch)
    if not launch.main:
        return None
    summary = {**fitted, **computed}
    run.finish("posterior", "done", summary, {"targets": corpus.tokenizer_fp})
    return summary


PARTS = ".parts"


def _compute(cfg: Config, corpus: TokenizedCorpus, prior: NGramPrior, proxy, out, inputs: dict, launch) -> dict | None:
    """Score this rank's slice of the examples into its part (the whole store with one process);
    rank 0 then merges the parts and returns the summary, the other ranks None."""
    p = cfg.posterior
    data = corpus.dataset
    vocab = len(corpus.tokenizer)
    contexts, targets = ngram.corpus_contexts(corpus.docs(data), prior.order, vocab)
    n_response = np.asarray(data["n_response"])
    starts = np.concatenate([[0], np.cumsum(n_response)])
    lo, hi = launch.shard(n_response)
    part = out / PARTS / f"rank-{launch.rank}" if launch.distributed else out
    mapper = EvidenceMapper(corpus.tokenizer)  # the API's top-k: `topk` targets always, the posterior's evidence if asked
    writer = TargetWriter(part / "targets", TARGET_SETS, p.top_k)
    sampling = sampling_of(cfg)
    loglik = np.full(len(corpus.records), np.nan)
    t_proxy = t_total = 0.0
    entropy_sum = 0.0
    for rb in corpus.batches(range(lo, hi), p.batch_size, "posterior"):
        t0 = time.perf_counter()
        if isinstance(proxy, ServedProxy):  # top-k and the realised token's logprob, per response token
            items = [(corpus.records[row["index"]], row["input_ids"], row["n_response"]) for row in rb.rows]
            logits = proxy.rows(items, cfg.data.template)
        else:
            logits = rb.logits(proxy)
        t_proxy += time.perf_counter() - t0
        for i, row, z in zip(rb.indices, rb.rows, logits):
            sl = slice(int(starts[i]), int(starts[i + 1]))
            record = corpus.records[row["index"]]
            loo = targets[sl] if cfg.prior.leave_one_out and corpus.split_of(row["prompt_id"]) == "train" else None
            n = sl.stop - sl.start
            ev = record_evidence(mapper, record, corpus.tokenizer, cfg.data.template, n, evidence_top(cfg))
            evidence = ev if p.use_logprobs else None
            dist = z.dist if isinstance(z, ServedRow) else z
            generator = record_generator(p.seed, row["index"])
            dists, ent = estimate(prior, contexts[sl], loo, dist, p, cfg.prior.top_k, evidence, generator, sampling=sampling)
            dists["topk"] = topk_targets(ev, n, sampling)
            writer.add(row["index"], dists, ent)
            entropy_sum += float(ent.astype(np.float64).sum())
            if isinstance(z, ServedRow):
                loglik[row["index"]] = float(z.token_logprobs.mean())
            else:
                labels = torch.from_numpy(targets[sl].astype(np.int64))
                loglik[row["index"]] = float((z.gather(1, labels[:, None]).squeeze(1) - z.logsumexp(-1)).mean())
        t_total += time.perf_counter() - t0
    meta = {"tokenizer": corpus.tokenizer_fp, "corpus": corpus.corpus_fp, "mode": p.mode, "m": p.m, "k": p.top_k,
            "prior_tables": inputs["prior"], "proxy_checkpoint": inputs["proxy"]}
    writer.close(meta)
    mine = {"loglik": loglik, "positions": int(starts[hi] - starts[lo]), "t_proxy": t_proxy, "t_total": t_total,
            "entropy_sum": entropy_sum, "evidence": dict(mapper.stats)}  # fmt: skip
    parts = launch.gather("posterior parts", mine)
    if parts is None:
        return None
    t_merge = time.perf_counter()
    if launch.distributed:
        merge_stores([out / PARTS / f"rank-{r}" / "targets" for r in range(launch.world)], out / "targets", meta)
        shutil.rmtree(out / PARTS)
        loglik = parts[0]["loglik"]
        for other in parts[1:]:  # every record was scored by one rank; the others left it NaN
            loglik = np.where(np.isnan(loglik), other["loglik"], loglik)
        mapper.stats = sum((Counter(x["evidence"]) for x in parts), Counter())
    t_merge = time.perf_counter() - t_merge
    np.save(out / "proxy_loglik.npy", loglik)
    store = TargetStore.open(out / "targets")
    # The launch's rate: its positions over its slowest rank's time, plus the merge.
    wall = max(x["t_total"] for x in parts) + (t_merge if launch.distributed else 0.0)
    return {
        "examples": len(data),
        "positions": int(len(targets)),
        "processes": launch.world,
        "positions_per_s": len(targets) / max(wall, 1e-9),
        "proxy_forward_share": sum(x["t_proxy"] for x in parts) / max(sum(x["t_total"] for x in parts), 1e-9),
        "mean_posterior_entropy": sum(x["entropy_sum"] for x in parts) / len(targets) if len(targets) else 0.0,
        "bytes_per_entry": store.bytes_per_entry("posterior"),
        "evidence": mapper.summary(),
    }
