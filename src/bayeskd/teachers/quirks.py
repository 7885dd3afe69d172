"""Quirks of third-party OpenAI-compatible servers, reproduced by `bayeskd serve` on purpose.

`serve.quirks` (off by default) makes the server answer as some servers users run do, so
that the client's handling of each is tested against a real server over HTTP:

- `ignore_n`: one choice whatever `n` asks for, and one generation billed (llama.cpp's server,
  llama-cpp-python 0.3);
- `empty_end_of_turn`: a sample whose first sampled token ends the turn comes back as text "",
  finish reason `stop`, an empty logprobs list and no completion tokens (llama.cpp again). This
  server otherwise lists the end-of-turn token and counts it, as vLLM does.

A quirk acts on the request before it is decoded and on the response after, never on the
model or its sampling.
"""

from __future__ import annotations

from dataclasses import replace

from bayeskd.teachers.base import Choice, TeacherRequest, TeacherResponse, Usage


def quirked_request(request: TeacherRequest, quirks: list[str]) -> TeacherRequest:
    """The request as the model decodes it: one sample under `ignore_n`; under `empty_end_of_turn`
    with at least one logprob per token, so that the first token is known (dropped again later)."""
    if "ignore_n" in quirks:
        request = replace(request, n=1)
    if "empty_end_of_turn" in quirks and request.top_logprobs == 0:
        request = replace(request, top_logprobs=1)
    return request


def quirked_response(response: TeacherResponse, quirks: list[str], top_logprobs: int, end_of_turn: str) -> TeacherResponse:
    """The response as the quirky server shows it. `top_logprobs` is what the client asked for;
    `end_of_turn` is the string of the token that ends a turn."""
    if "empty_end_of_turn" not in quirks:
        return response
    choices, dropped = [], 0
    for c in response.choices:
        if c.tokens and c.tokens[0].token == end_of_turn:  # the turn ended at the first token
            dropped += len(c.tokens)
            c = Choice(text="", finish_reason="stop", tokens=[])
        if not top_logprobs:
            c = replace(c, tokens=None)
        choices.append(c)
    usage = Usage(response.usage.prompt_tokens, response.usage.completion_tokens - dropped)
    return replace(response, choices=choices, usage=usage)
