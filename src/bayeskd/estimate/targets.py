"""The target store: per-response-token sparse distributions, in memory-mapped shards.

A store is a folder with one sub-folder per shard (`shard-00000/`, ...) holding, for each
target set (`prior`, `posterior`, `proxy`, ...), `{set}_ids.npy` int32 [N, K],
`{set}_probs.npy` float16 [N, K] (rounded toward zero: no row sums above 1) and `{set}_tail.npy` float32 [N]; plus `entropy.npy`
float16 [N] (the posterior's, per token) and `records.npy` int64 [R, 3] (corpus record
index, first row, number of rows). `store.json` records what produced the targets: the
tokenizer's and the corpus's fingerprints, the prior tables, the proxy checkpoint, mode, M,
K. A shard never splits a record, so every record's rows are one slice of one shard.
Bytes per stored entry: 4 (id) + 2 (probability) + 4 / K (tail) -> about 6.1 at K = 32.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bayeskd.artifacts import writing
from bayeskd.estimate.distributions import SparseDist
from bayeskd.errors import BayeskdError

STORE_META = "store.json"


def float16_floor(probs: np.ndarray) -> np.ndarray:
    """Probabilities [N, K] as float16, each rounded toward zero, after rows summing above 1 are
    scaled down to 1: so that no stored row sums above 1 (round-to-nearest could give 1.00015,
    and a tail clipped at 0 would not absorb it). What rounding takes off joins the tail."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    p = p / np.maximum(p.sum(1, keepdims=True), 1.0)
    half = p.astype(np.float16)
    over = half.astype(np.float64) > p
    return np.where(over, np.nextafter(half, np.float16(0)), half)


class TargetWriter:
    """Appends records' target rows; closes a shard every `shard_rows` rows (at a record boundary)."""

    def __init__(self, folder: str | Path, sets: tuple[str, ...], k: int, shard_rows: int = 1_000_000):
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.sets, self.k, self.shard_rows = sets, k, shard_rows
        self.shard = 0
        self._reset()

    def _reset(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.records: list[tuple[int, int, int]] = []
        self.rows = 0

    def add(self, record_index: int, dists: dict[str, SparseDist], entropy: np.ndarray) -> None:
        """One record's rows: a SparseDist per set (same number of rows) and the posterior entropy."""
        n = len(entropy)
        for name in self.sets:
            d = dists[name]
            if len(d.ids) != n:
                raise ValueError(f"target set {name}: {len(d.ids)} rows for {n} positions")
            if not (np.isfinite(d.probs).all() and np.isfinite(d.tail).all()):
                raise BayeskdError(
                    f"non-finite {name} targets for corpus record {record_index}: "
                    "check the proxy checkpoint and posterior.* (e.g. proxy_temperature)"
                )
            ids = np.full((n, self.k), -1, np.int32)
            probs = np.zeros((n, self.k), np.float16)
            kk = min(self.k, d.ids.shape[1])
            ids[:, :kk], probs[:, :kk] = d.ids[:, :kk], float16_floor(d.probs[:, :kk])
            # The tail is stored as 1 - sum of the stored (rounded) probabilities, so that each
            # stored row sums to one exactly as the student sees it.
            tail = np.clip(1.0 - probs.astype(np.float64).sum(1), 0.0, 1.0).astype(np.float32)
            for key, arr in (("ids", ids), ("probs", probs), ("tail", tail)):
                self.parts.setdefault(f"{name}_{key}", []).append(arr)
        self.parts.setdefault("entropy", []).append(entropy.astype(np.float16))
        self.records.append((record_index, self.rows, n))
        self.rows += n
        if self.rows >= self.shard_rows:
            self._flush()

    def add_stored(self, record_index: int, arrays: dict[str, np.ndarray]) -> None:
        """One record's rows as another writer stored them (`{set}_ids`, `{set}_probs`, `{set}_tail`,
        `entropy`), copied as they are: merging stores changes no stored value."""
        n = len(arrays["entropy"])
        keys = [f"{name}_{key}" for name in self.sets for key in ("ids", "probs", "tail")] + ["entropy"]
        for key in keys:
            arr = arrays[key]
            if len(arr) != n or (arr.ndim == 2 and arr.shape[1] != self.k):
                raise ValueError(f"{key}: shape {arr.shape} for {n} rows of width {self.k}")
            self.parts.setdefault(key, []).append(np.asarray(arr))
        self.records.append((record_index, self.rows, n))
        self.rows += n
        if self.rows >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.records:
            return
        d = self.folder / f"shard-{self.shard:05d}"
        with writing(d):
            d.mkdir()
            for name, parts in self.parts.items():
                np.save(d / f"{name}.npy", np.concatenate(parts))
            np.save(d / "records.npy", np.asarray(self.records, dtype=np.int64))
        self.shard += 1
        self._reset()

    def close(self, meta: dict) -> None:
        self._flush()
        tmp = self.folder / f".{STORE_META}.tmp"
        with writing(self.folder / STORE_META, remove_on_error=tmp):
            tmp.write_text(json.dumps({"sets": list(self.sets), "k": self.k, **meta}, indent=2))
            os.replace(tmp, self.folder / STORE_META)


def merge_stores(parts: list[Path], folder: str | Path, meta: dict, shard_rows: int = 1_000_000) -> TargetStore:
    """One store from stores that each hold a consecutive slice of the records (the ranks of a
    distributed `posterior`, in rank order): the records in that order, their rows copied, the
    shards cut where one writer fed the same records would have cut them."""
    stores = [TargetStore.open(p) for p in parts]
    sets, k = stores[0].meta["sets"], stores[0].meta["k"]
    if any(st.meta["sets"] != sets or st.meta["k"] != k for st in stores):
        raise BayeskdError(f"target stores {[str(p) for p in parts]} differ in their sets or K: not parts of one store")
    writer = TargetWriter(folder, tuple(sets), k, shard_rows)
    for store in stores:
        for index, (shard, start, rows) in store._index.items():  # in the order the part wrote them
            arrays = store.arrays(shard)
            writer.add_stored(index, {key: arr[start : start + rows] for key, arr in arrays.items() if key != "records"})
    writer.close(meta)
    return TargetStore.open(folder)


@dataclass
class _SetView:
    """One target set of a store, in the shape `data.Collator` asks of a table: `.example(i, n)`."""

    store: TargetStore
    name: str

    def example(self, index: int, n: int) -> SparseDist:
        """The first n target rows of corpus record `index`, as tensors: ids / probs [n, K], tail [n]."""
        shard, start, rows = self.store.where(index)
        if rows < n:
            raise BayeskdError(f"target store: record {index} has {rows} target rows for {n} response labels")
        arrays = self.store.arrays(shard)
        sl = slice(start, start + n)
        return SparseDist(
            torch.from_numpy(np.array(arrays[f"{self.name}_ids"][sl], dtype=np.int64)),
            torch.from_numpy(np.array(arrays[f"{self.name}_probs"][sl], dtype=np.float32)),
            torch.from_numpy(np.array(arrays[f"{self.name}_tail"][sl], dtype=np.float32)),
        )


@dataclass
class TargetStore:
    folder: Path
    meta: dict
    _index: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    _arrays: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> TargetStore:
        folder = Path(folder)
        meta_path = folder / STORE_META
        if not meta_path.is_file():
            raise BayeskdError(f"{folder} is not a finished target store: run `bayeskd posterior` first")
        store = cls(folder, json.loads(meta_path.read_text()))
        for shard_dir in sorted(folder.glob("shard-*")):
            shard = int(shard_dir.name.split("-")[1])
            for index, start, rows in np.load(shard_dir / "records.npy"):
                store._index[int(index)] = (shard, int(start), int(rows))
        return store

    def check(self, tokenizer_fp: str, corpus_fp: str) -> None:
        """Refuse targets made with another tokenizer or from another corpus."""
        if self.meta.get("tokenizer") != tokenizer_fp:
            raise BayeskdError(
                f"targets in {self.folder} were made with another tokenizer "
                f"({self.meta.get('tokenizer')} vs the student's {tokenizer_fp}): rerun `bayeskd posterior`"
            )
        if self.meta.get("corpus") != corpus_fp:
            raise BayeskdError(
                f"targets in {self.folder} were made from another corpus "
                f"({self.meta.get('corpus')} vs {corpus_fp}): rerun `bayeskd posterior`"
            )

    def where(self, index: int) -> tuple[int, int, int]:
        if index not in self._index:
            raise BayeskdError(f"target store {self.folder}: no targets for corpus record {index}")
        return self._index[index]

    def arrays(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._arrays:
            d = self.folder / f"shard-{shard:05d}"
            self._arrays[shard] = {p.stem: np.load(p, mmap_mode="r") for p in d.glob("*.npy")}
        return self._arrays[shard]

    def table(self, name: str) -> _SetView:
        if name not in self.meta["sets"]:
            raise BayeskdError(f"target store {self.folder} has no {name!r} targets (it has {self.meta['sets']})")
        return _SetView(self, name)

    def rows(self, index: int, key: str) -> np.ndarray:
        """All stored rows of one array (e.g. "entropy", "posterior_probs") for one record."""
        shard, start, rows = self.where(index)
        return np.asarray(self.arrays(shard)[key][start : start + rows])

    def bytes_per_entry(self, name: str) -> float:
        """Data bytes (ids, probabilities, tail) per stored entry of a set; .npy headers not counted."""
        total = entries = 0
        for shard_dir in self.folder.glob("shard-*"):
            for key in ("ids", "probs", "tail"):
                total += np.load(shard_dir / f"{name}_{key}.npy", mmap_mode="r").nbytes
            entries += np.load(shard_dir / f"{name}_ids.npy", mmap_mode="r").size
        return total / max(entries, 1)
