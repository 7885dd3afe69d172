"""A student whose tokenizer is not the teacher's: tokenizer and model built from a run's own text.

`bayeskd student` trains a byte-level BPE tokenizer on the training split of the run's corpus
(the prompts and the teacher's responses; the held-out and validation prompts stay unseen) and
saves a randomly initialised Llama on it at `distill.train.model` (`models.build_tiny`). The
proxy and the student both start from that folder (the student with `distill.train.init_layers`
of its layers), so that prior, proxy, posterior and targets all live in the student's token
space, while the teacher's logprobs arrive as strings in its own (`estimate/evidence.py` maps them).
"""

from __future__ import annotations

from pathlib import Path

from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.data import read_corpus, record_split
from bayeskd.errors import BayeskdError
from bayeskd.models import build_tiny


def training_texts(cfg: Config, run: Run) -> list[str]:
    """The prompts and responses of the run's training split (what a tokenizer may be trained on)."""
    path = run.output("collect", "corpus.jsonl")  # an error naming `bayeskd collect` when there is none
    d = cfg.data
    texts = []
    for r in read_corpus(path):
        if record_split(r, d.split, d.heldout_fraction, d.validation_fraction) == "train":
            texts += [m["content"] for m in r["messages"]] + [r["text"]]
    if not texts:
        raise BayeskdError(f"{path} has no training responses to train a tokenizer on")
    return texts


def build_student(cfg: Config, run: Run, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                  force: bool = False) -> dict:  # fmt: skip
    """Build the tokenizer and model folder at `distill.train.model`; refuse to overwrite one unless `force`."""
    folder = Path(cfg.student_model)
    if (folder / "config.json").is_file() and not force:
        raise BayeskdError(f"distill.train.model={str(folder)!r} already holds a model (--force rebuilds it)")
    for name, v in (("--vocab-size", vocab_size), ("--hidden-size", hidden_size), ("--layers", num_layers), ("--heads", num_heads)):
        if v < 1:
            raise BayeskdError(f"{name}={v}: must be >= 1")
    if vocab_size < 260:
        raise BayeskdError(f"--vocab-size={vocab_size}: must be >= 260 (256 bytes and the special tokens)")
    if hidden_size % num_heads:
        raise BayeskdError(f"--hidden-size={hidden_size} must be a multiple of --heads={num_heads}")
    texts = training_texts(cfg, run)
    build_tiny(folder, texts, vocab_size, hidden_size, num_layers, num_heads, seed=cfg.seed)
    from bayeskd.models import load_tokenizer

    return {"folder": str(folder), "vocab": len(load_tokenizer(str(folder))), "texts": len(texts),
            "hidden_size": hidden_size, "layers": num_layers}  # fmt: skip
