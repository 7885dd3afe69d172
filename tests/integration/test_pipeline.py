"""The whole pipeline through the CLI, on tiny models built from config and a real in-process teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from bayeskd.cli import main
from bayeskd.models import build_tiny
from bayeskd.estimate.targets import TargetStore


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("other"), ["a completely different corpus of words"] * 20, vocab_size=280)


def tiny_args(run_dir: Path, model: Path) -> list[str]:
    train = "max_steps=4,batch_size=4,save_every=2,warmup_steps=1,lr=0.01,init_layers=null"
    args = [
        f"run_dir={run_dir}",
        f"teacher.model={model}",
        "collect.limit=24",
        "collect.max_tokens=8",
        "collect.top_logprobs=3",
        "data.heldout_fraction=0.2",
        "prior.order=3",
    ]
    for section in ("proxy", "distill"):
        args.append(f"{section}.train.model={model}")
        args += [f"{section}.train.{kv}" for kv in train.split(",")]
    return args


def report_of(run_dir: Path) -> str:
    return (run_dir / "eval" / "report.md").read_text()


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def test_run_all_stages_then_skip_then_stale(tiny_teacher_dir, tmp_path, capsys):
    args = tiny_args(tmp_path, tiny_teacher_dir)
    assert main(["run", *args]) == 0
    for stage in ("collect", "prior", "proxy", "distill/sft"):
        assert manifest(tmp_path, stage)["status"] == "done", stage
    prior = manifest(tmp_path, "prior")["summary"]
    assert prior["tokens"] > 0 and len(prior["unique_contexts"]) == 3
    log = [json.loads(x) for x in (tmp_path / "proxy" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == 4 and all(r["loss"] > 0 for r in log)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "distill" / "sft" / "final")
    assert student.config.num_hidden_layers == 2
    capsys.readouterr()
    # A rerun skips every finished stage.
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("already done") >= 3
    # Changing a stage's config makes it refuse stale outputs unless --force.
    assert main(["proxy", *args, "proxy.train.lr=0.02"]) == 2
    assert "another config" in capsys.readouterr().err
    assert main(["proxy", *args, "proxy.train.lr=0.02", "--force"]) == 0


def test_proxy_with_another_tokenizer_is_refused(tiny_teacher_dir, other_tokenizer_model, tmp_path, capsys):
    args = tiny_args(tmp_path, tiny_teacher_dir)
    assert main(["collect", *args]) == 0
    assert main(["proxy", *args, f"proxy.train.model={other_tokenizer_model}"]) == 2
    err = capsys.readouterr().err
    assert str(other_tokenizer_model) in err and str(tiny_teacher_dir) in err and "tokenizer" in err
    assert not (tmp_path / "proxy" / "manifest.json").exists()


def test_stage_before_its_input_is_a_clear_error(tiny_teacher_dir, tmp_path, capsys):
    assert main(["prior", *tiny_args(tmp_path, tiny_teacher_dir)]) == 2
    assert "run `bayeskd collect` first" in capsys.readouterr().err


def test_posterior_and_every_distill_mode_through_the_cli(tiny_teacher_dir, tmp_path):
    modes = "[sft, bayes, prior-only, posterior-only, proxy-kd, topk-kd, oracle-kd]"
    args = [*tiny_args(tmp_path, tiny_teacher_dir), f"distill.modes={modes}", "posterior.top_k=8", "prior.top_k=8"]
    assert main(["run", *args]) == 0
    summary = manifest(tmp_path, "posterior")["summary"]
    assert summary["positions"] > 0 and summary["bytes_per_entry"] <= 7
    ev = summary["evidence"]
    assert ev["positions"] == summary["positions"] and 0 < ev["share_with_evidence"] <= 1
    for mode in ("sft", "bayes", "prior-only", "posterior-only", "proxy-kd", "topk-kd", "oracle-kd"):
        m = manifest(tmp_path, f"distill/{mode}")
        assert m["status"] == "done", mode
        assert (tmp_path / "distill" / mode / "final" / "model.safetensors").is_file()
    assert "upper bound" in manifest(tmp_path, "distill/oracle-kd")["summary"]["note"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    students = metrics["students"]
    assert set(students) == {"sft", "bayes", "prior-only", "posterior-only", "proxy-kd", "topk-kd", "oracle-kd"}
    for s in students.values():
        assert s["bpb"] > 0 and s["kl_teacher"] >= 0 and 0 <= s["rouge_l"] <= 1 and s["tokens"] > 0
    assert "upper bound" in students["oracle-kd"]["note"]
    for setting in ("train", "heldout"):
        est = metrics["estimates"][setting]
        for name in ("one-hot", "prior", "proxy", "posterior-no-logprobs", "posterior", "one-hot+proxy", "one-hot+posterior"):
            assert est[name]["kl"] >= 0 and 0 <= est[name]["top1"] <= 1 and est[name]["tokens"] > 0
    bb = metrics["estimates"]["heldout"]["blackbox"]
    assert {"prior", "proxy", "posterior-no-logprobs"} <= set(bb["estimates"]) and -1 <= bb["kendall_tau"] <= 1
    # With logprobs: the API's top-k alone as topk-kd trains on it (its tail uniform), in both settings,
    # and held out, without the sampled token's own logprob, beside the posterior built the same way.
    assert {"top-k alone (top-k only)", "posterior (top-k only)"} <= set(bb["estimates"])
    for setting in ("train", "heldout"):
        assert metrics["estimates"][setting]["top-k alone"]["kl"] >= 0
    assert "top-k alone" in report_of(tmp_path)
    for name, r in bb["estimates"].items():  # the black-box NLL is the same column as the fidelity table's
        assert r["kl"] >= 0 and r["nll"] == pytest.approx(metrics["estimates"]["heldout"].get(name, r)["nll"])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| sft |" in report and (tmp_path / "eval" / "students.png").is_file()
    assert (tmp_path / "eval" / "fidelity.png").is_file() and (tmp_path / "eval" / "training.png").is_file()
    last = json.loads((tmp_path / "distill" / "bayes" / "train_log.jsonl").read_text().splitlines()[-1])
    assert {"ce", "prior", "target"} <= set(last) and last["prior"] > 0 and last["target"] > 0
    last = json.loads((tmp_path / "distill" / "sft" / "train_log.jsonl").read_text().splitlines()[-1])
    assert "prior" not in last and "target" not in last
    last = json.loads((tmp_path / "distill" / "topk-kd" / "train_log.jsonl").read_text().splitlines()[-1])
    assert "prior" not in last and last["target"] > 0
    # Proxy-KD's per-record weights off (an ablation) is another student: its stage config says so.
    weighted = manifest(tmp_path, "distill/proxy-kd")
    assert weighted["config"]["sample_weights"] == "kl-only"
    assert main(["distill", *args, "distill.modes=[proxy-kd]", "distill.proxy_kd_weights=false"]) == 2  # changed: refused
    assert main(["distill", *args, "distill.modes=[proxy-kd]", "distill.proxy_kd_weights=false", "--force"]) == 0
    unweighted = manifest(tmp_path, "distill/proxy-kd")
    assert "sample_weights" not in unweighted["config"] and unweighted["fingerprint"] != weighted["fingerprint"]
    # topk-kd's targets are the API's own top-k, as mapped onto student tokens: nothing else.
    store = TargetStore.open(tmp_path / "posterior" / "targets")
    corpus_rows = [json.loads(x) for x in (tmp_path / "collect" / "corpus.jsonl").read_text().splitlines()]
    with_ev = [i for i, r in enumerate(corpus_rows) if r["tokens"]]
    ids, probs = store.rows(with_ev[0], "topk_ids"), store.rows(with_ev[0], "topk_probs").astype(float)
    tail = store.rows(with_ev[0], "topk_tail")
    assert (ids[:, 0] >= 0).any() and np.allclose(probs.sum(1) + tail, 1, atol=1e-3)
    # At the response's first token (one tokenizer here: the mapping is exact): the teacher's top-k,
    # plus its sampled token when that is not among them.
    first = corpus_rows[with_ev[0]]["tokens"][0]
    top = sum(math.exp(lp) for _, lp in first["top"])
    sampled = 0.0 if first["token"] in [t for t, _ in first["top"]] else math.exp(first["logprob"])
    np.testing.assert_allclose(probs[0].sum(), top + sampled, atol=1e-2)


def test_topk_kd_without_logprobs_is_a_clear_error(tiny_teacher_dir, tmp_path, capsys):
    args = [*tiny_args(tmp_path, tiny_teacher_dir), "collect.top_logprobs=0", "distill.modes=[topk-kd]"]
    for stage in ("collect", "prior", "proxy", "posterior"):
        assert main([stage, *args]) == 0
    capsys.readouterr()
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err
    assert "topk-kd" in err and "collect.top_logprobs" in err


def test_distill_refuses_targets_from_another_corpus(tiny_teacher_dir, tmp_path, capsys):
    args = [*tiny_args(tmp_path, tiny_teacher_dir), "distill.modes=[bayes]"]
    assert main(["run", *args]) == 0
    # Recollect a different corpus in the same run folder: the stored targets no longer match it.
    assert main(["collect", *args, "collect.limit=20", "--force"]) == 0
    assert main(["distill", *args, "--force"]) == 2
    assert "another corpus" in capsys.readouterr().err


def test_posterior_fit_auto_chooses_on_the_validation_split_without_an_oracle(tiny_teacher_dir, tmp_path, capsys):
    args = [*tiny_args(tmp_path, tiny_teacher_dir), "posterior.fit=auto", "posterior.fit_mu=[0.5, 8.0]",
            "posterior.fit_m=[0.0, 4.0, .inf]", "posterior.fit_proxy_temperature=[1.0]"]  # fmt: skip
    for stage in ("collect", "prior", "proxy"):
        assert main([stage, *args]) == 0
    # No validation split: the fit has nothing it may score, and says what to set.
    assert main(["posterior", *args]) == 2
    assert "data.validation_fraction" in capsys.readouterr().err
    args.append("data.validation_fraction=0.3")
    for stage in ("prior", "proxy", "posterior"):
        assert main([stage, *args, "--force"]) == 0
    fit = manifest(tmp_path, "posterior")["summary"]["fit"]
    grid = json.loads((tmp_path / "posterior" / "fit.json").read_text())["grid"]
    # The grids given, plus the configured values (prior.mu 2, M 8): orders 1-3 x mu 3 x M 4 x tau 1.
    assert len(grid) == 3 * 3 * 4 and fit["positions"] > 0 and fit["with_logprobs"]
    assert fit["nll"] == min(g["nll"] for g in grid) <= fit["nll_at_configured"]
    # Validation prompts are neither counted by the prior nor trained on by the proxy.
    prior = manifest(tmp_path, "prior")["summary"]
    proxy = manifest(tmp_path, "proxy")["summary"]
    corpus = [json.loads(x) for x in (tmp_path / "collect" / "corpus.jsonl").read_text().splitlines()]
    from bayeskd.data import split_of

    splits = [split_of(r["prompt_id"], 0.2, 0.3) for r in corpus]
    assert splits.count("validation") > 0
    assert prior["examples"] == proxy["train_examples"] == splits.count("train")


def test_equal_tuning_for_every_mode_at_a_declared_sampling_temperature(tiny_teacher_dir, tmp_path):
    """Collected at T = 0.7, top_p = 0.9: the posterior records the conversion of the API's raw
    logprobs, the oracle measures that distribution. With distill.fit=auto each KD mode trains one
    student per (kd_weight, tau) and keeps the lowest validation NLL; with select=best_validation
    each keeps its best step. sft gets no grid (nothing to tune)."""
    args = [*tiny_args(tmp_path, tiny_teacher_dir), "collect.temperature=0.7", "collect.top_p=0.9",
            "data.validation_fraction=0.3", "distill.modes=[sft, topk-kd, proxy-kd]", "distill.fit=auto",
            "distill.fit_kd_weight=[0.5, 1.0]", "distill.fit_tau=[1.0]", "distill.train.eval_every=2",
            "distill.train.select=best_validation"]  # fmt: skip
    assert main(["run", *args]) == 0
    assert manifest(tmp_path, "posterior")["config"]["sampling"] == {"temperature": 0.7, "top_p": 0.9}
    for mode in ("topk-kd", "proxy-kd"):
        fit = manifest(tmp_path, f"distill/{mode}")["summary"]["fit"]
        assert [(g["kd_weight"], g["tau"]) for g in fit["grid"]] == [(0.5, 1.0), (1.0, 1.0)]
        best = min(fit["grid"], key=lambda g: g["validation_nll"])
        assert fit["chosen"] == {"kd_weight": best["kd_weight"], "tau": best["tau"]}
        chosen = tmp_path / "distill" / mode / "fit" / f"kd{best['kd_weight']:g}-tau1" / "final" / "model.safetensors"
        assert (tmp_path / "distill" / mode / "final" / "model.safetensors").read_bytes() == chosen.read_bytes()
    sft = manifest(tmp_path, "distill/sft")["summary"]
    assert "fit" not in sft and sft["best_step"] in (2, 4)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    held = metrics["estimates"]["heldout"]
    assert held["posterior"]["kl"] >= 0 and held["top-k alone"]["kl"] >= 0 and -1 <= held["blackbox"]["kendall_tau"] <= 1


def test_a_scratch_student_owes_the_model_it_is_cut_from_nothing_but_its_shape(tiny_teacher_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    args = [*tiny_args(tmp_path, tiny_teacher_dir), "distill.modes=[sft]", "distill.train.max_steps=1", "distill.train.lr=1e-6"]
    assert main(["collect", *args]) == 0
    # seed 5: the tiny teacher is itself random weights drawn from seed 0, which init: scratch at seed 0 would redraw
    args.append("distill.train.seed=5")
    assert main(["distill", *args, "distill.train.init=scratch"]) == 0
    m = manifest(tmp_path, "distill/sft")
    assert m["status"] == "done" and m["config"]["train"]["init"] == "scratch"
    student = load_file(tmp_path / "distill" / "sft" / "final" / "model.safetensors")
    teacher = load_file(tiny_teacher_dir / "model.safetensors")
    weights = [k for k in student if "norm" not in k]
    assert weights and all(student[k].shape == teacher[k].shape for k in weights)
    assert all((student[k] - teacher[k]).abs().max() > 1e-3 for k in weights)  # one step at lr 1e-6 cannot explain it
    # The initialisation is part of what the student was built from.
    assert main(["distill", *args]) == 2
    assert "another config" in capsys.readouterr().err


def test_the_dpo_proxy_is_what_later_stages_read(tiny_teacher_dir, tmp_path, capsys):
    from bayeskd.artifacts import fingerprint_file

    args = [*tiny_args(tmp_path, tiny_teacher_dir), "proxy.align=sft+dpo", "proxy.dpo.max_steps=3",
            "proxy.dpo.save_every=2", "proxy.dpo.lr=0.01", "distill.modes=[proxy-kd]", "eval.max_examples=4"]  # fmt: skip
    assert main(["run", *args]) == 0
    dpo = manifest(tmp_path, "proxy/dpo")
    assert dpo["status"] == "done" and dpo["summary"]["steps"] == 3 and dpo["summary"]["pairs"] > 0
    # No pair comes from a held-out prompt; the posterior read the DPO proxy, not the SFT one.
    from bayeskd.data import split_of

    pairs = [json.loads(x) for x in (tmp_path / "proxy" / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert all(split_of(p["prompt_id"], 0.2) == "train" for p in pairs)
    dpo_fp = fingerprint_file(tmp_path / "proxy" / "dpo" / "final" / "model.safetensors")
    assert manifest(tmp_path, "posterior")["inputs"]["proxy"] == dpo_fp
    assert dpo_fp != fingerprint_file(tmp_path / "proxy" / "final" / "model.safetensors")
    # eval scores both proxies, the DPO one as `proxy` and the SFT one beside it.
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for setting in ("train", "heldout"):
        est = metrics["estimates"][setting]
        assert est["proxy"]["kl"] != est["proxy (sft)"]["kl"] and est["proxy (sft)"]["tokens"] == est["proxy"]["tokens"]
    assert "proxy (sft)" in metrics["estimates"]["heldout"]["blackbox"]["estimates"]
    assert "| heldout | proxy (sft) |" in (tmp_path / "eval" / "report.md").read_text()
    # Back to align=sft: the posterior built on the DPO proxy is stale for it, and says which input changed.
    capsys.readouterr()
    assert main(["posterior", *args, "proxy.align=sft"]) == 2
    assert "input (proxy)" in capsys.readouterr().err
