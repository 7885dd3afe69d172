"""Reliability of the teacher path: injected faults, SIGKILLs of collect, secrets, and load.

Every test talks to a real `bayeskd serve` on a loopback port (in this process, or as a
subprocess) with a tiny model; the fault injector (`serve.faults.*`) counts on the server
side what was asked, what failed and what the model answered (what an API would bill).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bayeskd.cli import main
from bayeskd.teachers.config import FAULT_KINDS, FaultConfig, ServeConfig, TeacherConfig
from bayeskd.teachers.store import ResponseStore
from bayeskd.teachers import openai_compat
from bayeskd.teachers.base import TeacherError, TeacherRequest
from sigkill import sigkill_loop  # bench/sigkill.py (tests/conftest.py puts bench/ on the path)
from bayeskd.teachers.openai_compat import OpenAITeacher

# One torch thread: a tiny model gains nothing from more, and on a busy 2-core machine their
# spin-waits make each generation 10-50x slower (and client timeouts fire).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "collect" / "manifest.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def audit_store(run_dir: Path) -> list[str]:
    """Every store line whole and valid JSON (no torn line); returns the keys in write order."""
    keys = []
    for shard in sorted((run_dir / "collect" / "store").glob("records-*.jsonl")):
        data = shard.read_bytes()
        assert not data or data.endswith(b"\n"), f"torn last line in {shard.name}"
        for line in data.splitlines():
            record = json.loads(line)
            assert isinstance(record["text"], str) and record["finish_reason"]
            keys.append(record["key"])
    return keys


def collect_args(run_dir: Path, server, *extra: str) -> list[str]:
    return [
        "collect",
        f"run_dir={run_dir}",
        "teacher.backend=openai",
        f"teacher.model={server.teacher.model_ref}",
        f"teacher.base_url={server.base_url}",
        "teacher.backoff_s=0.02",
        "collect.teacher_check=false",  # its requests would take faults meant for collect's own
        *extra,
    ]


def fault_server(start_server, model_dir, log: Path, api_key_env: str | None = None, max_queue: int = 256, **faults):
    faults = {"retry_after_s": 0.1, "slow_s": 3.0, **faults}
    cfg = ServeConfig(port=0, api_key_env=api_key_env, max_queue=max_queue, faults=FaultConfig(log=str(log), **faults))
    return start_server(model_dir, cfg)


# ---------------------------------------------------------------- each fault kind, end to end


@pytest.mark.parametrize(
    "kind, endpoint",
    [(k, "chat") for k in FAULT_KINDS] + [(k, "completions") for k in ("drop", "malformed", "empty", "truncated")],
)
def test_each_fault_kind_end_to_end(kind, endpoint, start_server, tiny_teacher_dir, tmp_path):
    limit, n, max_tokens = 10, 2, 6
    timeout = 1.5 if kind == "slow" else 30  # slow answers come after 3 s
    with fault_server(start_server, tiny_teacher_dir, tmp_path / "calls.jsonl", **{kind: 0.4}, seed=1) as s:
        args = collect_args(tmp_path / "run", s, f"teacher.endpoint={endpoint}", "teacher.max_retries=8",
                            f"teacher.timeout_s={timeout}", f"collect.limit={limit}", f"collect.n={n}",
                            f"collect.max_tokens={max_tokens}", "collect.top_logprobs=2")
        assert main(args) == 0
        faults = s.app.state.faults
    m = manifest(tmp_path / "run")
    summary = m["summary"]
    assert m["status"] == "done" and summary["records"] == limit * n and summary["failures"] == 0
    assert read_jsonl(tmp_path / "run" / "collect" / "failures.jsonl") == []
    keys = audit_store(tmp_path / "run")
    assert len(keys) == len(set(keys)) == limit * n
    injected = faults.injected[kind]
    assert injected > 0 and sum(faults.injected.values()) == injected
    assert faults.requests == limit + summary["retries"]  # every attempt reached the server, and was counted
    rows = read_jsonl(tmp_path / "run" / "collect" / "corpus.jsonl")
    if kind == "truncated":
        # A response cut short is a valid answer: kept, not retried, counted in the summary.
        assert summary["retries"] == 0
        cut = [r for r in rows if r["finish_reason"] == "length" and len(r["tokens"]) < max_tokens]
        assert len(cut) == n * injected
        assert summary["cut_short"] >= len(cut)
    elif kind == "slow":
        assert summary["retries"] >= injected  # each slow answer timed out (a busy machine may add some)
    else:
        assert summary["retries"] == injected  # each fault cost exactly one retry, none was kept
        assert all(r["text"] is not None and r["tokens"] for r in rows)


def test_retry_after_is_honoured(start_server, tiny_teacher_dir, tmp_path, monkeypatch):
    slept: list[float] = []

    class Clock:  # the client's view of time: records its sleeps instead of waiting
        time = staticmethod(time.time)
        sleep = staticmethod(slept.append)

    monkeypatch.setattr(openai_compat, "time", Clock)
    with fault_server(start_server, tiny_teacher_dir, tmp_path / "calls.jsonl", rate_limit=0.5, retry_after_s=0.37) as s:
        cfg = TeacherConfig(backend="openai", model=s.teacher.model_ref, base_url=s.base_url, backoff_s=5.0, max_retries=10)
        teacher = OpenAITeacher(cfg)
        requests = [TeacherRequest.chat([{"role": "user", "content": f"say {i}"}], max_tokens=3) for i in range(12)]
        results = [r for _, r in teacher.stream(requests)]
        teacher.close()
        injected = s.app.state.faults.injected["rate_limit"]
    assert not [r for r in results if isinstance(r, TeacherError)]
    assert injected > 0 and sum(r.retries for r in results) == injected
    assert slept == [0.37] * injected  # Retry-After, not the 5 s backoff


def test_permanent_failures_are_recorded_and_retried_on_rerun(start_server, tiny_teacher_dir, tmp_path):
    limit = 16
    with fault_server(start_server, tiny_teacher_dir, tmp_path / "calls.jsonl", server_error=0.3, drop=0.2, seed=3) as s:
        base = collect_args(tmp_path / "run", s, f"collect.limit={limit}", "collect.max_tokens=4")
        assert main([*base, "teacher.max_retries=0"]) == 0
        m = manifest(tmp_path / "run")
        failures = read_jsonl(tmp_path / "run" / "collect" / "failures.jsonl")
        assert m["status"] == "partial" and m["summary"]["failures"] == len(failures) > 0
        assert m["summary"]["records"] + len(failures) == limit  # nothing silently dropped
        assert all(("HTTP 500" in f["reason"] or "cannot reach" in f["reason"]) and f["keys"] for f in failures)
        assert not {k for f in failures for k in f["keys"]} & set(audit_store(tmp_path / "run"))
        # The rerun asks only for what failed, and completes.
        assert main([*base, "teacher.max_retries=8"]) == 0
        faults = s.app.state.faults
    m = manifest(tmp_path / "run")
    assert m["status"] == "done" and m["summary"]["requests"] == len(failures)
    assert read_jsonl(tmp_path / "run" / "collect" / "failures.jsonl") == []
    keys = audit_store(tmp_path / "run")
    assert len(keys) == len(set(keys)) == limit
    assert faults.generated == limit  # faults struck before the model ran: nothing was paid for twice


def test_a_server_that_dies_mid_run_stops_collect_naming_it(start_server, tiny_teacher_dir, tmp_path, capsys):
    # The server answers 3 requests, then dies: later connections are refused. collect must say the
    # endpoint is down (naming it) after teacher.down_after refusals, not sit retrying every prompt.
    limit, answered = 8, 3
    run_dir = tmp_path / "run"
    named = ["teacher.name=tiny-teacher", f"collect.limit={limit}", "collect.max_tokens=4", "teacher.max_concurrency=1"]
    with fault_server(start_server, tiny_teacher_dir, tmp_path / "calls.jsonl", die_after=answered) as s:
        assert main([*collect_args(run_dir, s, *named), "teacher.down_after=3"]) == 2
        dead_url = s.base_url
    err = capsys.readouterr().err
    assert f"teacher at {dead_url} is down: 3 connections in a row were refused" in err
    assert manifest(run_dir)["status"] == "running"  # not finished: the rerun resumes it
    assert len(audit_store(run_dir)) == answered  # what was paid for is kept
    # The server is back (at another address: the named teacher's answers stay valid); only the rest is asked.
    with start_server(tiny_teacher_dir) as s:
        assert main(collect_args(run_dir, s, *named)) == 0
    m = manifest(run_dir)
    assert m["status"] == "done" and m["summary"]["requests"] == limit - answered
    keys = audit_store(run_dir)
    assert len(keys) == len(set(keys)) == limit


# ---------------------------------------------------------------- SIGKILL, again and again


def test_sigkill_loses_no_appended_record(tmp_path):
    """Lines reach the OS as they are appended: a kill between fsyncs loses none of them."""
    code = ("import os, signal, sys; from bayeskd.teachers.store import ResponseStore\n"
            "s = ResponseStore(sys.argv[1], flush_every=16)\n"
            "[s.append({'key': str(i), 'text': 'paid'}) for i in range(5)]\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=ENV)
    assert len(ResponseStore(tmp_path)) == 5


def test_sigkill_loop_then_rerun_completes_exactly_once(start_server, tiny_teacher_dir, tmp_path):
    """20 SIGKILLs at random moments, then one clean run: one valid record per sample, none paid twice."""
    limit, n, concurrency, kills_wanted = 240, 2, 4, 20
    log = tmp_path / "calls.jsonl"
    # Every request takes 0.1 s more (the `slow` fault as latency, well under the timeout), so
    # a run collects for a while and most kills land mid-collection.
    with fault_server(start_server, tiny_teacher_dir, log, slow=1.0, slow_s=0.1) as s:
        faults = s.app.state.faults
        args = [sys.executable, "-m", "bayeskd.cli", *collect_args(
            tmp_path / "run", s, f"teacher.max_concurrency={concurrency}", f"collect.limit={limit}",
            f"collect.n={n}", "collect.max_tokens=4")]
        rng = random.Random(0)
        kills = sigkill_loop(args, ENV, lambda: faults.requests, kills_wanted, rng)
        partial = len(set(audit_store(tmp_path / "run")))
        subprocess.run(args, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        time.sleep(0.3)  # let calls in flight at the last kill finish on the server
        paid = faults.generated
    print(f"\n{kills} kills, {partial} of {limit * n} records before the last run, {paid - limit} calls paid twice")
    keys = audit_store(tmp_path / "run")
    assert len(keys) == len(set(keys)) == limit * n
    rows = read_jsonl(tmp_path / "run" / "collect" / "corpus.jsonl")
    assert [r["key"] for r in rows] and sorted(r["key"] for r in rows) == sorted(keys)
    m = manifest(tmp_path / "run")
    assert m["status"] == "done" and m["summary"]["records"] == limit * n
    assert kills >= 15 and 0 < partial < limit * n, (kills, partial)
    assert paid - limit <= kills * concurrency, f"{paid - limit} calls paid twice after {kills} kills"
    assert sum(1 for line in read_jsonl(log) if line["generated"]) == paid


# ---------------------------------------------------------------- secrets


def test_no_secret_in_any_artifact_or_log(start_server, tiny_teacher_dir, tmp_path, monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    key, wrong = f"sk-canary-{uuid.uuid4().hex}", f"sk-canary-wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv("CANARY_SERVE_TOKEN", key)
    rates = {k: 0.05 for k in FAULT_KINDS}
    with fault_server(start_server, tiny_teacher_dir, tmp_path / "calls.jsonl", "CANARY_SERVE_TOKEN", **rates, slow_s=1.5) as s:
        base = collect_args(tmp_path / "run", s, "teacher.api_key_env=CANARY_TEACHER_KEY", "teacher.timeout_s=1",
                            "collect.limit=24", "collect.max_tokens=4", "collect.top_logprobs=2")
        monkeypatch.setenv("CANARY_TEACHER_KEY", wrong)
        assert main(base) == 2  # 401: the key is refused before any paid call
        monkeypatch.setenv("CANARY_TEACHER_KEY", key)
        assert main([*base, "teacher.max_retries=0"]) == 0  # faults, no retries: permanent failures
        failures = (tmp_path / "run" / "collect" / "failures.jsonl").read_text()
        assert manifest(tmp_path / "run")["status"] == "partial" and failures
        assert main([*base, "teacher.max_retries=8"]) == 0
        assert manifest(tmp_path / "run")["status"] == "done"
    out, err = capfd.readouterr()
    assert "401" in err and "CANARY_TEACHER_KEY" in err
    texts = {"stdout": out, "stderr": err, "logs": caplog.text, "failures (partial run)": failures}
    texts["log records"] = "\n".join(f"{r.name} {r.msg!r} {r.args!r} {r.exc_text}" for r in caplog.records)
    texts |= {str(p): p.read_bytes().decode(errors="replace") for p in tmp_path.rglob("*") if p.is_file()}
    assert len(texts) > 10
    for secret in (key, wrong):
        for where, text in texts.items():
            assert secret not in text, f"the API key leaked into {where}"
            assert secret[10:] not in text, f"part of the API key leaked into {where}"


# ---------------------------------------------------------------- load


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
@pytest.mark.parametrize("max_queue", [256, 16])
def test_serve_under_64_clients_answers_or_sheds_and_stays_up(max_queue, start_server, tiny_teacher_dir, tmp_path):
    """64 clients x 4 requests: each answered exactly once or shed with 429 (then retried); the server stays up.

    The server runs in this process (a `bayeskd serve` subprocess takes 10+ s to start here;
    bench/reliability.py measures one), so the RSS below is this process's.
    """
    log = tmp_path / "calls.jsonl"
    with fault_server(start_server, tiny_teacher_dir, log, max_queue=max_queue) as s:
        cfg = TeacherConfig(backend="openai", model=s.teacher.model_ref, base_url=s.base_url, max_concurrency=64,
                            max_retries=40, backoff_s=0.05, timeout_s=60)
        teacher = OpenAITeacher(cfg)
        warm = teacher.generate(TeacherRequest.chat([{"role": "user", "content": "warm up"}], max_tokens=4))
        rss_before = _rss_mib()
        requests = [TeacherRequest.chat([{"role": "user", "content": f"Count to {i}."}], max_tokens=4, seed=i)
                    for i in range(64 * 4)]
        results = [r for _, r in teacher.stream(requests)]
        rss_after = _rss_mib()
        final = teacher.generate(TeacherRequest.chat([{"role": "user", "content": "still there?"}], max_tokens=4))
        teacher.close()
    assert not [r for r in results if isinstance(r, TeacherError)]
    assert warm.choices and final.choices  # up before and after
    statuses = [line["status"] for line in read_jsonl(log)]
    assert set(statuses) <= {200, 429}  # every request answered, or shed with 429
    assert statuses.count(200) == len(requests) + 2  # each answered exactly once
    retries = sum(r.retries for r in results)
    assert retries == statuses.count(429)  # the clients retried every 429
    if max_queue < 64:
        assert retries > 0
    print(f"\nmax_queue={max_queue}: {retries} requests shed with 429 and retried; RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert rss_after - rss_before < 256  # MiB: memory stays bounded under load
