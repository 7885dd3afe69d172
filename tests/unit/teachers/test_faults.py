"""Fault injection: deterministic choice, rates respected, faulty bodies shaped as promised."""

from __future__ import annotations

import asyncio
import json

import pytest

from bayeskd.teachers.config import FAULT_KINDS, FaultConfig
from bayeskd.errors import ConfigError
from bayeskd.config import load_config
from bayeskd.teachers.base import TeacherError
from bayeskd.teachers.faults import VARIANTS, FaultInjector, FaultMiddleware, empty, rewrite, truncate
from bayeskd.teachers.openai_compat import parse_chat, parse_completion

N = 20_000


def draws(cfg: FaultConfig, numbers=range(1, N + 1)) -> list[tuple[str | None, int]]:
    injector = FaultInjector(cfg)
    return [injector.choose(k) for k in numbers]


def test_choice_is_a_function_of_seed_and_request_number():
    cfg = FaultConfig(**{k: 0.05 for k in FAULT_KINDS}, seed=7)
    first = draws(cfg, range(1, 2001))
    assert draws(cfg, range(1, 2001)) == first
    # Order does not matter: request k gets its fault whenever it comes.
    assert [FaultInjector(cfg).choose(k) for k in reversed(range(1, 2001))] == first[::-1]
    assert draws(FaultConfig(**{k: 0.05 for k in FAULT_KINDS}, seed=8), range(1, 2001)) != first


def test_each_kind_gets_its_own_rate():
    rates = dict(zip(FAULT_KINDS, [0.02, 0.05, 0.08, 0.1, 0.03, 0.12, 0.07, 0.15]))
    got = [kind for kind, _ in draws(FaultConfig(**rates, seed=1))]
    for kind, rate in rates.items():
        share = got.count(kind) / N
        assert abs(share - rate) < 5 * (rate * (1 - rate) / N) ** 0.5 + 1e-9, (kind, share, rate)
    assert abs(got.count(None) / N - (1 - sum(rates.values()))) < 0.015


def test_zero_rates_never_fault_and_full_rate_always_does():
    assert {kind for kind, _ in draws(FaultConfig(), range(1, 2001))} == {None}
    assert {kind for kind, _ in draws(FaultConfig(drop=1.0), range(1, 2001))} == {"drop"}
    variants = [v for _, v in draws(FaultConfig(empty=1.0), range(1, 3001))]
    assert all(abs(variants.count(v) / 3000 - 1 / VARIANTS) < 0.05 for v in range(VARIANTS))


def test_rates_must_sum_to_at_most_one_and_default_is_off():
    with pytest.raises(ConfigError, match="rates must sum to <= 1"):
        load_config(None, ["serve.faults.drop=0.6", "serve.faults.malformed=0.6"])
    assert not load_config().serve.faults.active
    assert load_config(None, ["serve.faults.truncated=0.1"]).serve.faults.active
    assert load_config(None, ["serve.faults.log=calls.jsonl"]).serve.faults.active


# ---------------------------------------------------------------- faulty bodies


CHAT = {
    "object": "chat.completion",
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "finish_reason": "stop",
            "logprobs": {"content": [{"token": t, "logprob": -0.5, "top_logprobs": []} for t in ["Hel", "lo", " world"]]},
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
}
COMPLETION = {
    "object": "text_completion",
    "model": "m",
    "choices": [
        {
            "index": 0,
            "text": "abcd",
            "finish_reason": "stop",
            "logprobs": {"tokens": ["ab", "cd"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{}, {}], "text_offset": [0, 2]},
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


def test_truncated_is_a_valid_answer_cut_short():
    chat = parse_chat(truncate(CHAT, chat=True))
    assert chat.choices[0].text == "Hello" and chat.choices[0].finish_reason == "length"
    assert [t.token for t in chat.choices[0].tokens] == ["Hel"]
    comp = parse_completion(truncate(COMPLETION, chat=False))
    assert comp.choices[0].text == "ab" and comp.choices[0].finish_reason == "length"
    assert [t.token for t in comp.choices[0].tokens] == ["ab"]
    assert CHAT["choices"][0]["message"]["content"] == "Hello world"  # the input is not mutated


def test_empty_shapes():
    with pytest.raises(TeacherError, match="no message content") as e:
        parse_chat(empty(CHAT, 0, chat=True))
    assert e.value.retryable
    assert empty(CHAT, 1, chat=True)["choices"] == []
    blank = empty(COMPLETION, 2, chat=False)
    assert blank["choices"][0]["text"] == "" and blank["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("variant", range(VARIANTS))
def test_malformed_bodies_are_not_completions(variant):
    body, content_type = rewrite("malformed", variant, json.dumps(CHAT).encode(), chat=True)
    if content_type.startswith(b"application/json"):
        with pytest.raises((ValueError, AttributeError, TypeError)):
            parse_chat(json.loads(body))
    else:
        assert body.startswith(b"<html>")


# ---------------------------------------------------------------- the middleware, without a network


def run_asgi(middleware: FaultMiddleware, path: str = "/v1/chat/completions") -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(middleware(scope, receive, send))
    return sent


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(CHAT).encode()})


def test_middleware_answers_faults_and_logs_each_request(tmp_path):
    log = tmp_path / "calls.jsonl"
    injector = FaultInjector(FaultConfig(rate_limit=1.0, retry_after_s=2.5, log=str(log)))
    sent = run_asgi(FaultMiddleware(ok_app, injector))
    assert sent[0]["status"] == 429 and (b"retry-after", b"2.5") in sent[0]["headers"]
    injector.cfg = FaultConfig(drop=1.0, log=str(log))
    sent = run_asgi(FaultMiddleware(ok_app, injector))
    assert [m["type"] for m in sent] == ["http.response.start"]  # no body: the server closes the connection
    injector.cfg = FaultConfig(truncated=1.0, log=str(log))
    sent = run_asgi(FaultMiddleware(ok_app, injector))
    assert json.loads(sent[1]["body"])["choices"][0]["finish_reason"] == "length"
    run_asgi(FaultMiddleware(ok_app, injector), path="/v1/models")  # not a generation: untouched, uncounted
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["n"], x["fault"], x["status"], x["generated"]) for x in lines] == [
        (1, "rate_limit", 429, False),
        (2, "drop", None, False),
        (3, "truncated", 200, True),
    ]
    assert injector.summary()["requests"] == 3 and injector.generated == 1
