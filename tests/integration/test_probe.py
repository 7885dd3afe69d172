"""Prefix continuation and the `probe` stage, on a tiny real teacher (in-process and over HTTP)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bayeskd.cli import main
from bayeskd.teachers.config import FaultConfig, ServeConfig, TeacherConfig
from bayeskd.teachers.base import TeacherRequest
from bayeskd.teachers.local import LocalTeacher
from bayeskd.teachers.openai_compat import OpenAITeacher

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PREFIX = "The capital"


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return LocalTeacher(str(tiny_teacher_dir))


def next_token_probs(teacher: LocalTeacher, prefix: str) -> torch.Tensor:
    """The tiny teacher's own next-token distribution after the chat-formatted prefix (test-side oracle)."""
    text = teacher.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) + prefix
    ids = teacher.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return torch.softmax(teacher.model(ids).logits[0, -1].float(), -1)


def test_local_prefix_samples_come_from_the_next_token_distribution(teacher):
    p = next_token_probs(teacher, PREFIX)
    greedy = teacher.generate(TeacherRequest.chat(MESSAGES, prefix=PREFIX, max_tokens=1, temperature=0, n=3))
    assert {c.text for c in greedy.choices} == {teacher.tokenizer.decode([int(p.argmax())])}
    n = 3000
    r = teacher.generate(TeacherRequest.chat(MESSAGES, prefix=PREFIX, max_tokens=1, n=n, seed=1))
    assert len(r.choices) == n and r.usage.completion_tokens == n
    ids = [teacher.tokenizer.encode(c.text, add_special_tokens=False)[0] if c.text else teacher.tokenizer.eos_token_id
           for c in r.choices]  # fmt: skip
    freq = np.bincount(ids, minlength=len(p)) / n
    top = np.argsort(-p.numpy())[:3]
    sigma = np.sqrt(p.numpy()[top] * (1 - p.numpy()[top]) / n)
    assert np.all(np.abs(freq[top] - p.numpy()[top]) < 5 * sigma + 1e-3), (freq[top], p.numpy()[top])


@pytest.mark.parametrize("via", ["completions", "continue_final_message"])
def test_served_teacher_continues_a_prefix_both_ways(server, teacher, via):
    cfg = TeacherConfig(backend="openai", model=server.teacher.model_ref, base_url=server.base_url, prefix_via=via)
    client = OpenAITeacher(cfg)
    assert client.supports_prefix
    r = client.generate(TeacherRequest.chat(MESSAGES, prefix=PREFIX, max_tokens=1, temperature=0))
    assert r.choices[0].text == teacher.tokenizer.decode([int(next_token_probs(teacher, PREFIX).argmax())])


def test_openai_itself_has_no_prefix_continuation(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    assert not OpenAITeacher(TeacherConfig(backend="openai", model="gpt-x")).supports_prefix  # auto, no base_url


# ------------------------------------------------------------------ the stage


def tiny_args(run_dir: Path, model: Path) -> list[str]:
    args = [f"run_dir={run_dir}", f"teacher.model={model}", "collect.limit=20", "collect.max_tokens=8", "collect.n=2",
            "data.heldout_fraction=0.2", "posterior.top_k=8", "prior.top_k=8", "distill.modes=[bayes]",
            "probe.samples=4", "probe.round_size=8"]  # fmt: skip
    for section in ("proxy", "distill"):
        args += [f"{section}.train.model={model}", f"{section}.train.init_layers=null", f"{section}.train.max_steps=2",
                 f"{section}.train.batch_size=4", f"{section}.train.save_every=0"]  # fmt: skip
    return args


@pytest.fixture(scope="module")
def posterior_run(tiny_teacher_dir, tmp_path_factory):
    """A run up to `posterior`, copied by each test."""
    root = tmp_path_factory.mktemp("probe-base")
    args = tiny_args(root, tiny_teacher_dir)
    for stage in ("collect", "prior", "proxy", "posterior"):
        assert main([stage, *args]) == 0
    return root


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def store_keys(run: Path) -> list[str]:
    return [json.loads(line)["key"] for f in sorted((run / "probe" / "store").glob("*.jsonl")) for line in f.read_text().splitlines()]


def summary(run: Path) -> dict:
    return json.loads((run / "probe" / "manifest.json").read_text())["summary"]


def test_probe_stays_within_the_budget_and_a_rerun_pays_for_nothing_twice(posterior_run, tiny_teacher_dir, tmp_path):
    run = copy_run(posterior_run, tmp_path / "run")
    args = [*tiny_args(run, tiny_teacher_dir), "probe.budget_tokens=2500"]
    assert main(["probe", *args]) == 0
    s = summary(run)
    assert s["budget_reached"] and 0 < s["tokens"] <= 2500 and s["positions_probed"] > 0
    assert s["teacher_samples"] >= 4 * len(store_keys(run)) - 4  # every answered query counted (an EOS or token each)
    first = store_keys(run)
    assert len(first) == len(set(first))  # positions sharing a prompt and prefix shared their query
    # Rerun from scratch: everything asked before comes from the store.
    assert main(["probe", *args, "--force"]) == 0
    again = store_keys(run)
    assert again[: len(first)] == first and len(again) == len(set(again))
    assert summary(run)["tokens"] <= 2500
    # A larger budget asks only for what is new.
    assert main(["probe", *tiny_args(run, tiny_teacher_dir), "probe.budget_tokens=5000", "--force"]) == 0
    more = store_keys(run)
    assert len(more) > len(again) and len(more) == len(set(more)) and summary(run)["tokens"] <= 5000


def test_bayes_student_trains_on_the_probed_targets(posterior_run, tiny_teacher_dir, tmp_path):
    run = copy_run(posterior_run, tmp_path / "run")
    args = [*tiny_args(run, tiny_teacher_dir), "probe.budget_tokens=1500", "probe.strategy=random"]
    assert main(["run", *args]) == 0
    assert summary(run)["strategy"] == "random"
    inputs = json.loads((run / "distill" / "bayes" / "manifest.json").read_text())["inputs"]
    assert inputs["targets"].startswith("probe:")
    meta = json.loads((run / "probe" / "targets" / "store.json").read_text())
    assert meta["probe"]["positions"] == summary(run)["positions_probed"]


def test_teacher_without_prefix_continuation_falls_back_to_whole_responses(posterior_run, tiny_teacher_dir, server, tmp_path, capsys):
    run = copy_run(posterior_run, tmp_path / "run")
    # The same model, now behind an OpenAI-compatible endpoint that cannot continue a prefix.
    args = [*tiny_args(run, tiny_teacher_dir), "probe.budget_tokens=1500", "teacher.backend=openai",
            f"teacher.base_url={server.base_url}", f"teacher.model={server.teacher.model_ref}", "teacher.prefix_via=none"]  # fmt: skip
    assert main(["probe", *args]) == 0
    out = capsys.readouterr().out
    assert "cannot continue a response prefix" in out and "falls back to whole-response sampling" in out
    s = summary(run)
    assert s["strategy"] == "whole" and s["fallback_to_whole"] and s["positions_probed"] > 0 and s["tokens"] <= 1500


def test_failed_queries_are_listed_and_a_rerun_asks_them(posterior_run, tiny_teacher_dir, server, start_server, tmp_path, capsys):
    run = copy_run(posterior_run, tmp_path / "run")
    # The teacher is named, so that its answers keep their keys when it is served at another address.
    args = [*tiny_args(run, tiny_teacher_dir), "probe.budget_tokens=1500", "teacher.backend=openai", "teacher.name=tiny",
            f"teacher.model={server.teacher.model_ref}", "teacher.max_retries=0"]  # fmt: skip
    with start_server(tiny_teacher_dir, ServeConfig(port=0, faults=FaultConfig(unavailable=1.0))) as down:
        assert main(["probe", *args, f"teacher.base_url={down.base_url}"]) == 0
    failures = [json.loads(line) for line in (run / "probe" / "failures.jsonl").read_text().splitlines()]
    m = json.loads((run / "probe" / "manifest.json").read_text())
    assert m["status"] == "partial" and m["summary"]["failures"] == len(failures) > 0
    assert all("HTTP 503" in f["reason"] and f["prompt_id"] and "prefix" in f for f in failures)
    assert "queries failed" in capsys.readouterr().err
    assert store_keys(run) == []
    assert main(["probe", *args, f"teacher.base_url={server.base_url}"]) == 0  # not skipped: asks them again
    m = json.loads((run / "probe" / "manifest.json").read_text())
    assert m["status"] == "done" and m["summary"]["failures"] == 0 and (run / "probe" / "failures.jsonl").read_text() == ""
    assert {k for f in failures for k in f["keys"]} <= set(store_keys(run))
