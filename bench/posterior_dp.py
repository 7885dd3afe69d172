"""Throughput of the `posterior` stage at 1 and 2 processes (issue 28): the stage itself, run
by the CLI on a real run folder, alone and under `accelerate launch` (2 CPU processes, gloo).

    python bench/posterior_dp.py [--prompts 160] [--samples 2] [--max-tokens 64] [--hidden 256]
                                 [--layers 4] [--vocab 4096] [--repeats 2] [--out bench/out/posterior_dp.json]

Setup (not timed): a Llama built from config (`models.build_tiny`: hidden 256, 4 layers, a BPE
tokenizer trained on the built-in prompts, random init) serves as teacher, proxy and student;
`collect` (its answers to the first `--prompts` built-in prompts, `--samples` each, top-5
logprobs), `prior` (order 3) and `proxy` (one step) run once in this process. Timed: `bayeskd
posterior --force` in a child, per configuration:

- `1 proc x 1 thread`, `1 proc x 2 threads`: `python -m bayeskd.cli posterior ...` with
  OMP_NUM_THREADS 1 or 2;
- `2 procs x 1 thread`: `accelerate launch --multi_gpu --num_processes 2` with
  ACCELERATE_USE_CPU=1 (the line the README gives), OMP_NUM_THREADS 1 per process.

Reported: positions; the stage's own positions/s from its manifest (positions over the slowest
rank's scoring time plus rank 0's merge: no interpreter start, no model load); the command's wall
time and positions per wall second (everything: start, imports, loads, merge). Configurations
take turns in each repeat (order rotated), so a shared machine's slow spells spread over all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_args(run_dir: Path, model: Path, a: argparse.Namespace) -> list[str]:
    args = [f"run_dir={run_dir}", f"teacher.model={model}", f"collect.limit={a.prompts}", f"collect.n={a.samples}",
            f"collect.max_tokens={a.max_tokens}", "collect.top_logprobs=5", "data.heldout_fraction=0.1",
            "prior.order=3", f"posterior.batch_size={a.batch_size}"]  # fmt: skip
    for kv in ("max_steps=1", "batch_size=4", "warmup_steps=0", "save_every=1", "init_layers=null"):
        args.append(f"proxy.train.{kv}")
    return [*args, f"proxy.train.model={model}", f"distill.train.model={model}"]


CONFIGS = {"1 proc x 1 thread": (1, 1), "1 proc x 2 threads": (1, 2), "2 procs x 1 thread": (2, 1)}


def run_posterior(name: str, args: list[str]) -> dict:
    procs, threads = CONFIGS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    if procs == 1:
        cmd = [sys.executable, "-m", "bayeskd.cli", "posterior", "--force", *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "bayeskd.cli", "posterior", "--force", *args]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return {"wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=160)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="posterior.batch_size")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/out/posterior_dp.json")
    a = p.parse_args()
    sys.path.insert(0, SRC)
    from rich.console import Console
    from rich.table import Table

    from bayeskd.cli import main as cli
    from bayeskd.models import build_tiny
    from bayeskd.prompts import load_builtin_prompts

    with tempfile.TemporaryDirectory(prefix="bench-posterior-dp-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model = build_tiny(tmp / "model", [x["prompt"] for x in load_builtin_prompts()], vocab_size=a.vocab,
                           hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads)  # fmt: skip
        args = stage_args(tmp / "run", model, a)
        for stage in ("collect", "prior", "proxy"):
            if cli([stage, *args]) != 0:
                raise SystemExit(f"setup: {stage} failed")
        setup_s = time.perf_counter() - t0
        print(f"setup {setup_s:.0f} s", file=sys.stderr)
        runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        names = list(CONFIGS)
        for r in range(a.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                res = run_posterior(name, args)
                summary = json.loads((tmp / "run" / "posterior" / "manifest.json").read_text())["summary"]
                res.update(positions=summary["positions"], stage_positions_per_s=summary["positions_per_s"],
                           processes=summary["processes"])  # fmt: skip
                res["wall_positions_per_s"] = res["positions"] / res["wall_s"]
                runs[name].append(res)
                print(f"{name}: {res}", file=sys.stderr, flush=True)

    def best(name: str, key: str) -> float:
        return max(x[key] for x in runs[name])

    table = Table(title=f"posterior stage, {runs[names[0]][0]['positions']} positions, proxy L{a.layers} H{a.hidden} "
                        f"V~{a.vocab}, {os.cpu_count()} CPUs (best of {a.repeats}; all runs in the JSON)")  # fmt: skip
    for col in ("configuration", "stage pos/s", "vs 1x1", "command wall s", "pos per wall s"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    base = best(names[0], "stage_positions_per_s")
    for name in names:
        table.add_row(name, f"{best(name, 'stage_positions_per_s'):.0f}", f"{best(name, 'stage_positions_per_s') / base:.2f}x",
                      f"{min(x['wall_s'] for x in runs[name]):.1f}", f"{best(name, 'wall_positions_per_s'):.0f}")  # fmt: skip
    Console(width=120).print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    out.write_text(json.dumps({"settings": vars(a), "cpus": os.cpu_count(), "machine": platform.platform(),
                               "loadavg_at_end": load, "setup_s": setup_s, "runs": runs}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
