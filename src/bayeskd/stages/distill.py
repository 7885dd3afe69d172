"""Stage `distill`: train one student per mode (method.md, sections 3-4), each in `distill/<mode>/`.

    L = lambda_ce * CE(y) + alpha * KL(p_prior || p_S) + beta * KL(p_target || p_S)

| mode           | alpha | beta | p_target                      | weights            |
|----------------|-------|------|-------------------------------|--------------------|
| sft            | 0     | 0    | -                             | -                  |
| bayes          | alpha | beta | posterior                     | -                  |
| prior-only     | alpha | 0    | -                             | -                  |
| posterior-only | 0     | beta | posterior                     | -                  |
| proxy-kd       | 0     | beta | proxy                         | Proxy-KD's sigmoid |
| topk-kd        | 0     | beta | the API's top-k, tail bucket  | -                  |
| oracle-kd      | 0     | beta | the true teacher (upper bound)| -                  |

Each student is its own sub-stage with its own manifest, so adding a mode trains only that
student. The Bayesian modes read `posterior/targets/` (`probe/targets/` when `probe` ran) and
refuse targets made with another tokenizer or from another corpus.
"""

from __future__ import annotations


import numpy as np

from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.corpus import load_corpus
from bayeskd.errors import BayeskdError
from bayeskd.losses import make_loss_fn
from bayeskd.stages.fit import fit
from bayeskd.targets import TargetStore

UPPER_BOUND = "oracle-kd is an upper bound: it trains on the true teacher distribution, which a closed API never shows"


def proxy_kd_weights(loglik: np.ndarray) -> list[float]:
    """Proxy-KD's per-sample weights: sigmoid((log p_P(y|x) - mean) / std), over the records that have one."""
    ok = np.isfinite(loglik)
    mean, std = loglik[ok].mean(), loglik[ok].std() + 1e-8
    w = 1.0 / (1.0 + np.exp(-(loglik - mean) / std))
    return np.where(ok, w, 0.0).tolist()


def _plan(cfg: Config, run: Run, mode: str, corpus) -> tuple[dict, dict, list[float] | None, dict]:
    """(loss weights, target sets by loss slot (`losses.LOSS_TARGETS`), per-record weights, extra inputs) of a mode."""
    d = cfg.distill
    if mode == "sft":
        return {"lambda_ce": d.lambda_ce}, {}, None, {}
    if mode == "oracle-kd":
        from bayeskd.oracle import oracle_targets

        store = oracle_targets(cfg, run, corpus)
        source = {"target": store.table("oracle")}
        return {"lambda_ce": d.lambda_ce, "beta": d.beta}, source, None, {"oracle": store.meta["teacher"]}
    source = cfg.target_stage  # `probe` when it ran: the posterior with the teacher's own samples
    store = TargetStore.open(run.output(source, "targets"))
    store.check(corpus.tokenizer_fp, corpus.corpus_fp)
    extra = {"targets": f"{source}:{(run.manifest(source) or {}).get('fingerprint', '')}"}
    if mode == "bayes":
        return {"lambda_ce": d.lambda_ce, "alpha": d.alpha, "beta": d.beta}, {
            "prior": store.table("prior"), "target": store.table("posterior")}, None, extra
    if mode == "prior-only":
        return {"lambda_ce": d.lambda_ce, "alpha": d.alpha}, {"prior": store.table("prior")}, None, extra
    if mode == "posterior-only":
        return {"lambda_ce": d.lambda_ce, "beta": d.beta}, {"target": store.table("posterior")}, None, extra
    if mode == "topk-kd":
        if not any(r.get("tokens") for r in corpus.records):
            raise BayeskdError(
                "distill.modes: topk-kd trains on the teacher's top-k logprobs, and this corpus has none: "
                "collect with collect.top_logprobs > 0 (an API that returns logprobs)"
            )
        return {"lambda_ce": d.lambda_ce, "beta": d.beta}, {"target": store.table("topk")}, None, extra
    if mode == "proxy-kd":
        loglik = np.load(run.output("posterior", "proxy_loglik.npy"))
        weights = proxy_kd_weights(loglik)
        return {"lambda_ce": d.lambda_ce, "beta": d.beta}, {"target": store.table("proxy")}, weights, extra
    raise BayeskdError(f"distill.modes: unknown mode {mode!r}")


def run_distill(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    summaries = {}
    for mode in cfg.distill.modes:
        stage = f"distill/{mode}"
        loss, tables, weights, extra = _plan(cfg, run, mode, corpus)
        stage_cfg = {"mode": mode, "loss": loss, "tau": cfg.distill.tau, "train": cfg.distill.train.identity(),
                     "data": cfg.data.identity()}
        inputs = {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp, **extra}
        out = run.begin(stage, stage_cfg, inputs, force)
        if out is None:
            continue
        loss_fn = make_loss_fn(tau=cfg.distill.tau, **loss)
        summary = fit(cfg, cfg.distill.train, corpus, loss_fn, out, targets=tables, weights=weights)
        if mode == "oracle-kd":
            summary = {"note": UPPER_BOUND, **summary}
        run.finish(stage, "done", summary, {"model": summary["model"]})
        summaries[mode] = summary
    return summaries or None
