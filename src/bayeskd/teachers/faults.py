"""Fault injection for `bayeskd serve`: what a flaky API does to its clients, on purpose.

With `serve.faults.*` rates set, a share of generation requests (`/v1/chat/completions`,
`/v1/completions`) is answered the way real APIs and the gateways in front of them fail:

- `rate_limit`, `server_error`, `unavailable`: 429 (with Retry-After), 500, 503, before the
  model runs;
- `drop`: the status line and headers, then the connection is closed before any body;
- `slow`: the answer is held back `slow_s` seconds (past a client's timeout);
- `malformed`: a 200 whose body is no completion (JSON cut in half, an HTML page, JSON of
  the wrong shape);
- `empty`: a 200 without text (content null, no choices, or empty text with zero
  completion tokens and finish reason `length`; with `stop`, that is a valid answer: the model
  ended its turn at once);
- `truncated`: a valid answer cut short (text and logprobs halved, finish_reason `length`).

With `die_after` set, the server dies after that many generation requests: the next one's
connection is dropped and the server stops listening (`FaultInjector.on_die`).

The choice is deterministic: request number k (counted from 1 since the server started)
draws from a generator seeded with (`seed`, k), so a run replays the same faults in the same
request order. The injector counts requests, faults, statuses, and the requests the model
answered (what an API would bill); `serve.faults.log` writes one JSON line per request.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from bayeskd.teachers.config import FAULT_KINDS, FaultConfig

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
VARIANTS = 3
"""`malformed` and `empty` come in three shapes each, drawn per request."""

_STATUS = {"rate_limit": (429, "rate_limit_error"), "server_error": (500, "server_error"), "unavailable": (503, "server_error")}
_HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"


class FaultInjector:
    """Chooses each generation request's fault and counts what happened."""

    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg
        self.requests = 0
        """Generation requests seen."""
        self.generated = 0
        """Requests the model answered (status 200 before any fault rewrote it): what an API bills."""
        self.injected: Counter[str] = Counter()
        self.statuses: Counter[int | None] = Counter()
        """Status the client was sent (None: dropped)."""
        self.on_die: Callable[[], None] | None = None
        """Stops the server listening; the server that runs the app sets it (`serve.die_after`)."""

    def choose(self, number: int) -> tuple[str | None, int]:
        """The fault of request `number` (or None) and its shape (0..VARIANTS-1): a function of (seed, number)."""
        rng = random.Random(f"{self.cfg.seed}:{number}")
        u, variant = rng.random(), rng.randrange(VARIANTS)
        edge = 0.0
        for kind in FAULT_KINDS:
            edge += getattr(self.cfg, kind)
            if u < edge:
                return kind, variant
        return None, variant

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "generated": self.generated,
            "injected": {k: self.injected[k] for k in FAULT_KINDS},
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))},
        }

    def record(self, number: int, path: str, fault: str | None, status: int | None, generated: bool) -> None:
        self.statuses[status] += 1
        self.generated += generated
        if self.cfg.log:
            line = {"n": number, "path": path, "fault": fault, "status": status, "generated": generated}
            with open(self.cfg.log, "a") as f:
                f.write(json.dumps(line) + "\n")


class FaultMiddleware:
    """ASGI middleware that applies an injector's faults to generation requests."""

    def __init__(self, app: Any, injector: FaultInjector):
        self.app = app
        self.injector = injector

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        inj = self.injector
        inj.requests += 1
        number = inj.requests
        if inj.cfg.die_after is not None and number > inj.cfg.die_after:
            if inj.on_die is not None:
                inj.on_die()
            await _drop(send)
            inj.record(number, scope["path"], "die", None, False)
            return
        fault, variant = inj.choose(number)
        if fault:
            inj.injected[fault] += 1
        status, generated = None, False
        try:
            if fault in _STATUS:
                status, kind = _STATUS[fault]
                headers = {"Retry-After": f"{inj.cfg.retry_after_s:g}"} if fault == "rate_limit" else {}
                await _send(send, status, _error_body(status, kind, f"injected fault: {fault}"), headers=headers)
                return
            if fault == "drop":
                await _drop(send)
                return
            if fault == "slow":
                # Read the request first: the model still runs after the client gave up, as at a real API.
                receive = await _buffered(receive)
                await asyncio.sleep(inj.cfg.slow_s)
            if fault in ("malformed", "empty", "truncated"):
                start, body = await _capture(self.app, scope, receive)
                status = start["status"]
                generated = status == 200
                if generated:  # only a good answer is spoiled; the server's own errors pass unchanged
                    body, content_type = rewrite(fault, variant, body, scope["path"].endswith("chat/completions"))
                    await _send(send, status, body, content_type=content_type)
                else:
                    await send(start)
                    await send({"type": "http.response.body", "body": body})
                return

            async def watch(message: dict) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await self.app(scope, receive, watch)
            generated = status == 200
        finally:
            inj.record(number, scope["path"], fault, status, generated)


async def _drop(send: Any) -> None:
    """Headers that promise a body that never comes: returning without it makes the ASGI server
    close the connection, which the client sees as a broken connection."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1024")]})  # fmt: skip


async def _buffered(receive: Any) -> Any:
    """Read the whole request body now; return a `receive` that replays it, then waits as before."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    return replay


async def _capture(app: Any, scope: dict, receive: Any) -> tuple[dict, bytes]:
    """Run the inner app and keep its response (start message, body) instead of sending it."""
    start, chunks = {"type": "http.response.start", "status": 500, "headers": []}, []

    async def keep(message: dict) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    return start, b"".join(chunks)


async def _send(send: Any, status: int, body: bytes, content_type: bytes = b"application/json", headers: dict | None = None) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


# ---------------------------------------------------------------- rewriting a good answer (pure)


def rewrite(fault: str, variant: int, body: bytes, chat: bool) -> tuple[bytes, bytes]:
    """A 200 completion body -> (the faulty body, its content type)."""
    if fault == "malformed":
        if variant == 0:
            return body[: len(body) // 2], b"application/json"
        if variant == 1:
            return _HTML, b"text/html; charset=utf-8"
        data = json.loads(body)
        return json.dumps({**data, "choices": "unavailable"}).encode(), b"application/json"
    data = json.loads(body)
    data = empty(data, variant, chat) if fault == "empty" else truncate(data, chat)
    return json.dumps(data).encode(), b"application/json"


def empty(data: dict, variant: int, chat: bool) -> dict:
    """No text: content null (0), no choices (1), or empty text with zero completion tokens, cut short (2)."""
    if variant == 1:
        return {**data, "choices": []}
    text = None if variant == 0 else ""
    choices = []
    for c in data["choices"]:
        c = {**c, "logprobs": None, **({"finish_reason": "length"} if variant == 2 else {})}
        if chat:
            c["message"] = {**c["message"], "content": text}
        else:
            c["text"] = text
        choices.append(c)
    out = {**data, "choices": choices}
    if variant == 2 and out.get("usage"):
        u = out["usage"]
        out["usage"] = {**u, "completion_tokens": 0, "total_tokens": u.get("prompt_tokens", 0)}
    return out


def truncate(data: dict, chat: bool) -> dict:
    """Cut every choice's text and logprobs to about half, with finish_reason `length` (usage unchanged)."""
    choices = []
    for c in data["choices"]:
        c = {**c, "finish_reason": "length"}
        if chat:
            text = c["message"]["content"] or ""
            c["message"] = {**c["message"], "content": text[: len(text) // 2]}
            lp = c.get("logprobs") or {}
            if lp.get("content"):
                c["logprobs"] = {**lp, "content": lp["content"][: _half(len(lp["content"]))]}
        else:
            text = c["text"] or ""
            c["text"] = text[: len(text) // 2]
            lp = c.get("logprobs") or {}
            if lp.get("tokens"):
                k = _half(len(lp["tokens"]))
                c["logprobs"] = {name: (v[:k] if isinstance(v, list) else v) for name, v in lp.items()}
        choices.append(c)
    return {**data, "choices": choices}


def _half(n: int) -> int:
    return max(1, n // 2)
