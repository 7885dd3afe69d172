"""Stage `proxy`: align an open model to the teacher by fine-tuning it on the corpus (method.md, section 2).

The proxy must share the student's tokenizer: its distribution is evidence about the same
tokens the student predicts. Output: `proxy/final/`, a normal Hugging Face checkpoint.
"""

from __future__ import annotations


from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.losses import make_loss_fn
from bayeskd.corpus import load_corpus
from bayeskd.models import check_same_tokenizer
from bayeskd.stages.fit import fit


def run_proxy(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    train_cfg = cfg.proxy.train
    check_same_tokenizer(train_cfg.model, cfg.student_model, corpus.tokenizer_fp, "proxy")
    stage_cfg = {"train": train_cfg.identity(), "data": cfg.data.identity()}
    out = run.begin("proxy", stage_cfg, {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp}, force)
    if out is None:
        return None
    summary = fit(cfg, train_cfg, corpus, make_loss_fn(lambda_ce=1.0), out)
    run.finish("proxy", "done", summary, {"model": summary["model"]})
    return summary
