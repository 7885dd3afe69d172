"""What `proxy` and `distill` share: load a model, build the batches, run the one training loop."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from bayeskd.evaluate import metrics as M
from bayeskd.config import Config
from bayeskd.train.config import TrainConfig
from bayeskd.corpus import TokenizedCorpus
from bayeskd.data import Collator, TargetSource, pack
from bayeskd.errors import BayeskdError
from bayeskd.train.losses import make_loss_fn
from bayeskd.models import load_causal_lm
from bayeskd.train.loop import LossFn, train


def fit(
    cfg: Config,
    train_cfg: TrainConfig,
    corpus: TokenizedCorpus,
    loss_fn: LossFn,
    out: Path,
    targets: Mapping[str, TargetSource] | None = None,
    weights: list[float] | None = None,
) -> dict:
    """Train `train_cfg.model` on the corpus's training prompts; evaluate on the held-out ones.

    With `train_cfg.select: best_validation` the model kept is the one with the lowest NLL of
    the teacher's tokens on the validation split (no oracle, nothing held out is read).
    Returns the summary: steps, final train loss, held-out loss, where the model was saved.
    A rerun after a crash resumes from `out/checkpoints`.
    """
    train_set = corpus.subset("train")
    eval_set = corpus.subset("heldout")
    select_set = None
    if train_cfg.select == "best_validation":
        select_set = corpus.subset("validation")
        if not len(select_set):
            raise BayeskdError("train.select=best_validation needs a validation split: set data.validation_fraction > 0 (e.g. 0.1)")
    collate = Collator(corpus.tokenizer.pad_token_id, targets=targets or {}, weights=weights)
    if cfg.data.packing:
        train_set = pack(train_set, cfg.data.max_length, seed=train_cfg.seed)
    model = load_causal_lm(train_cfg.model, init_layers=train_cfg.init_layers,
                           scratch_seed=train_cfg.seed if train_cfg.init == "scratch" else None)
    result = train(
        model,
        train_set,
        loss_fn,
        train_cfg,
        out,
        collate_fn=collate,
        eval_data=eval_set if len(eval_set) and not targets else None,
        select_data=select_set,
        select_loss_fn=make_loss_fn() if select_set is not None else None,
        tokenizer=corpus.tokenizer,
    )
    return {
        "train_examples": len(train_set),
        "heldout_examples": len(eval_set),
        "steps": result.step,
        "resumed_from_step": result.resumed_from,
        **{k: v for k, v in result.last.items() if k != "step"},
        "model": str(result.final_dir),
    }


def validation_nll(corpus: TokenizedCorpus, model_dir: str | Path, batch_size: int = 8) -> float:
    """Mean NLL per token of the teacher's responses on the validation split under a model: the
    black-box score (H(p_T) + KL(p_T || model) in expectation) that choosing among students uses."""
    indices = corpus.indices("validation")
    if not indices:
        raise BayeskdError("choosing a student needs a validation split: set data.validation_fraction > 0 (e.g. 0.1)")
    model = load_causal_lm(str(model_dir))
    total = n = 0.0
    with torch.inference_mode():
        for rb in corpus.batches(indices, batch_size, "validation NLL"):
            for z, y in zip(rb.logits(model), rb.labels()):
                total += float(M.token_nll(z, y).sum())
                n += len(y)
    return total / max(n, 1)
