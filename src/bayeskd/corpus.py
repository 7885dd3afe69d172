"""The corpus as the token-level stages see it: records from `collect`, tokenized with the student's tokenizer.

Every token-level stage (prior, proxy, posterior, probe, distill, eval) goes through here, so
that a response token has the same position and context everywhere: the same template, the
same truncation, the same train/held-out split (by a hash of the prompt id). `batches` and
`ResponseBatch.logits` are the one way a model is read at response positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bayeskd.artifacts import Run
from bayeskd.config import Config
from bayeskd.data import Collator, build_dataset, read_corpus, record_split, response_logits, response_positions, split_of
from bayeskd.errors import BayeskdError
from bayeskd.models import load_tokenizer, tokenizer_fingerprint


@dataclass
class ResponseBatch:
    """Dataset rows collated into one batch, with each row's response positions (its labels)."""

    indices: list[int]  # the rows' positions in the dataset
    rows: list[dict]
    batch: dict[str, torch.Tensor]
    positions: list[torch.Tensor]  # per row: the label positions, in order

    def labels(self) -> list[torch.Tensor]:
        """Per row: the response tokens [n_response]."""
        return [self.batch["labels"][b, p] for b, p in enumerate(self.positions)]

    def logits(self, model) -> list[torch.Tensor]:
        """Per row: the model's float logits [n_response, V], row t predicting response token t."""
        with torch.inference_mode():
            z = model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"]).logits.float()
        return response_logits(z, self.positions)


@dataclass
class TokenizedCorpus:
    records: list[dict]
    dataset: object  # datasets.Dataset: index, prompt_id, input_ids, labels, n_response
    tokenizer: object
    tokenizer_fp: str
    corpus_fp: str
    heldout_fraction: float
    validation_fraction: float = 0.0
    named_splits: dict[str, str] | None = None  # `data.split: prompts`: prompt id -> the split its prompt named

    def split_of(self, prompt_id: str) -> str:
        """`train`, `validation` or `heldout` (see `data.split_of`; `data.split: prompts`: as the prompts file named it)."""
        if self.named_splits is not None:
            return self.named_splits[prompt_id]
        return split_of(prompt_id, self.heldout_fraction, self.validation_fraction)

    def indices(self, split: str) -> list[int]:
        """Dataset positions of the examples of one split (`train`, `validation`, `heldout`), in order."""
        return [i for i, p in enumerate(self.dataset["prompt_id"]) if self.split_of(p) == split]

    def subset(self, split: str):
        """The examples of one split."""
        return self.dataset.select(self.indices(split))

    def batch(self, indices: Sequence[int]) -> ResponseBatch:
        rows = [self.dataset[int(i)] for i in indices]
        batch = Collator(self.tokenizer.pad_token_id)(rows)
        return ResponseBatch([int(i) for i in indices], rows, batch, response_positions(batch["labels"]))

    def batches(self, indices: Sequence[int], size: int, desc: str) -> Iterator[ResponseBatch]:
        """The given dataset rows in batches of `size`, in order, with a progress bar."""
        for lo in tqdm(range(0, len(indices), size), desc=desc, unit="batch", dynamic_ncols=True):
            yield self.batch(indices[lo : lo + size])

    @staticmethod
    def docs(dataset) -> list[tuple[np.ndarray, np.ndarray]]:
        """(prefix ids, response ids) per example: the response starts at the first label."""
        out = []
        for ids, n in zip(dataset["input_ids"], dataset["n_response"]):
            ids = np.asarray(ids, dtype=np.int64)
            out.append((ids[: len(ids) - n], ids[len(ids) - n :]))
        return out


def select_records(records: list[dict], cfg: Config) -> list[dict]:
    """`data.samples` and `data.train_prompts`: a smaller training corpus, the same held-out and validation sets."""
    d = cfg.data

    def train(r: dict) -> bool:
        return record_split(r, d.split, d.heldout_fraction, d.validation_fraction) == "train"

    if d.samples is not None:
        records = [r for r in records if r.get("sample_index", 0) < d.samples or not train(r)]
    if d.train_prompts is not None:
        kept: set[str] = set()
        for r in records:
            if len(kept) < d.train_prompts and train(r):
                kept.add(r["prompt_id"])
        records = [r for r in records if r["prompt_id"] in kept or not train(r)]
    return records


def load_corpus(cfg: Config, run: Run, gold: bool = False) -> TokenizedCorpus:
    """The collected corpus, selected and tokenized. A prompt's gold answer (the prompts file's
    `answer`) is the evaluator's alone: the method's stages get records without it (`gold=False`)."""
    d = cfg.data
    path: Path = run.output("collect", "corpus.jsonl")
    records = select_records(read_corpus(path), cfg)
    if not gold:
        records = [{k: v for k, v in r.items() if k != "answer"} for r in records]
    if not records:
        raise BayeskdError(f"{path} is empty: collect found no responses")
    tokenizer = load_tokenizer(cfg.student_model)
    dataset = build_dataset(records, tokenizer, d.template, d.max_length, d.num_proc)
    if len(dataset) == 0:
        raise BayeskdError(
            f"no example keeps a response token within data.max_length={d.max_length}: "
            "the prompts are longer than that"
        )
    corpus_fp = (run.manifest("collect") or {}).get("outputs", {}).get("corpus", "")
    if d.samples is not None or d.train_prompts is not None:
        # A selection is another corpus: stored targets and tables keyed by the whole one must not match it.
        corpus_fp = f"{corpus_fp}:samples={d.samples}:train_prompts={d.train_prompts}"
    named = None if d.split == "hash" else {r["prompt_id"]: record_split(r, d.split, 0, 0) for r in records}
    return TokenizedCorpus(records, dataset, tokenizer, tokenizer_fingerprint(tokenizer), corpus_fp, d.heldout_fraction,
                           d.validation_fraction, named)  # fmt: skip
