"""Quirks of third-party OpenAI-compatible servers, reproduced by `bayeskd serve` on purpose.

`serve.quirks` (off by default) makes the server answer as some servers users run do, so
that the client's handling of each is tested against a real server over HTTP. All are
llama.cpp's server's ways (llama-cpp-python 0.3):

- `ignore_n`: one choice whatever `n` asks for, and one generation billed;
- `empty_end_of_turn`: a sample whose first sampled token ends the turn comes back as text "",
  finish reason `stop`, an empty logprobs list and no completion tokens. This server otherwise
  lists the end-of-turn token and counts it, as vLLM does;
- `topk_plus_sampled`: a sampled token outside the top k is added to its alternatives (k + 1);
- `special_tokens_empty`: special tokens are rendered "" in token strings and alternatives, and
  the final end-of-turn token is left out of the token list (usage still counts it);
- `extra_system_turn`: the chat endpoint renders an empty system turn before messages that have
  none (llama-cpp-python's `chatml` format), so that its prompt is not what the completions
  endpoint gets from a plain ChatML template;
- `server_top_k`: samples from the `SERVER_TOP_K` likeliest tokens only unless the request says
  otherwise (its `top_k` field, e.g. through `teacher.extra_body`), while the logprobs still
  describe the whole distribution, as llama.cpp's default top_k 40 does.

A quirk acts on the request before it is decoded and on the response after, never on the
model; `server_top_k` is the one that changes the sampling, since that is its point.
"""

from __future__ import annotations

from dataclasses import replace

from bayeskd.teachers.base import Choice, TeacherRequest, TeacherResponse, TokenLogprob, Usage

SERVER_TOP_K = 5
"""`server_top_k`'s truncation: small, so that a tiny model's near-uniform draws show it."""


def server_top_k(asked: int | None, quirks: list[str]) -> int:
    """The top_k a request is sampled with: the one it asked for (0 or less: none), else the server's default."""
    if asked is not None:
        return max(asked, 0)
    return SERVER_TOP_K if "server_top_k" in quirks else 0


def quirked_request(request: TeacherRequest, quirks: list[str]) -> TeacherRequest:
    """The request as the model decodes it: one sample under `ignore_n`; an empty system turn first
    under `extra_system_turn` (chat only); with at least one logprob per token when a quirk needs
    to see the tokens (dropped again later)."""
    if "ignore_n" in quirks:
        request = replace(request, n=1)
    if "extra_system_turn" in quirks and request.messages and request.messages[0][0] != "system":
        request = replace(request, messages=(("system", ""), *request.messages))
    if {"empty_end_of_turn", "special_tokens_empty"} & set(quirks) and request.top_logprobs == 0:
        request = replace(request, top_logprobs=1)
    return request


def quirked_response(response: TeacherResponse, quirks: list[str], top_logprobs: int, end_of_turn: str,
                     specials: frozenset[str] = frozenset()) -> TeacherResponse:  # fmt: skip
    """The response as the quirky server shows it. `top_logprobs` is what the client asked for;
    `end_of_turn` is the string of the token that ends a turn; `specials`, of every special token."""
    choices, dropped = [], 0
    for c in response.choices:
        if "empty_end_of_turn" in quirks and c.tokens and c.tokens[0].token == end_of_turn:  # ended at the first token
            dropped += len(c.tokens)
            c = Choice(text="", finish_reason="stop", tokens=[])
        if c.tokens and "topk_plus_sampled" in quirks and top_logprobs:
            c = replace(c, tokens=[_plus_sampled(t) for t in c.tokens])
        if c.tokens and "special_tokens_empty" in quirks:
            tokens = c.tokens[:-1] if c.finish_reason == "stop" and c.tokens[-1].token == end_of_turn else c.tokens
            c = replace(c, tokens=[_specials_empty(t, specials) for t in tokens])
        if not top_logprobs:
            c = replace(c, tokens=None)
        choices.append(c)
    usage = Usage(response.usage.prompt_tokens, response.usage.completion_tokens - dropped)
    return replace(response, choices=choices, usage=usage)


def _plus_sampled(t: TokenLogprob) -> TokenLogprob:
    if any(s == t.token for s, _ in t.top):
        return t
    return TokenLogprob(t.token, t.logprob, [*t.top, (t.token, t.logprob)])


def _specials_empty(t: TokenLogprob, specials: frozenset[str]) -> TokenLogprob:
    def shown(s: str) -> str:
        return "" if s in specials else s

    return TokenLogprob(shown(t.token), t.logprob, [(shown(s), lp) for s, lp in t.top])
