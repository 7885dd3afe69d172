"""Stage `distill`: train one student per mode (method.md, sections 3-4), each in `distill/<mode>/`.

    L = lambda_ce * CE(y) + w * (s * KL(p_prior || p_S) + (1 - s) * KL(p_target || p_S))

w = `distill.kd_weight`, the same total for every KD mode; s = `distill.prior_share` for `bayes`.

| mode           | s           | p_target                      | weights (KL only)  |
|----------------|-------------|-------------------------------|--------------------|
| sft            | (w = 0)     | -                             | -                  |
| bayes          | prior_share | posterior                     | -                  |
| prior-only     | 1           | -                             | -                  |
| posterior-only | 0           | posterior                     | -                  |
| proxy-kd       | 0           | proxy                         | Proxy-KD's sigmoid |
| topk-kd        | 0           | the API's top-k, tail bucket  | -                  |
| oracle-kd      | 0           | the true teacher (upper bound)| -                  |

Each student is its own sub-stage with its own manifest, so adding a mode trains only that
student. The Bayesian modes read `posterior/targets/` (`probe/targets/` when `probe` ran) and
refuse targets made with another tokenizer or from another corpus. With `distill.fit: auto`
every KD mode trains one student per (w, tau) of `distill.fit_kd_weight` x `distill.fit_tau`
in `distill/<mode>/fit/` and keeps the one with the lowest validation NLL of the teacher's
tokens as its `final/`: the same tuning for every mode, by a criterion that needs no oracle.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.corpus import load_corpus
from bayeskd.errors import BayeskdError
from bayeskd.train.losses import make_loss_fn
from bayeskd.train.fit import fit, validation_nll
from bayeskd.estimate.targets import TargetStore

UPPER_BOUND = "oracle-kd is an upper bound: it trains on the true teacher distribution, which a closed API never shows"


def proxy_kd_weights(loglik: np.ndarray) -> list[float]:
    """Proxy-KD's per-sample weights: sigmoid((log p_P(y|x) - mean) / std), over the records that have one."""
    ok = np.isfinite(loglik)
    mean, std = loglik[ok].mean(), loglik[ok].std() + 1e-8
    w = 1.0 / (1.0 + np.exp(-(loglik - mean) / std))
    return np.where(ok, w, 0.0).tolist()


def _plan(cfg: Config, run: Run, mode: str, corpus) -> tuple[dict, dict, list[float] | None, dict]:
    """(each loss slot's share of the KD weight, target sets by slot (`losses.LOSS_TARGETS`),
    per-record weights of the KL, extra inputs) of a mode."""
    d = cfg.distill
    if mode == "sft":
        return {}, {}, None, {}
    if mode == "oracle-kd":
        from bayeskd.evaluate.oracle import oracle_targets

        store = oracle_targets(cfg, run, corpus)
        return {"target": 1.0}, {"target": store.table("oracle")}, None, {"oracle": store.meta["teacher"]}
    source = cfg.target_stage  # `probe` when it ran: the posterior with the teacher's own samples
    store = TargetStore.open(run.output(source, "targets"))
    store.check(corpus.tokenizer_fp, corpus.corpus_fp)
    extra = {"targets": f"{source}:{(run.manifest(source) or {}).get('fingerprint', '')}"}
    if mode == "bayes":
        return {"prior": d.prior_share, "target": 1.0 - d.prior_share}, {
            "prior": store.table("prior"), "target": store.table("posterior")}, None, extra
    if mode == "prior-only":
        return {"prior": 1.0}, {"prior": store.table("prior")}, None, extra
    if mode == "posterior-only":
        return {"target": 1.0}, {"target": store.table("posterior")}, None, extra
    if mode == "topk-kd":
        if not any(r.get("tokens") for r in corpus.records):
            raise BayeskdError(
                "distill.modes: topk-kd trains on the teacher's top-k logprobs, and this corpus has none: "
                "collect with collect.top_logprobs > 0 (an API that returns logprobs)"
            )
        return {"target": 1.0}, {"target": store.table("topk")}, None, extra
    if mode == "proxy-kd":
        loglik = np.load(run.output("posterior", "proxy_loglik.npy"))
        weights = proxy_kd_weights(loglik) if d.proxy_kd_weights else None
        return {"target": 1.0}, {"target": store.table("proxy")}, weights, extra
    raise BayeskdError(f"distill.modes: unknown mode {mode!r}")


def loss_weights(lambda_ce: float, shares: dict[str, float], kd_weight: float) -> dict[str, float]:
    """`objective`'s weights: lambda_ce, and alpha (the prior slot) and beta (the target slot) that sum to kd_weight."""
    coef = {"prior": "alpha", "target": "beta"}
    return {"lambda_ce": lambda_ce, **{coef[slot]: share * kd_weight for slot, share in shares.items() if share}}


def grid(cfg: Config, mode: str) -> list[tuple[float, float]]:
    """The (kd_weight, tau) points a mode trains at: the configured one, or with `fit: auto` the
    grids' product (the configured values always among them). `sft` has no KD term to tune."""
    d = cfg.distill
    if mode == "sft" or d.fit == "none":
        return [(d.kd_weight, d.tau)]
    weights, taus = sorted(set(d.fit_kd_weight) | {d.kd_weight}), sorted(set(d.fit_tau) | {d.tau})
    return [(w, t) for w in weights for t in taus]


def _train_point(cfg, corpus, shares, tables, weights, out: Path, kd_weight: float, tau: float) -> dict:
    loss_fn = make_loss_fn(tau=tau, **loss_weights(cfg.distill.lambda_ce, shares, kd_weight))
    return fit(cfg, cfg.distill.train, corpus, loss_fn, out, targets=tables, weights=weights)


def run_distill(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    d = cfg.distill
    summaries = {}
    for mode in d.modes:
        stage = f"distill/{mode}"
        shares, tables, weights, extra = _plan(cfg, run, mode, corpus)
        points = grid(cfg, mode)
        stage_cfg = {"mode": mode, "loss": loss_weights(d.lambda_ce, shares, d.kd_weight), "tau": d.tau,
                     "train": d.train.identity(), "data": cfg.data.identity()}  # fmt: skip
        if weights is not None:  # a student trained when the weights also scaled the CE is another student
            stage_cfg["sample_weights"] = "kl-only"
        if len(points) > 1:
            stage_cfg["fit"] = {"kd_weight": sorted({w for w, _ in points}), "tau": sorted({t for _, t in points})}
        inputs = {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp, **extra}
        out = run.begin(stage, stage_cfg, inputs, force)
        if out is None:
            continue
        if len(points) == 1:
            summary = _train_point(cfg, corpus, shares, tables, weights, out, *points[0])
        else:
            summary = _fit_mode(cfg, corpus, shares, tables, weights, out, points, run.launch)
        if mode == "oracle-kd":
            summary = {"note": UPPER_BOUND, **summary}
        run.finish(stage, "done", summary, {"model": summary["model"]})
        summaries[mode] = summary
    return summaries or None


def _fit_mode(cfg, corpus, shares, tables, weights, out: Path, points: list[tuple[float, float]], launch) -> dict:
    """One student per (kd_weight, tau) in out/fit/, each resumable; the lowest validation NLL becomes out/final."""
    scored = []
    for kd_weight, tau in points:
        sub = out / "fit" / f"kd{kd_weight:g}-tau{tau:g}"
        summary = _train_point(cfg, corpus, shares, tables, weights, sub, kd_weight, tau)
        nll = summary.get("best_loss") if "best_loss" in summary else validation_nll(corpus, summary["model"])
        scored.append({"kd_weight": kd_weight, "tau": tau, "validation_nll": nll, "summary": summary})
    best = min(scored, key=lambda g: g["validation_nll"])
    if launch.main:  # under `accelerate launch`, one copy; the other ranks wait for it
        tmp = out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best["summary"]["model"], tmp)
        shutil.rmtree(out / "final", ignore_errors=True)
        os.replace(tmp, out / "final")
    launch.broadcast(f"final {out}")
    return {**best["summary"], "model": str(out / "final"),
            "fit": {"chosen": {"kd_weight": best["kd_weight"], "tau": best["tau"]},
                    "grid": [{k: g[k] for k in ("kd_weight", "tau", "validation_nll")} for g in scored]}}  # fmt: skip
