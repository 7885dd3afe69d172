"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama, `bayeskd serve`).

Calls go through the official `openai` SDK. Concurrency is bounded by a thread pool that
pulls requests lazily; retries are ours (the SDK's are turned off) so that each one is
counted and `Retry-After` is honoured exactly. The API key is read from the environment
variable the config names, at the moment the client is built, and is never stored.
"""

from __future__ import annotations

import email.utils
import os
import random
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any

import jinja2
import openai

from bayeskd.teachers.config import TeacherConfig
from bayeskd.errors import BayeskdError
from bayeskd.models import CHATML_TEMPLATE
from bayeskd.teachers.base import (
    Choice,
    Teacher,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
    TokenLogprob,
    Usage,
)

MAX_RETRY_AFTER_S = 120.0


class TeacherUnavailable(BayeskdError):
    """The endpoint cannot be reached or rejects the key: nothing can be collected."""


class TeacherDown(TeacherUnavailable):
    """The endpoint refused `teacher.down_after` connections in a row during a run."""


class OpenAITeacher(Teacher):
    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.name = cfg.key_name
        key = os.environ.get(cfg.api_key_env)
        if not key:
            if cfg.base_url is None:
                raise TeacherUnavailable(f"teacher.api_key_env: environment variable {cfg.api_key_env} is not set")
            key = "EMPTY"  # local servers (vLLM, llama.cpp, Ollama) accept any key
        self.client = openai.OpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=0)
        self.prefix_via = prefix_via(cfg)
        self.supports_prefix = self.prefix_via != "none"
        self.ignores_n = False
        """Whether the server was seen to answer a request for n > 1 samples with one (llama.cpp's
        server does): from then on each sample is asked for on its own."""
        self._lock = threading.Lock()
        self._refused = 0
        """Refused connections in a row, over all threads; any answer from the server resets it."""

    def check(self) -> None:
        """Fail fast, before any paid call, on an unreachable endpoint or a rejected key (lists models)."""
        where = self.cfg.base_url or "the OpenAI API"
        try:
            self.client.models.list()
        except openai.AuthenticationError:
            raise TeacherUnavailable(f"teacher at {where}: authentication failed (401): check ${self.cfg.api_key_env}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise TeacherUnavailable(f"teacher at {where} is unreachable: {e}") from None
        except openai.APIStatusError:
            pass  # some servers have no /models; the first real call will tell

    # ------------------------------------------------------------------ interface

    def stream(self, requests: Iterable[TeacherRequest]) -> Iterator[tuple[int, TeacherResponse | TeacherError]]:
        it = iter(enumerate(requests))
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency, thread_name_prefix="teacher") as pool:
            running: dict[Future, int] = {}
            exhausted, down = False, None
            while running or not exhausted:
                while not exhausted and len(running) < self.cfg.max_concurrency:
                    try:
                        index, request = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    running[pool.submit(self._call_with_retries, request)] = index
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    index = running.pop(fut)
                    try:
                        result = fut.result()
                    except TeacherDown as e:  # send nothing more; what is in flight still comes back
                        down, exhausted = down or e, True
                        continue
                    yield index, result
        if down:
            raise down

    # ------------------------------------------------------------------ one call

    def token_bound(self, request: TeacherRequest) -> int:
        """A server that ignores `n` is asked once per sample, and each request pays for the prompt again.
        Requests already in flight when that is found out were reserved as one request: each may pass
        its reservation by n - 1 prompts (the ledger still counts what they cost)."""
        if request.n > 1 and self.ignores_n:
            return request.n * replace(request, n=1).token_bound()
        return request.token_bound()

    def _call_with_retries(self, request: TeacherRequest) -> TeacherResponse | TeacherError:
        """An answer with all `request.n` samples, or the error that ended the attempts."""
        if request.n > 1 and self.ignores_n:
            return self._one_by_one(request, [])
        result = self._attempts(request)
        if isinstance(result, TeacherResponse) and len(result.choices) < request.n:
            self._found_ignores_n(request.n)
            return self._one_by_one(request, [result])
        return result

    def _attempts(self, request: TeacherRequest) -> TeacherResponse | TeacherError:
        """One request, retried while retryable; rejected answers' usage is added to what comes back."""
        attempt, paid = 0, Usage()
        while True:
            try:
                response = self._call(request)
                response.retries, response.usage = attempt, response.usage + paid
                return response
            except TeacherError as e:
                paid = paid + e.usage
                self._stop_if_down(e)
                if not e.retryable or attempt >= self.cfg.max_retries:
                    e.args = (f"{e.args[0]} (after {attempt + 1} attempts)",)
                    e.usage = paid
                    return e
                delay = getattr(e, "retry_after", None)
                if delay is None:
                    delay = self.cfg.backoff_s * (2**attempt) * (0.5 + random.random())
                time.sleep(min(delay, MAX_RETRY_AFTER_S))
                attempt += 1

    def _stop_if_down(self, error: TeacherError) -> None:
        """Raise TeacherDown once `teacher.down_after` connections in a row were refused."""
        if self.cfg.down_after and self._refused >= self.cfg.down_after:
            where = self.cfg.base_url or "the OpenAI API"
            raise TeacherDown(
                f"teacher at {where} is down: {self._refused} connections in a row were refused (last: {error}). "
                "Stopped; every answer received is kept, and a rerun asks only for the rest once the server is back "
                "(teacher.down_after sets how many refusals mean down)"
            )

    def _found_ignores_n(self, n: int) -> None:
        with self._lock:
            if self.ignores_n:
                return
            self.ignores_n = True
        where = self.cfg.base_url or "the OpenAI API"
        print(f"teacher at {where} ignores n (asked for {n} samples, got 1): asking for each sample on its own, "
              "with seed + i for sample i", file=sys.stderr, flush=True)  # fmt: skip

    def _one_by_one(self, request: TeacherRequest, got: list[TeacherResponse]) -> TeacherResponse | TeacherError:
        """The samples of `request` that `got` lacks, one request each: sample i with seed + i (when seeded).
        A failure carries the usage of the samples already paid for."""
        for i in range(len(got), request.n):
            seed = None if request.seed is None else (request.seed + i) % 2**31
            result = self._attempts(replace(request, n=1, seed=seed))
            if isinstance(result, TeacherError):
                result.usage = sum((r.usage for r in got), result.usage)
                return result
            got.append(result)
        return TeacherResponse(
            choices=[c for r in got for c in r.choices],
            usage=sum((r.usage for r in got), Usage()),
            model=got[0].model,
            retries=sum(r.retries for r in got),
        )

    def _common(self, request: TeacherRequest) -> dict[str, Any]:
        """The SDK arguments every endpoint shares (`extra_body` as the SDK takes it)."""
        common: dict[str, Any] = dict(
            model=self.cfg.model,
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
        )
        if request.seed is not None:
            common["seed"] = request.seed
        if request.stop:
            common["stop"] = list(request.stop)
        if self.cfg.extra_body:
            common["extra_body"] = dict(self.cfg.extra_body)
        return common

    # ------------------------------------------------------------------ the Batch API's share

    def chat_body(self, request: TeacherRequest) -> dict:
        """The JSON body that `request` sends to /chat/completions online (`extra_body` merged in, as
        the SDK does): the `body` of its line in a Batch API input file."""
        if request.messages is None or request.prefix is not None:
            raise ValueError("a Batch API line is a chat request without a response prefix")
        common = self._common(request)
        extra = common.pop("extra_body", {})
        if request.top_logprobs:
            common.update(logprobs=True, top_logprobs=request.top_logprobs)
        return {**common, "messages": request.message_dicts(), **extra}

    @staticmethod
    def chat_answer(body: dict, request: TeacherRequest) -> TeacherResponse:
        """A chat.completion body that answered `request` (a Batch API output line's), checked as an
        online answer is; raises TeacherError (with the body's usage) for one that would lose samples."""
        return _checked(parse_chat, body, request)

    # ------------------------------------------------------------------ one call (continued)

    def _call(self, request: TeacherRequest) -> TeacherResponse:
        common = self._common(request)
        try:
            response = self._send(request, common)
        except openai.APIStatusError as e:
            self._answered()
            raise _status_error(e, self.cfg.api_key_env) from None
        except openai.APITimeoutError:
            raise TeacherError(f"timed out after {self.cfg.timeout_s}s", retryable=True) from None
        except openai.APIConnectionError as e:
            # No connection made (refused, unknown host), as against one dropped or reset: httpx's
            # ConnectError (the SDK may bring its own copy of httpx, so it is matched by name).
            if type(e.__cause__).__name__ == "ConnectError":
                with self._lock:
                    self._refused += 1
            raise TeacherError(f"cannot reach {self.cfg.base_url or 'the OpenAI API'}: {e}", retryable=True) from None
        except TeacherError:
            self._answered()
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # a body of the wrong shape
            self._answered()
            raise TeacherError(f"malformed response: {e}", retryable=True) from None
        self._answered()
        return response

    def _answered(self) -> None:
        with self._lock:
            self._refused = 0

    def _send(self, request: TeacherRequest, common: dict[str, Any]) -> TeacherResponse:
        """The request by the endpoint it goes to; the SDK's and our parsers' errors pass through."""
        if request.prefix is not None:
            return self._continue(request, common)
        if self.cfg.endpoint == "chat":
            if request.messages is None:
                raise TeacherError("teacher.endpoint=chat needs chat messages, got a raw prompt")
            if request.top_logprobs:
                common.update(logprobs=True, top_logprobs=request.top_logprobs)
            raw = self.client.chat.completions.create(messages=request.message_dicts(), **common)
            return _checked(parse_chat, _body(raw), request)
        if request.top_logprobs:
            common["logprobs"] = request.top_logprobs
        prompt = request.prompt if request.prompt is not None else self.format_chat(request.message_dicts())
        raw = self.client.completions.create(prompt=prompt, **common)
        return _checked(parse_completion, _body(raw), request)

    def _continue(self, request: TeacherRequest, common: dict[str, Any]) -> TeacherResponse:
        """Prefix continuation, by the completions endpoint or by vLLM's continue_final_message."""
        if self.prefix_via == "none":
            raise TeacherError(
                f"teacher {self.name} cannot continue a response prefix (teacher.prefix_via=none: no completions "
                "endpoint and no continue_final_message); use whole-response sampling instead"
            )
        if self.prefix_via == "completions":
            if request.top_logprobs:
                common["logprobs"] = request.top_logprobs
            prompt = self.format_chat(request.message_dicts()) + request.prefix
            return _checked(parse_completion, _body(self.client.completions.create(prompt=prompt, **common)), request)
        if request.top_logprobs:
            common.update(logprobs=True, top_logprobs=request.top_logprobs)
        messages = [*request.message_dicts(), {"role": "assistant", "content": request.prefix}]
        extra = {**common.pop("extra_body", {}), "continue_final_message": True, "add_generation_prompt": False}
        raw = self.client.chat.completions.create(messages=messages, extra_body=extra, **common)
        return _checked(parse_chat, _body(raw), request)

    def format_chat(self, messages: list[dict]) -> str:
        """Chat messages -> completions prompt, with `teacher.completion_template` (the endpoint has none)."""
        template = CHATML_TEMPLATE if self.cfg.completion_template == "chatml" else self.cfg.completion_template
        return jinja2.Template(template).render(messages=messages, add_generation_prompt=True)

    def close(self) -> None:
        self.client.close()


def prefix_via(cfg: TeacherConfig) -> str:
    """How this endpoint continues a response prefix: `teacher.prefix_via`, with `auto` resolved."""
    if cfg.prefix_via != "auto":
        return cfg.prefix_via
    # Servers one runs (vLLM, llama.cpp, Ollama, bayeskd serve) have a raw completions endpoint;
    # OpenAI's own chat models have neither that nor prefill.
    return "completions" if cfg.base_url is not None else "none"


def _body(raw: Any) -> dict:
    """The SDK's answer as a dict. The SDK hands back the text itself when the body is not JSON."""
    if not hasattr(raw, "model_dump"):
        raise TeacherError(f"malformed response: not a completion: {_short(repr(raw), 80)}", retryable=True)
    return raw.model_dump(warnings=False)


def _checked(parse: Any, body: dict, request: TeacherRequest) -> TeacherResponse:
    """Parse a 200 body, refusing (retryably) one that would silently lose samples: a choice without
    text, a number of choices other than n, or no text and no tokens without an end of turn. The
    refusal carries the body's usage: it was paid for.

    Two answers that look short are valid: one choice for n > 1 (a server that ignores n; the
    caller asks for the rest), and an empty text with finish reason `stop` and no completion
    tokens (llama.cpp's way of saying the model ended its turn at once: the sample is the EOS)."""
    paid = _usage(body)
    try:
        response = parse(body)
    except TeacherError as e:
        e.usage = paid
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a body of the wrong shape
        raise TeacherError(f"malformed response: {e}", retryable=True, usage=paid) from None
    response = bounded_top(response, request.top_logprobs)
    got = len(response.choices)
    if got != request.n and not (got == 1 and request.n > 1):
        raise TeacherError(f"malformed response: asked for {request.n} choices, got {got}", retryable=True, usage=paid)
    nothing = body.get("usage") is not None and response.usage.completion_tokens == 0
    if nothing and all(c.text == "" for c in response.choices) and any(c.finish_reason != "stop" for c in response.choices):
        raise TeacherError("empty response: no text and no completion tokens, and no end of turn", retryable=True, usage=paid)
    return response


def bounded_top(response: TeacherResponse, k: int) -> TeacherResponse:
    """Each token's alternatives cut to the k largest, the k the request asked for.

    llama.cpp's server adds the sampled token to its alternatives when it is not among the top k
    (k + 1 entries). Stored as the top-k, the lowest listed value would no longer bound the
    unlisted tokens, which the evidence relies on; the extra entry is the sampled token's own
    logprob, which the token itself keeps (`TokenLogprob.logprob`)."""
    if not any(c.tokens and any(len(t.top) > k for t in c.tokens) for c in response.choices):
        return response

    def cut(t: TokenLogprob) -> TokenLogprob:
        return t if len(t.top) <= k else TokenLogprob(t.token, t.logprob, sorted(t.top, key=lambda a: -a[1])[:k])

    choices = [c if c.tokens is None else replace(c, tokens=[cut(t) for t in c.tokens]) for c in response.choices]
    return replace(response, choices=choices)


def _status_error(e: openai.APIStatusError, key_env: str) -> TeacherError:
    status = e.status_code
    if status == 401:
        return TeacherError(f"authentication failed (401): check the key in ${key_env}", status=401)
    retryable = status in (408, 409, 429) or status >= 500
    err = TeacherError(f"HTTP {status}: {_short(e.message)}", retryable=retryable, status=status)
    err.retry_after = retry_after_seconds(e.response.headers)  # type: ignore[attr-defined]
    return err


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())


# ---------------------------------------------------------------- response parsing (pure)


def _usage(body: dict) -> Usage:
    u = body.get("usage") or {}
    return Usage(prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0))


def parse_chat(body: dict) -> TeacherResponse:
    """An OpenAI chat.completion body -> TeacherResponse (choices in `index` order)."""
    choices = []
    for c in sorted(body["choices"], key=lambda c: c.get("index", 0)):
        text = (c.get("message") or {}).get("content")
        if text is None:
            raise TeacherError("malformed response: a choice has no message content", retryable=True)
        tokens = None
        content = (c.get("logprobs") or {}).get("content")
        if content:
            tokens = [
                TokenLogprob(
                    token=t["token"],
                    logprob=float(t["logprob"]),
                    top=[(a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or []],
                )
                for t in content
            ]
        choices.append(Choice(text=text, finish_reason=c.get("finish_reason") or "stop", tokens=tokens))
    return TeacherResponse(choices=choices, usage=_usage(body), model=body.get("model") or "")


def parse_completion(body: dict) -> TeacherResponse:
    """An OpenAI text_completion body (legacy logprobs format) -> TeacherResponse."""
    choices = []
    for c in sorted(body["choices"], key=lambda c: c.get("index", 0)):
        if c.get("text") is None:
            raise TeacherError("malformed response: a choice has no text", retryable=True)
        tokens = None
        lp = c.get("logprobs") or {}
        if lp.get("tokens"):
            tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
            tokens = [
                TokenLogprob(
                    token=tok,
                    logprob=float(tlp),
                    top=sorted(((k, float(v)) for k, v in (top or {}).items()), key=lambda kv: -kv[1]),
                )
                for tok, tlp, top in zip(lp["tokens"], lp["token_logprobs"], tops)
            ]
        choices.append(Choice(text=c["text"], finish_reason=c.get("finish_reason") or "stop", tokens=tokens))
    return TeacherResponse(choices=choices, usage=_usage(body), model=body.get("model") or "")
