"""`bayeskd serve`: an OpenAI-compatible HTTP server in front of a local model.

It lets anyone treat a local model as a closed API (the method then sees only what a real
API shows), and it is what the integration tests talk to over real HTTP. Endpoints:
`/v1/chat/completions`, `/v1/completions` (with the legacy `echo`: prompt logprobs, as vLLM serves
them and lm-evaluation-harness reads them), `/v1/models`, and a Batch API (`/v1/files`,
`/v1/batches`: `serve_batch.py`) whose lines are answered as chat requests are. Concurrent requests are gathered
into the local teacher's continuous batch as it has room; when too many wait, new ones are
shed with 429 and `Retry-After`, as real APIs do. `serve.faults` injects failures and
`serve.quirks` reproduces other servers' ways (`faults.py`, `quirks.py`), both off by default.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bayeskd.teachers.config import ServeConfig
from bayeskd.teachers.base import Choice, TeacherError, TeacherRequest, TeacherResponse, TokenLogprob, Usage
from bayeskd.teachers.local import LocalTeacher
from bayeskd.teachers.quirks import quirked_request, quirked_response, server_top_k


class ChatMessage(BaseModel):
    role: str
    content: str


class _Sampling(BaseModel):
    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    top_k: int | None = None
    """vLLM's and llama.cpp's extension: sample from the k likeliest tokens (0 or less: all)."""


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    continue_final_message: bool = False
    """vLLM's extension: the last message is the assistant's unfinished response, to be continued."""
    add_generation_prompt: bool = True


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt, or several (a choice per prompt and sample, prompt-major), as text or token ids."""
    max_tokens: int | None = Field(None, ge=0)
    """0 only with `echo`: the prompt's logprobs and nothing generated (vLLM's way)."""
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    """The legacy endpoint's echo: the prompt is returned before the completion, and with `logprobs`
    every prompt token's logprob and top alternatives too (the first token's null), as vLLM does."""
    return_tokens_as_token_ids: bool = False
    """vLLM's extension: the echoed prompt's tokens and their alternatives as `token_id:N` strings, so
    that tokens that decode alike (byte fragments) stay apart. Generated tokens keep their strings here."""


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


@dataclass
class _Job:
    request: TeacherRequest
    future: asyncio.Future


class Batcher:
    """Feeds requests from many connections to the teacher's continuous batch, as it has room.

    Requests wait in the queue (where `max_queue` sheds load) until fewer than the teacher's
    `batch_size` rows are in flight; those that arrive within `batch_wait_ms` of each other are
    handed over together, so that their prompts are prefilled in one forward.
    """

    def __init__(self, teacher: LocalTeacher, cfg: ServeConfig):
        self.teacher, self.cfg = teacher, cfg
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.room = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    def full(self) -> bool:
        return self.queue.qsize() >= self.cfg.max_queue

    async def submit(self, request: TeacherRequest) -> TeacherResponse:
        job = _Job(request, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        result = await job.future
        if isinstance(result, TeacherError):
            raise result
        return result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            while not self.teacher.has_room():
                self.room.clear()
                await self.room.wait()
            rows = jobs[0].request.n
            deadline = loop.time() + self.cfg.batch_wait_ms / 1000
            while self.teacher.has_room() and rows < self.teacher.batch_size and (left := deadline - loop.time()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                rows += jobs[-1].request.n
            for job in jobs:
                try:
                    self.teacher.submit(job.request, partial(loop.call_soon_threadsafe, self._resolve, job))
                except Exception as e:  # a failure in one request must not take the server down
                    self._resolve(job, TeacherError(f"generation failed: {e}"))

    def _resolve(self, job: _Job, result: TeacherResponse | TeacherError) -> None:
        if not job.future.done():
            job.future.set_result(result)
        self.room.set()


def create_app(teacher: LocalTeacher, cfg: ServeConfig, served_name: str | None = None) -> FastAPI:
    """The ASGI app; `served_name` is the model name clients must ask for (default: the model ref)."""
    model_name = served_name or teacher.model_ref
    token = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not token:
        raise ValueError(f"serve.api_key_env: environment variable {cfg.api_key_env} is not set")
    batcher = Batcher(teacher, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="bayeskd teacher", lifespan=lifespan)
    # What the server answered and billed (before a fault spoils an answer): tests compare a client's ledger with it.
    app.state.billed = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    end_of_turn = teacher.tokenizer.decode([teacher.tokenizer.eos_token_id])
    specials = frozenset(teacher.tokenizer.all_special_tokens)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "invalid or missing bearer token", "authentication_error")
        length = request.headers.get("content-length")
        limit = cfg.max_file_bytes if request.url.path == "/v1/files" else cfg.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(413, f"request body over {limit} bytes")
        return await call_next(request)

    if cfg.faults.active:  # added last, so outermost: faults come before the checks above
        from bayeskd.teachers.faults import FaultInjector, FaultMiddleware

        app.state.faults = FaultInjector(cfg.faults)
        app.add_middleware(FaultMiddleware, injector=app.state.faults)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg')}")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "bayeskd"}]}

    def refused(body: _Sampling, max_tokens: int, shed: bool = True) -> JSONResponse | None:
        if body.model != model_name:
            return _error(404, f"model {body.model!r} not found; this server serves {model_name!r}", "not_found_error")
        if body.n > cfg.max_n:
            return _error(400, f"n={body.n} exceeds this server's limit of {cfg.max_n}")
        if max_tokens > cfg.max_tokens_limit:
            return _error(400, f"max_tokens={max_tokens} exceeds this server's limit of {cfg.max_tokens_limit}")
        if shed and batcher.full():
            return _error(429, "server busy, retry later", "rate_limit_error", headers={"Retry-After": "1"})
        return None

    def bill(prompt_tokens: int, completion_tokens: int) -> None:
        billed = app.state.billed
        billed.update(requests=billed["requests"] + 1, prompt_tokens=billed["prompt_tokens"] + prompt_tokens,
                      completion_tokens=billed["completion_tokens"] + completion_tokens)  # fmt: skip

    async def generate(request: TeacherRequest) -> TeacherResponse:
        response = await batcher.submit(quirked_request(request, cfg.quirks))
        return quirked_response(response, cfg.quirks, request.top_logprobs, end_of_turn, specials)

    async def run(body: _Sampling, request: TeacherRequest, render, shed: bool = True) -> JSONResponse:
        error = refused(body, request.max_tokens, shed)
        if error is not None:
            return error
        try:
            response = await generate(request)
        except TeacherError as e:
            return _error(e.status or 500, str(e))
        bill(response.usage.prompt_tokens, response.usage.completion_tokens)
        return JSONResponse(render(response))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        return await answer_chat(body)

    async def answer_chat(body: ChatBody, shed: bool = True) -> JSONResponse:
        messages, prefix = [m.model_dump() for m in body.messages], None
        if body.continue_final_message:
            if messages[-1]["role"] != "assistant" or body.add_generation_prompt:
                return _error(400, "continue_final_message needs a final assistant message and add_generation_prompt=false")
            messages, prefix = messages[:-1], messages[-1]["content"]
            if not messages:
                return _error(400, "continue_final_message needs a message before the assistant's")
        request = TeacherRequest.chat(
            messages,
            top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
            prefix=prefix,
            **_sampling(body, cfg.quirks, body.max_completion_tokens),
        )
        return await run(body, request, lambda r: _chat_json(r, model_name), shed)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompts = _prompts(body.prompt)
        if prompts is None:
            return _error(400, "prompt: must be a string, a list of strings, a list of token ids or a list of lists of them")
        if body.max_tokens == 0 and not body.echo:
            return _error(400, "max_tokens=0 needs echo=true (the prompt's logprobs alone)")
        if not body.echo and len(prompts) == 1 and isinstance(prompts[0], str):
            request = TeacherRequest(prompt=prompts[0], top_logprobs=body.logprobs or 0, **_sampling(body, cfg.quirks))
            return await run(body, request, lambda r: _completion_json(r, model_name))
        return await many(body, prompts)

    async def many(body: CompletionBody, prompts: list[str | list[int]]) -> JSONResponse:
        """Several prompts (a choice per prompt and sample, prompt-major) or token-id prompts, or
        `echo`: each prompt's tokens, with `logprobs` their logprobs and top alternatives (the first
        token's null), before what was generated (nothing with max_tokens 0)."""
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        error = refused(body, max_tokens)
        if error is not None:
            return error
        tok = teacher.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else p for p in prompts]
        if any(t < 0 or t >= len(tok) for p in ids for t in p):
            return _error(400, f"prompt: token ids must be in 0..{len(tok) - 1}")
        texts = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
        k = body.logprobs or 0
        try:
            scored = await asyncio.to_thread(teacher.score, ids, k) if body.echo and body.logprobs is not None else None
            answers = [None] * len(prompts)
            if max_tokens:
                # Echoed logprobs (even logprobs=0) list the generated tokens' logprobs too: ask for at least one alternative.
                top = max(k, 1) if scored is not None else k
                params = {**_sampling(body, cfg.quirks), "max_tokens": max_tokens, "top_logprobs": top}
                answers = await asyncio.gather(*(generate(TeacherRequest(prompt=t, **params)) for t in texts))
        except TeacherError as e:
            return _error(e.status or 500, str(e))
        choices, usage = [], Usage()
        for j, (p, text) in enumerate(zip(ids, texts)):
            answer = answers[j]
            usage = usage + (answer.usage if answer is not None else Usage(prompt_tokens=len(p)))
            for c in answer.choices if answer is not None else [Choice(text="", finish_reason="length", tokens=[])]:
                if k == 0 and c.tokens:
                    c = Choice(c.text, c.finish_reason, [TokenLogprob(t.token, t.logprob, []) for t in c.tokens])
                if not body.echo:
                    choices.append(_completion_choice(len(choices), c))
                    continue
                echoed = None
                if scored is not None:
                    own, tops = scored[j]
                    name = (lambda t: f"token_id:{t}") if body.return_tokens_as_token_ids else teacher.token_str
                    echoed = [TokenLogprob(name(p[0]), None, None)]  # type: ignore[arg-type]
                    echoed += [TokenLogprob(name(t), lp, [(name(a), v) for a, v in top])
                               for t, lp, top in zip(p[1:], own, tops)]  # fmt: skip
                choices.append(_completion_choice(len(choices), c, text, echoed))
        bill(usage.prompt_tokens, usage.completion_tokens)
        return JSONResponse(_envelope("text_completion", model_name, TeacherResponse(choices=[], usage=usage), choices))

    from bayeskd.teachers.serve_batch import add_batch_api

    # A batch's lines go the way of /v1/chat/completions requests (not shed: the batch waits its turn).
    add_batch_api(app, cfg, lambda body: answer_chat(body, shed=False), ChatBody)
    return app


def _sampling(body: _Sampling, quirks: list[str], max_tokens: int | None = None) -> dict:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return dict(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=max_tokens or body.max_tokens or 16,
        n=body.n,
        seed=body.seed,
        stop=tuple(stop),
        top_k=server_top_k(body.top_k, quirks),
    )


def _envelope(kind: str, model: str, response: TeacherResponse, choices: list[dict]) -> dict:
    u = response.usage
    return {
        "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total},
    }


def _chat_json(response: TeacherResponse, model: str) -> dict:
    def logprobs(c: Choice) -> dict | None:
        if c.tokens is None:
            return None
        return {
            "content": [
                {
                    "token": t.token,
                    "logprob": t.logprob,
                    "bytes": list(t.token.encode()),
                    "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top],
                }
                for t in c.tokens
            ]
        }

    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "logprobs": logprobs(c),
        }
        for i, c in enumerate(response.choices)
    ]
    return _envelope("chat.completion", model, response, choices)


def _completion_json(response: TeacherResponse, model: str) -> dict:
    choices = [_completion_choice(i, c) for i, c in enumerate(response.choices)]
    return _envelope("text_completion", model, response, choices)


def _completion_choice(index: int, c: Choice, echo: str | None = None, echoed: list[TokenLogprob] | None = None) -> dict:
    """One choice in the legacy format. `echo`: the prompt's text, put before the completion's, and
    `echoed` its tokens (first: logprob and alternatives None), put before the completion's tokens."""
    tokens = c.tokens
    if echoed is not None:
        tokens = echoed + (c.tokens or [])
    logprobs = None
    if tokens is not None and (echoed is not None or c.tokens is not None):
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t.token)
        logprobs = {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.top is None else _by_string(t.top) for t in tokens],
            "text_offset": offsets,
        }
    text = c.text if echo is None else echo + c.text
    return {"index": index, "text": text, "finish_reason": c.finish_reason, "logprobs": logprobs}


def _prompts(prompt: Any) -> list[str | list[int]] | None:
    """A completions `prompt` as a list of prompts, each a string or token ids; None if malformed."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        return list(prompt)
    return None


def _by_string(top: list[tuple[str, float]]) -> dict[str, float]:
    """The legacy format's alternatives, keyed by string. Two tokens that decode alike share a key:
    the first (the likelier, the list being sorted) is kept, so that the string's value is that of
    its likelier token, a lower bound of its mass; `dict(top)` would keep the last."""
    out: dict[str, float] = {}
    for s, lp in top:
        out.setdefault(s, lp)
    return out
