"""Fixtures for the integration tests: a tiny model and a real loopback teacher server."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bayeskd.prompts import load_builtin_prompts  # noqa: E402
from bayeskd.config import ServeConfig  # noqa: E402
from bayeskd.models import build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny Llama (hidden 16, 2 layers) with a BPE tokenizer trained on the built-in prompts."""
    texts = [p["prompt"] for p in load_builtin_prompts()]
    return build_tiny(tmp_path_factory.mktemp("tiny-teacher"), texts, vocab_size=320, seed=0)


def _start_server(model_dir, cfg: ServeConfig | None = None):
    from bayeskd.teachers.local import LocalTeacher
    from bayeskd.teachers.server import BackgroundServer

    cfg = cfg or ServeConfig(port=0)
    return BackgroundServer(LocalTeacher(str(model_dir), batch_size=cfg.max_batch), cfg)


@pytest.fixture(scope="session")
def start_server():
    """`with start_server(model_dir, ServeConfig(...)) as s:` -- a server with its own settings."""
    return _start_server


@pytest.fixture(scope="module")
def server(tiny_teacher_dir):
    with _start_server(tiny_teacher_dir) as s:
        yield s
