"""`bayeskd teacher-check`: what an OpenAI-compatible endpoint does with the requests a run sends.

A few cheap requests, one row per property (`check_teacher`):

- `n`: two samples asked for at once come back as two choices, or one (the server ignores n);
- `seed`: two identical seeded requests give the same text;
- `top_logprobs`: how many alternatives come back for 20 asked, and whether the sampled token is
  added to them when it is outside (a k + 1-th, llama.cpp's way);
- end of turn: how a response that ends its turn shows it (the end-of-turn token listed by name,
  as "", or not at all), and whether an immediate end of turn is an empty answer;
- prompt rendering: `usage.prompt_tokens` of one prompt sent through the chat endpoint and through
  the completions endpoint formatted with `teacher.completion_template`. Different counts mean
  different prompts, and `probe` (completions) would condition on another prompt than `collect`
  (chat) did (`rendering`; probe runs it too, before its first paid query);
- sampling: over a few hundred generated positions at temperature 1, how often the sampled token
  is one the logprobs call rare (below 0.05 times the likeliest, which min_p 0.05 never draws) or
  outside the 20 listed (which top_k 20 never draws), against how often the logprobs predict. Far
  fewer than predicted (a Poisson tail below 1e-3) is server-side truncation: the corpus would not
  be drawn from the distribution its logprobs describe.

The requests carry `teacher.extra_body`, as a run's do. A row that would break a run fails it
(no logprobs where collect asks for them, truncation, a prompt rendered two ways where probe
will use completions), and the command exits 2. `collect` runs the whole check once before its
first paid request; `probe` runs the rendering comparison alone (`same_prompt`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import openai

from bayeskd.config import Config
from bayeskd.errors import BayeskdError
from bayeskd.teachers.base import Usage, content_key
from bayeskd.teachers.cached import CachedTeacher
from bayeskd.teachers.openai_compat import OpenAITeacher, TeacherUnavailable

TOP = 20
"""Alternatives asked for: the most APIs give, so that the unlisted mass is small."""
RARE = math.log(0.05)
"""A token below exp(RARE) times the likeliest: what min_p 0.05 never samples."""


@dataclass
class Row:
    name: str
    status: str
    """"ok", "warn" (handled, at a cost) or "fail" (would break a run)."""
    found: str
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    requests: int = 0
    """Requests answered (each paid for)."""

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "fail"]


class _Client:
    """Raw requests to the endpoint: the body as the server sent it (before the client's own fixes)."""

    def __init__(self, teacher: OpenAITeacher, report: Report):
        self.teacher, self.report = teacher, report
        cfg = teacher.cfg
        self.common: dict[str, Any] = {"model": cfg.model}
        if cfg.extra_body:
            self.common["extra_body"] = dict(cfg.extra_body)

    def chat(self, messages: list[dict], **params) -> dict:
        return self._paid(self.teacher.client.chat.completions.create(messages=messages, **self.common, **params))

    def completion(self, prompt: str, **params) -> dict:
        return self._paid(self.teacher.client.completions.create(prompt=prompt, **self.common, **params))

    def _paid(self, raw: Any) -> dict:
        body = raw.model_dump(warnings=False)
        u = body.get("usage") or {}
        paid = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
        self.report.usage = self.report.usage + paid
        self.report.requests += 1
        return body


def rendering(teacher: OpenAITeacher, messages: list[dict]) -> tuple[int, int, Usage]:
    """(prompt tokens through chat, through completions with `teacher.completion_template`, usage paid)."""
    report = Report()
    client = _Client(teacher, report)
    chat = client.chat(messages, max_tokens=1, temperature=0)
    completion = client.completion(teacher.format_chat(messages), max_tokens=1, temperature=0)
    return chat["usage"]["prompt_tokens"], completion["usage"]["prompt_tokens"], report.usage


def rendering_mismatch(chat: int, completion: int, template: str) -> str:
    return (f"the chat endpoint renders the prompt as {chat} tokens, the completions endpoint with "
            f"teacher.completion_template={_short(template)} as {completion}: probe (completions) would condition "
            "on another prompt than collect (chat). Set teacher.completion_template to the server's chat "
            "template (e.g. with an empty system turn first), or teacher.prefix_via=continue_final_message "
            "where the server has it")  # fmt: skip


def check_teacher(cfg: Config, messages: list[dict], positions: int = 256) -> Report:
    """Probe the endpoint of `cfg.teacher` with `messages` (a prompt of the run); see the module docstring."""
    teacher = OpenAITeacher(cfg.teacher)
    teacher.check()
    report = Report()
    client = _Client(teacher, report)
    try:
        report.rows.append(_n(client, messages))
        report.rows.append(_seed(client, messages))
        samples = _samples(client, messages, positions)
        report.rows += [_top_logprobs(samples, cfg), _end_of_turn(samples)]
        report.rows += [_rendering(teacher, client, messages, cfg), _sampling(samples, cfg)]
    except openai.APIError as e:
        raise TeacherUnavailable(f"teacher-check: a request to {cfg.teacher.base_url} failed: {_short(str(e), 300)}") from None
    finally:
        teacher.close()
    return report


def _n(client: _Client, messages: list[dict]) -> Row:
    got = len(client.chat(messages, n=2, max_tokens=1, temperature=1.0, seed=7)["choices"])
    if got == 2:
        return Row("n", "ok", "2 samples asked, 2 returned")
    return Row("n", "warn", f"2 samples asked, {got} returned",
               "ignored: each sample is asked for on its own (seed + i), the prompt paid once per sample")  # fmt: skip


def _seed(client: _Client, messages: list[dict]) -> Row:
    texts = [client.chat(messages, max_tokens=8, temperature=1.0, seed=1234)["choices"][0]["message"]["content"]
             for _ in range(2)]  # fmt: skip
    if texts[0] == texts[1]:
        return Row("seed", "ok", "two seeded requests, the same text")
    return Row("seed", "warn", "two seeded requests, different texts",
               "answers are kept in the store; a lost store cannot be drawn again exactly")  # fmt: skip


def _samples(client: _Client, messages: list[dict], positions: int) -> list[dict]:
    """Choices with logprobs (TOP alternatives, temperature 1) until `positions` tokens, or 4x the requests that takes."""
    out, got, max_tokens = [], 0, 16
    for i in range(4 * math.ceil(positions / max_tokens)):
        body = client.chat(messages, max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=1000 + i,
                           logprobs=True, top_logprobs=TOP)  # fmt: skip
        for c in body["choices"]:
            out.append({**c, "completion_tokens": (body.get("usage") or {}).get("completion_tokens")})
            got += len((c.get("logprobs") or {}).get("content") or [])
        if got >= positions:
            break
    return out


def _tokens(choice: dict) -> list[dict]:
    return (choice.get("logprobs") or {}).get("content") or []


def _top_logprobs(samples: list[dict], cfg: Config) -> Row:
    tokens = [t for c in samples for t in _tokens(c)]
    if not tokens:
        status = "fail" if cfg.collect.top_logprobs > 0 else "warn"
        return Row("top_logprobs", status, "no logprobs returned",
                   f"collect.top_logprobs={cfg.collect.top_logprobs} needs them" if status == "fail" else "")  # fmt: skip
    counts = [len(t.get("top_logprobs") or []) for t in tokens]
    plus = sum(n > TOP for n in counts)
    found = f"{min(counts)}..{max(counts)} alternatives for {TOP} asked"
    if plus:
        return Row("top_logprobs", "ok", f"{found}; the sampled token added at {plus}/{len(tokens)} positions",
                   "cut to the k asked for; the sampled token's own logprob kept apart")  # fmt: skip
    status = "warn" if max(counts) < min(TOP, cfg.collect.top_logprobs or TOP) else "ok"
    return Row("top_logprobs", status, found, "fewer than asked: less evidence per token" if status == "warn" else "")


def _end_of_turn(samples: list[dict]) -> Row:
    ended = [c for c in samples if c.get("finish_reason") == "stop"]
    empty = sum(c["message"]["content"] == "" and not c.get("completion_tokens") for c in ended)
    shown: dict[str, int] = {}
    for c in ended:
        tokens, text = _tokens(c), c["message"]["content"]
        if "".join(t["token"] for t in tokens) == text:
            key = "not listed"
        elif "".join(t["token"] for t in tokens[:-1]) == text:
            key = f"listed as {tokens[-1]['token']!r}"
        else:
            continue  # the strings do not spell the text (byte fragments): cannot tell
        shown[key] = shown.get(key, 0) + 1
    blanks = sum(a["token"] == "" for c in samples for t in _tokens(c) for a in t.get("top_logprobs") or [])
    if not ended:
        return Row("end of turn", "ok", f"no response ended its turn in {len(samples)}")
    found = f"{len(ended)}/{len(samples)} ended; the end-of-turn token " + ", ".join(f"{k} x{v}" for k, v in shown.items())
    notes = []
    if empty:
        notes.append(f"{empty} empty answers (an immediate end of turn, kept as the EOS)")
    if blanks:
        notes.append(f'{blanks} alternatives "" (special tokens shown empty: read as the end of turn in ended responses)')
    if "not listed" in shown:
        notes.append("the final end of turn has no logprob evidence")
    return Row("end of turn", "ok", found, "; ".join(notes))


def _rendering(teacher: OpenAITeacher, client: _Client, messages: list[dict], cfg: Config) -> Row:
    try:
        chat, completion, usage = rendering(teacher, messages)
    except Exception as e:  # noqa: BLE001 -- e.g. no completions endpoint: said in the table
        return Row("prompt rendering", "warn", f"not compared: {_short(str(e))}",
                   "probe needs teacher.prefix_via=continue_final_message or none without a completions endpoint")  # fmt: skip
    client.report.usage = client.report.usage + usage
    client.report.requests += 2
    if chat == completion:
        return Row("prompt rendering", "ok", f"chat and completions: {chat} prompt tokens each")
    probe_uses_it = cfg.teacher.endpoint == "chat" and teacher.prefix_via == "completions" and cfg.probe.budget_tokens
    found = f"chat {chat} vs completions {completion} prompt tokens"
    return Row("prompt rendering", "fail" if probe_uses_it else "warn", found,
               rendering_mismatch(chat, completion, cfg.teacher.completion_template))  # fmt: skip


def _sampling(samples: list[dict], cfg: Config) -> Row:
    rare = outside = 0
    rare_expected = outside_expected = 0.0
    n = 0
    for c in samples:
        for t in _tokens(c):
            top = sorted(((a["token"], a["logprob"]) for a in t.get("top_logprobs") or []), key=lambda a: -a[1])[:TOP]
            if len(top) < TOP:
                continue  # too few listed to tell what is outside them
            n += 1
            listed = sum(math.exp(lp) for _, lp in top)
            unlisted = max(0.0, 1.0 - listed)
            cut = top[0][1] + RARE
            # A lower bound: the unlisted tokens count as rare only when the lowest listed one already is.
            rare_expected += sum(math.exp(lp) for _, lp in top if lp < cut) + (unlisted if top[-1][1] < cut else 0.0)
            outside_expected += unlisted
            rare += t["logprob"] < cut
            # By string and logprob: tokens that decode alike (byte fragments, shown as U+FFFD) are told apart.
            outside += all(s != t["token"] or abs(lp - t["logprob"]) > 1e-6 for s, lp in top)
    if n == 0:
        return Row("sampling", "warn", "not measured: no positions with the top 20 alternatives")
    found = (f"{n} positions: {rare} rare tokens sampled (>= {rare_expected:.1f} predicted), "
             f"{outside} outside the top {TOP} ({outside_expected:.1f} predicted)")  # fmt: skip
    tests = (("min_p-like", rare, rare_expected), ("top_k-like", outside, outside_expected))
    truncated = [name for name, seen, expected in tests if expected >= 5 and _poisson_cdf(seen, expected) < 1e-3]
    if not truncated:
        return Row("sampling", "ok", found)
    extra = f"teacher.extra_body={cfg.teacher.extra_body} does not turn it off" if cfg.teacher.extra_body else \
        "turn it off with teacher.extra_body, e.g. for llama.cpp {top_k: 0, min_p: 0, repeat_penalty: 1.0}"  # fmt: skip
    return Row("sampling", "fail", found,
               f"server-side truncation ({', '.join(truncated)}): the corpus would not be drawn from the distribution "
               f"its logprobs describe; {extra}")  # fmt: skip


def _poisson_cdf(k: int, mean: float) -> float:
    """P(X <= k) for X ~ Poisson(mean)."""
    term = total = math.exp(-mean)
    for i in range(1, k + 1):
        term *= mean / i
        total += term
    return total


def _short(text: str, limit: int = 120) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="teacher-check")
    for col in ("property", "", "found", "what it means"):
        table.add_column(col)
    marks = {"ok": "[green]OK[/]", "warn": "[yellow]WARN[/]", "fail": "[red]FAIL[/]"}
    for r in report.rows:
        table.add_row(r.name, marks[r.status], r.found, r.note)
    console = Console()
    console.print(table)
    console.print(f"cost: {report.usage.prompt_tokens} prompt + {report.usage.completion_tokens} completion tokens")


def same_prompt(cfg: Config, messages: list[dict], teacher: CachedTeacher, stage: str) -> None:
    """`probe`: refuse, before the first paid query, to continue prefixes through a completions endpoint that
    renders a prompt otherwise than the chat endpoint collect used: the counts would be of another
    prompt's continuations. One prompt, both ways, compared by `usage.prompt_tokens` (two short
    requests, in this run's ledger); a server that cannot answer the comparison is only warned of."""
    t = teacher.teacher
    if not isinstance(t, OpenAITeacher) or t.prefix_via != "completions" or cfg.teacher.endpoint != "chat":
        return
    try:
        chat, completion, usage = rendering(t, messages)
    except (openai.APIError, KeyError, TypeError) as e:
        print(f"{stage}: could not compare the chat and completions prompts: {e}", file=sys.stderr)
        return
    teacher.budget.ledger.add(cfg.teacher.key_name, content_key(cfg.teacher.key_name, messages, "rendering"),
                              usage.prompt_tokens, usage.completion_tokens)  # fmt: skip
    if chat != completion:
        raise BayeskdError(f"{stage}: {rendering_mismatch(chat, completion, cfg.teacher.completion_template)}; "
                           "nothing was queried")  # fmt: skip
