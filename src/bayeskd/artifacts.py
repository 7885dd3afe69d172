"""The run folder: one sub-folder per stage, each with a manifest.

A manifest records what a stage was built from (its resolved config and the fingerprints of
its inputs), the package versions, timestamps, its status and a summary. A stage whose
manifest says `done` with the same fingerprint is skipped on rerun; one built from another
config or other inputs is refused unless `--force`, so stale outputs never pass silently.

A finished manifest also lists every file the stage wrote, with its size and sha256. A stage
opening another's output (`Run.output`) checks the sizes always and the checksums when the
output is small or `Run.verify_checksums` is set (`--verify`): a file changed or damaged after
its stage finished stops the command with `CorruptArtifactError`, naming the file and the
stage to rebuild. A full disk while writing is `DiskFullError`, naming the path.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from bayeskd.errors import BayeskdError
from bayeskd.ranks import Launch, is_main_rank

MANIFEST = "manifest.json"
_PACKAGES = ("bayeskd", "torch", "transformers", "accelerate", "datasets", "peft", "openai", "numpy")


# Outputs up to this size are checksummed whenever a stage opens them; larger ones with --verify.
CHEAP_CHECKSUM_BYTES = 64 << 20
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")
_WRITE_FAILED = "file write failed"  # torch.save's message, errno lost: a full disk when no space is left


class StaleStageError(BayeskdError):
    """A finished stage's outputs were built from another config or other inputs."""


class CorruptArtifactError(BayeskdError):
    """A file a finished stage wrote is missing, or differs from its size or sha256 in the manifest."""


class DiskFullError(BayeskdError):
    """No space left while writing: what earlier runs wrote is intact, the interrupted stage is unfinished."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(
            f"no space left on device writing {path}: free some space and rerun the same command "
            "(what was written before is intact; the unfinished stage resumes or starts again)"
        )


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception, or one it was raised from, says the disk (or the quota) is full."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(cur) for t in _DISK_FULL_TEXTS):  # safetensors, tokenizers: errors from Rust
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing(path: str | Path, remove_on_error: str | Path | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into `DiskFullError` naming `path` (or the file the OS
    named); `remove_on_error` (a temporary file or folder) is deleted on any error, freeing its space."""
    try:
        yield
    except BaseException as e:
        if remove_on_error is not None:
            _remove(Path(remove_on_error))
        if isinstance(e, DiskFullError) or not isinstance(e, Exception):
            raise
        if not (is_disk_full(e) or (_WRITE_FAILED in str(e) and _free_bytes(Path(path)) < 1 << 20)):
            raise
        named = getattr(e, "filename", None)
        raise DiskFullError(named or path) from e


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON beside the target and rename over it: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, remove_on_error=tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """JSON lines written beside the target, fsynced and renamed over it (readers see old or new)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, remove_on_error=tmp):
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


CHECKPOINTS = "checkpoints"
"""Training's resume state (`train/checkpoints.py`): model, optimizer and data order at a step. Not an
output: a finished stage's manifest does not list it, and `Run.finish` removes it."""


def stage_files(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of the files a stage wrote in `folder`: not its manifest,
    not hidden temporaries (`.tmp-*`, `.name.tmp`), not sub-stages (folders with their own
    manifest), not training's resume state (`checkpoints/`)."""
    out: dict[str, dict] = {}

    def walk(d: Path) -> None:
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                if p.name == CHECKPOINTS:
                    continue
                if not (p / MANIFEST).exists():
                    walk(p)
            elif p.is_file() and not (d == folder and p.name == MANIFEST):
                out[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}

    walk(folder)
    return out


def drop_resume_state(folder: Path) -> None:
    """Remove every `checkpoints/` folder of the stage in `folder` (not of its sub-stages)."""
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            if p.name == CHECKPOINTS:
                shutil.rmtree(p, ignore_errors=True)
            elif not (p / MANIFEST).exists():
                drop_resume_state(p)


def fingerprint(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint_file(path: Path) -> str:
    """sha256 of a file's bytes (or of a folder's files, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Run:
    """A run folder. `verify_checksums` (`--verify`): checksum every output a stage opens, and
    every file of a finished stage that is skipped. `launch`: the ranks of a distributed launch
    (`ranks.Launch`; one process by default), which the CLI sets once it holds the lock."""

    root: Path
    verify_checksums: bool = False
    launch: Launch = field(default_factory=Launch, repr=False, compare=False)
    _verified: set = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def stage_dir(self, stage: str) -> Path:
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest(self, stage: str) -> dict | None:
        path = self.root / stage / MANIFEST
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def save_config(self, resolved: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".config.yaml.tmp"
        with writing(self.root / "config.yaml", remove_on_error=tmp):
            tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
            os.replace(tmp, self.root / "config.yaml")

    def begin(
        self, stage: str, config: dict, inputs: dict[str, str], force: bool = False, keep_outputs: bool = False
    ) -> Path | None:
        """Start a stage: None if it is already done with these config and inputs (skip it).

        In a distributed launch (`launch`), rank 0 decides and prepares the folder; the other
        ranks wait for its decision, so that none writes into a folder rank 0 is about to clear.

        Raises StaleStageError if it is done but was built from something else, unless `force`.
        An unfinished stage with the same fingerprint keeps its folder (a crashed run resumes
        from its checkpoints); otherwise the folder is emptied first, unless `keep_outputs`
        (collect keeps its content-keyed store: nothing paid for is ever thrown away).
        """
        if self.launch.distributed and not self.launch.main:
            began = self.launch.broadcast(f"begin {stage}")
            return None if began["skip"] else self.root / stage
        d = self._begin(stage, config, inputs, force, keep_outputs)
        self.launch.broadcast(f"begin {stage}", {"skip": d is None})
        return d

    def _begin(self, stage: str, config: dict, inputs: dict[str, str], force: bool, keep_outputs: bool) -> Path | None:
        fp = fingerprint({"config": config, "inputs": inputs})
        old = self.manifest(stage)
        if old and old.get("status") == "done" and not force:
            if old.get("fingerprint") == fp:
                if self.verify_checksums:
                    self.verify(stage)
                return None
            changed = _changed(old, config, inputs)
            raise StaleStageError(
                f"stage {stage!r} in {self.root / stage} is done but was built from another "
                f"{changed}; rerun with --force to rebuild it"
            )
        resumable = old is not None and old.get("status") != "done" and old.get("fingerprint") == fp
        d = self.root / stage
        if not is_main_rank():  # other ranks of a distributed launch: rank 0 alone clears and records
            d.mkdir(parents=True, exist_ok=True)
            return d
        if old is not None and not resumable and not keep_outputs:
            _discard(d)
        _remove(_trash(d))  # left by a kill during an earlier discard
        d = self.stage_dir(stage)
        manifest = {
            "stage": stage,
            "status": "running",
            "fingerprint": fp,
            "config": config,
            "inputs": inputs,
            "versions": versions(),
            "started": now(),
        }
        write_json_atomic(d / MANIFEST, manifest)
        return d

    def finish(self, stage: str, status: str, summary: dict, outputs: dict[str, str] | None = None) -> None:
        """Record the end of a stage: `done`, or `partial` (it stopped early; a rerun continues)."""
        if not is_main_rank():
            return
        path = self.root / stage / MANIFEST
        manifest = json.loads(path.read_text())
        files = stage_files(self.root / stage)
        manifest.update(status=status, finished=now(), summary=summary, outputs=outputs or {}, files=files)
        write_json_atomic(path, manifest)
        if status == "done":  # a finished training resumes nothing: its checkpoints are twice the model or more
            drop_resume_state(self.root / stage)
        self._verified = {k for k in self._verified if k[0] != stage}

    def output(self, stage: str, name: str) -> Path:
        """A finished (or partial) stage's output file or folder, checked against its manifest
        (see `verify`), or a clear error naming the stage to run."""
        m = self.manifest(stage)
        path = self.root / stage / name
        if m is None or m.get("status") not in ("done", "partial") or not path.exists():
            raise BayeskdError(f"{path} does not exist: run `bayeskd {stage.split('/')[0]}` first")
        self.verify(stage, name, checksum=None)
        return path

    def verify(self, stage: str, name: str | None = None, checksum: bool | None = True) -> int:
        """Check the files a finished stage wrote (all, or those under `name`) against its manifest:
        presence and size always; sha256 when `checksum`, or with None when `verify_checksums` is
        set or they are small (CHEAP_CHECKSUM_BYTES). Raises CorruptArtifactError naming the file
        and the stage to rebuild; returns the number of files checked. Manifests written before
        files were recorded are not checked."""
        files = (self.manifest(stage) or {}).get("files")
        if files is None:
            return 0
        mine = {k: v for k, v in files.items() if name is None or k == name or k.startswith(name.rstrip("/") + "/")}
        if checksum is None:
            checksum = self.verify_checksums or sum(v["size"] for v in mine.values()) <= CHEAP_CHECKSUM_BYTES
        if (stage, name, checksum) in self._verified or (stage, name, True) in self._verified:
            return len(mine)
        for rel, want in mine.items():
            path = self.root / stage / rel
            if not path.is_file():
                problem = "it is missing"
            elif path.stat().st_size != want["size"]:
                problem = f"it has {path.stat().st_size} bytes, the manifest says {want['size']}"
            elif checksum and sha256_file(path) != want["sha256"]:
                problem = "its sha256 differs from the manifest's"
            else:
                continue
            raise CorruptArtifactError(
                f"{path} is not the file stage {stage!r} wrote ({problem}): it was changed or damaged after "
                f"the stage finished; rebuild it with `bayeskd {stage.split('/')[0]} --force`"
            )
        self._verified.add((stage, name, checksum))
        return len(mine)


def _trash(d: Path) -> Path:
    return d.with_name(f".{d.name}.discarded")


def _discard(d: Path) -> None:
    """Remove a stage folder so that a kill midway never leaves a `done` manifest over half its
    files: rename it aside first (atomic), then delete it."""
    trash = _trash(d)
    _remove(trash)
    os.replace(d, trash)
    shutil.rmtree(trash)


def _changed(old: dict, config: dict, inputs: dict[str, str]) -> str:
    parts = []
    keys = sorted(set(old.get("config", {})) | set(config))
    diff = [k for k in keys if old.get("config", {}).get(k) != config.get(k)]
    if diff:
        parts.append("config (" + ", ".join(diff) + ")")
    idiff = sorted(k for k in set(old.get("inputs", {})) | set(inputs) if old.get("inputs", {}).get(k) != inputs.get(k))
    if idiff:
        parts.append("input (" + ", ".join(idiff) + ")")
    return " and ".join(parts) or "config"
