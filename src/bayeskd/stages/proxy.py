"""Stage `proxy`: align an open model to the teacher by fine-tuning it on the corpus (method.md, section 2).

The proxy must share the student's tokenizer: its distribution is evidence about the same
tokens the student predicts. Output: `proxy/final/`, a normal Hugging Face checkpoint.

With `proxy.align: sft+dpo` a second step follows, as in Proxy-KD: DPO with the teacher's
responses preferred over the SFT proxy's own samples to the training prompts, against the
frozen SFT proxy (see `preference`). It is a sub-stage, `proxy/dpo/` with its own manifest
(so the SFT proxy's fingerprint does not depend on it), writing `pairs.jsonl` (the pairs with
the reference's log-probabilities) and `final/`, which later stages read as the proxy
(`proxy_model`). A kill while sampling resamples the same pairs; a kill while training
resumes from `proxy/dpo/checkpoints`.
"""

from __future__ import annotations

from dataclasses import asdict

from bayeskd.artifacts import Run, fingerprint_file, write_jsonl_atomic
from bayeskd.config import Config
from bayeskd.corpus import TokenizedCorpus, load_corpus
from bayeskd.data import read_corpus
from bayeskd.errors import BayeskdError
from bayeskd.train.preference import make_dpo_loss_fn
from bayeskd.train.losses import make_loss_fn
from bayeskd.models import check_same_tokenizer, load_causal_lm
from bayeskd.stages import DPO_STAGE
from bayeskd.train.fit import fit

def run_proxy(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    train_cfg = cfg.proxy.train
    check_same_tokenizer(train_cfg.model, cfg.student_model, corpus.tokenizer_fp, "proxy")
    stage_cfg = {"train": train_cfg.identity(), "data": cfg.data.identity()}
    out = run.begin("proxy", stage_cfg, {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp}, force)
    summary = None
    if out is not None:
        summary = fit(cfg, train_cfg, corpus, make_loss_fn(lambda_ce=1.0), out)
        run.finish("proxy", "done", summary, {"model": summary["model"]})
    if cfg.proxy.align == "sft+dpo":
        dpo = run_dpo(cfg, run, corpus, force)
        if dpo is not None:
            summary = {**(summary or {}), "dpo": dpo}
    return summary


def run_dpo(cfg: Config, run: Run, corpus: TokenizedCorpus, force: bool = False) -> dict | None:
    """The DPO step on the finished SFT proxy: pairs from the training prompts, then the training loop."""
    d = cfg.proxy.dpo
    sft_dir = run.output("proxy", "final")
    train_cfg = d.train_config(cfg.proxy.train, str(sft_dir))
    max_tokens = d.max_new_tokens or cfg.collect.max_tokens
    # The SFT proxy enters by its weights, not by its path: a run folder copied or linked elsewhere stays valid.
    stage_cfg = {"dpo": asdict(d), "max_new_tokens": max_tokens, "data": cfg.data.identity(),
                 "train": {k: v for k, v in asdict(train_cfg).items() if k != "model"}}  # fmt: skip
    inputs = {"corpus": corpus.corpus_fp, "tokenizer": corpus.tokenizer_fp,
              "sft": fingerprint_file(sft_dir / "model.safetensors")}  # fmt: skip
    out = run.begin(DPO_STAGE, stage_cfg, inputs, force)
    if out is None:
        return None
    pairs_path = out / "pairs.jsonl"
    if pairs_path.is_file():  # written whole (renamed into place) by an earlier, interrupted run
        pairs = read_corpus(pairs_path)
    else:
        from bayeskd.train.preference import build_pairs, score_reference

        reference = load_causal_lm(str(sft_dir))
        pairs = build_pairs(corpus, reference, d.samples, max_tokens, cfg.data.max_length, d.temperature, d.seed)
        if not pairs:
            raise BayeskdError(
                "proxy.align=sft+dpo: no preference pair: the corpus has no training prompt with room for a "
                "response within data.max_length (or the proxy sampled the teacher's every response)"
            )
        pairs = score_reference(reference, pairs, corpus.tokenizer.pad_token_id, 2 * d.batch_size)
        write_jsonl_atomic(pairs_path, pairs)
        del reference
    from bayeskd.train.preference import PairCollator
    from bayeskd.train.loop import train

    result = train(load_causal_lm(str(sft_dir)), pairs, make_dpo_loss_fn(d.beta), train_cfg, out,
                   collate_fn=PairCollator(corpus.tokenizer.pad_token_id), tokenizer=corpus.tokenizer)  # fmt: skip
    summary = {
        "pairs": len(pairs),
        "prompts": len({p["prompt_id"] for p in pairs}),
        "rejected_unfinished": sum(p["rejected_finish"] == "length" for p in pairs),
        "steps": result.step,
        "resumed_from_step": result.resumed_from,
        **{k: v for k, v in result.last.items() if k != "step"},
        "model": str(result.final_dir),
    }
    run.finish(DPO_STAGE, "done", summary, {"model": summary["model"]})
    return summary
