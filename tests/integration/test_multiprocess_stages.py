"""`posterior` and `eval` under `accelerate launch` with two CPU processes (gloo) against one process.

The two-process launch runs `bayeskd run` on a copy of a finished one-process run folder with
its `prior`, `posterior` and `eval` removed: `collect` (done) and `prior` (rebuilt) run on rank
0 alone, `proxy` and `distill` are skipped by every rank, `posterior` and `eval` are sharded
over the two ranks and merged by rank 0. The merged target store must be the one-process
store (record for record, ids equal, probabilities within float16 rounding) and the metrics
the same within float rounding. The launch line is the one `test_multiprocess.py` explains.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bayeskd.cli import main
from bayeskd.estimate.targets import TargetStore

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("one_thread")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args_for(run_dir: Path, model: Path) -> list[str]:
    train = "max_steps=3,batch_size=4,save_every=3,warmup_steps=1,lr=0.01,init_layers=null"
    args = [f"run_dir={run_dir}", f"teacher.model={model}", "collect.limit=24", "collect.max_tokens=8",
            "collect.top_logprobs=3", "data.heldout_fraction=0.3", "prior.order=3", "posterior.top_k=8",
            "prior.top_k=8", "posterior.mode=sampled", "posterior.m=8", "posterior.batch_size=3",
            "distill.modes=[sft, bayes]", "eval.batch_size=3"]  # fmt: skip
    for section in ("proxy", "distill"):
        args += [f"{section}.train.model={model}", *(f"{section}.train.{kv}" for kv in train.split(","))]
    return args


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def assert_close_tree(a, b, path="metrics"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6, nan_ok=True), path
    else:
        assert a == b, path


def test_two_processes_write_the_posterior_and_metrics_of_one(tiny_teacher_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", *args_for(one, tiny_teacher_dir)]) == 0
    shutil.copytree(one, two)
    for stage in ("prior", "posterior", "eval"):
        shutil.rmtree(two / stage)
    collect_before = manifest(two, "collect")

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "bayeskd.cli", "run", *args_for(two, tiny_teacher_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    assert manifest(two, "collect") == collect_before  # done: neither rank touched it
    assert manifest(two, "prior")["fingerprint"] == manifest(one, "prior")["fingerprint"]
    m1, m2 = manifest(one, "posterior"), manifest(two, "posterior")
    assert m2["status"] == "done" and m2["fingerprint"] == m1["fingerprint"]
    assert set(m2["files"]) == set(m1["files"])  # the same files: the parts were merged and removed
    assert m2["summary"]["processes"] == 2 and m1["summary"]["processes"] == 1
    for key in ("examples", "positions", "evidence"):  # the evidence's mass shares: sums in another order
        assert_close_tree(m1["summary"][key], m2["summary"][key], key)
    assert m2["summary"]["mean_posterior_entropy"] == pytest.approx(m1["summary"]["mean_posterior_entropy"], rel=1e-3)
    assert not (two / "posterior" / ".parts").exists()
    # distill read the same targets fingerprint, so it was not retrained
    assert manifest(two, "distill/bayes")["finished"] == manifest(one, "distill/bayes")["finished"]

    a, b = TargetStore.open(one / "posterior" / "targets"), TargetStore.open(two / "posterior" / "targets")
    assert a.meta == b.meta and a._index == b._index  # same records, same rows, same shards
    for index in a._index:
        for name in ("prior", "posterior", "proxy", "topk"):
            np.testing.assert_array_equal(a.rows(index, f"{name}_ids"), b.rows(index, f"{name}_ids"))
            for key in ("probs", "tail"):
                np.testing.assert_allclose(a.rows(index, f"{name}_{key}").astype(float),
                                           b.rows(index, f"{name}_{key}").astype(float), atol=2e-3)  # fmt: skip
    np.testing.assert_allclose(np.load(one / "posterior" / "proxy_loglik.npy"),
                               np.load(two / "posterior" / "proxy_loglik.npy"), rtol=1e-5)  # fmt: skip

    metrics_one = json.loads((one / "eval" / "metrics.json").read_text())
    metrics_two = json.loads((two / "eval" / "metrics.json").read_text())
    assert metrics_one["estimates"]["heldout"]["posterior"]["tokens"] > 0
    assert_close_tree(metrics_one, metrics_two)
    assert manifest(two, "eval")["status"] == "done" and (two / "eval" / "report.md").is_file()
