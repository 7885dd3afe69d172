"""A student whose tokenizer is not the teacher's, end to end through the CLI (issue 14): the
teacher is a tiny real model on one BPE, the proxy and student are built by `bayeskd student` on
another, trained on the run's own text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bayeskd.cli import main
from bayeskd.models import tokenizer_fingerprint


def cross_args(run_dir: Path, teacher: Path, student: Path) -> list[str]:
    train = "max_steps=4,batch_size=4,save_every=0,warmup_steps=1,lr=0.01"
    args = [f"run_dir={run_dir}", f"teacher.model={teacher}", "collect.limit=24", "collect.max_tokens=8", "collect.n=2",
            "collect.top_logprobs=5", "data.heldout_fraction=0.2", "prior.order=3", "posterior.top_k=8", "prior.top_k=8",
            "distill.modes=[sft, topk-kd, bayes]", "eval.max_examples=6", "eval.max_new_tokens=4",
            "probe.samples=4", "probe.round_size=8", "probe.max_tokens=4", "probe.budget_tokens=1500"]  # fmt: skip
    for section in ("proxy", "distill"):
        args += [f"{section}.train.model={student}", f"{section}.train.init_layers=null"]
        args += [f"{section}.train.{kv}" for kv in train.split(",")]
    return args


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


@pytest.fixture(scope="module")
def cross_run(tiny_teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    student = root / "student-model"
    args = cross_args(root / "run", tiny_teacher_dir, student)
    assert main(["collect", *args]) == 0
    assert main(["student", *args, "--vocab-size", "400", "--hidden-size", "16", "--layers", "2", "--heads", "2"]) == 0
    return root / "run", args, student


def test_student_command_builds_another_tokenizer_and_refuses_to_overwrite(cross_run, tiny_teacher_dir, capsys):
    run, args, student = cross_run
    mine, theirs = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(tiny_teacher_dir)
    assert tokenizer_fingerprint(mine) != tokenizer_fingerprint(theirs) and len(mine) == 400
    assert main(["student", *args]) == 2
    assert "already holds a model" in capsys.readouterr().err


def test_whole_pipeline_in_the_students_token_space(cross_run, capsys):
    run, args, student = cross_run
    for stage in ("prior", "proxy", "posterior", "probe", "distill"):
        assert main([stage, *args]) == 0, stage
    ev = manifest(run, "posterior")["summary"]["evidence"]
    assert ev["positions_with_evidence"] > 0
    assert ev["share_mass_exact"] + ev["share_mass_prefix"] + ev["share_mass_dropped"] == pytest.approx(1.0)
    # Two different BPEs disagree somewhere: the chain rule's deeper factors are used.
    assert ev["straddles"] + ev["positions_inside_teacher_token"] > 0 and ev["share_mass_prefix"] > 0

    probe = manifest(run, "probe")["summary"]
    assert probe["queries"] > 0
    # Every sample is counted at its position or left out as unsettled: none is lost or double counted.
    assert probe["teacher_samples"] + probe["samples_not_counted"] == probe["queries"] * 4

    capsys.readouterr()
    assert main(["eval", *args]) == 0
    out = capsys.readouterr().out
    assert "undefined across vocabularies" in out
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert "undefined across vocabularies" in metrics["skipped"] and not metrics["estimates"]
    for mode in ("sft", "topk-kd", "bayes"):
        s = metrics["students"][mode]
        assert "kl_teacher" not in s and s["kl_teacher_byte"] >= 0 and s["bpb"] > 0 and s["byte_positions"] > 0


def test_oracle_kd_across_tokenizers_is_a_clear_error(cross_run, capsys):
    run, args, _ = cross_run
    assert main(["distill", *args, "distill.modes=[oracle-kd]"]) == 2
    assert "tokenizer" in capsys.readouterr().err
