"""The black-box teacher interface: requests in, text and (at most top-20) logprobs out.

Everything the method learns about the teacher passes through these types. They hold no
logits, no weights and no tokenizer, on purpose: a closed API offers nothing more, and the
method's code must not be able to reach more than that.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field


class TeacherError(RuntimeError):
    """A request failed. `retryable` tells whether trying again may succeed; `usage`, what was paid
    for on the way (answers the client rejected, samples of an answer left unfinished)."""

    def __init__(self, message: str, retryable: bool = False, status: int | None = None, usage: Usage | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.usage = usage or Usage()


@dataclass(frozen=True)
class TeacherRequest:
    """One call: chat messages (or a raw prompt for the completions endpoint) and sampling parameters."""

    messages: tuple[tuple[str, str], ...] | None = None
    """(role, content) pairs; a tuple so that the request is hashable and immutable."""
    prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    prefix: str | None = None
    """Prefix continuation: the start of the assistant's response, which the teacher must
    continue (the returned text is what comes after it). Needs `messages`."""
    top_k: int = 0
    """Sample from the k likeliest tokens only (0: all). Set by `bayeskd serve` from a request's
    `top_k` field (vLLM's and llama.cpp's); the client never sets it (a server's own fields go in
    `teacher.extra_body`), and it does not key the store."""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a TeacherRequest needs exactly one of messages or prompt")
        if self.prefix is not None and self.messages is None:
            raise ValueError("a TeacherRequest with a response prefix needs chat messages")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs={self.top_logprobs}: must be in 0..20")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0: no truncation)")
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"n={self.n}, max_tokens={self.max_tokens}: both must be >= 1")

    @staticmethod
    def chat(messages: list[dict], **params) -> TeacherRequest:
        return TeacherRequest(messages=tuple((m["role"], m["content"]) for m in messages), **params)

    def message_dicts(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]

    def token_bound(self) -> int:
        """Most tokens this request can cost, reserved against a budget while it is in flight: the
        teacher's tokenizer is unknown, but no token is shorter than a byte, so the prompt (plus a
        chat-template allowance per message) and the prefix count their bytes; then n completions
        of max_tokens."""
        prompt = sum(len(c.encode()) + 16 for _, c in self.messages or ()) + len((self.prompt or "").encode())
        return prompt + len((self.prefix or "").encode()) + self.n * self.max_tokens

    def sampling(self) -> dict:
        """The sampling parameters, as they key the response store."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop),
            "top_logprobs": self.top_logprobs,
        }


@dataclass
class TokenLogprob:
    """One generated token as the API shows it: its string, logprob, and top-k alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Choice:
    text: str
    finish_reason: str
    tokens: list[TokenLogprob] | None = None
    """Per generated token, when logprobs were asked for and offered."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


@dataclass
class TeacherResponse:
    choices: list[Choice]
    usage: Usage
    """Every generation paid for this answer: the API's usage, plus that of answers the client
    rejected and asked again, and of the single requests that stand in for `n` where a server
    ignores it."""
    model: str = ""
    retries: int = 0
    """Retries the client needed for this response (not part of the API's answer)."""

    def to_dict(self) -> dict:
        return asdict(self)


class Teacher(ABC):
    """A teacher reached as a black box.

    `stream` pulls requests lazily from the iterable (so a caller can stop feeding it, e.g.
    when a budget is reached) and yields `(index, response or TeacherError)` as results
    complete, in any order; `index` is the request's position in the iterable.
    """

    name: str
    supports_prefix: bool = False
    """Whether requests with a response `prefix` (prefix continuation) can be answered."""

    @abstractmethod
    def stream(self, requests: Iterable[TeacherRequest]) -> Iterator[tuple[int, TeacherResponse | TeacherError]]:
        ...

    def token_bound(self, request: TeacherRequest) -> int:
        """Most tokens `request` can cost at this teacher, reserved against a budget while it is in flight."""
        return request.token_bound()

    def generate(self, request: TeacherRequest) -> TeacherResponse:
        """One request, synchronously; raises TeacherError on failure."""
        for _, result in self.stream([request]):
            if isinstance(result, TeacherError):
                raise result
            return result
        raise TeacherError("the teacher returned nothing")

    def close(self) -> None:
        """Release connections or memory."""


def content_key(*parts: object) -> str:
    """A stable hash of JSON-serialisable parts: what keys the response store."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
