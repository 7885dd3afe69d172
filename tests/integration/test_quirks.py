"""The client against servers that answer as third-party ones do (`serve.quirks`), end to end.

Each test serves a tiny real teacher with some of llama.cpp's ways switched on, runs collect ->
prior -> proxy -> posterior -> probe through the CLI over HTTP (then distill), and checks that nothing failed,
nothing was retried, every sample is in the corpus or the probe's store, and the ledgers count
exactly what the server billed. The teacher ends its turn at once in about 3 samples in 10
(`eager_eos_teacher_dir`), so that empty end-of-turn answers are common.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bayeskd.cli import main
from bayeskd.errors import ConfigError
from bayeskd.teachers.config import FaultConfig, ServeConfig
from bayeskd.config import load_config
from bayeskd.models import CHATML_TEMPLATE, load_tokenizer
from bayeskd.estimate.targets import TargetStore

LIMIT = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pipeline_args(run: Path, server, model: Path, n: int, samples: int) -> list[str]:
    args = [f"run_dir={run}", "teacher.backend=openai", f"teacher.model={server.teacher.model_ref}",
            f"teacher.base_url={server.base_url}", "teacher.backoff_s=0.02", "teacher.max_retries=2",
            f"collect.limit={LIMIT}", f"collect.n={n}", "collect.max_tokens=6", "collect.top_logprobs=3",
            "data.heldout_fraction=0.2", "posterior.top_k=8", "prior.top_k=8",
            f"probe.samples={samples}", "probe.round_size=4", "probe.budget_tokens=1200",
            "distill.modes=[sft, bayes, topk-kd]"]  # fmt: skip
    for section in ("proxy", "distill"):
        args += [f"{section}.train.model={model}", f"{section}.train.init_layers=null", f"{section}.train.max_steps=2",
                 f"{section}.train.batch_size=4", f"{section}.train.save_every=0"]  # fmt: skip
    return args


@pytest.mark.parametrize(
    "quirks, n, samples",
    [(["ignore_n"], 3, 4), (["empty_end_of_turn"], 1, 1), (["ignore_n", "empty_end_of_turn"], 3, 4)],
    ids=["ignore_n", "empty_end_of_turn", "llama.cpp"],
)
def test_collect_and_probe_against_a_quirky_server(quirks, n, samples, eager_eos_teacher_dir, tiny_teacher_dir,
                                                   start_server, tmp_path, capsys):  # fmt: skip
    run = tmp_path / "run"
    with start_server(eager_eos_teacher_dir, ServeConfig(port=0, quirks=quirks)) as server:
        args = pipeline_args(run, server, tiny_teacher_dir, n, samples)
        for stage in ("collect", "prior", "proxy", "posterior", "probe"):
            assert main([stage, *args]) == 0, stage
        billed = dict(server.app.state.billed)
    assert main(["distill", *args]) == 0  # students train on a corpus with empty responses (the EOS alone)
    err = capsys.readouterr().err
    collect = json.loads((run / "collect" / "manifest.json").read_text())
    probe = json.loads((run / "probe" / "manifest.json").read_text())
    for m in (collect, probe):
        assert m["status"] == "done" and m["summary"]["failures"] == 0 and m["summary"]["retries"] == 0
    assert read_jsonl(run / "collect" / "failures.jsonl") == read_jsonl(run / "probe" / "failures.jsonl") == []
    rows = read_jsonl(run / "collect" / "corpus.jsonl")
    assert collect["summary"]["records"] == len(rows) == LIMIT * n
    answers = read_jsonl(next((run / "probe" / "store").glob("records-*.jsonl")))
    probed = [s for a in answers for s in a["samples"]]
    assert 0 < len(answers) <= probe["summary"]["queries"] and len(probed) == samples * len(answers)  # positions may share one
    # An end of turn is always counted (as the EOS); a one-token text may not be (an unfinished character).
    assert probe["summary"]["samples_not_counted"] <= sum(s["text"] != "" for s in probed)

    # The ledgers count every generation the server billed: the prompt once per request it answered.
    ledgers = [json.loads((run / stage / "ledger.json").read_text()) for stage in ("collect", "probe")]
    spent = {k: sum(sum(ledger[k].values()) for ledger in ledgers) for k in ("prompt_tokens", "completion_tokens")}
    assert spent == {k: billed[k] for k in spent}
    # collect's teacher-check and probe's prompt check (chat and completions) are billed too.
    checks = json.loads((run / "collect" / "teacher_check.json").read_text())["requests"] + 2
    if "ignore_n" in quirks:
        assert billed["requests"] == LIMIT * n + len(probed) + checks  # one request per sample
        assert err.count("ignores n") == 2  # said once by each stage's client
    else:
        assert billed["requests"] == LIMIT + len(answers) + checks
    if "empty_end_of_turn" in quirks:  # answers that ended the turn at once are kept, as the EOS
        empty = [r for r in rows if r["text"] == ""]
        assert empty and all(r["finish_reason"] == "stop" and r["tokens"] is None for r in empty)
        assert any(s["text"] == "" and s["finish_reason"] == "stop" for s in probed)


@pytest.mark.parametrize("quirk", ["topk_plus_sampled", "special_tokens_empty", "extra_system_turn", "server_top_k"])
def test_the_estimate_is_sound_against_a_quirky_server(quirk, eager_eos_teacher_dir, tiny_teacher_dir, start_server,
                                                       tmp_path, capsys):  # fmt: skip
    """collect -> prior -> proxy -> posterior against each of llama.cpp's other ways: the stored
    top-k holds at most the k asked for, every target is a valid (sub-)distribution, and where
    the server shows the end of the turn as "" the evidence still has it. Where its chat endpoint
    renders another prompt than the completions one, probe refuses until the template agrees."""
    run = tmp_path / "run"
    with start_server(eager_eos_teacher_dir, ServeConfig(port=0, quirks=[quirk])) as server:
        args = pipeline_args(run, server, tiny_teacher_dir, n=2, samples=1)
        if quirk in ("extra_system_turn", "server_top_k"):  # collect's teacher-check stops it before it pays
            assert main(["collect", *args]) == 2
            row = "prompt rendering" if quirk == "extra_system_turn" else "sampling: "
            assert f"teacher-check found what would break this collect: {row}" in capsys.readouterr().err
            assert not list((run / "collect" / "store").glob("*.jsonl"))  # nothing collected
            args.append("collect.teacher_check=false")  # collect anyway: what follows is what the client does then
        for stage in ("collect", "prior", "proxy", "posterior"):
            assert main([stage, *args]) == 0, stage
        if quirk == "extra_system_turn":  # probe continues prefixes through completions: another prompt
            assert main(["probe", *args]) == 2
            assert "teacher.completion_template" in capsys.readouterr().err
            assert not list((run / "probe" / "store").glob("*.jsonl"))  # nothing queried
            # The server's own template (an empty system turn first) makes the prompts one: probe runs.
            template = "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n<|im_end|>\n{% endif %}" + CHATML_TEMPLATE
            (tmp_path / "llama.yaml").write_text(yaml.safe_dump({"teacher": {"completion_template": template}}))
            assert main(["probe", "--config", str(tmp_path / "llama.yaml"), *args]) == 0
    rows = read_jsonl(run / "collect" / "corpus.jsonl")
    tops = [len(t["top"]) for r in rows for t in r["tokens"] or []]
    assert tops and max(tops) <= 3  # collect.top_logprobs=3
    store = TargetStore.open(run / "posterior" / "targets")
    eos = load_tokenizer(str(tiny_teacher_dir)).eos_token_id
    with_eos = 0
    for i in range(len(rows)):
        for name in ("posterior", "topk"):
            probs = store.rows(i, f"{name}_probs").astype(np.float64)
            tail = store.rows(i, f"{name}_tail").astype(np.float64)
            assert np.isfinite(probs).all() and (probs >= 0).all() and (probs.sum(1) <= 1 + 1e-3).all()
            assert (np.abs(probs.sum(1) + tail - 1) < 1e-2).all()
        topk = store.rows(i, "topk_ids")[: -1 if rows[i]["finish_reason"] == "stop" else None]  # not the final EOS
        with_eos += int((topk == eos).any(1).sum())
    evidence = json.loads((run / "posterior" / "manifest.json").read_text())["summary"]["evidence"]
    assert evidence["positions_with_evidence"] > 0
    # The teacher ends its turn with p = 0.3 at every step, so inside a response the end of the turn
    # is among the top 3 nearly everywhere: rendered "" or by name, it is evidence for the EOS.
    listed = [r["tokens"] for r in rows if r["tokens"]]
    inside = sum(len(t) - (t[-1]["token"] == "<|im_end|>") for t in listed)  # the final end of turn, where listed
    assert with_eos >= 0.5 * inside
    if quirk != "server_top_k":  # (drawn from the top 5 only, nearly every response is the end of the turn alone)
        assert inside > len(rows)


def test_unknown_quirk_is_named():
    with pytest.raises(ConfigError, match=r"serve.quirks\[1\]='ignore_m': unknown quirk; known: ignore_n"):
        load_config(None, ["serve.quirks=[ignore_n, ignore_m]"])


def test_samples_paid_before_a_failure_are_counted(tiny_teacher_dir, start_server, tmp_path):
    """A server that ignores n and fails now and then: an answer whose later samples fail is not
    kept, but the samples it got were paid for, and this run's ledger counts them."""
    cfg = ServeConfig(port=0, quirks=["ignore_n"], faults=FaultConfig(server_error=0.3, seed=3))
    with start_server(tiny_teacher_dir, cfg) as server:
        args = pipeline_args(tmp_path / "run", server, tiny_teacher_dir, n=3, samples=1)
        assert main(["collect", *args, "teacher.max_retries=0", "collect.teacher_check=false"]) == 0
        billed = dict(server.app.state.billed)
    m = json.loads((tmp_path / "run" / "collect" / "manifest.json").read_text())
    failures = read_jsonl(tmp_path / "run" / "collect" / "failures.jsonl")
    assert m["status"] == "partial" and m["summary"]["records"] == 3 * (LIMIT - len(failures))
    assert any(f["usage"]["completion_tokens"] > 0 for f in failures)  # samples got before the failing one
    ledger = json.loads((tmp_path / "run" / "collect" / "ledger.json").read_text())
    assert {k: sum(ledger[k].values()) for k in ("prompt_tokens", "completion_tokens")} == {
        k: billed[k] for k in ("prompt_tokens", "completion_tokens")
    }
