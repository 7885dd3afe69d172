"""Where this process stands in a distributed launch (torchrun, `accelerate launch`): read from the
environment those launchers set, so that the run's plumbing (artifacts, the lock) can ask without
importing torch or accelerate; and how the ranks of a launch share work and wait for each other
(`Launch`)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bayeskd.errors import BayeskdError


def launch_id() -> str | None:
    """What all ranks of one distributed launch share (None outside one)."""
    if "RANK" not in os.environ:
        return None
    env = os.environ
    return f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}/{env.get('TORCHELASTIC_RUN_ID', '')}"


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_rank() -> bool:
    """Rank 0 of a distributed launch (`RANK`, as torchrun and accelerate set it), or no launch at all."""
    return rank() == 0


def world_size() -> int:
    """Processes in the launch (`WORLD_SIZE`, as torchrun and accelerate set it); 1 outside one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class RankFailedError(BayeskdError):
    """Another rank of this launch stopped with an error: this one stops too."""


def shard(weights: Sequence[float], rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): rank's contiguous slice of items with these weights (positions per example), the
    slices in rank order covering all items, each about 1/world of the total weight. Contiguous, so
    that the parts concatenated in rank order are the items in their order."""
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])
    cuts = [0, *(int(np.searchsorted(cum, cum[-1] * r / world, side="left")) for r in range(1, world)), len(weights)]
    cuts = np.maximum.accumulate(np.minimum(cuts, len(weights)))
    return int(cuts[rank]), int(cuts[rank + 1])


class Launch:
    """Signals between the ranks of one distributed launch, as files under `<run_dir>/.launch/<id>/`.

    Files rather than the process group: a rank may wait for hours on rank 0 (`collect` asks a paid
    API), past any collective's timeout, and the stages that wait need no torch. Every rank calls
    the same `broadcast` and `gather` in the same order (each name counts its calls, so that a
    stage run twice in a launch signals twice). A rank that stops with an error calls `fail`, and
    every rank waiting anywhere in the launch stops with `RankFailedError` instead of hanging.
    Outside a launch (one process) every call returns at once. The run folder must be one shared
    folder for all ranks (one machine, or a shared file system).
    """

    def __init__(self, folder: Path | None = None, rank: int = 0, world: int = 1, poll_s: float = 0.05):
        self.folder, self.rank, self.world, self.poll_s = (Path(folder) if folder else None), rank, world, poll_s
        self._calls: dict[str, int] = {}

    @classmethod
    def of(cls, run_dir: str | Path, holder: dict) -> Launch:
        """This process's launch on a run folder whose lock `holder` (rank 0's record) holds it; one
        process outside a launch. Rank 0 removes what earlier launches left."""
        world = world_size()
        if world <= 1 or "RANK" not in os.environ:
            return cls()
        token = hashlib.sha256(json.dumps([holder.get(k) for k in ("pid", "host", "started", "launch")]).encode()).hexdigest()[:16]
        base = Path(run_dir) / ".launch"
        if rank() == 0 and base.is_dir():
            for old in base.iterdir():
                if old.name != token:
                    shutil.rmtree(old, ignore_errors=True)
        (base / token).mkdir(parents=True, exist_ok=True)
        return cls(base / token, rank(), world)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, weights: Sequence[float]) -> tuple[int, int]:
        return shard(weights, self.rank, self.world)

    def _key(self, name: str) -> str:
        self._calls[name] = self._calls.get(name, 0) + 1
        return f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)}.{self._calls[name]}"

    def _write(self, key: str, rank_: int, data: Any) -> None:
        path = self.folder / f"{key}.rank{rank_}.pkl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(data, f)
        os.replace(tmp, path)

    def _read(self, key: str, rank_: int) -> Any:
        path = self.folder / f"{key}.rank{rank_}.pkl"
        while not path.exists():
            failed = sorted(self.folder.glob("failed.rank*.pkl"))
            if failed:
                with open(failed[0], "rb") as f:
                    who, message = pickle.load(f)
                raise RankFailedError(f"rank {who} of this launch stopped: {message}")
            time.sleep(self.poll_s)
        with open(path, "rb") as f:  # our own launch's files (written by its ranks, in its run folder)
            return pickle.load(f)

    def broadcast(self, name: str, data: Any = None) -> Any:
        """Rank 0's `data`, on every rank: rank 0 goes on at once, the others wait for it."""
        if not self.distributed:
            return data
        key = self._key(name)
        if self.main:
            self._write(key, 0, data)
            return data
        return self._read(key, 0)

    def gather(self, name: str, data: Any) -> list | None:
        """Every rank's `data`, in rank order, on rank 0 (which waits for all); None on the others,
        which go on at once."""
        if not self.distributed:
            return [data]
        key = self._key(name)
        self._write(key, self.rank, data)
        if not self.main:
            return None
        return [data if r == 0 else self._read(key, r) for r in range(self.world)]

    def fail(self, message: str) -> None:
        """Tell the other ranks this one stopped (they stop waiting)."""
        if self.distributed:
            try:
                self._write("failed", self.rank, (self.rank, message))
            except OSError:
                pass
