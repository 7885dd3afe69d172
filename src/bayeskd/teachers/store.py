"""The append-only response store and the usage ledger.

Every teacher answer costs money, so each is written once and replayed forever. Records are
JSON lines in shards (`records-00000.jsonl`, ...), keyed by a content hash of what was asked
(teacher, prompt, sampling parameters, sample index). Lines are written whole and fsynced in
batches; on open, a torn last line (a kill mid-write) is cut off, and a key already present
is never written again, so a rerun after a crash skips what is done and never duplicates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bayeskd.artifacts import DiskFullError, is_disk_full
from bayeskd.teachers.config import PriceConfig

_SHARD = "records-{:05d}.jsonl"


class ResponseStore:
    """Keyed JSONL records on disk; an index of key -> (shard, offset) in memory."""

    def __init__(self, folder: str | Path, flush_every: int = 16, shard_records: int = 50_000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.shard_records = shard_records
        self.index: dict[str, tuple[int, int]] = {}
        self.repaired = 0
        self._shard_count: dict[int, int] = {}
        self._file = None
        self._unsynced = 0
        self._load()

    # ------------------------------------------------------------------ reading

    def _load(self) -> None:
        for path in sorted(self.folder.glob("records-*.jsonl")):
            shard = int(path.stem.split("-")[1])
            self._repair(path)
            count, offset = 0, 0
            with open(path, "rb") as f:
                for line in f:
                    key = json.loads(line)["key"]
                    self.index.setdefault(key, (shard, offset))
                    offset += len(line)
                    count += 1
            self._shard_count[shard] = count

    def _repair(self, path: Path) -> None:
        """Cut a torn or unparsable last line (the only line a kill can damage)."""
        with open(path, "rb+") as f:
            data = f.read()
            good = len(data)
            if data and not data.endswith(b"\n"):
                good = data.rfind(b"\n") + 1
            else:
                last_start = data.rfind(b"\n", 0, max(len(data) - 1, 0)) + 1
                try:
                    if data:
                        json.loads(data[last_start:])
                except ValueError:
                    good = last_start
            if good != len(data):
                f.truncate(good)
                self.repaired += 1

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> dict:
        shard, offset = self.index[key]
        with open(self.folder / _SHARD.format(shard), "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def records(self) -> Iterator[dict]:
        """All records, shard by shard, in the order written."""
        for path in sorted(self.folder.glob("records-*.jsonl")):
            with open(path, "rb") as f:
                for line in f:
                    yield json.loads(line)

    # ------------------------------------------------------------------ writing

    def append(self, record: dict) -> bool:
        """Write a record unless its key is present; returns whether it was written."""
        key = record["key"]
        if key in self.index:
            return False
        shard = max(self._shard_count, default=0)
        if self._shard_count.get(shard, 0) >= self.shard_records:
            shard += 1
            self._close_file()
        if self._file is None:
            # Unbuffered: each line reaches the OS at once, so a SIGKILL loses nothing written;
            # fsync every flush_every lines guards against a machine crash.
            self._file = open(self.folder / _SHARD.format(shard), "ab", buffering=0)
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        offset = self._file.tell()
        view = memoryview(line)
        try:
            while view:  # one line per write call (a raw write may be partial): a kill tears at most this line
                view = view[self._file.write(view) :]
        except OSError as e:
            self._file.truncate(offset)  # a failed write (a full disk) leaves no fragment for the next line to join
            if is_disk_full(e):
                raise DiskFullError(self.folder / _SHARD.format(shard)) from e
            raise
        self.index[key] = (shard, offset)
        self._shard_count[shard] = self._shard_count.get(shard, 0) + 1
        self._unsynced += 1
        if self._unsynced >= self.flush_every:
            self.sync()
        return True

    def sync(self) -> None:
        if self._file is not None and self._unsynced:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._unsynced = 0

    def _close_file(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()

    def __enter__(self) -> ResponseStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Ledger:
    """Teacher tokens spent, per teacher, and their cost under a price table.

    A call's usage is counted once even when its n samples become n records (each record
    carries its call's id and usage). Calls made through a Batch API (records with a `batch`
    field) are counted in the totals too, and again in `batch_*_tokens`: their cost is the
    online price times `price.batch_discount`.
    """

    price: PriceConfig = field(default_factory=PriceConfig)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)
    calls: set[str] = field(default_factory=set)
    batch_prompt_tokens: dict[str, int] = field(default_factory=dict)
    batch_completion_tokens: dict[str, int] = field(default_factory=dict)

    def add(self, teacher: str, call: str, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> None:
        if call in self.calls:
            return
        self.calls.add(call)
        self.prompt_tokens[teacher] = self.prompt_tokens.get(teacher, 0) + prompt_tokens
        self.completion_tokens[teacher] = self.completion_tokens.get(teacher, 0) + completion_tokens
        if batch:
            self.batch_prompt_tokens[teacher] = self.batch_prompt_tokens.get(teacher, 0) + prompt_tokens
            self.batch_completion_tokens[teacher] = self.batch_completion_tokens.get(teacher, 0) + completion_tokens

    def add_record(self, record: dict) -> None:
        u = record.get("usage") or {}
        self.add(record["teacher"], record["call"], u.get("prompt_tokens", 0), u.get("completion_tokens", 0),
                 batch=bool(record.get("batch")))  # fmt: skip

    @property
    def tokens(self) -> int:
        return sum(self.prompt_tokens.values()) + sum(self.completion_tokens.values())

    def cost_of(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        cost = (prompt_tokens * self.price.prompt_per_1k + completion_tokens * self.price.completion_per_1k) / 1000
        return cost * self.price.batch_discount if batch else cost

    @property
    def cost(self) -> float:
        bp, bc = sum(self.batch_prompt_tokens.values()), sum(self.batch_completion_tokens.values())
        online = self.cost_of(sum(self.prompt_tokens.values()) - bp, sum(self.completion_tokens.values()) - bc)
        return online + self.cost_of(bp, bc, batch=True)

    def to_dict(self) -> dict:
        out = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "calls": len(self.calls),
            "tokens": self.tokens,
            "cost": round(self.cost, 6),
            "price": {"prompt_per_1k": self.price.prompt_per_1k, "completion_per_1k": self.price.completion_per_1k},
        }
        if self.batch_prompt_tokens or self.batch_completion_tokens:  # only then: online ledgers keep their shape
            out["batch_prompt_tokens"] = self.batch_prompt_tokens
            out["batch_completion_tokens"] = self.batch_completion_tokens
            out["price"]["batch_discount"] = self.price.batch_discount
        return out


class Budget:
    """A ledger and its caps, with the tokens that requests in flight may still spend reserved.

    `take(tokens)` reserves a request's most expensive outcome (`TeacherRequest.token_bound`)
    before it is sent and says whether it still fits under `budget_tokens` and `budget_cost`
    (extra tokens priced as completion tokens: pessimistic; `batch=True`: at the batch price);
    `release` returns the reservation once the ledger has the real usage. `admit(tokens)` only
    checks (for usage already known). `reached` says whether a check has failed.
    """

    def __init__(self, ledger: Ledger, budget_tokens: int | None = None, budget_cost: float | None = None):
        self.ledger, self.budget_tokens, self.budget_cost = ledger, budget_tokens, budget_cost
        self.reserved, self.reserved_cost, self.reached = 0, 0.0, False

    def fits(self, tokens: int, batch: bool = False) -> bool:
        if self.budget_tokens is not None and self.ledger.tokens + self.reserved + tokens > self.budget_tokens:
            return False
        extra = self.reserved_cost + self.ledger.cost_of(0, tokens, batch)
        return self.budget_cost is None or self.ledger.cost + extra <= self.budget_cost

    def admit(self, tokens: int, batch: bool = False) -> bool:
        ok = self.fits(tokens, batch)
        self.reached |= not ok
        return ok

    def take(self, tokens: int, batch: bool = False) -> bool:
        if not self.admit(tokens, batch):
            return False
        self.reserved += tokens
        self.reserved_cost += self.ledger.cost_of(0, tokens, batch)
        return True

    def release(self, tokens: int, batch: bool = False) -> None:
        self.reserved -= tokens
        self.reserved_cost -= self.ledger.cost_of(0, tokens, batch)
