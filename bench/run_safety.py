"""The run folder under kills, a second command, a full disk and corrupted files: the scenarios
that `bench/reliability.py` adds to its teacher-path ones (issue 17).

Every scenario starts from one unkilled pipeline on tiny models (an in-process local teacher
that samples each request alone, so that every stage is a pure function of its inputs) and
compares what it leaves with that run, stage folder by stage folder (`sigkill.compare_stage`).
Each returns rows {"group", "scenario", "tried", "result", "ok", ...}.
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diskfull import checkpoint_full_on, fsync_full_after, store_full_after, targets_full
from sigkill import compare_stage, digest, folder_state, sigkill_loop, status

STAGES = ("collect", "prior", "proxy", "posterior", "probe", "distill", "eval")
TRAINING = ("proxy", "distill")


def pipeline_args(run_dir: Path, model: Path, steps: int, prompts: int = 32, probe_tokens: int = 1500,
                  save_every: int = 4, warmup: int = 2) -> list[str]:  # fmt: skip
    """The whole pipeline on a tiny model (the bench's sizes by default; its test passes smaller ones).

    teacher.batch_size=1: one request at a time. Which requests share a decoding batch depends on
    timing, and batch-mates change the logits in their last bits, so now and then a sample would
    differ between the unkilled run and a rerun; alone, every request decodes the same each time."""
    train = f"max_steps={steps},batch_size=4,save_every={save_every},warmup_steps={warmup},lr=0.01,init_layers=null"
    args = [f"run_dir={run_dir}", f"teacher.model={model}", "teacher.batch_size=1", f"collect.limit={prompts}",
            "collect.max_tokens=8", "collect.top_logprobs=3", "data.heldout_fraction=0.2", "prior.order=3",
            "prior.top_k=8", "posterior.top_k=8", f"probe.budget_tokens={probe_tokens}", "probe.round_size=4",
            "probe.samples=4", "distill.modes=[sft,bayes]"]
    for section in TRAINING:
        args.append(f"{section}.train.model={model}")
        args += [f"{section}.train.{kv}" for kv in train.split(",")]
    return args


def cli(args: list[str], *extra: str) -> tuple[int, str]:
    """`bayeskd ...` in this process: (exit code, stderr)."""
    from bayeskd.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([*args, *extra])
    return rc, err.getvalue()


def clean_run(model: Path, work: Path, steps: int) -> tuple[Path, dict[str, float]]:
    """The reference: every stage once, never killed; and how long each took here."""
    run_dir, took = work / "clean", {}
    for stage in STAGES:
        t0 = time.time()
        rc, err = cli([stage, *pipeline_args(run_dir, model, steps)])
        if rc:
            raise RuntimeError(f"the unkilled run failed in {stage}: {err[-2000:]}")
        took[stage] = time.time() - t0
    return run_dir, took


def _copy(clean: Path, dest: Path, stages) -> Path:
    for stage in stages:
        shutil.copytree(clean / stage, dest / stage)
    return dest


def _verdict(diff: dict) -> str:
    if diff["exact"]:
        return f"rerun identical ({diff['files']} files, bytes)"
    if diff["identical"]:
        return f"rerun identical ({diff['files']} files; {len(diff['close'])} within float tolerance)"
    return "rerun DIFFERS: " + ", ".join(diff["differ"][:4])


# ---------------------------------------------------------------- kills per stage


def stage_kills(model: Path, work: Path, clean: Path, took: dict, kills_wanted: int, steps: int, env: dict,
                rng: random.Random) -> list[dict]:  # fmt: skip
    """Each stage in turn SIGKILLed `kills_wanted` times at random moments, then run to the end."""
    run_dir, rows = work / "killed", []
    args = pipeline_args(run_dir, model, steps)
    for stage in STAGES:
        cmd = [sys.executable, "-m", "bayeskd.cli", stage, *args]
        mid = [0]

        def landed(began: bool, stage=stage) -> None:
            mid[0] += began and status(run_dir, stage) != "done"  # in the stage, not in start-up or after it

        def undo_done(stage=stage) -> None:  # a stage that finished (a kill came late) starts again
            if status(run_dir, stage) == "done":
                shutil.rmtree(run_dir / stage)

        def delay(r: random.Random, span=took[stage]) -> float:
            # Log-uniform from 1 ms to the stage's duration once it has begun (its folder changes):
            # stages that take milliseconds past their start get kills there too.
            return span * 10 ** r.uniform(-3, 0)

        t0 = time.time()
        kills = sigkill_loop(cmd, env, lambda s=stage: folder_state(run_dir / s), kills_wanted, rng, timeout=120,
                             on_kill=landed, before_each=undo_done, delay=delay)  # fmt: skip
        final = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        diff = compare_stage(clean, run_dir, stage)
        rows.append({"group": "kills", "scenario": f"{stage}: SIGKILL x {kills}", "kills": kills, "mid_stage": mid[0],
                     "tried": f"{mid[0]} of {kills} in the stage", "final_exit": final.returncode,
                     "result": _verdict(diff) if final.returncode == 0 else f"rerun exit {final.returncode}: {final.stderr[-300:]}",
                     "ok": final.returncode == 0 and diff["identical"], "diff": diff,
                     "seconds": round(time.time() - t0, 1)})  # fmt: skip
    return rows


# ---------------------------------------------------------------- the lock


def lock_contention(model: Path, work: Path, clean: Path, contenders: int, steps: int, env: dict) -> list[dict]:
    """`contenders` commands on one folder at once; then a command killed holding the lock, and the next one."""
    rows = []
    run_dir = _copy(clean, work / "lock", ("collect",))
    args = pipeline_args(run_dir, model, steps)
    procs = [subprocess.Popen([sys.executable, "-m", "bayeskd.cli", "prior", *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(contenders)]  # fmt: skip
    results = [(p.pid, p.wait(timeout=600), p.stderr.read()) for p in procs]
    pids = {str(pid) for pid, _, _ in results}
    ran = [pid for pid, rc, _ in results if rc == 0]
    refused = [err for _, rc, err in results if rc == 2]
    named = [err for err in refused if "in use by another bayeskd command: PID" in err
             and any(f"PID {pid} on" in err for pid in pids)]  # fmt: skip
    same = compare_stage(clean, run_dir, "prior")["exact"]
    rows.append({"group": "lock", "scenario": f"{contenders} x `bayeskd prior` at once", "tried": f"{contenders} processes",
                 "result": f"{len(ran)} ran (the rest found it done), {len(refused)} refused with exit 2 naming the holder; "
                           f"prior {'identical' if same else 'DIFFERS'}",
                 "ok": len(ran) + len(refused) == contenders and len(named) == len(refused) >= 1 and same})  # fmt: skip

    cmd = [sys.executable, "-m", "bayeskd.cli", "proxy", *args]
    holder = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and holder.poll() is None and not any((run_dir / "proxy").glob("checkpoints/step-*")):
        time.sleep(0.01)
    holder.kill()
    holder.wait()
    rc, err = cli(["proxy", *args])
    diff = compare_stage(clean, run_dir, "proxy")
    took_over = "took over the lock" in err and f"PID {holder.pid}" in err
    rows.append({"group": "lock", "scenario": "stale lock (holder SIGKILLed mid-proxy)", "tried": "next command",
                 "result": f"exit {rc}, {'took it over, naming the dead holder' if took_over else 'did NOT take it over'}; "
                           + _verdict(diff), "ok": rc == 0 and took_over and diff["identical"]})  # fmt: skip
    return rows


# ---------------------------------------------------------------- a full disk


def disk_full(model: Path, work: Path, clean: Path, steps: int) -> list[dict]:
    """ENOSPC injected in four write paths: exit 2 naming the path, the rest intact, the rerun the same."""
    rows = []
    run_dir = work / "diskfull"
    args = pipeline_args(run_dir, model, steps)
    cases = [
        ("collect", "store append", store_full_after(10), (), "collect/store/records-00000.jsonl"),
        ("posterior", "target shard", targets_full(), ("collect", "prior", "proxy"), "posterior/targets/shard-00000"),
        ("distill", "checkpoint save", checkpoint_full_on(3), ("posterior", "probe"), "distill/sft/checkpoints/.tmp-step-00000012"),
        ("eval", "manifest at the end", fsync_full_after(2), ("distill",), "eval/manifest.json"),
    ]  # fmt: skip
    for stage, what, fault, upstream, where in cases:
        if not (run_dir / stage).exists():
            _copy(clean, run_dir, [s for s in upstream if not (run_dir / s).exists()])
        before = {s: digest(run_dir / s) for s in STAGES[: STAGES.index(stage)]}
        with fault:
            rc, err = cli([stage, *args])
        named = "no space left on device" in err and str(run_dir / where) in err
        intact = {s: digest(run_dir / s) for s in before} == before and status(run_dir, stage) != "done"
        rerun, _ = cli([stage, *args])
        diff = compare_stage(clean, run_dir, stage)
        rows.append({"group": "disk", "scenario": f"ENOSPC: {stage}, {what}", "tried": "1 write fails",
                     "result": f"exit {rc}, path {'named' if named else 'NOT named'}, earlier stages "
                               f"{'intact' if intact else 'CHANGED'}; {_verdict(diff)}",
                     "ok": rc == 2 and named and intact and rerun == 0 and diff["identical"], "message": err.strip()})  # fmt: skip
    return rows


# ---------------------------------------------------------------- corruption


def corruption(model: Path, work: Path, clean: Path, steps: int) -> list[dict]:
    """A byte flipped (same size) or a file cut short in each stage's output: the next stage names it."""
    from bayeskd import artifacts

    rows = []
    cases = [
        ("collect/corpus.jsonl", "flip", "prior"),
        ("prior/tables/order2.count.npy", "flip", "posterior"),
        ("proxy/final/model.safetensors", "cut", "posterior"),
        ("posterior/targets/shard-00000/posterior_probs.npy", "flip", "probe"),
        ("probe/targets/shard-00000/posterior_ids.npy", "cut", "distill"),
        ("distill/sft/final/model.safetensors", "flip", "eval"),
    ]
    for i, (rel, how, reader) in enumerate(cases):
        run_dir = _copy(clean, work / f"corrupt-{i}", STAGES[: STAGES.index(reader)])  # the reader has yet to run
        writer = "/".join(rel.split("/")[:2]) if rel.startswith("distill/") else rel.split("/")[0]
        with _damaged(run_dir / rel, how):
            rc, err = cli([reader, *pipeline_args(run_dir, model, steps)])
        rows.append(_corruption_row(f"{how} {rel}", f"`bayeskd {reader}`", rc, err, run_dir / rel, writer))
    # An output above CHEAP_CHECKSUM_BYTES: its size is checked always, its checksum with --verify.
    run_dir = _copy(clean, work / "corrupt-large", STAGES)
    args = pipeline_args(run_dir, model, steps)
    rel, cheap = "distill/bayes/final/model.safetensors", artifacts.CHEAP_CHECKSUM_BYTES
    artifacts.CHEAP_CHECKSUM_BYTES = 0
    try:
        with _damaged(run_dir / rel, "flip"):
            plain, _ = cli(["run", *args])
            rc, err = cli(["run", *args, "--verify"])
    finally:
        artifacts.CHEAP_CHECKSUM_BYTES = cheap
    row = _corruption_row(f"flip {rel}, checked as a large output", "`bayeskd run --verify`", rc, err, run_dir / rel,
                          "distill/bayes")  # fmt: skip
    row["result"] = f"`run`: exit {plain} (same size: not summed without --verify); --verify: {row['result']}"
    row["ok"] = row["ok"] and plain == 0
    rows.append(row)
    rc, _ = cli(["run", *args, "--verify"])
    rows.append({"group": "corruption", "scenario": "every file restored", "tried": "`bayeskd run --verify`",
                 "result": f"exit {rc}", "ok": rc == 0})
    return rows


def _corruption_row(scenario: str, tried: str, rc: int, err: str, path: Path, writer: str) -> dict:
    named = str(path) in err and f"stage {writer!r}" in err and f"bayeskd {writer.split('/')[0]} --force" in err
    return {"group": "corruption", "scenario": scenario, "tried": tried,
            "result": f"exit {rc}, {'file and stage named' if named else 'NOT named'}", "ok": rc == 2 and named,
            "message": err.strip()}  # fmt: skip


@contextlib.contextmanager
def _damaged(path: Path, how: str):
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    path.write_bytes(bytes(bad) if how == "flip" else good[:-8])
    try:
        yield
    finally:
        path.write_bytes(good)
