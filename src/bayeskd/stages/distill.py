"""Stage `distill`: train one student per mode (method.md, sections 3-4), each in `distill/<mode>/`.

Mode `sft` is cross-entropy on the teacher's tokens only: what practitioners do today and
the baseline every other result is compared to. Each student is its own sub-stage with its
own manifest, so adding a mode trains only that student.
"""

from __future__ import annotations

from dataclasses import asdict

from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.losses import make_loss_fn
from bayeskd.stages.corpus import load_corpus
from bayeskd.stages.fit import fit


def run_distill(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    summaries = {}
    for mode in cfg.distill.modes:
        stage = f"distill/{mode}"
        stage_cfg = {"mode": mode, "train": asdict(cfg.distill.train), "data": asdict(cfg.data)}
        out = run.begin(stage, stage_cfg, {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp}, force)
        if out is None:
            continue
        summary = fit(cfg, cfg.distill.train, corpus, make_loss_fn(lambda_ce=1.0), out)
        run.finish(stage, "done", summary, {"model": summary["model"]})
        summaries[mode] = summary
    return summaries or None
