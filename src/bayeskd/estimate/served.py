"""The proxy behind an OpenAI-compatible completions endpoint (`posterior.proxy_backend: openai`).

The proxy is an open model; a large one is easier to run on a server (vLLM) than in the
posterior stage's process. Its distribution at every corpus position comes from the legacy
completions endpoint's prompt logprobs: the example's text, rendered by `data.render` as the
local path renders it, is sent with `echo: true`, `logprobs: k` and `max_tokens: 0`, and
`choices[0].logprobs` lists, per prompt token, its string, its logprob and the top-k
alternatives (the first token has none). The served model must share the student's
tokenizer: the echoed token strings must be the student's tokens of the example, one for one
(a BOS the server adds in front is skipped), or the stage refuses, naming the endpoint, the
record and the first token that differs.

Alternatives are read as student token ids: `token_id:N` strings (vLLM's
`return_tokens_as_token_ids`, which is asked for) or, from servers that ignore it, by their
decoded string; a string that several ids decode to (byte fragments, U+FFFD) cannot be told
apart and is left in the tail. At each response token the result is a `SparseDist`: the listed
ids with their probabilities, the rest of the proxy's mass as the tail, as the API's logprobs
are treated.

This reaches an open model, never the teacher: the teacher is reached only through `teachers/`.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bayeskd.data import render
from bayeskd.errors import BayeskdError
from bayeskd.estimate import distributions as D
from bayeskd.estimate.config import PosteriorConfig


@dataclass
class ServedRow:
    """The served proxy on one example's response tokens: its top-k (the tail the rest) and the
    logprob of each realised token (exact: the echo lists it)."""

    dist: D.SparseDist  # ids [n, K] (PAD where unused), probs [n, K], tail [n]
    token_logprobs: np.ndarray  # [n]


def example_text(record: dict, ids: list[int], tokenizer, template: str) -> str:
    """The text whose tokens are the example's `ids` (the dataset row's): the rendered record up to the
    end of its last kept token, and the EOS's own string where `tokenize_record` appended it as an id."""
    _, full = render(record, tokenizer, template)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    got, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    k = 0
    while k < min(len(ids), len(got)) and ids[k] == got[k]:
        k += 1
    rest = ids[k:]
    if any(t != tokenizer.eos_token_id for t in rest):
        raise BayeskdError(f"record {record.get('key')!r}: its tokens are not those of its rendered text")
    return full[: offsets[k - 1][1] if k else 0] + tokenizer.eos_token * len(rest)


class ServedProxy:
    """Prompt logprobs of the examples from `posterior.proxy_base_url`, `proxy_concurrency` requests at a time."""

    def __init__(self, cfg: PosteriorConfig, tokenizer):
        import openai

        self.cfg = cfg
        self.where = f"proxy at {cfg.proxy_base_url} (model {cfg.proxy_model!r})"
        key = "EMPTY"  # servers one runs accept any key
        if cfg.proxy_api_key_env:
            key = os.environ.get(cfg.proxy_api_key_env, "")
            if not key:
                raise BayeskdError(f"posterior.proxy_api_key_env: environment variable {cfg.proxy_api_key_env} is not set")
        self.openai = openai
        self.client = openai.OpenAI(api_key=key, base_url=cfg.proxy_base_url, timeout=cfg.proxy_timeout_s, max_retries=3)
        self.tokenizer = tokenizer
        self.strings = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        by: dict[str, int | None] = {}
        for i, s in enumerate(self.strings):
            by[s] = None if s in by else i  # None: several ids decode to it
        self.by_string = by
        self.bos = tokenizer.bos_token
        self.stats = {"positions": 0, "alternatives": 0, "unreadable_alternatives": 0, "requests": 0}

    def check(self) -> None:
        """Fail fast on an endpoint that cannot be reached or rejects the key."""
        try:
            self.client.models.list()
        except self.openai.AuthenticationError:
            raise BayeskdError(f"{self.where}: authentication failed (401): check ${self.cfg.proxy_api_key_env}") from None
        except (self.openai.APIConnectionError, self.openai.APITimeoutError) as e:
            raise BayeskdError(f"{self.where} is unreachable: {e}") from None
        except self.openai.APIStatusError:
            pass  # some servers have no /models; the first request will tell

    def rows(self, items: list[tuple[dict, list[int], int]], template: str) -> list[ServedRow]:
        """Per (record, the example's token ids, n_response): the proxy at its response tokens, in order."""
        texts = [example_text(r, ids, self.tokenizer, template) for r, ids, _ in items]
        workers = min(self.cfg.proxy_concurrency, max(1, len(items)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="proxy") as pool:
            bodies = list(pool.map(self._request, texts))
        return [self.read(body, r, ids, n) for body, (r, ids, n) in zip(bodies, items)]

    def _request(self, text: str) -> dict:
        try:
            raw = self.client.completions.create(
                model=self.cfg.proxy_model, prompt=text, echo=True, logprobs=self.cfg.proxy_top_logprobs, max_tokens=0,
                temperature=0.0, extra_body={"return_tokens_as_token_ids": True},
            )  # fmt: skip
        except self.openai.APIStatusError as e:
            raise BayeskdError(f"{self.where}: HTTP {e.status_code}: {e.message}; it must serve completions with "
                               "echo and logprobs (prompt logprobs), as vLLM does") from None  # fmt: skip
        except (self.openai.APIConnectionError, self.openai.APITimeoutError) as e:
            raise BayeskdError(f"{self.where}: {e}") from None
        self.stats["requests"] += 1
        return raw.model_dump() if hasattr(raw, "model_dump") else raw

    def token_id(self, s: str) -> int | None:
        if s.startswith("token_id:"):
            try:
                return int(s[len("token_id:") :])
            except ValueError:
                return None
        return self.by_string.get(s)

    def read(self, body: dict, record: dict, ids: list[int], n: int) -> ServedRow:
        """One echo answer -> the proxy at the example's last n tokens (its response)."""
        where = f"{self.where}, record {record.get('key')!r}"
        try:
            lp = body["choices"][0]["logprobs"] or {}
            tokens, values, tops = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise BayeskdError(f"{where}: the answer has no prompt logprobs (choices[0].logprobs); the endpoint "
                               "must support echo with logprobs") from None  # fmt: skip
        if len(tokens) > len(ids) and self.bos is not None and tokens[0] in (self.bos, f"token_id:{self.tokenizer.bos_token_id}"):
            tokens, values, tops = tokens[1:], values[1:], tops[1:]  # a BOS the server put in front
        if len(tokens) < len(ids):
            raise BayeskdError(f"{where}: {len(tokens)} prompt tokens echoed for the example's {len(ids)}: "
                               "the served model's tokenizer is not the student's")  # fmt: skip
        for j, (s, t) in enumerate(zip(tokens, ids)):
            if self.token_id(s) != t and s != self.strings[t]:
                raise BayeskdError(f"{where}: prompt token {j} is {s!r} at the endpoint but {self.strings[t]!r} "
                                   f"(id {t}) in the student's tokenizer: the served model's tokenizer is not the "
                                   "student's")  # fmt: skip
        start = len(ids) - n
        if start < 1:
            raise BayeskdError(f"{where}: the response starts at the first token, which has no logprobs")
        k = max((len(tops[p] or {}) for p in range(start, len(ids))), default=1) or 1
        out_ids = np.full((n, k), D.PAD, np.int64)
        out_p = np.zeros((n, k))
        realised = np.zeros(n)
        for j, p in enumerate(range(start, len(ids))):
            if values[p] is None or tops[p] is None:
                raise BayeskdError(f"{where}: no logprobs at prompt token {p}")
            realised[j] = float(values[p])
            seen: dict[int, float] = {}
            for s, v in tops[p].items():
                self.stats["alternatives"] += 1
                t = self.token_id(s)
                if t is None or not math.isfinite(v):
                    self.stats["unreadable_alternatives"] += 1
                    continue
                seen[t] = max(seen.get(t, -math.inf), float(v))
            ranked = sorted(seen.items(), key=lambda kv: -kv[1])
            for c, (t, v) in enumerate(ranked):
                out_ids[j, c], out_p[j, c] = t, math.exp(v)
        self.stats["positions"] += n
        tail = np.clip(1 - out_p.sum(1), 0, 1)
        return ServedRow(D.SparseDist(out_ids, out_p, tail), realised)

    def summary(self) -> dict:
        return dict(self.stats)

    def close(self) -> None:
        self.client.close()
