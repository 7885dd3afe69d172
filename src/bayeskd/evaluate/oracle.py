"""The oracle: the true teacher distribution, for the `oracle-kd` upper bound and for measuring fidelity.

Only possible when the "closed" teacher is a local open model standing in for one
(`teacher.backend: local`) that shares the student's tokenizer. The method's own stages never
import this module; only `distill` (mode `oracle-kd`, flagged as an upper bound in every
output) and `eval` do. The teacher's distribution is the one it sampled from in `collect`:
softmax(z / collect.temperature) cut to its nucleus of mass collect.top_p (`teacher_probs`).
"""

from __future__ import annotations

import numpy as np
import torch

from bayeskd.estimate import distributions as D
from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.corpus import TokenizedCorpus
from bayeskd.errors import BayeskdError
from bayeskd.models import check_same_tokenizer, load_causal_lm
from bayeskd.estimate.targets import TargetStore, TargetWriter
from bayeskd.teachers.decoding import sampling_probs


def load_oracle(cfg: Config, student_fp: str | None):
    """The teacher as an open model, or a clear error saying why there is none.

    `student_fp`: refuse a teacher whose tokenizer is not the student's (token-level targets and
    KLs need one vocabulary); None: any tokenizer (`eval`'s next-byte measure needs none)."""
    model = oracle_model(cfg)
    if model is None:
        raise BayeskdError(
            "an oracle needs the teacher's weights: teacher.backend `local` (an open model standing in "
            "for a closed one) or eval.oracle_model (the open model behind a served teacher); a closed "
            "API has no oracle"
        )
    if student_fp is not None:
        check_same_tokenizer(model, cfg.student_model, student_fp, "oracle teacher")
    return load_causal_lm(model, dtype=cfg.teacher.dtype, device=cfg.teacher.device)


def oracle_model(cfg: Config) -> str | None:
    if cfg.eval.oracle_model:
        return cfg.eval.oracle_model
    return cfg.teacher.model if cfg.teacher.backend == "local" else None


def teacher_probs(cfg: Config, logits: torch.Tensor) -> torch.Tensor:
    """The distribution the teacher sampled from in `collect` (the estimate's target), [..., V]:
    softmax(z / collect.temperature) cut to its nucleus of mass collect.top_p."""
    return sampling_probs(logits, cfg.collect.temperature, cfg.collect.top_p)


def oracle_targets(cfg: Config, run: Run, corpus: TokenizedCorpus) -> TargetStore:
    """Top-K of the true teacher distribution at every response token (cached in `oracle/`)."""
    k = cfg.posterior.top_k
    stage_cfg = {"teacher": oracle_model(cfg), "temperature": max(cfg.collect.temperature, 1e-6), "k": k,
                 **({"top_p": cfg.collect.top_p} if cfg.collect.top_p < 1 else {})}  # fmt: skip
    out = run.begin("oracle", stage_cfg, {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp})
    if out is None:
        return TargetStore.open(run.output("oracle", "targets"))
    if not run.launch.main:  # under `accelerate launch` rank 0 writes the targets; the others wait for them
        run.launch.broadcast("oracle targets")
        return TargetStore.open(run.output("oracle", "targets"))
    model = load_oracle(cfg, corpus.tokenizer_fp)
    writer = TargetWriter(out / "targets", ("oracle",), k)
    for rb in corpus.batches(range(len(corpus.dataset)), 8, "oracle"):
        for row, z in zip(rb.rows, rb.logits(model)):
            p, ids = teacher_probs(cfg, z).topk(k, -1)
            p = p.double().numpy()
            dist = D.SparseDist(ids.numpy().astype(np.int32), p, np.clip(1 - p.sum(1), 0, 1))
            writer.add(row["index"], {"oracle": dist}, D.entropy(dist))
    writer.close({"tokenizer": corpus.tokenizer_fp, "corpus": corpus.corpus_fp, "teacher": oracle_model(cfg),
                  "note": "the true teacher distribution: an upper bound, never available to the method"})
    run.finish("oracle", "done", {"examples": len(corpus.dataset)})
    run.launch.broadcast("oracle targets")
    return TargetStore.open(out / "targets")
