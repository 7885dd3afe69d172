"""Where this process stands in a distributed launch (torchrun, `accelerate launch`): read from the
environment those launchers set, so that the run's plumbing (artifacts, the lock) can ask without
importing torch or accelerate."""

from __future__ import annotations

import os


def launch_id() -> str | None:
    """What all ranks of one distributed launch share (None outside one)."""
    if "RANK" not in os.environ:
        return None
    env = os.environ
    return f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}/{env.get('TORCHELASTIC_RUN_ID', '')}"


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_rank() -> bool:
    """Rank 0 of a distributed launch (`RANK`, as torchrun and accelerate set it), or no launch at all."""
    return rank() == 0
