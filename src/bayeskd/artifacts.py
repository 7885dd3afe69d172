"""The run folder: one sub-folder per stage, each with a manifest.

A manifest records what a stage was built from (its resolved config and the fingerprints of
its inputs), the package versions, timestamps, its status and a summary. A stage whose
manifest says `done` with the same fingerprint is skipped on rerun; one built from another
config or other inputs is refused unless `--force`, so stale outputs never pass silently.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from bayeskd.errors import BayeskdError

MANIFEST = "manifest.json"
_PACKAGES = ("bayeskd", "torch", "transformers", "accelerate", "datasets", "peft", "openai", "numpy")


class StaleStageError(BayeskdError):
    """A finished stage's outputs were built from another config or other inputs."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON beside the target and rename over it: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """A run folder."""

    root: Path

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
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        os.replace(tmp, self.root / "config.yaml")

    def begin(
        self, stage: str, config: dict, inputs: dict[str, str], force: bool = False, keep_outputs: bool = False
    ) -> Path | None:
        """Start a stage: None if it is already done with these config and inputs (skip it).

        Raises StaleStageError if it is done but was built from something else, unless `force`.
        An unfinished stage with the same fingerprint keeps its folder (a crashed run resumes
        from its checkpoints); otherwise the folder is emptied first, unless `keep_outputs`
        (collect keeps its content-keyed store: nothing paid for is ever thrown away).
        """
        fp = fingerprint({"config": config, "inputs": inputs})
        old = self.manifest(stage)
        if old and old.get("status") == "done" and not force:
            if old.get("fingerprint") == fp:
                return None
            changed = _changed(old, config, inputs)
            raise StaleStageError(
                f"stage {stage!r} in {self.root / stage} is done but was built from another "
                f"{changed}; rerun with --force to rebuild it"
            )
        resumable = old is not None and old.get("status") != "done" and old.get("fingerprint") == fp
        if old is not None and not resumable and not keep_outputs:
            shutil.rmtree(self.root / stage)
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
        path = self.root / stage / MANIFEST
        manifest = json.loads(path.read_text())
        manifest.update(status=status, finished=now(), summary=summary, outputs=outputs or {})
        write_json_atomic(path, manifest)

    def output(self, stage: str, name: str) -> Path:
        """A finished (or partial) stage's output file, or a clear error naming the stage to run."""
        m = self.manifest(stage)
        path = self.root / stage / name
        if m is None or m.get("status") not in ("done", "partial") or not path.exists():
            raise BayeskdError(f"{path} does not exist: run `bayeskd {stage}` first")
        return path


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
