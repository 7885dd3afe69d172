"""What `proxy` and `distill` share: load a model, build the batches, run the one training loop."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bayeskd.config import Config, TrainConfig
from bayeskd.data import Collator, TargetSource, pack
from bayeskd.models import load_causal_lm
from bayeskd.corpus import TokenizedCorpus
from bayeskd.training import LossFn, train


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

    Returns the summary: steps, final train loss, held-out loss, where the model was saved.
    A rerun after a crash resumes from `out/checkpoints`.
    """
    train_set = corpus.subset("train")
    eval_set = corpus.subset("heldout")
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
