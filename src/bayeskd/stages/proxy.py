"""Stage `proxy`: align an open model to the teacher by fine-tuning it on the corpus (method.md, section 2).

The proxy must share the student's tokenizer: its distribution is evidence about the same
tokens the student predicts. Output: `proxy/final/`, a normal Hugging Face checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict

from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.errors import BayeskdError
from bayeskd.losses import make_loss_fn
from bayeskd.models import load_tokenizer, tokenizer_fingerprint
from bayeskd.stages.corpus import load_corpus
from bayeskd.stages.fit import fit


def check_same_tokenizer(model: str, student: str, student_fp: str, role: str) -> None:
    fp = tokenizer_fingerprint(load_tokenizer(model))
    if fp != student_fp:
        raise BayeskdError(
            f"the {role} {model!r} has another tokenizer than the student {student!r} "
            f"(fingerprints {fp} vs {student_fp}): token-level targets would not line up"
        )


def run_proxy(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    train_cfg = cfg.proxy.train
    check_same_tokenizer(train_cfg.model, cfg.student_model, corpus.tokenizer_fp, "proxy")
    stage_cfg = {"train": asdict(train_cfg), "data": cfg.data.identity()}
    out = run.begin("proxy", stage_cfg, {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp}, force)
    if out is None:
        return None
    summary = fit(cfg, train_cfg, corpus, make_loss_fn(lambda_ce=1.0), out)
    run.finish("proxy", "done", summary, {"model": summary["model"]})
    return summary
