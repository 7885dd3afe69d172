"""Kill a command again and again, and compare what it leaves with an unkilled run: the helpers
behind `bench/reliability.py` and its short tests.

A bench helper, not part of the package: only the reliability bench and its tests start and
kill `bayeskd` processes.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import time
from collections.abc import Callable, Hashable
from pathlib import Path

# Files whose bytes legitimately differ between two equal runs: the manifest (times, paths),
# and the timing fields of the training logs (compared without them).
SKIP = ("manifest.json",)
TIMING_KEYS = ("elapsed", "tokens_per_s")


def sigkill_loop(
    args: list[str],
    env: dict,
    progress: Callable[[], Hashable],
    kills_wanted: int,
    rng: random.Random,
    window: float = 0.4,
    startup_every: int = 5,
    timeout: float = 30.0,
    on_kill: Callable[[bool], None] | None = None,
    before_each: Callable[[], None] | None = None,
    delay: Callable[[random.Random], float] | None = None,
) -> int:
    """Start `args` `kills_wanted` times and SIGKILL it at a random moment each time.

    `progress()` is any signal that changes when the command gets going (the server's call
    count for `collect`, `folder_state` of a stage folder for the others). One kill in
    `startup_every` (0: none) lands in start-up (imports, loading inputs); the others a random
    moment within `window` seconds after `progress()` first changes (or `delay(rng)` seconds
    after, where given). `before_each()` runs before each start, `on_kill(began)` after each
    kill (`began`: progress had changed, the command was past start-up). Returns how many runs
    were really killed (a run may finish first).
    """
    kills = 0
    for attempt in range(kills_wanted):
        if before_each is not None:
            before_each()
        seen = progress()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        startup = bool(startup_every) and attempt % startup_every == 0
        deadline = time.time() + (rng.uniform(0.0, 2.5) if startup else timeout)
        began = False
        while proc.poll() is None and time.time() < deadline:
            if progress() != seen:
                began = True
                break
            time.sleep(0.01)
        if not startup:
            time.sleep(delay(rng) if delay is not None else rng.uniform(0.0, window))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            proc.wait()
            if on_kill is not None:
                on_kill(began)
        proc.wait()
    return kills


def folder_state(folder: Path) -> tuple:
    """(path, size, mtime) of every file under `folder`: changes whenever a file appears, grows or is rewritten."""
    out = []
    if folder.is_dir():
        for p in folder.rglob("*"):
            try:
                st = p.stat()
            except OSError:  # removed while listing
                continue
            if p.is_file():
                out.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def status(run_dir: Path, stage: str) -> str | None:
    """A stage's manifest status (for `distill`, "done" only when every mode is)."""
    paths = [run_dir / stage / "manifest.json"] if stage != "distill" else sorted((run_dir / "distill").glob("*/manifest.json"))
    states = []
    for p in paths:
        try:
            states.append(json.loads(p.read_text()).get("status"))
        except (OSError, ValueError):
            states.append(None)
    if not states:
        return None
    return "done" if all(s == "done" for s in states) else "running"


# ---------------------------------------------------------------- comparing two runs' stage folders


def _normal_text(path: Path, root: Path) -> bytes:
    """A text file with its run folder's own path taken out (the eval report names it)."""
    return path.read_bytes().replace(str(root.resolve()).encode(), b"<run>").replace(str(root).encode(), b"<run>")


def _records(path: Path, drop: tuple[str, ...] = ()) -> list:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: v for k, v in row.items() if k not in drop} if isinstance(row, dict) else row)
    return rows


def _close(a, b, rtol: float, atol: float) -> bool:
    """Equal JSON values, numbers within tolerance."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= atol + rtol * abs(float(b))
        except (TypeError, ValueError):
            return False
    return a == b


def _tensors_close(a: Path, b: Path, rtol: float, atol: float) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.allclose(x[k].float(), y[k].float(), rtol=rtol, atol=atol) for k in x)


def compare_stage(a_root: Path, b_root: Path, stage: str, rtol: float = 1e-5, atol: float = 1e-6) -> dict:
    """Compare `stage`'s folder in two run folders, file by file.

    Byte-identical is the rule. Where two equal runs legitimately differ, the comparison says
    how: manifests are skipped; training logs and trainer states compare without their timings;
    the append-only stores compare as sets of records (a killed run appends in another order);
    text files compare with the run folder's own path taken out; safetensors files that differ
    in bytes are compared within (rtol, atol) and reported as `close`.
    Returns {"identical": bool (nothing differs beyond tolerance), "exact": bool (bytes equal after
    the normalisations), "files": n, "close": [...], "differ": [...]}.
    """
    a, b = a_root / stage, b_root / stage

    def files(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name not in SKIP
                and not any(part.startswith(".") for part in p.relative_to(d).parts)}

    fa, fb = files(a), files(b)
    differ = sorted(f"{f} (only in one run)" for f in fa ^ fb)
    close = []
    for rel in sorted(fa & fb):
        pa, pb = a / rel, b / rel
        if pa.read_bytes() == pb.read_bytes():
            continue
        name = pa.name
        if name == "train_log.jsonl":
            ra, rb = _records(pa, TIMING_KEYS), _records(pb, TIMING_KEYS)
            same, near = ra == rb, _close(ra, rb, rtol, atol)
        elif name == "trainer_state.json":
            ra, rb = ({k: v for k, v in json.loads(p.read_text()).items() if k not in TIMING_KEYS} for p in (pa, pb))
            same, near = ra == rb, False
        elif "store" in Path(rel).parts and name.endswith(".jsonl"):
            same, near = sorted(pa.read_text().splitlines()) == sorted(pb.read_text().splitlines()), False
        elif name.endswith((".md", ".json", ".jsonl", ".yaml", ".txt")):
            same, near = _normal_text(pa, a_root) == _normal_text(pb, b_root), False
        elif name.endswith(".safetensors"):
            same, near = False, _tensors_close(pa, pb, rtol, atol)
        else:
            same, near = False, False
        if not same:
            (close if near else differ).append(rel)
    return {"identical": not differ, "exact": not differ and not close, "files": len(fa), "close": close,
            "differ": differ}


def digest(folder: Path) -> str:
    """sha256 over a folder's files (names and bytes), manifests skipped: "did anything change?"."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in SKIP:
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
