"""Reliability of the teacher path and of the run folder: what was tried, and what survived.

    python bench/reliability.py [--rate 0.08] [--prompts 160] [--kills 12] [--clients 64] [--stage-kills 5]
                                [--only faults,sigkill,load,stages,lock,disk,corrupt] [--out bench/out/reliability.json]

On a tiny model (`bayeskd.models.build_tiny`) behind a loopback `bayeskd serve`:

- faults: every kind of `serve.faults.*` at `--rate` each; `collect` once with its default
  retries, then rerun (which retries the permanent failures);
- sigkill: `python -m bayeskd.cli collect` started and SIGKILLed `--kills` times at random
  moments, then run to the end; once with `collect.flush_every=1`, once with the default.
  "Excess paid" counts the calls the server answered beyond one per request; the bound is
  kills x `teacher.max_concurrency` (the calls in flight at each kill);
- load: `--clients` concurrent clients x 4 requests against a `bayeskd serve` subprocess, with
  the default `serve.max_queue` and with 16 (load shedding); RSS of the server before and after.

And on the run folder (`bench/run_safety.py`), against one unkilled pipeline on tiny models:

- stages: every stage (`python -m bayeskd.cli <stage>`) SIGKILLed `--stage-kills` times at random
  moments (one in five in start-up, the others within the stage's own duration once its folder
  changes), then run to the end; its folder is compared with the unkilled run's;
- lock: `--contenders` commands on one folder at once (one runs, the others exit 2 naming it),
  and a command SIGKILLed holding the lock (the next one takes it over);
- disk: ENOSPC injected in the store, a target shard, a checkpoint and a manifest;
- corrupt: a byte flipped or a file cut short in each stage's output, then the next stage.

Prints tables and writes JSON. Loopback only; every count and wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bayeskd.artifacts import Run  # noqa: E402
from bayeskd.teachers.config import FAULT_KINDS, FaultConfig, ServeConfig, TeacherConfig  # noqa: E402
from bayeskd.config import load_config
from bayeskd.stages.collect import run_collect  # noqa: E402
from bayeskd.teachers.base import TeacherError, TeacherRequest  # noqa: E402
import run_safety  # noqa: E402  (bench/run_safety.py, beside this script)
from sigkill import sigkill_loop  # noqa: E402  (bench/sigkill.py, beside this script)
from bayeskd.teachers.local import LocalTeacher  # noqa: E402
from bayeskd.teachers.openai_compat import OpenAITeacher  # noqa: E402
from bayeskd.teachers.hosting import BackgroundServer, free_port  # noqa: E402

# One torch thread: a tiny model gains nothing from more, and on a shared machine they spin.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CONCURRENCY = 4


def audit(run_dir: Path, expected: int) -> dict:
    """What the store holds: valid records, duplicates, torn lines, and how many are missing."""
    keys, torn = [], 0
    for shard in sorted((run_dir / "collect" / "store").glob("records-*.jsonl")):
        data = shard.read_bytes()
        torn += bool(data) and not data.endswith(b"\n")
        for line in data.splitlines():
            try:
                keys.append(json.loads(line)["key"])
            except (ValueError, KeyError):
                torn += 1
    corpus = run_dir / "collect" / "corpus.jsonl"
    rows = len(corpus.read_text().splitlines()) if corpus.exists() else 0
    return {"records": len(set(keys)), "lost": expected - len(set(keys)), "duplicates": len(keys) - len(set(keys)),
            "torn": torn, "corpus": rows}


def collect(run_dir: Path, server: BackgroundServer, *overrides: str) -> dict:
    cfg = load_config(None, [f"run_dir={run_dir}", "teacher.backend=openai", f"teacher.model={server.teacher.model_ref}",
                             f"teacher.base_url={server.base_url}", *overrides])
    return run_collect(cfg, Run(cfg.run_dir), force=False) or {}


# ---------------------------------------------------------------- scenarios


def faults_scenario(model: Path, work: Path, rate: float, prompts: int) -> dict:
    rates = {k: rate for k in FAULT_KINDS}
    cfg = ServeConfig(port=0, faults=FaultConfig(**rates, retry_after_s=0.2, slow_s=1.5, seed=0))
    overrides = [f"collect.limit={prompts}", "collect.n=2", "collect.max_tokens=8", "collect.top_logprobs=2",
                 "teacher.timeout_s=1", "teacher.backoff_s=0.05", "teacher.max_concurrency=8"]
    t0 = time.time()
    with BackgroundServer(LocalTeacher(str(model)), cfg) as server:
        first = collect(work / "faults", server, *overrides)
        rerun = collect(work / "faults", server, *overrides)
        inj = server.app.state.faults.summary()
    store = audit(work / "faults", prompts * 2)
    return {
        "scenario": f"faults ({rate:.0%} each kind)",
        "sent": inj["requests"],
        "injected": inj["injected"],
        "retries": inj["requests"] - first.get("requests", 0) - rerun.get("requests", 0),  # attempts after the first
        "permanent_failures": first.get("failures", 0),
        "after_rerun": {"failures": rerun.get("failures", 0), "requests": rerun.get("requests", 0)},
        "cut_short": first.get("cut_short", 0) + rerun.get("cut_short", 0),
        "excess_paid": inj["generated"] - prompts,
        "excess_bound": None,
        "seconds": round(time.time() - t0, 1),
        **store,
    }


def sigkill_scenario(model: Path, work: Path, kills_wanted: int, prompts: int, flush_every: int | None) -> dict:
    name = f"sigkill-flush{flush_every or 'default'}"
    run_dir = work / name
    # Every call takes 0.1 s more (the `slow` fault as latency), so that kills land mid-collection.
    cfg = ServeConfig(port=0, max_batch=8, faults=FaultConfig(slow=1.0, slow_s=0.1))
    rng = random.Random(0)
    t0 = time.time()
    with BackgroundServer(LocalTeacher(str(model)), cfg) as server:
        faults = server.app.state.faults
        args = [sys.executable, "-m", "bayeskd.cli", "collect", f"run_dir={run_dir}", "teacher.backend=openai",
                f"teacher.model={model}", f"teacher.base_url={server.base_url}", f"teacher.max_concurrency={CONCURRENCY}",
                f"collect.limit={prompts}", "collect.n=2", "collect.max_tokens=4"]
        if flush_every:
            args.append(f"collect.flush_every={flush_every}")
        kills = sigkill_loop(args, ENV, lambda: faults.requests, kills_wanted, rng)
        before_final = audit(run_dir, prompts * 2)["records"]
        final = subprocess.run(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        time.sleep(0.3)  # calls in flight at the last kill finish on the server
        paid, sent = faults.generated, faults.requests
    manifest = json.loads((run_dir / "collect" / "manifest.json").read_text())
    return {
        "scenario": f"{kills} SIGKILLs, flush_every={flush_every or 16}",
        "sent": sent,
        "injected": {},
        "retries": manifest.get("summary", {}).get("retries", 0),
        "permanent_failures": manifest.get("summary", {}).get("failures", 0),
        "kills": kills,
        "records_before_final_run": before_final,
        "final_run_exit": final.returncode,
        "excess_paid": paid - prompts,
        "excess_bound": kills * CONCURRENCY,
        "seconds": round(time.time() - t0, 1),
        **audit(run_dir, prompts * 2),
    }


def _rss_mib(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def load_scenario(model: Path, work: Path, clients: int, per_client: int, max_queue: int | None) -> dict:
    port, log = free_port("127.0.0.1"), work / f"load-{max_queue}.jsonl"
    args = [sys.executable, "-m", "bayeskd.cli", "serve", f"teacher.model={model}", f"serve.port={port}",
            f"serve.faults.log={log}"]
    if max_queue:
        args.append(f"serve.max_queue={max_queue}")
    server = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    teacher = OpenAITeacher(TeacherConfig(backend="openai", model=str(model), base_url=base_url, max_concurrency=clients,
                                          max_retries=40, backoff_s=0.05, timeout_s=60))
    try:
        deadline = time.time() + 120
        while True:
            try:
                teacher.check()
                break
            except Exception:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("bayeskd serve did not start") from None
                time.sleep(0.2)
        teacher.generate(TeacherRequest.chat([{"role": "user", "content": "warm up"}], max_tokens=4))
        before = _rss_mib(server.pid)
        requests = [TeacherRequest.chat([{"role": "user", "content": f"Count to {i}."}], max_tokens=4, seed=i)
                    for i in range(clients * per_client)]
        t0 = time.time()
        results = [r for _, r in teacher.stream(requests)]
        seconds = time.time() - t0
        after = _rss_mib(server.pid)
        try:
            final_ok = bool(teacher.generate(TeacherRequest.chat([{"role": "user", "content": "up?"}], max_tokens=4)).choices)
        except TeacherError:
            final_ok = False
    finally:
        teacher.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    statuses = [json.loads(line)["status"] for line in log.read_text().splitlines()]
    errors = [r for r in results if isinstance(r, TeacherError)]
    return {
        "scenario": f"{clients} clients x {per_client}, max_queue={max_queue or 256}",
        "sent": len(statuses),
        "injected": {},
        "shed_429": statuses.count(429),
        "other_statuses": sorted({s for s in statuses if s not in (200, 429)}, key=str),
        "retries": sum(r.retries for r in results if not isinstance(r, TeacherError)),
        "permanent_failures": len(errors),
        "records": len(results) - len(errors),
        "lost": len(errors),
        "duplicates": statuses.count(200) - len(requests) - 2,  # answered more than once (2: warm-up, final)
        "torn": 0,
        "final_request_ok": final_ok,
        "rss_mib": {"before": before["VmRSS"], "after": after["VmRSS"], "peak": after["VmHWM"]},
        "excess_paid": statuses.count(200) - len(requests) - 2,
        "excess_bound": 0,
        "seconds": round(seconds, 1),
    }


# ---------------------------------------------------------------- report


def verdict(s: dict) -> bool:
    ok = s["lost"] == 0 and s["duplicates"] == 0 and s["torn"] == 0
    if s.get("excess_bound") is not None:
        ok = ok and s["excess_paid"] <= s["excess_bound"]
    if "final_request_ok" in s:
        ok = ok and s["final_request_ok"] and not s["other_statuses"]
    return ok


def print_tables(scenarios: list[dict]) -> None:
    console = Console(width=max(Console().width, 120))
    folder = [s for s in scenarios if "group" in s]
    scenarios = [s for s in scenarios if "group" not in s]
    if folder:
        t = Table(title="bench/reliability.py: the run folder under kills, a second command, a full disk, corruption")
        for col in ("group", "scenario", "tried", "result", "ok"):
            t.add_column(col, justify="left", overflow="fold")
        for s in folder:
            t.add_row(s["group"], s["scenario"], s["tried"], s["result"], "yes" if s["ok"] else "NO")
        console.print(t)
    if not scenarios:
        return
    t = Table(title="bench/reliability.py: what was tried, what survived")
    for col in ("scenario", "sent", "faults", "retries", "perm. failures", "records", "lost", "dup", "torn",
                "excess paid (bound)", "ok"):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    notes = []
    for s in scenarios:
        bound = "" if s.get("excess_bound") is None else f" (<= {s['excess_bound']})"
        t.add_row(s["scenario"], str(s["sent"]), str(sum(s["injected"].values())), str(s["retries"]),
                  str(s["permanent_failures"]), str(s["records"]), str(s["lost"]), str(s["duplicates"]), str(s["torn"]),
                  f"{s['excess_paid']}{bound}", "yes" if s["ok"] else "NO")
        if "cut_short" in s:
            notes.append(f"{s['scenario']}: {s['cut_short']} records with finish_reason=length kept; the rerun asked "
                         f"{s['after_rerun']['requests']} failed requests again, {s['after_rerun']['failures']} failed; "
                         f"excess paid = answers the model produced that were faulty (slow, malformed, empty)")
        if "kills" in s:
            notes.append(f"{s['scenario']}: {s['records_before_final_run']} of {s['records'] + s['lost']} records "
                         f"before the final run ({s['seconds']} s)")
        if "rss_mib" in s:
            r = s["rss_mib"]
            notes.append(f"{s['scenario']}: {s['shed_429']} shed with 429 (all retried), other statuses "
                         f"{s['other_statuses'] or 'none'}; serve RSS {r['before']:.0f} -> {r['after']:.0f} MiB "
                         f"(peak {r['peak']:.0f}); final request {'ok' if s['final_request_ok'] else 'FAILED'}; {s['seconds']} s")
    console.print(t)
    for line in notes:
        console.print(f"- {line}", highlight=False)
    faults = next((s for s in scenarios if s["injected"]), None)
    if faults:
        k = Table(title=f"faults injected per kind ({faults['scenario']})")
        for kind in FAULT_KINDS:
            k.add_column(kind, justify="right")
        k.add_row(*(str(faults["injected"][kind]) for kind in FAULT_KINDS))
        console.print(k)


GROUPS = ("faults", "sigkill", "load", "stages", "lock", "disk", "corrupt")


def run_folder_scenarios(model: Path, work: Path, args: argparse.Namespace, only: set[str]) -> list[dict]:
    steps = args.train_steps
    clean, took = run_safety.clean_run(model, work, steps)
    print("unkilled run, seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in took.items()), flush=True)
    rows = []
    if "stages" in only:
        rows += run_safety.stage_kills(model, work, clean, took, args.stage_kills, steps, ENV, random.Random(17))
    if "lock" in only:
        rows += run_safety.lock_contention(model, work, clean, args.contenders, steps, ENV)
    if "disk" in only:
        rows += run_safety.disk_full(model, work, clean, steps)
    if "corrupt" in only:
        rows += run_safety.corruption(model, work, clean, steps)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=0.08, help="share of requests per fault kind (8 kinds)")
    p.add_argument("--prompts", type=int, default=160, help="prompts per collect scenario (n=2 samples each)")
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs per sigkill scenario")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-client", type=int, default=4)
    p.add_argument("--stage-kills", type=int, default=5, help="SIGKILLs per pipeline stage (stages scenario)")
    p.add_argument("--train-steps", type=int, default=40, help="optimizer steps of proxy and each student")
    p.add_argument("--contenders", type=int, default=4, help="commands started at once on one run folder")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated scenario groups of {','.join(GROUPS)}")
    p.add_argument("--out", default="bench/out/reliability.json")
    args = p.parse_args()
    only = set(args.only.split(","))
    if only - set(GROUPS):
        p.error(f"--only: unknown group(s) {sorted(only - set(GROUPS))}")
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # dropped connections log one error each

    import torch

    from bayeskd.prompts import load_builtin_prompts
    from bayeskd.models import build_tiny

    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bayeskd-reliability-") as tmp:
        work = Path(tmp)
        model = build_tiny(work / "tiny", [r["prompt"] for r in load_builtin_prompts()], vocab_size=320, seed=0)
        scenarios = []
        if "faults" in only:
            scenarios.append(faults_scenario(model, work, args.rate, args.prompts))
        if "sigkill" in only:
            scenarios += [sigkill_scenario(model, work, args.kills, args.prompts, flush_every=1),
                          sigkill_scenario(model, work, args.kills, args.prompts, flush_every=None)]
        if "load" in only:
            scenarios += [load_scenario(model, work, args.clients, args.per_client, max_queue=None),
                          load_scenario(model, work, args.clients, args.per_client, max_queue=16)]
        for s in scenarios:
            s["ok"] = verdict(s)
        if only & {"stages", "lock", "disk", "corrupt"}:
            scenarios += run_folder_scenarios(model, work, args, only)
    print_tables(scenarios)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "seconds": round(time.time() - t0, 1), "scenarios": scenarios,
              "ok": all(s["ok"] for s in scenarios)}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['seconds']} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
