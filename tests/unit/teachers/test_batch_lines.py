"""The Batch API input lines `collect.mode: batch` writes: valid OpenAI Batch lines (the format vLLM's
`run_batch` reads too), each the body its request sends online; and the ledger's batch price."""

from __future__ import annotations

import json

from bayeskd.prompts import load_prompts
from bayeskd.stages.collect import request_for, sample_key
from bayeskd.teachers.base import TeacherRequest
from bayeskd.teachers.batch import ENDPOINT, batch_line
from bayeskd.teachers.cached import Ask
from bayeskd.teachers.config import CollectConfig, PriceConfig, TeacherConfig
from bayeskd.teachers.openai_compat import OpenAITeacher
from bayeskd.teachers.store import Budget, Ledger

EXTRA = {"top_k": 0, "min_p": 0}


def check_batch_lines(lines: list[dict], model: str) -> None:
    """What OpenAI's Batch API (and vLLM's run_batch) require of each input line."""
    assert lines
    assert len({line["custom_id"] for line in lines}) == len(lines)  # unique
    for line in lines:
        assert set(line) == {"custom_id", "method", "url", "body"}
        assert isinstance(line["custom_id"], str) and line["custom_id"]
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        body = line["body"]
        assert body["model"] == model and body["n"] == 1
        assert body["messages"] and all(set(m) == {"role", "content"} for m in body["messages"])
        assert isinstance(body["max_tokens"], int) and body["max_tokens"] >= 1
        assert "extra_body" not in body  # merged into the body, as the SDK sends it
        json.loads(json.dumps(line))  # plain JSON


def collect_asks(cfg: CollectConfig, teacher: str, limit: int = 5) -> list[Ask]:
    prompts = load_prompts(CollectConfig(limit=limit), seed=0)
    return [Ask(request_for(p, cfg, 1, first=s), (sample_key(teacher, p, cfg, s, EXTRA),)) for p in prompts for s in range(cfg.n)]


def test_lines_are_openai_batch_lines_keyed_by_sample():
    teacher = OpenAITeacher(TeacherConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", extra_body=EXTRA))
    cfg = CollectConfig(n=3, max_tokens=7, top_logprobs=4, temperature=0.8, top_p=0.9, stop=["\n\n"], seed=5)
    asks = collect_asks(cfg, teacher.name)
    lines = [batch_line(teacher, ask) for ask in asks]
    check_batch_lines(lines, "m")
    assert [line["custom_id"] for line in lines] == [ask.keys[0] for ask in asks]  # the store key
    for line, ask in zip(lines, asks):
        body = line["body"]
        assert body["temperature"] == 0.8 and body["top_p"] == 0.9 and body["max_tokens"] == 7 and body["stop"] == ["\n\n"]
        assert body["logprobs"] is True and body["top_logprobs"] == 4
        assert body["seed"] == ask.request.seed and {k: body[k] for k in EXTRA} == EXTRA
    # sample s of a prompt is seeded seed + s: the samples of one prompt differ
    seeds = [line["body"]["seed"] for line in lines[:3]]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]
    teacher.close()


def test_a_line_is_the_body_its_request_sends_online(recording_server):
    """What the SDK puts on the wire for the same request (a real loopback server keeps it) is the line's body."""
    with recording_server() as s:
        teacher = OpenAITeacher(TeacherConfig(backend="openai", model="m", base_url=s.base_url, extra_body=EXTRA))
        for request in (TeacherRequest.chat([{"role": "user", "content": "hi"}], max_tokens=3, seed=11, top_logprobs=2),
                        TeacherRequest.chat([{"role": "system", "content": "s"}, {"role": "user", "content": "é"}], stop=("x",))):  # fmt: skip
            teacher.generate(request)
            assert s.bodies[-1][1] == batch_line(teacher, Ask(request, ("k",)))["body"]
        teacher.close()
    assert ENDPOINT == "/v1/chat/completions"


def test_batch_calls_cost_the_discounted_price():
    ledger = Ledger(price=PriceConfig(prompt_per_1k=1.0, completion_per_1k=3.0, batch_discount=0.5))
    ledger.add("t", "online", 1000, 1000)
    ledger.add("t", "batched", 1000, 1000, batch=True)
    ledger.add_record({"teacher": "t", "call": "from-store", "usage": {"prompt_tokens": 2000, "completion_tokens": 0}, "batch": "b1"})
    assert ledger.tokens == 6000
    assert abs(ledger.cost - (4.0 + 2.0 + 1.0)) < 1e-9
    d = ledger.to_dict()
    assert d["batch_prompt_tokens"] == {"t": 3000} and d["batch_completion_tokens"] == {"t": 1000}
    assert d["price"]["batch_discount"] == 0.5
    assert "batch_prompt_tokens" not in Ledger().to_dict()  # an online ledger keeps its shape
    # The budget reserves a batch request's bound at the batch price.
    budget = Budget(Ledger(price=PriceConfig(completion_per_1k=1.0, batch_discount=0.5)), budget_cost=1.0)
    assert budget.take(1500, batch=True) and not budget.fits(1500, batch=False)
    budget.release(1500, batch=True)
    assert budget.reserved == 0 and abs(budget.reserved_cost) < 1e-12
