"""Training examples from corpus records: formatting, response-only labels, packing, sparse targets.

A corpus record (what `collect` writes, one JSON a line) becomes one example: the prompt
messages and the teacher's response, formatted with the chat template (or as plain text),
tokenized, with labels only on the response tokens. Each example keeps `index` (its record's
position in the corpus) and `n_response` (its number of label positions), which is how
per-response-token targets stored by record (a `targets.TargetStore` set) find their
positions: row j of record i's targets is the distribution of the j-th label of example i.

Row layouts the `Collator` turns into batches:

- padded: one example per row, right padding, `attention_mask`;
- packed (`pack`): several examples per row, `position_ids` restarting at 0 for each, no
  attention mask. Transformers then builds a block-diagonal causal mask from the position
  resets (with `use_cache=False`, as the training loop calls the model), so examples in a
  row do not attend to each other.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from datasets import Dataset
from torch import Tensor

from bayeskd.errors import BayeskdError
from bayeskd.estimate.distributions import SparseDist

IGNORE_INDEX = -100
"""Label value that marks a position without a target (prompt, padding)."""

LOSS_TARGETS = ("prior", "target")
"""The sparse targets a batch may carry (keys `{name}_ids`, `{name}_probs`, `{name}_tail`): `prior`
for the alpha term, `target` for the beta term (the posterior, or the proxy's or the oracle's
distribution, as the distill mode says)."""


class DataError(ValueError):
    """A record cannot be formatted, or targets do not line up with an example's labels."""


def read_corpus(path: str | Path) -> list[dict]:
    """The records of a corpus JSONL file, in file order (record i has index i)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- formatting and tokenizing


def render(record: Mapping[str, Any], tokenizer: Any, template: Literal["chat", "plain"]) -> tuple[str, str]:
    """(prompt text, full text) of a record; the response starts at len(prompt text).

    chat: the tokenizer's chat template, prompt with the generation prompt, full with the
    response as the assistant turn. plain: the messages' contents one a line, a newline, the
    response (no special tokens; the EOS is appended as an id by `tokenize_record`).
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    response = record["text"]
    if template == "plain":
        prompt = "\n".join(m["content"] for m in messages) + "\n"
        return prompt, prompt + response
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"record {record.get('key')!r}: the chat template does not extend the prompt with the response")
    return prompt, full


def tokenize_record(
    record: Mapping[str, Any], tokenizer: Any, template: Literal["chat", "plain"], max_length: int
) -> dict[str, Any]:
    """input_ids, labels (-100 on the prompt) and n_response of one record, truncated to max_length.

    The response's end-of-turn token (the EOS) is a target, and nothing after it is kept (a
    template's trailing newline is never generated). A response the teacher did not finish
    (`finish_reason == "length"`) gets no EOS: the student must not learn to stop there.
    Tokens are labelled by character offsets, so a token that straddles the prompt/response
    boundary counts as response. Truncation cuts the end; n_response may then be 0.
    """
    prompt, full = render(record, tokenizer, template)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    start = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    eos = tokenizer.eos_token_id
    end = next((i + 1 for i in range(start, len(ids)) if ids[i] == eos), None)
    if end is None:
        ids, end = ids + [eos], len(ids) + 1
    if record.get("finish_reason") == "length":
        end -= 1
    ids = ids[: min(end, max_length)]
    labels = [IGNORE_INDEX] * min(start, len(ids)) + ids[start:]
    return {"input_ids": ids, "labels": labels, "n_response": max(0, len(ids) - start)}


def build_dataset(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    template: Literal["chat", "plain"] = "chat",
    max_length: int = 512,
    num_proc: int = 1,
) -> Dataset:
    """A `datasets.Dataset` of examples, one per record with at least one response token left.

    Columns: index (record position in `records`), prompt_id, input_ids, labels, n_response.
    Records whose prompt fills max_length entirely are dropped (their index is absent).
    Tokenized in batches, in `num_proc` processes when there are more records than that.
    """
    base = Dataset.from_dict(
        {
            "index": list(range(len(records))),
            "prompt_id": [str(r.get("prompt_id", r.get("key", i))) for i, r in enumerate(records)],
            "messages": [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in records],
            "text": [r["text"] for r in records],
            "finish_reason": [r.get("finish_reason") or "stop" for r in records],
        }
    )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        rows = [
            tokenize_record({"messages": m, "text": t, "finish_reason": f}, tokenizer, template, max_length)
            for m, t, f in zip(batch["messages"], batch["text"], batch["finish_reason"])
        ]
        return {key: [row[key] for row in rows] for key in ("input_ids", "labels", "n_response")}

    procs = num_proc if 1 < num_proc < len(records) else None
    data = base.map(tokenize, batched=True, num_proc=procs, remove_columns=["messages", "text", "finish_reason"],
                    desc="tokenizing" if procs else None)
    return data.filter(lambda n: n > 0, input_columns="n_response")


def response_positions(labels: Tensor) -> list[Tensor]:
    """Per row of labels [B, T]: the positions that have a target (labels != IGNORE_INDEX), in order."""
    return [torch.nonzero(row != IGNORE_INDEX).squeeze(-1) for row in labels]


def response_logits(logits: Tensor, positions: list[Tensor]) -> list[Tensor]:
    """Per row of a model's logits [B, T, V]: [n_response, V], row t predicting response token t.

    The logits at t-1 predict the token at t (labels are aligned with input_ids)."""
    return [logits[b, p - 1] for b, p in enumerate(positions)]


# ---------------------------------------------------------------- held-out split


def is_heldout(prompt_id: str, fraction: float, salt: str = "heldout") -> bool:
    """Whether a prompt belongs to the held-out split: a hash of (salt, prompt_id), not an RNG.

    The same prompt lands on the same side on every machine, run and corpus size, and all
    samples of one prompt stay together.
    """
    digest = hashlib.sha256(f"{salt}\0{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_of(prompt_id: str, heldout_fraction: float, validation_fraction: float = 0.0) -> str:
    """`heldout` (evaluation), `validation` (fitting; neither trained on nor evaluated) or `train`.

    Both by hashes of the prompt id: a held-out prompt stays held out whatever the validation
    share, and the validation prompts are a fixed share of the others."""
    if is_heldout(prompt_id, heldout_fraction):
        return "heldout"
    return "validation" if is_heldout(prompt_id, validation_fraction, salt="validation") else "train"


SPLITS = ("train", "validation", "heldout")


def record_split(record: dict, split: str, heldout_fraction: float, validation_fraction: float) -> str:
    """A record's split: by the hashes of `split_of` (`data.split: hash`), or (`prompts`) the one its
    prompt named in the prompts file (`split`), as a task suite with its own splits has them."""
    if split == "hash":
        return split_of(record["prompt_id"], heldout_fraction, validation_fraction)
    named = record.get("split")
    if named not in SPLITS:
        raise BayeskdError(
            f"data.split=prompts: prompt {record['prompt_id']!r} has split {named!r}; every prompt in "
            f"collect.prompts needs a `split` field, one of {', '.join(SPLITS)}"
        )
    return named


# ---------------------------------------------------------------- packing


def pack(data: Dataset, max_length: int, seed: int | None = None) -> Dataset:
    """Pack examples into rows of at most max_length tokens (next-fit, in order or shuffled by seed).

    Columns: input_ids, labels, position_ids (restart at 0 per example), index and n_response
    (lists: the examples of the row, in order). Labels are the examples' own, so the set of
    target tokens is unchanged.
    """
    order = list(range(len(data)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    rows: list[dict[str, list]] = []
    row: dict[str, list] = {}
    for ex in data.select(order):
        if len(ex["input_ids"]) > max_length:
            raise DataError(f"pack: example {ex['index']} has {len(ex['input_ids'])} tokens > max_length={max_length}")
        if not row or len(row["input_ids"]) + len(ex["input_ids"]) > max_length:
            row = {"input_ids": [], "labels": [], "position_ids": [], "index": [], "n_response": []}
            rows.append(row)
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += list(range(len(ex["input_ids"])))
        row["index"].append(ex["index"])
        row["n_response"].append(ex["n_response"])
    keys = ("input_ids", "labels", "position_ids", "index", "n_response")
    return Dataset.from_dict({k: [r[k] for r in rows] for k in keys})


# ---------------------------------------------------------------- sparse targets


class TargetSource(Protocol):
    """Sparse targets by corpus record, one row per response token (a `targets.TargetStore` set)."""

    def example(self, index: int, n: int) -> SparseDist:
        """The first n rows of record `index`, as tensors: ids / probs [n, K], tail [n]."""
        ...


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _pad(seqs: list[list[int]], value: int, length: int) -> Tensor:
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


@dataclass
class Collator:
    """Rows (padded examples or packed rows) -> a batch of tensors for the training loop.

    Batch fields: input_ids [B, T], labels [B, T] (-100 = no target); padded rows add
    attention_mask [B, T] and index [B]; packed rows add position_ids [B, T] (the padding
    tail is one more sequence, positions from 0, so it attends only to itself). With
    `targets` (name -> TargetSource; names in LOSS_TARGETS) each adds
    `{name}_ids` [B, T, K] (-1 elsewhere), `{name}_probs` [B, T, K], `{name}_tail` [B, T]
    (0 elsewhere), placed exactly at the label positions. With `weights` (one per corpus
    record) it adds `weights`: [B] for padded rows, [B, T] (per token) for packed rows.
    """

    pad_token_id: int
    targets: Mapping[str, TargetSource] = field(default_factory=dict)
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.targets) - set(LOSS_TARGETS)
        if unknown:
            raise ValueError(f"Collator: unknown targets {sorted(unknown)}; expected names in {LOSS_TARGETS}")

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        packed = "position_ids" in rows[0]
        length = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": _pad([list(r["input_ids"]) for r in rows], self.pad_token_id, length),
            "labels": _pad([list(r["labels"]) for r in rows], IGNORE_INDEX, length),
        }
        if packed:
            batch["position_ids"] = torch.tensor(
                [list(r["position_ids"]) + list(range(length - len(r["position_ids"]))) for r in rows]
            )
        else:
            batch["attention_mask"] = _pad([[1] * len(r["input_ids"]) for r in rows], 0, length)
            batch["index"] = torch.tensor([r["index"] for r in rows])
        label_pos = response_positions(batch["labels"])
        for name, table in self.targets.items():
            batch.update(self._place(name, table, rows, label_pos, length))
        if self.weights is not None:
            batch["weights"] = self._weights(rows, packed, length)
        return batch

    def _place(
        self, name: str, table: TargetSource, rows: Sequence[Mapping[str, Any]], label_pos: list[Tensor], length: int
    ) -> dict[str, Tensor]:
        """Scatter each row's examples' targets, concatenated in order, onto its label positions."""
        per_row = []
        for r, pos in zip(rows, label_pos):
            parts = [table.example(int(i), int(n)) for i, n in zip(_as_list(r["index"]), _as_list(r["n_response"]))]
            t = SparseDist(*(torch.cat(x) for x in zip(*parts)))
            if len(t.tail) != len(pos):
                raise DataError(f"{name} targets: {len(t.tail)} rows for {len(pos)} label positions")
            per_row.append(t)
        k = per_row[0].ids.shape[-1]
        ids = torch.full((len(rows), length, k), -1, dtype=per_row[0].ids.dtype)
        probs = torch.zeros((len(rows), length, k), dtype=torch.float32)
        tail = torch.zeros((len(rows), length), dtype=torch.float32)
        for b, (t, pos) in enumerate(zip(per_row, label_pos)):
            ids[b, pos], probs[b, pos], tail[b, pos] = t.ids, t.probs.float(), t.tail.float()
        return {f"{name}_ids": ids, f"{name}_probs": probs, f"{name}_tail": tail}

    def _weights(self, rows: Sequence[Mapping[str, Any]], packed: bool, length: int) -> Tensor:
        """[B] per example, or for packed rows [B, T]: each token gets its own example's weight."""
        if not packed:
            return torch.tensor([float(self.weights[r["index"]]) for r in rows])
        out = torch.zeros(len(rows), length)
        for b, r in enumerate(rows):
            starts = [j for j, p in enumerate(r["position_ids"]) if p == 0] + [len(r["position_ids"])]
            for seg, i in enumerate(r["index"]):
                out[b, starts[seg] : starts[seg + 1]] = float(self.weights[i])
        return out
