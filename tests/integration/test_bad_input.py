"""Bad input: a clear message naming the problem, exit code 2, and no stage marked done."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bayeskd.artifacts import Run
from bayeskd.cli import main
from bayeskd.estimate.distributions import SparseDist
from bayeskd.errors import BayeskdError
from bayeskd.estimate.targets import TargetWriter


def status(run_dir: Path, stage: str) -> str | None:
    path = run_dir / stage / "manifest.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def base(run_dir, model) -> list[str]:
    return [f"run_dir={run_dir}", f"teacher.model={model}", "collect.limit=6", "collect.max_tokens=4",
            f"proxy.train.model={model}", f"distill.train.model={model}", "proxy.train.init_layers=null",
            "proxy.train.max_steps=2", "distill.train.init_layers=null", "distill.train.max_steps=2"]


def test_unknown_yaml_key_and_wrong_type(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("collect:\n  max_tokns: 3\n")
    assert main(["collect", "-c", str(cfg)]) == 2
    assert "unknown key collect.max_tokns" in capsys.readouterr().err
    cfg.write_text("prior:\n  order: three\n")
    assert main(["prior", "-c", str(cfg)]) == 2
    assert "prior.order='three': expected an integer" in capsys.readouterr().err


def test_missing_prompt_file_and_empty_prompts(tiny_teacher_dir, tmp_path, capsys):
    assert main(["collect", *base(tmp_path, tiny_teacher_dir), f"collect.prompts={tmp_path / 'nope.jsonl'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["collect", *base(tmp_path, tiny_teacher_dir), f"collect.prompts={empty}"]) == 2
    assert "no prompts found" in capsys.readouterr().err
    assert status(tmp_path, "collect") is None


def test_prompt_longer_than_the_teacher_context(tiny_teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "long.txt"
    prompts.write_text("short question?\n" + "word " * 2000 + "\n")
    assert main(["collect", *base(tmp_path, tiny_teacher_dir), f"collect.prompts={prompts}"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the model context" in err and "failures.jsonl" in err
    assert status(tmp_path, "collect") == "running"  # not done: a rerun retries
    failures = [json.loads(x) for x in (tmp_path / "collect" / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and failures[0]["status"] == 400


def test_empty_corpus(tiny_teacher_dir, tmp_path, capsys):
    args = base(tmp_path, tiny_teacher_dir)
    assert main(["collect", *args]) == 0
    (tmp_path / "collect" / "corpus.jsonl").write_text("")
    assert main(["prior", *args]) == 2  # emptied after collect finished: a damaged file
    assert "is not the file stage 'collect' wrote" in capsys.readouterr().err
    Run(tmp_path).finish("collect", "partial", {})  # as a collect that found nothing records it
    assert main(["prior", *args]) == 2
    assert "is empty" in capsys.readouterr().err
    assert status(tmp_path, "prior") is None


def test_a_model_that_is_not_a_causal_lm(tiny_teacher_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=320, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(t5)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(t5)  # same tokenizer: only the model is wrong
    args = base(tmp_path, tiny_teacher_dir)
    assert main(["collect", *args]) == 0
    assert main(["proxy", *args, f"proxy.train.model={t5}"]) == 2
    err = capsys.readouterr().err
    assert "is not a causal language model" in err and str(t5) in err
    assert status(tmp_path, "proxy") != "done"


def test_non_finite_targets_are_refused(tmp_path):
    writer = TargetWriter(tmp_path / "t", ("posterior",), k=2)
    bad = SparseDist(np.array([[1, 2]], np.int32), np.array([[np.nan, 0.5]]), np.array([0.5]))
    with pytest.raises(BayeskdError, match="non-finite posterior targets for corpus record 7"):
        writer.add(7, {"posterior": bad}, np.ones(1))
