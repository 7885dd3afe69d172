"""The run-folder lock: one holder; ranks of one distributed launch count as that holder."""

from __future__ import annotations

import os

import pytest

from bayeskd.lock import RunLock, RunLockedError


def test_one_holder_at_a_time_and_released_on_exit(tmp_path):
    with RunLock(tmp_path) as first:
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()} on "):
            RunLock(tmp_path).acquire()  # another open file description: refused, even in-process
        assert first.taken_over is None
    with RunLock(tmp_path) as again:
        assert again.taken_over is None  # a clean release leaves no holder to report


def test_other_ranks_wait_for_their_own_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    with RunLock(tmp_path):
        monkeypatch.setenv("RANK", "1")
        RunLock(tmp_path, rank_wait_s=1).acquire()  # its launch's rank 0 holds the lock: proceed
        monkeypatch.setenv("MASTER_PORT", "29501")  # a rank of another launch
        with pytest.raises(RunLockedError, match="rank 1: rank 0 of this launch did not take the lock"):
            RunLock(tmp_path, rank_wait_s=0.2).acquire()


def test_other_ranks_neither_clear_nor_record_a_stage(tmp_path, monkeypatch):
    from bayeskd.artifacts import Run

    monkeypatch.setenv("RANK", "1")
    run = Run(tmp_path)
    out = run.begin("proxy", {"lr": 1}, {})
    (out / "weights").write_text("rank 1 trains too")
    run.finish("proxy", "done", {})
    assert run.manifest("proxy") is None  # rank 0 writes the manifest; ranks racing on it could lose it
    monkeypatch.setenv("RANK", "0")
    assert run.begin("proxy", {"lr": 1}, {}) == out and run.manifest("proxy")["status"] == "running"
