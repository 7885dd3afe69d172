"""The run folder under kills, a second command, corrupted files and a full disk (issue 17).

One unkilled pipeline (tiny models, an in-process teacher that samples each request alone, so
that every stage is a pure function of its inputs) is the reference; each test works on a copy.
bench/reliability.py runs the long versions (many kills per stage).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from bayeskd import artifacts
from bayeskd.cli import main
from bayeskd.lock import LOCK_NAME
from diskfull import checkpoint_full_on, store_full_after, targets_full  # bench/diskfull.py
import run_safety  # bench/run_safety.py
from sigkill import compare_stage, digest, folder_state, sigkill_loop, status  # bench/sigkill.py

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
STAGES = ("prior", "proxy", "posterior", "probe", "distill", "eval")
TRAINING = run_safety.TRAINING


def pipeline_args(run_dir: Path, model: Path) -> list[str]:
    """The bench's pipeline (bench/run_safety.py), smaller: 24 prompts, 6 training steps, 400 probe tokens."""
    return run_safety.pipeline_args(run_dir, model, steps=6, prompts=24, probe_tokens=400, save_every=2, warmup=1)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same sums in the same order
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_teacher_dir) -> Path:
    """Every stage, never killed."""
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    assert main(["run", *pipeline_args(run_dir, tiny_teacher_dir)]) == 0
    return run_dir


def copy_run(clean: Path, dest: Path, stages: tuple[str, ...] = ("collect", *STAGES)) -> Path:
    for stage in stages:
        shutil.copytree(clean / stage, dest / stage)
    return dest


def cli(stage: str, run_dir: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "bayeskd.cli", stage, *pipeline_args(run_dir, model)]


def checkpoints(run_dir: Path, stage: str):
    return lambda: any((run_dir / stage).glob("**/checkpoints/step-*/trainer_state.json"))


# ---------------------------------------------------------------- kills


def test_each_stage_killed_then_rerun_matches_an_unkilled_run(clean_run, tiny_teacher_dir, tmp_path):
    """One SIGKILL in each stage after collect (at a random moment once the stage has begun; in the
    training stages once a checkpoint exists), then the same command: the same artifacts."""
    run_dir = copy_run(clean_run, tmp_path / "run", ("collect",))
    rng = random.Random(17)
    for stage in STAGES:
        progress = checkpoints(run_dir, stage) if stage in TRAINING else (lambda s=stage: folder_state(run_dir / s))
        window = 0.5
        for _ in range(4):  # a kill that comes after the stage finished proves nothing: again, sooner
            sigkill_loop(cli(stage, run_dir, tiny_teacher_dir), ENV, progress, 1, rng, window=window, startup_every=0,
                         timeout=120)
            if status(run_dir, stage) != "done":
                break
            shutil.rmtree(run_dir / stage)
            window /= 4
        assert status(run_dir, stage) != "done", f"{stage}: every kill came after the stage finished"
        assert main([stage, *pipeline_args(run_dir, tiny_teacher_dir)]) == 0, stage
        diff = compare_stage(clean_run, run_dir, stage)
        assert diff["identical"], f"{stage} after a kill and a rerun: {diff}"
        if stage not in TRAINING:
            assert diff["exact"], f"{stage} is deterministic, yet: {diff}"


# ---------------------------------------------------------------- the lock


def test_second_command_refused_naming_the_holder_then_stale_lock_taken_over(clean_run, tiny_teacher_dir, tmp_path,
                                                                            capfd):  # fmt: skip
    run_dir = copy_run(clean_run, tmp_path / "run", ("collect",))
    args = pipeline_args(run_dir, tiny_teacher_dir)
    holder = subprocess.Popen(cli("prior", run_dir, tiny_teacher_dir), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 60
        while str(holder.pid) not in _lock_text(run_dir) and time.time() < deadline:
            time.sleep(0.01)
        assert main(["prior", *args]) == 2  # the second command, while the first holds the folder
        err = capfd.readouterr().err
        assert f"PID {holder.pid} on {socket.gethostname()}" in err and "bayeskd.cli prior" in err, err
        assert main(["proxy", *args]) == 2  # any stage: the whole folder is held
        capfd.readouterr()
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
    finally:
        holder.kill()
        holder.wait()
    assert str(holder.pid) in _lock_text(run_dir)  # its record is still there...
    assert main(["prior", *args]) == 0  # ...and the next command takes the lock over
    err = capfd.readouterr().err
    assert "took over the lock" in err and f"PID {holder.pid}" in err
    assert compare_stage(clean_run, run_dir, "prior")["exact"]
    assert main(["config", *args]) == 0  # `config` writes nothing and takes no lock


def _lock_text(run_dir: Path) -> str:
    try:
        return (run_dir / LOCK_NAME).read_text()
    except OSError:
        return ""


# ---------------------------------------------------------------- corruption


def test_corrupted_table_or_target_is_detected_naming_the_stage(clean_run, tiny_teacher_dir, tmp_path, capfd,
                                                                monkeypatch):  # fmt: skip
    run_dir = copy_run(clean_run, tmp_path / "run")
    args = pipeline_args(run_dir, tiny_teacher_dir)
    # One byte flipped in an n-gram table (same size): caught by its checksum (small outputs are always summed).
    table = run_dir / "prior" / "tables" / "order2.count.npy"
    with damaged(table, flip=True):
        assert main(["posterior", *args, "--force"]) == 2
    err = capfd.readouterr().err
    assert str(table) in err and "stage 'prior'" in err and "sha256" in err and "bayeskd prior --force" in err, err
    # A target file cut short: caught by its size, however large the output.
    monkeypatch.setattr(artifacts, "CHEAP_CHECKSUM_BYTES", 0)
    target = next((run_dir / "probe" / "targets").glob("shard-*/posterior_probs.npy"))
    with damaged(target, flip=False):
        assert main(["distill", *args, "--force"]) == 2
    err = capfd.readouterr().err
    assert str(target) in err and "stage 'probe'" in err and "bytes" in err and "bayeskd probe --force" in err, err
    # A flipped byte in a large output passes the size check; --verify sums every input, and every skipped stage.
    student = run_dir / "distill" / "sft" / "final" / "model.safetensors"
    with damaged(student, flip=True):
        assert main(["run", *args]) == 0  # all skipped: nothing reads the student's bytes but eval, which is done
        assert main(["run", *args, "--verify"]) == 2
    err = capfd.readouterr().err
    assert str(student) in err and "stage 'distill/sft'" in err and "bayeskd distill --force" in err, err
    assert main(["run", *args, "--verify"]) == 0  # as written: all clear


@contextmanager
def damaged(path: Path, flip: bool):
    """One byte flipped (same size), or the last 8 bytes cut off; the file restored afterwards."""
    good = path.read_bytes()
    bad = bytearray(good)
    if flip:
        bad[len(bad) // 2] ^= 0x01
    path.write_bytes(bytes(bad) if flip else good[:-8])
    try:
        yield
    finally:
        path.write_bytes(good)


# ---------------------------------------------------------------- a full disk


def test_full_disk_names_the_path_and_loses_nothing(clean_run, tiny_teacher_dir, tmp_path, capfd):
    """A full disk while collect appends answers, while posterior writes its targets, while proxy
    saves a checkpoint: exit 2 naming the path; what was written before stays; the rerun ends
    where the unkilled run ended."""
    run_dir = tmp_path / "run"
    args = pipeline_args(run_dir, tiny_teacher_dir)
    with store_full_after(10):
        assert main(["collect", *args]) == 2
    err = capfd.readouterr().err
    assert "no space left on device" in err and str(run_dir / "collect" / "store" / "records-00000.jsonl") in err, err
    lines = (run_dir / "collect" / "store" / "records-00000.jsonl").read_bytes()
    assert lines.endswith(b"\n") and len(lines.splitlines()) == 10  # the 10 answers kept, no fragment
    assert main(["collect", *args]) == 0
    assert compare_stage(clean_run, run_dir, "collect")["exact"]

    copy_run(clean_run, run_dir, ("prior", "proxy"))
    before = {s: digest(run_dir / s) for s in ("collect", "prior", "proxy")}
    with targets_full():
        assert main(["posterior", *args]) == 2
    err = capfd.readouterr().err
    assert "no space left on device" in err and str(run_dir / "posterior" / "targets" / "shard-00000") in err, err
    assert {s: digest(run_dir / s) for s in before} == before  # earlier stages untouched
    assert main(["probe", *args]) == 2 and "run `bayeskd posterior` first" in capfd.readouterr().err  # not trusted
    assert main(["posterior", *args]) == 0
    assert compare_stage(clean_run, run_dir, "posterior")["exact"]

    shutil.rmtree(run_dir / "proxy")
    with checkpoint_full_on(2):
        assert main(["proxy", *args]) == 2
    err = capfd.readouterr().err
    ckpts = run_dir / "proxy" / "checkpoints"
    assert "no space left on device" in err and str(ckpts / ".tmp-step-00000004") in err, err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]  # the half checkpoint is gone, the last whole one stays
    assert main(["proxy", *args]) == 0
    assert json.loads((run_dir / "proxy" / "manifest.json").read_text())["summary"]["resumed_from_step"] == 2
    assert compare_stage(clean_run, run_dir, "proxy")["identical"]
