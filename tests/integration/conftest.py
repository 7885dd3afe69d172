"""Fixtures for the integration tests: a tiny model and a real loopback teacher server."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bayeskd.prompts import load_builtin_prompts  # noqa: E402
from bayeskd.teachers.config import ServeConfig  # noqa: E402
from bayeskd.models import build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny Llama (hidden 16, 2 layers) with a BPE tokenizer trained on the built-in prompts."""
    texts = [p["prompt"] for p in load_builtin_prompts()]
    return build_tiny(tmp_path_factory.mktemp("tiny-teacher"), texts, vocab_size=320, seed=0)


@pytest.fixture(scope="session")
def eager_eos_teacher_dir(tiny_teacher_dir, tmp_path_factory):
    """The tiny teacher made to end its turn at every step with probability about 0.3, its other
    tokens near uniform: about 3 responses in 10 end at their first token.

    Every token's embedding gets a constant first coordinate, which then dominates the residual
    stream, so that after the final norm h_0 is about sqrt(hidden); the end-of-turn token's
    (tied) output row gets log(0.3 (V - 1) / 0.7) / h_0 more there than the others."""
    import math
    import shutil

    import torch

    from bayeskd.models import load_causal_lm, load_tokenizer

    folder = tmp_path_factory.mktemp("eager-eos") / "model"
    shutil.copytree(tiny_teacher_dir, folder)
    tok, model = load_tokenizer(str(folder)), load_causal_lm(str(folder))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        vocab, hidden = emb.shape
        emb[:, 0] = 1.0
        emb[tok.eos_token_id, 0] += math.log(0.3 * (vocab - 1) / 0.7) / math.sqrt(hidden)
    model.save_pretrained(folder)
    return folder


def _start_server(model_dir, cfg: ServeConfig | None = None):
    from bayeskd.teachers.local import LocalTeacher
    from bayeskd.teachers.hosting import BackgroundServer

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module that serves and trains tiny models at once: they gain nothing
    from more, and on a busy 2-core machine the threads' spin-waits slow each generation 10-50x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
