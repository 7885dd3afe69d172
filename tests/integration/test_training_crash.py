"""SIGKILL during `proxy`, then the same command again: it resumes and ends where an unkilled run ends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from bayeskd.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def args(run_dir, model) -> list[str]:
    return [f"run_dir={run_dir}", f"teacher.model={model}", "collect.limit=24", "collect.max_tokens=8",
            f"proxy.train.model={model}", f"distill.train.model={model}", "proxy.train.init_layers=null",
            "proxy.train.max_steps=40", "proxy.train.save_every=4", "proxy.train.batch_size=4",
            "proxy.train.lr=0.01", "proxy.train.warmup_steps=2"]


def test_proxy_killed_mid_training_resumes_to_the_same_weights(tiny_teacher_dir, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    assert main(["collect", *args(killed, tiny_teacher_dir)]) == 0
    shutil.copytree(killed / "collect", clean / "collect")
    cmd = [sys.executable, "-m", "bayeskd.cli", "proxy", *args(killed, tiny_teacher_dir)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed / "proxy" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts.exists() and any(p.name >= "step-00000012" for p in ckpts.glob("step-*"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "proxy" / "final").exists(), "the kill should land before the end"
    subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "bayeskd.cli", "proxy", *args(clean, tiny_teacher_dir)], env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import json

    manifest = json.loads((killed / "proxy" / "manifest.json").read_text())
    summary = manifest["summary"]
    assert summary["resumed_from_step"] and summary["resumed_from_step"] >= 12
    # Finished: the resume state is gone (it is no output: the manifest never listed it).
    assert not ckpts.exists() and not [f for f in manifest["files"] if "checkpoints" in f]
    a = load_file(killed / "proxy" / "final" / "model.safetensors")
    b = load_file(clean / "proxy" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def dpo_args(run_dir, model) -> list[str]:
    """A short SFT proxy, then a DPO step long enough to be killed in the middle."""
    return [f"run_dir={run_dir}", f"teacher.model={model}", "collect.limit=24", "collect.max_tokens=8",
            f"proxy.train.model={model}", f"distill.train.model={model}", "proxy.train.init_layers=null",
            "proxy.train.max_steps=4", "proxy.train.batch_size=4", "proxy.train.lr=0.01", "proxy.train.warmup_steps=1",
            "proxy.dpo.max_steps=40", "proxy.dpo.save_every=4", "proxy.dpo.batch_size=4", "proxy.dpo.lr=0.01",
            "proxy.dpo.beta=0.5", "data.validation_fraction=0.2"]  # fmt: skip


def test_dpo_killed_mid_training_resumes_to_the_same_weights(tiny_teacher_dir, tmp_path):
    import json

    killed, clean = tmp_path / "killed", tmp_path / "clean"
    assert main(["collect", *dpo_args(killed, tiny_teacher_dir)]) == 0
    shutil.copytree(killed / "collect", clean / "collect")
    # The clean run makes its SFT proxy with the default align first: adding DPO must leave the
    # SFT stage as it is (skipped, same fingerprint), so existing runs are not rebuilt.
    sft_only = [sys.executable, "-m", "bayeskd.cli", "proxy", *dpo_args(clean, tiny_teacher_dir)]
    subprocess.run(sft_only, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sft_manifest = (clean / "proxy" / "manifest.json").read_text()
    assert not (clean / "proxy" / "dpo").exists()
    subprocess.run([*sft_only, "proxy.align=sft+dpo"], env=ENV, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    assert (clean / "proxy" / "manifest.json").read_text() == sft_manifest

    cmd = [sys.executable, "-m", "bayeskd.cli", "proxy", *dpo_args(killed, tiny_teacher_dir), "proxy.align=sft+dpo"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed / "proxy" / "dpo" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts.exists() and any(p.name >= "step-00000012" for p in ckpts.glob("step-*"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "proxy" / "dpo" / "final").exists(), "the kill should land before the end"
    subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    summary = json.loads((killed / "proxy" / "dpo" / "manifest.json").read_text())["summary"]
    assert summary["resumed_from_step"] and summary["resumed_from_step"] >= 12 and summary["steps"] == 40
    assert summary["pairs"] > 0 and summary["accuracy"] > 0.5  # it learned to prefer the teacher's responses
    assert (killed / "proxy" / "dpo" / "pairs.jsonl").read_text() == (clean / "proxy" / "dpo" / "pairs.jsonl").read_text()
    a = load_file(killed / "proxy" / "dpo" / "final" / "model.safetensors")
    b = load_file(clean / "proxy" / "dpo" / "final" / "model.safetensors")
    sft = load_file(clean / "proxy" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a[k], sft[k]) for k in a), "DPO should move the proxy away from the SFT one"
