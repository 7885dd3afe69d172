"""A peer's client on our API: log-likelihoods through `bayeskd serve`'s completions `echo`.

lm-evaluation-harness (`local-completions`, where it is installed: the `bench` extra, not CI's)
runs a tiny local task against the server for the teacher and a student checkpoint; the raw
OpenAI SDK then makes the same call lm-eval makes (token-id prompts in a batch, echo, logprobs 1,
max_tokens 1, temperature 0, the continuation's echoed logprobs summed), so that CI checks it
without lm-eval. Both must match the model's own scoring."""

from __future__ import annotations

import openai
import pytest

from bayeskd.models import build_tiny, load_tokenizer
from bayeskd.prompts import load_builtin_prompts
from bayeskd.teachers.config import ServeConfig
from bayeskd.teachers.local import LocalTeacher
from bayeskd.teachers.hosting import BackgroundServer
from lmeval import DOCS, lmeval_logliks, own_logliks  # bench/lmeval.py (tests/conftest.py puts bench/ on the path)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A student checkpoint: the teacher's tokenizer, its own random weights."""
    texts = [p["prompt"] for p in load_builtin_prompts()]
    return build_tiny(tmp_path_factory.mktemp("student"), texts, vocab_size=320, seed=1)


def serve(model_dir):
    return BackgroundServer(LocalTeacher(str(model_dir), batch_size=8), ServeConfig(port=0), served_name="m")


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_lmeval_loglikelihoods_through_serve_match_our_scoring(which, tiny_teacher_dir, student_dir, tmp_path, one_torch_thread):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval[api]
    model = tiny_teacher_dir if which == "teacher" else student_dir
    with serve(model) as s:
        theirs = lmeval_logliks(s.base_url, "m", str(model), DOCS, tmp_path)
    ours = own_logliks(str(model), DOCS)
    assert theirs == pytest.approx(ours, abs=1e-3)


def test_the_echo_call_lmeval_makes(tiny_teacher_dir, student_dir, one_torch_thread):
    for model in (tiny_teacher_dir, student_dir):
        tok = load_tokenizer(str(model))
        ctx = [tok(d["context"], add_special_tokens=False)["input_ids"] for d in DOCS]
        whole = [tok(d["context"] + d["continuation"], add_special_tokens=False)["input_ids"] for d in DOCS]
        with serve(model) as s:
            client = openai.OpenAI(api_key="EMPTY", base_url=s.base_url)
            r = client.completions.create(model="m", prompt=whole, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
            only = client.completions.create(model="m", prompt=whole[0], echo=True, logprobs=5, max_tokens=0)
        choices = sorted(r.choices, key=lambda c: c.index)
        assert len(choices) == len(DOCS)
        theirs = []
        for c, cx, w in zip(choices, ctx, whole):
            lp = c.logprobs
            assert len(lp.tokens) == len(w) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            theirs.append(sum(lp.token_logprobs[len(cx) : -1]))  # lm-eval's slice: the generated token dropped
            # The top alternative is the likeliest: its value bounds the token's own (lm-eval's is_greedy).
            assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        assert theirs == pytest.approx(own_logliks(str(model), DOCS), abs=1e-4)
        # max_tokens 0: the prompt alone, nothing generated, up to k alternatives per token after the first.
        lp = only.choices[0].logprobs
        assert len(lp.tokens) == len(whole[0]) and only.usage.completion_tokens == 0
        assert all(1 <= len(t) <= 5 for t in lp.top_logprobs[1:])  # alternatives that decode alike share a key
        assert lp.token_logprobs[1:] == pytest.approx(r.choices[0].logprobs.token_logprobs[1 : len(whole[0])], abs=1e-5)
