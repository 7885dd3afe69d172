"""The corpus as the token-level stages see it: records from `collect`, tokenized with the student's tokenizer.

Every token-level stage (prior, proxy, posterior, distill, eval) goes through here, so that
a response token has the same position and context everywhere: the same template, the same
truncation, the same train/held-out split (by a hash of the prompt id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.data import build_dataset, is_heldout, read_corpus
from bayeskd.errors import BayeskdError
from bayeskd.models import load_tokenizer, tokenizer_fingerprint


@dataclass
class TokenizedCorpus:
    records: list[dict]
    dataset: object  # datasets.Dataset: index, prompt_id, input_ids, labels, n_response
    tokenizer: object
    tokenizer_fp: str
    corpus_fp: str

    def split(self, fraction: float, heldout: bool):
        """Examples on one side of the held-out split."""
        keep = [i for i, p in enumerate(self.dataset["prompt_id"]) if is_heldout(p, fraction) == heldout]
        return self.dataset.select(keep)

    @staticmethod
    def docs(dataset) -> list[tuple[np.ndarray, np.ndarray]]:
        """(prefix ids, response ids) per example: the response starts at the first label."""
        out = []
        for ids, n in zip(dataset["input_ids"], dataset["n_response"]):
            ids = np.asarray(ids, dtype=np.int64)
            out.append((ids[: len(ids) - n], ids[len(ids) - n :]))
        return out


def select_records(records: list[dict], cfg: Config) -> list[dict]:
    """`data.samples` and `data.train_prompts`: a smaller training corpus, the same held-out set."""
    d = cfg.data
    if d.samples is not None:
        records = [r for r in records if r.get("sample_index", 0) < d.samples or is_heldout(r["prompt_id"], d.heldout_fraction)]
    if d.train_prompts is not None:
        kept: set[str] = set()
        for r in records:
            if len(kept) < d.train_prompts and not is_heldout(r["prompt_id"], d.heldout_fraction):
                kept.add(r["prompt_id"])
        records = [r for r in records if r["prompt_id"] in kept or is_heldout(r["prompt_id"], d.heldout_fraction)]
    return records


def load_corpus(cfg: Config, run: Run) -> TokenizedCorpus:
    path: Path = run.output("collect", "corpus.jsonl")
    records = select_records(read_corpus(path), cfg)
    if not records:
        raise BayeskdError(f"{path} is empty: collect found no responses")
    tokenizer = load_tokenizer(cfg.student_model)
    dataset = build_dataset(records, tokenizer, cfg.data.template, cfg.data.max_length, cfg.data.num_proc)
    if len(dataset) == 0:
        raise BayeskdError(
            f"no example keeps a response token within data.max_length={cfg.data.max_length}: "
            "the prompts are longer than that"
        )
    corpus_fp = (run.manifest("collect") or {}).get("outputs", {}).get("corpus", "")
    if cfg.data.samples is not None or cfg.data.train_prompts is not None:
        # A selection is another corpus: stored targets and tables keyed by the whole one must not match it.
        corpus_fp = f"{corpus_fp}:samples={cfg.data.samples}:train_prompts={cfg.data.train_prompts}"
    return TokenizedCorpus(records, dataset, tokenizer, tokenizer_fingerprint(tokenizer), corpus_fp)
