"""Stage `prior`: n-gram count tables over the training responses (method.md, section 1).

Counts every order 1..n of the student-tokenized responses of the training prompts (the
held-out prompts stay out, so that held-out fidelity is measured on unseen text), and writes
the memory-mappable tables under `prior/tables/`. Queries (top-K, tail, kappa) happen where
the prior is used: in `posterior` and `eval`.
"""

from __future__ import annotations

from dataclasses import asdict

from bayeskd.estimate import ngram
from bayeskd.estimate.ngram_build import build
from bayeskd.estimate.prior import table_summary
from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.corpus import load_corpus


def run_prior(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    p = cfg.prior
    stage_cfg = {
        "prior": {k: v for k, v in asdict(p).items() if k in ("order", "smoothing")},
        "data": cfg.data.identity(),
        "table_format": f"{ngram.FORMAT} v{ngram.VERSION}",  # tables of another format are rebuilt, not misread
    }
    inputs = {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp}
    out = run.begin("prior", stage_cfg, inputs, force)
    if out is None:
        return None
    train = corpus.subset("train")
    vocab = len(corpus.tokenizer)
    table = build(
        corpus.docs(train), p.order, vocab, out / "tables", shard_tokens=p.shard_tokens, num_workers=p.num_workers
    )
    stats = table_summary(table, p.mu)
    summary = {
        "examples": len(train),
        "vocab_size": vocab,
        **stats,
        "table_bytes": table.nbytes,
    }
    run.finish("prior", "done", summary, {"tables": corpus.tokenizer_fp})
    return summary
