"""Errors that mean "the input is wrong", as opposed to bugs.

The CLI prints their message (which names the bad field, file or value) without a
traceback and exits with code 2; no stage is marked done.
"""

from __future__ import annotations

from typing import Any


class BayeskdError(Exception):
    """A problem with the user's input or environment that the message explains."""

    exit_code = 2


class ConfigError(BayeskdError, ValueError):
    """A config value, key or file is invalid. The message names the field."""


def check(cond: bool, path: str, value: Any, why: str) -> None:
    """A config section's validation: unless `cond`, raise ConfigError naming `path`, `value` and why."""
    if not cond:
        raise ConfigError(f"{path}={value!r}: {why}")
