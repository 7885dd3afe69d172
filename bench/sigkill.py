"""Kill a command again and again: the SIGKILL loop behind `bench/reliability.py` and its short test.

A bench helper, not part of the package: only the reliability bench and its test start and
kill `bayeskd` processes.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable


def sigkill_loop(
    args: list[str], env: dict, calls_seen: Callable[[], int], kills_wanted: int, rng: random.Random
) -> int:
    """Start `args` (a collect command) `kills_wanted` times and SIGKILL it at a random moment each time.

    One kill in five lands in start-up (imports, loading the store, listing models); the others
    a random moment after the run's first call to the server, read through `calls_seen`.
    Returns how many runs were really killed (a run may finish first).
    """
    kills = 0
    for attempt in range(kills_wanted):
        seen = calls_seen()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        startup = attempt % 5 == 0
        deadline = time.time() + (rng.uniform(0.0, 2.5) if startup else 30)
        while calls_seen() == seen and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if not startup:
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    return kills
