"""The training loop under `accelerate launch` with two CPU processes (gloo) against one process.

Note on the launch line: in accelerate 1.15, `accelerate launch --cpu --num_processes 2` starts
ONE process (with --cpu the launcher only fans out through mpirun and a hostfile). Two local
CPU processes need the torchrun path (`--multi_gpu`) with ACCELERATE_USE_CPU=1, which makes
each process pick the gloo backend; that is what this test runs.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("one_thread")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, train_script):
    script, spec = train_script
    common = {"max_steps": 6, "lr": 5e-3, "warmup_steps": 1, "save_every": 3, "log_every": 1}
    two, one = tmp_path / "two", tmp_path / "one"
    _, spec_two = spec(two, cfg={**common, "batch_size": 2})
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(script), spec_two,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (two / "world_size").read_text() == "2"

    runpy.run_path(str(script))["run"](spec(one, cfg={**common, "batch_size": 4})[0])
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
    a, b = load_file(str(two / "final" / "model.safetensors")), load_file(str(one / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    # Both processes wrote their RNG state into the same checkpoint.
    assert sorted(p.name for p in (two / "checkpoints" / "step-00000006").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
