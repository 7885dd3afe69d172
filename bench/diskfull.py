"""A disk that fills up mid-write, injected where the pipeline writes: the helpers behind the
full-disk scenario of `bench/reliability.py` and its test.

Each is a context manager that patches one write path to fail with ENOSPC, as the OS would
(an OSError without a file name: a write, not an open, fails), after part of the data reached
the disk. A bench helper, not part of the package.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextmanager
def _patched(owner, name: str, value) -> Iterator[None]:
    missing = object()
    old = vars(owner).get(name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


@contextmanager
def store_full_after(lines: int) -> Iterator[None]:
    """The response store's shard file: the disk is full after `lines` whole lines (7 bytes of the next land)."""
    import builtins

    import bayeskd.teachers.store

    left = [lines]

    def opener(path, mode="r", **kw):
        f = builtins.open(path, mode, **kw)
        if "a" in mode:
            write = f.write

            def full(b):
                if left[0] == 0:
                    write(bytes(b)[:7])
                    enospc()
                left[0] -= 1
                return write(b)

            f.write = full
        return f

    with _patched(bayeskd.teachers.store, "open", opener):
        yield


@contextmanager
def targets_full() -> Iterator[None]:
    """np.save of a target store's shard (`shard-*`): the disk is full as the first shard is written."""
    import numpy as np

    save = np.save

    def full(path, *a, **k):
        if "shard-" in str(path):
            Path(path).write_bytes(b"\x93NUMPY")  # a few bytes landed
            enospc()
        return save(path, *a, **k)

    with _patched(np, "save", full):
        yield


@contextmanager
def checkpoint_full_on(nth: int) -> Iterator[None]:
    """The training loop's `nth` checkpoint save: the disk is full after part of the model landed."""
    from accelerate import Accelerator

    real, saves = Accelerator.save_state, [0]

    def full(self, path, *a, **k):
        saves[0] += 1
        if saves[0] == nth:
            Path(path).mkdir(parents=True, exist_ok=True)
            Path(path, "model.safetensors").write_bytes(b"half")
            enospc()
        return real(self, path, *a, **k)

    with _patched(Accelerator, "save_state", full):
        yield


@contextmanager
def fsync_full_after(calls: int) -> Iterator[None]:
    """os.fsync (write_json_atomic, the corpus, store batches): the disk is full after `calls` fsyncs
    succeed; e.g. a stage's manifest at its end."""
    fsync, left = os.fsync, [calls]

    def full(fd):
        if left[0] == 0:
            enospc()
        left[0] -= 1
        return fsync(fd)

    with _patched(os, "fsync", full):
        yield
