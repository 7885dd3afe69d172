"""`collect.mode: batch` against a real `bayeskd serve` (its /v1/files and /v1/batches), through the
official `openai` SDK: the corpus an online collect gives, a kill between submission and download,
and a partly failed batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bayeskd.cli import main
from bayeskd.teachers.config import FaultConfig, ServeConfig

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PRICE = ["collect.price.prompt_per_1k=1.0", "collect.price.completion_per_1k=2.0", "collect.price.batch_discount=0.5"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "collect" / "manifest.json").read_text())


def store_keys(run_dir: Path) -> list[str]:
    keys = []
    for shard in sorted((run_dir / "collect" / "store").glob("records-*.jsonl")):
        keys += [json.loads(line)["key"] for line in shard.read_bytes().split(b"\n")[:-1]]
    return keys


def args(run_dir: Path, server, *extra: str) -> list[str]:
    return ["collect", f"run_dir={run_dir}", "teacher.backend=openai", f"teacher.model={server.teacher.model_ref}",
            f"teacher.base_url={server.base_url}", "teacher.name=tiny", "teacher.backoff_s=0.05",
            "collect.teacher_check=false", "collect.batch_poll_s=0.1", "collect.batch_poll_max_s=0.5", *extra]  # fmt: skip


def test_batch_collect_gives_the_online_corpus_at_the_batch_price(server, tmp_path):
    settings = ["collect.limit=6", "collect.n=2", "collect.max_tokens=6", "collect.top_logprobs=2", *PRICE]
    api = server.app.state.batch_api
    created = api.created
    assert main(args(tmp_path / "online", server, *settings)) == 0
    assert main(args(tmp_path / "batch", server, *settings, "collect.mode=batch")) == 0
    assert api.created == created + 1
    online, batch = read_jsonl(tmp_path / "online" / "collect" / "corpus.jsonl"), read_jsonl(tmp_path / "batch" / "collect" / "corpus.jsonl")
    m = manifest(tmp_path / "batch")
    assert m["status"] == "done" and m["summary"]["records"] == 12 and m["summary"]["requests"] == 12
    batch_id = m["summary"]["batch"]
    # The same keys in the same order, records of the same shape (marked with the batch that answered them).
    assert [r["key"] for r in batch] == [r["key"] for r in online] and len({r["key"] for r in batch}) == 12
    for o, b in zip(online, batch):
        assert set(b) - {"batch"} == set(o) and b["batch"] == batch_id
        assert {k: b[k] for k in ("prompt_id", "messages", "sample_index", "answer", "teacher")} == \
               {k: o[k] for k in ("prompt_id", "messages", "sample_index", "answer", "teacher")}  # fmt: skip
        assert all(len(t["top"]) == 2 for t in b["tokens"]) and 1 <= len(b["tokens"]) <= 6
        if b["sample_index"] == 0:  # the same seed (sample s is seeded seed + s, n = 1): the local teacher repeats itself
            assert (b["text"], b["tokens"]) == (o["text"], o["tokens"])
    # One call per sample (n = 1 per line), each counted once, at half the online price.
    ledger = json.loads((tmp_path / "batch" / "collect" / "ledger.json").read_text())
    prompt = sum(r["usage"]["prompt_tokens"] for r in batch)
    completion = sum(r["usage"]["completion_tokens"] for r in batch)
    assert len({r["call"] for r in batch}) == ledger["calls"] == 12
    assert ledger["tokens"] == prompt + completion and ledger["batch_prompt_tokens"] == {"tiny": prompt}
    assert ledger["cost"] == pytest.approx(0.5 * (prompt * 1.0 + completion * 2.0) / 1000, abs=1e-6)
    # batch.json: the one batch, finished; its input file is what the server got.
    state = json.loads((tmp_path / "batch" / "collect" / "batch.json").read_text())
    assert [(b["batch_id"], b["status"], b["requests"], b["finished"]) for b in state["batches"]] == [(batch_id, "completed", 12, True)]
    lines = read_jsonl(tmp_path / "batch" / "collect" / state["batches"][0]["input"])
    assert [line["custom_id"] for line in lines] == [r["key"] for r in batch]
    assert api.content(state["batches"][0]["input_file_id"]) == (tmp_path / "batch" / "collect" / state["batches"][0]["input"]).read_bytes()
    # A rerun is skipped; --force rebuilds from the store: nothing is submitted again.
    assert main(args(tmp_path / "batch", server, *settings, "collect.mode=batch")) == 0
    assert main(args(tmp_path / "batch", server, *settings, "collect.mode=batch", "--force")) == 0
    assert api.created == created + 1 and sorted(store_keys(tmp_path / "batch")) == sorted(r["key"] for r in batch)


def test_budget_trims_the_batch_and_a_larger_one_finishes_it(server, tmp_path):
    base = args(tmp_path, server, "collect.limit=10", "collect.max_tokens=4", "collect.mode=batch")
    assert main([*base, "collect.budget_tokens=300"]) == 0
    m = manifest(tmp_path)
    assert m["status"] == "partial" and m["summary"]["budget_reached"]
    first = m["summary"]["requests"]
    assert 0 < first < 10 and m["summary"]["tokens"] <= 300
    assert main([*base, "collect.budget_tokens=100000"]) == 0
    m = manifest(tmp_path)
    assert m["status"] == "done" and m["summary"]["records"] == 10 and m["summary"]["requests"] == 10 - first


def test_sigkill_between_submission_and_download_never_submits_twice(start_server, tiny_teacher_dir, tmp_path):
    # Every batch line takes 2 s more (the `slow` fault), so the batch is still running when collect is killed.
    cfg = ServeConfig(port=0, faults=FaultConfig(slow=1.0, slow_s=2.0))
    with start_server(tiny_teacher_dir, cfg) as s:
        run_dir = tmp_path / "run"
        cmd = args(run_dir, s, "collect.limit=8", "collect.n=2", "collect.max_tokens=4", "collect.mode=batch")
        proc = subprocess.Popen([sys.executable, "-m", "bayeskd.cli", *cmd], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        state_path = run_dir / "collect" / "batch.json"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if state_path.exists() and json.loads(state_path.read_text())["batches"][-1].get("batch_id"):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        api = s.app.state.batch_api
        assert api.created == 1
        killed = json.loads(state_path.read_text())["batches"]
        assert len(killed) == 1 and not killed[0].get("finished") and store_keys(run_dir) == []  # killed before download
        assert main(cmd) == 0  # the rerun picks up the same batch
        assert api.created == 1
    m = manifest(run_dir)
    assert m["status"] == "done" and m["summary"]["records"] == 16
    assert m["summary"]["requests"] == 0 and m["summary"]["batch"] == killed[0]["batch_id"]
    keys = store_keys(run_dir)
    assert len(keys) == len(set(keys)) == 16


def test_a_partly_failed_batch_resubmits_only_what_failed(start_server, tiny_teacher_dir, tmp_path):
    limit, n = 10, 2
    cfg = ServeConfig(port=0, faults=FaultConfig(server_error=0.3, seed=2))
    with start_server(tiny_teacher_dir, cfg) as s:
        run_dir = tmp_path / "run"
        cmd = args(run_dir, s, f"collect.limit={limit}", f"collect.n={n}", "collect.max_tokens=4", "collect.mode=batch")
        api, faults = s.app.state.batch_api, s.app.state.faults
        assert main(cmd) == 0
        failures = read_jsonl(run_dir / "collect" / "failures.jsonl")
        m = manifest(run_dir)
        assert m["status"] == "partial" and m["summary"]["failures"] == len(failures) > 0
        assert m["summary"]["records"] + len(failures) == limit * n  # nothing silently dropped
        assert all("HTTP 500" in f["reason"] and f["batch"] == m["summary"]["batch"] and len(f["keys"]) == 1 for f in failures)
        runs = 1
        while m["status"] != "done" and runs < 6:
            missing = {k for f in failures for k in f["keys"]}
            assert missing.isdisjoint(store_keys(run_dir))
            assert main(cmd) == 0
            runs += 1
            state = json.loads((run_dir / "collect" / "batch.json").read_text())["batches"]
            resubmitted = {line["custom_id"] for line in read_jsonl(run_dir / "collect" / state[-1]["input"])}
            assert resubmitted == missing and state[-1]["requests"] == len(missing)  # only what failed
            failures, m = read_jsonl(run_dir / "collect" / "failures.jsonl"), manifest(run_dir)
        assert m["status"] == "done" and failures == [] and api.created == runs > 1
        assert faults.generated == limit * n  # faults struck before the model ran: nothing was paid for twice
    keys = store_keys(run_dir)
    assert len(keys) == len(set(keys)) == limit * n
