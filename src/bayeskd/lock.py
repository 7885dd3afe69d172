"""One command at a time on a run folder: an exclusive lock on `<run_dir>/.lock`.

Every command that writes a run folder (each stage, `run`) takes the lock first, for the
whole command; a second command on the same folder stops at once with `RunLockedError`
(exit code 2), naming the holder: PID, host, command line, start time. The lock is a
`fcntl.flock` on the file, so the kernel releases it when the holder dies, however it dies: a
lock left by a killed process is simply taken again (and the note says whose it was). The file
itself holds the holder's JSON for the message and is never deleted (deleting a lock file
lets two processes lock two different files).

Under `accelerate launch` (or any launcher that sets `RANK`), only rank 0 takes the lock; the
other ranks wait until their own launch's rank 0 holds it (same `MASTER_ADDR:MASTER_PORT`), so
that one launch is one holder and a second launch's ranks never touch a folder in use.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from bayeskd.errors import BayeskdError
from bayeskd.ranks import launch_id, rank

LOCK_NAME = ".lock"


class RunLockedError(BayeskdError):
    """Another command holds the run folder's lock."""


def holder_info() -> dict:
    try:
        command = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = " ".join([sys.executable, *sys.argv])
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "launch": launch_id()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path, tries: int = 5) -> dict | None:
    """The holder recorded in the lock file (None if empty or unreadable: it may be being written)."""
    for i in range(tries):
        try:
            text = path.read_text()
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        if i + 1 < tries:
            time.sleep(0.02)
    return None


def describe(holder: dict | None, held: bool = False) -> str:
    """The holder for a message; `held`: the lock is held now (a gone PID means a child of it holds it)."""
    if not holder:
        return "a process that has not yet recorded itself"
    same_host = holder.get("host") == socket.gethostname()
    gone = same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])
    note = ""
    if gone:
        note = " (that PID is gone; a child process it started still holds the lock)" if held else " (gone)"
    return (f"PID {holder.get('pid')} on {holder.get('host')}{note}, started {holder.get('started')}: "
            f"{holder.get('command')}")


class RunLock:
    """`with RunLock(run_dir):` -- hold the run folder for the block (see the module docstring)."""

    def __init__(self, root: str | Path, rank_wait_s: float = 120.0):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.rank_wait_s = rank_wait_s
        self.fd: int | None = None
        self.holder: dict = {}
        self.taken_over: dict | None = None  # the holder recorded by a process that died holding the lock

    def acquire(self) -> RunLock:
        from bayeskd.artifacts import writing

        self.root.mkdir(parents=True, exist_ok=True)
        if rank() != 0:
            self._wait_for_rank0()
            return self
        with writing(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(
                    f"{self.root} is in use by another bayeskd command: {describe(_read(self.path), held=True)}. Wait for it "
                    "to finish, or stop it (a lock left by a killed command is taken over by the next one)"
                ) from None
            previous = _read(self.path, tries=1)
            if previous and not previous.get("released"):
                self.taken_over = previous
            self.fd, self.holder = fd, holder_info()
            self._record(self.holder)
        return self

    def _record(self, holder: dict) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def _wait_for_rank0(self) -> None:
        mine, deadline = launch_id(), time.time() + self.rank_wait_s
        while True:
            holder = _read(self.path, tries=1)
            if holder and holder.get("launch") == mine:  # held, or already released by a rank 0 that skipped
                self.holder = holder  # rank 0's record: what names this launch (`ranks.Launch.of`)
                return
            if time.time() > deadline:
                raise RunLockedError(
                    f"rank {rank()}: rank 0 of this launch did not take the lock of {self.root} within "
                    f"{self.rank_wait_s:.0f} s; it is held by {describe(holder)}"
                )
            time.sleep(0.1)

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # marked released: the next command has no dead holder to report, and this launch's
            self._record({**self.holder, "released": True})  # other ranks still find their launch
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
