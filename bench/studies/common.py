"""What the studies share: their configs and run folders, the `bayeskd` CLI in a child process,
the per-seed summary of students, the record they write (OUT/name.json and OUT/name.md), and
how a variant of a run reuses its finished stages (links) under a regime's overrides."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: relative config, run and output paths are under it."""
STUDENT_FIELDS = ("bpb", "kl_teacher", "rouge_l", "accuracy")


def load_bench_config(path: str, overrides: list[str]):
    """A benchmark's config (offline, this checkout's bayeskd) and its base run folder, absolute."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    from bayeskd.config import load_config

    cfg = load_config(path, overrides)
    base = Path(cfg.run_dir)
    return cfg, base if base.is_absolute() else ROOT / base


def open_finished_run(config: str, run_dir: str):
    """A finished run read in process, for the benches that score estimates at positions: its
    config (with run_dir), the Run, the tokenized corpus, and the oracle (the local teacher's true
    distributions, used only to measure fidelity)."""
    path = ROOT / run_dir
    cfg, _ = load_bench_config(config, [f"run_dir={path}"])
    from bayeskd.artifacts import Run
    from bayeskd.corpus import load_corpus
    from bayeskd.evaluate.oracle import load_oracle

    run = Run(path)
    corpus = load_corpus(cfg, run)
    return cfg, run, corpus, load_oracle(cfg, corpus.tokenizer_fp)


def bayeskd(*args: str) -> None:
    cmd = [sys.executable, "-m", "bayeskd.cli", *args]
    print("$ bayeskd " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def summarise(per_seed: dict[int, dict], fields: tuple[str, ...] = STUDENT_FIELDS) -> dict:
    """mean, sample std, min, max over seeds of each student's `fields`."""
    out: dict = {}
    students = sorted({m for s in per_seed.values() for m in s}, key=_student_order)
    for mode in students:
        out[mode] = {"seeds": sorted(s for s in per_seed if mode in per_seed[s])}
        for f in fields:
            vals = [per_seed[s][mode][f] for s in per_seed if mode in per_seed[s] and per_seed[s][mode].get(f) is not None]
            if vals:
                out[mode][f] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                "min": min(vals), "max": max(vals), "values": vals}  # fmt: skip
    return out


def _student_order(mode: str) -> int:
    order = ["sft", "sft-trl", "proxy-kd", "prior-only", "posterior-only", "bayes", "oracle-kd"]
    return order.index(mode) if mode in order else len(order)


def write_record(out_arg: str, name: str, record: dict, md: str) -> Path:
    """OUT/name.json and OUT/name.md; returns OUT (relative paths are under the repository root)."""
    out = ROOT / out_arg if not Path(out_arg).is_absolute() else Path(out_arg)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    (out / f"{name}.md").write_text(md)
    return out


def link_stages(src: Path, dst: Path, stages: tuple[str, ...]) -> None:
    """dst/stage -> src/stage for finished stages that dst does not have (read, never rewritten)."""
    dst.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if not (dst / stage).exists():
            (dst / stage).symlink_to((src / stage).resolve(), target_is_directory=True)


def regime_overrides(r: int) -> list[str]:
    return ["posterior.use_logprobs=false", "posterior.top_logprobs=0"] if r == 0 else [f"posterior.top_logprobs={r}"]


def variant_dir(base: Path, r: int, fit: bool) -> Path:
    return base.parent / f"top{r}-{'fit' if fit else 'default'}"
