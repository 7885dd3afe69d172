"""The pipeline's stages, in order. Each reads only the artifacts it declares and writes its own folder.

A stage is `fn(cfg, run, force) -> summary dict`, or None when it was already done. Modules
are imported when their stage runs, so that `bayeskd collect` does not load the training stack.

The stages are the thin layer that wires the subsystems (`teachers`, `estimate`, `train`,
`evaluate`) to the run folder: they may import any of them and the plumbing, never each other.
What several stages share about the run's layout (which proxy later stages read) lives here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from bayeskd.artifacts import Run
from bayeskd.config import Config

StageFn = Callable[[Config, Run, bool], "dict | None"]

# name -> (module under bayeskd.stages, function)
_STAGES = {
    "collect": ("collect", "run_collect"),
    "prior": ("prior", "run_prior"),
    "proxy": ("proxy", "run_proxy"),
    "posterior": ("posterior", "run_posterior"),
    "probe": ("probe", "run_probe"),
    "distill": ("distill", "run_distill"),
    "eval": ("evaluate", "run_eval"),
}
STAGES: tuple[str, ...] = tuple(_STAGES)

RANK0_STAGES = frozenset({"collect", "prior", "probe"})
"""Under `accelerate launch`, the stages rank 0 runs alone while the other ranks wait: `collect` and
`probe` ask the teacher (paid once, written once), `prior` counts on CPU. The others use every
rank: `proxy` and `distill` train data-parallel, `posterior` and `eval` shard the examples
(`ranks.Launch`) and rank 0 merges."""


def stage(name: str) -> StageFn:
    module, fn = _STAGES[name]
    return getattr(importlib.import_module(f"bayeskd.stages.{module}"), fn)


DPO_STAGE = "proxy/dpo"


def proxy_model(cfg: Config, run: Run) -> Path:
    """The proxy later stages read: the DPO one with `proxy.align: sft+dpo`, else the SFT one."""
    if cfg.proxy.align == "sft+dpo":
        return run.output(DPO_STAGE, "final")
    return run.output("proxy", "final")
