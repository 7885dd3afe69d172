"""The pipeline's stages, in order. Each reads only the artifacts it declares and writes its own folder.

A stage is `fn(cfg, run, force) -> summary dict`, or None when it was already done.
Later stages (prior, proxy, posterior, distill, eval) register here as they land.
"""

from __future__ import annotations

from collections.abc import Callable

from bayeskd.artifacts import Run
from bayeskd.config import Config

StageFn = Callable[[Config, Run, bool], "dict | None"]


def _collect(cfg: Config, run: Run, force: bool) -> dict | None:
    from bayeskd.stages.collect import run_collect

    return run_collect(cfg, run, force)


def _prior(cfg: Config, run: Run, force: bool) -> dict | None:
    from bayeskd.stages.prior import run_prior

    return run_prior(cfg, run, force)


def _proxy(cfg: Config, run: Run, force: bool) -> dict | None:
    from bayeskd.stages.proxy import run_proxy

    return run_proxy(cfg, run, force)


def _posterior(cfg: Config, run: Run, force: bool) -> dict | None:
    from bayeskd.stages.posterior import run_posterior

    return run_posterior(cfg, run, force)


def _distill(cfg: Config, run: Run, force: bool) -> dict | None:
    from bayeskd.stages.distill import run_distill

    return run_distill(cfg, run, force)


def _eval(cfg: Config, run: Run, force: bool) -> dict | None:
    from bayeskd.stages.evaluate import run_eval

    return run_eval(cfg, run, force)


STAGES: dict[str, StageFn] = {
    "collect": _collect,
    "prior": _prior,
    "proxy": _proxy,
    "posterior": _posterior,
    "distill": _distill,
    "eval": _eval,
}
