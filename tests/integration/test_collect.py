"""`collect` against real teachers: in-process (local backend) and over HTTP through `bayeskd serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from bayeskd.cli import main
from bayeskd.teachers.config import ServeConfig, TeacherConfig
from bayeskd.teachers.base import TeacherRequest
from bayeskd.teachers.openai_compat import OpenAITeacher

from bayeskd.teachers.hosting import free_port


def corpus(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "collect" / "corpus.jsonl").read_text().splitlines()]


def store_keys(run_dir: Path) -> list[str]:
    """Keys of the stored records. Only whole lines count: a writer may be mid-line (or was killed mid-line,
    which the store cuts off when it next opens), and what follows the last newline is not a record yet."""
    keys = []
    for shard in sorted((run_dir / "collect" / "store").glob("records-*.jsonl")):
        keys += [json.loads(line)["key"] for line in shard.read_bytes().split(b"\n")[:-1]]
    return keys


def test_collect_over_http_with_logprobs(server, tmp_path):
    args = [
        "collect",
        f"run_dir={tmp_path}",
        "teacher.backend=openai",
        f"teacher.model={server.teacher.model_ref}",
        f"teacher.base_url={server.base_url}",
        "collect.limit=12",
        "collect.n=2",
        "collect.max_tokens=6",
        "collect.top_logprobs=4",
    ]
    assert main(args) == 0
    rows = corpus(tmp_path)
    assert len(rows) == 24
    assert len({r["key"] for r in rows}) == 24
    assert sorted({r["sample_index"] for r in rows}) == [0, 1]
    for r in rows:
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= len(r["tokens"]) <= 6
        for t in r["tokens"]:
            assert len(t["top"]) == 4
            top = [lp for _, lp in t["top"]]
            assert top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
            assert t["logprob"] <= top[0] + 1e-6  # the sampled token is never likelier than the best
    # Answers with checkable values keep them for later scoring.
    assert any(r["answer"] for r in rows)
    manifest = json.loads((tmp_path / "collect" / "manifest.json").read_text())
    assert manifest["status"] == "done"
    # teacher-check ran once before the first paid request: its table is kept, its cost is in the ledger.
    check = json.loads((tmp_path / "collect" / "teacher_check.json").read_text())
    assert not check["failed"] and {r["name"] for r in check["rows"]} >= {"n", "top_logprobs", "sampling"}
    ledger = json.loads((tmp_path / "collect" / "ledger.json").read_text())
    paid = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] for r in {r["call"]: r for r in rows}.values())
    assert ledger["calls"] == 12 + 1 and ledger["tokens"] == manifest["summary"]["tokens"]
    assert ledger["tokens"] == paid + sum(check["usage"].values()) and sum(check["usage"].values()) > 0
    # A rerun is skipped and pays nothing.
    assert main(args) == 0
    assert sorted(store_keys(tmp_path)) == sorted(r["key"] for r in rows)


def test_completions_endpoint_and_openai_sdk_directly(server):
    client = openai.OpenAI(api_key="unused", base_url=server.base_url)
    r = client.completions.create(model=server.teacher.model_ref, prompt="What is", max_tokens=3, logprobs=2, seed=1)
    assert r.usage.completion_tokens >= 1 and len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    assert [m.id for m in client.models.list()] == [server.teacher.model_ref]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=server.teacher.model_ref, messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.teacher.model_ref, messages=[], max_tokens=2)


def test_greedy_is_reproducible_over_http(server):
    client = openai.OpenAI(api_key="unused", base_url=server.base_url)
    ask = lambda: client.chat.completions.create(  # noqa: E731
        model=server.teacher.model_ref, messages=[{"role": "user", "content": "Name a color."}], max_tokens=5, temperature=0
    ).choices[0].message.content
    assert ask() == ask()


def test_bearer_token_and_bad_key_exit_2(start_server, tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SERVE_TOKEN", "canary-secret-123")
    cfg = ServeConfig(port=0, api_key_env="SERVE_TOKEN")
    with start_server(tiny_teacher_dir, cfg) as s:
        monkeypatch.setenv("TEACHER_KEY", "wrong-key-456")
        base = [f"run_dir={tmp_path}", "teacher.backend=openai", f"teacher.model={tiny_teacher_dir}",
                f"teacher.base_url={s.base_url}", "teacher.api_key_env=TEACHER_KEY", "collect.limit=2", "collect.max_tokens=3"]
        assert main(["collect", *base]) == 2
        err = capsys.readouterr().err
        assert "401" in err and "TEACHER_KEY" in err and "wrong-key-456" not in err
        monkeypatch.setenv("TEACHER_KEY", "canary-secret-123")
        assert main(["collect", *base]) == 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"canary-secret-123" not in path.read_bytes(), path


def test_unreachable_teacher_exits_2(tmp_path, capsys):
    args = ["collect", f"run_dir={tmp_path}", "teacher.backend=openai", "teacher.model=m",
            f"teacher.base_url=http://127.0.0.1:{free_port('127.0.0.1')}/v1", "teacher.timeout_s=2"]
    assert main(args) == 2
    assert "unreachable" in capsys.readouterr().err
    assert json.loads((tmp_path / "collect" / "manifest.json").read_text())["status"] == "running"


def test_budget_stops_cleanly_and_keeps_what_was_collected(tiny_teacher_dir, tmp_path):
    base = [f"run_dir={tmp_path}", f"teacher.model={tiny_teacher_dir}", "teacher.batch_size=4", "collect.limit=40",
            "collect.max_tokens=8"]
    assert main(["collect", *base, "collect.budget_tokens=400"]) == 0
    m = json.loads((tmp_path / "collect" / "manifest.json").read_text())
    assert m["status"] == "partial" and m["summary"]["budget_reached"]
    assert 0 < m["summary"]["records"] < 40
    assert m["summary"]["tokens"] <= 400
    kept = {r["key"] for r in corpus(tmp_path)}
    # A larger budget continues where it stopped: nothing collected is asked for again.
    assert main(["collect", *base, "collect.budget_tokens=100000"]) == 0
    m = json.loads((tmp_path / "collect" / "manifest.json").read_text())
    assert m["status"] == "done" and m["summary"]["records"] == 40
    assert kept <= {r["key"] for r in corpus(tmp_path)}
    assert len(store_keys(tmp_path)) == len(set(store_keys(tmp_path))) == 40


def test_more_samples_later_are_new_samples_not_repeats(tiny_teacher_dir, tmp_path):
    """Raising collect.n asks only for the new samples; a per-sample-seeded teacher must not hand
    back the first ones again (the request's seed moves with its first sample index)."""
    base = [f"run_dir={tmp_path}", f"teacher.model={tiny_teacher_dir}", "collect.limit=12", "collect.max_tokens=12"]
    assert main(["collect", *base, "collect.n=1"]) == 0
    assert main(["collect", *base, "collect.n=2", "--force"]) == 0
    rows = corpus(tmp_path)
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], {})[r["sample_index"]] = r["text"]
    assert len(rows) == 24 and all(len(s) == 2 for s in by_prompt.values())
    assert sum(s[0] != s[1] for s in by_prompt.values()) >= 10  # temperature 1: two draws rarely agree


def test_collect_killed_midway_resumes_with_one_record_per_request(tiny_teacher_dir, tmp_path):
    args = [sys.executable, "-m", "bayeskd.cli", "collect", f"run_dir={tmp_path}", f"teacher.model={tiny_teacher_dir}",
            "teacher.batch_size=2", "collect.limit=60", "collect.n=2", "collect.max_tokens=24", "collect.flush_every=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(store_keys(tmp_path) if (tmp_path / "collect" / "store").exists() else []) < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = store_keys(tmp_path)
    assert 20 <= len(before) < 120, "the kill should land mid-way"
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = store_keys(tmp_path)
    assert len(after) == len(set(after)) == 120
    assert after[: len(before)] == before  # nothing rewritten, nothing paid for twice
    assert len(corpus(tmp_path)) == 120


EXTRA = {"top_k": 0, "min_p": 0, "repeat_penalty": 1.0}


@pytest.mark.parametrize("endpoint, prefix_via", [("chat", "continue_final_message"), ("completions", "completions")])
def test_extra_body_is_sent_with_every_request(endpoint, prefix_via, recording_server):
    with recording_server() as s:
        cfg = TeacherConfig(backend="openai", model="m", base_url=s.base_url, endpoint=endpoint, prefix_via=prefix_via,
                            extra_body=EXTRA)  # fmt: skip
        teacher = OpenAITeacher(cfg)
        messages = [{"role": "user", "content": "hi"}]
        teacher.generate(TeacherRequest.chat(messages, n=2, temperature=0.7, max_tokens=3, seed=5))
        teacher.generate(TeacherRequest.chat(messages, prefix="The", max_tokens=1))
        teacher.close()
    assert len(s.bodies) == 2
    for _, body in s.bodies:
        assert {k: body[k] for k in EXTRA} == EXTRA
    assert s.bodies[0][1]["n"] == 2 and s.bodies[0][1]["temperature"] == 0.7  # bayeskd's own fields are kept


def test_extra_body_keys_the_store_and_refuses_bayeskds_own_fields(server, tmp_path):
    args = ["collect", f"run_dir={tmp_path}", "teacher.backend=openai", f"teacher.model={server.teacher.model_ref}",
            f"teacher.base_url={server.base_url}", "collect.limit=4", "collect.max_tokens=4"]  # fmt: skip
    assert main(args) == 0
    first = store_keys(tmp_path)
    # Answers drawn under other server-side sampling are not replayed for these.
    assert main([*args, "teacher.extra_body.top_k=0", "--force"]) == 0
    keys = store_keys(tmp_path)
    assert len(keys) == 2 * len(first) == 8 and keys[:4] == first
    assert main([*args, "teacher.extra_body.temperature=0"]) == 2


def test_a_named_teacher_keeps_its_answers_at_a_new_address(server, start_server, tiny_teacher_dir, tmp_path, capsys):
    args = ["collect", f"run_dir={tmp_path}", "teacher.backend=openai", f"teacher.model={server.teacher.model_ref}",
            "teacher.name=tiny", "collect.limit=4", "collect.n=2", "collect.max_tokens=4"]  # fmt: skip
    assert main([*args, f"teacher.base_url={server.base_url}"]) == 0
    first = store_keys(tmp_path)
    with start_server(tiny_teacher_dir, ServeConfig(port=0)) as moved:  # the same model on another port
        assert main([*args, f"teacher.base_url={moved.base_url}"]) == 0
        assert "already done" in capsys.readouterr().out
        assert main([*args, f"teacher.base_url={moved.base_url}", "--force"]) == 0  # rebuilt from the store
        assert moved.app.state.billed["requests"] == 0
    assert store_keys(tmp_path) == first and len(corpus(tmp_path)) == 8
