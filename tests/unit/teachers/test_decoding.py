"""The continuous-batching decoder and the local teacher on it, on a tiny real model (no mocks, no timings)."""

from __future__ import annotations

import pytest
import torch

from bayeskd.models import load_causal_lm, load_tokenizer
from bayeskd.teachers.base import TeacherError, TeacherRequest
from bayeskd.teachers.decoding import Decoder, Row, sample
from bayeskd.teachers.local import LocalTeacher

SYSTEM = {"role": "system", "content": "Be brief. What is a plus b? Answer with one number only."}
QUESTIONS = ["What is 1 plus 1?", "What is 11 plus 11, and what is 3 plus 3?", "Hi", "What is 7 plus 7?", "What is 2?"]


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return load_tokenizer(str(tiny_lm)), load_causal_lm(str(tiny_lm)).eval()


@pytest.fixture(scope="module")
def teacher(tiny_lm):
    t = LocalTeacher(str(tiny_lm), batch_size=3)
    yield t
    t.close()


def prompts(tok) -> list[list[int]]:
    """Chat prompts of different lengths; those with the system message share a long head (the kept prefix)."""
    chats = [[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS[:3]]
    chats += [[{"role": "user", "content": q}] for q in QUESTIONS[3:]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def run(decoder: Decoder, rows: list[Row]) -> None:
    decoder.add(rows)
    while decoder.rows_in_flight:
        decoder.step()


def make_decoder(tok, model, slots: int) -> Decoder:
    return Decoder(model, slots, tok.eos_token_id, tok.pad_token_id, lambda ids: tok.decode(ids, skip_special_tokens=True))


def uniforms(seed: int, n: int) -> list[float]:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_equals_hf_generate(lm):
    tok, model = lm
    rows = [Row(key=i, prompt=p, temperature=0, max_tokens=14) for i, p in enumerate(prompts(tok))]
    run(make_decoder(tok, model, slots=2), rows)  # 2 slots for 5 prompts: rows are refilled mid-way
    for r in rows:
        with torch.inference_mode():
            out = model.generate(torch.tensor([r.prompt]), max_new_tokens=14, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        expected = out[0, len(r.prompt) :].tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id) + 1]
        assert r.tokens == expected


def test_logprobs_equal_a_full_forward(lm):
    """Every reported logprob and top-k, cache or no cache, shared prefix or not, matches one forward without a cache."""
    tok, model = lm
    rows = [Row(key=i, prompt=p, temperature=1.0 if i % 2 else 0, top_p=0.9 if i == 3 else 1.0, max_tokens=9,
                top_logprobs=5, uniforms=uniforms(i, 9)) for i, p in enumerate(prompts(tok))]  # fmt: skip
    decoder = make_decoder(tok, model, slots=3)
    run(decoder, rows)
    assert decoder.prefix is not None and len(decoder.prefix[0]) >= 8  # the shared head was used
    for r in rows:
        with torch.inference_mode():
            full = torch.log_softmax(model(torch.tensor([r.prompt + r.tokens])).logits[0].float(), -1)
        steps = full[len(r.prompt) - 1 : -1]  # the distribution each generated token was drawn from
        assert len(r.logprobs) == len(r.tokens)
        for t, (lp, ids, lps) in enumerate(r.logprobs):
            top = steps[t].topk(5)
            assert lp == pytest.approx(float(steps[t, r.tokens[t]]), abs=1e-4)
            assert lps == pytest.approx(top.values.tolist(), abs=1e-4)
            assert ids == top.indices.tolist()


def test_sampling_follows_temperature_and_top_p():
    """The inverse-CDF draw: a token's share of draws is its tempered, top-p-truncated probability."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0)).tolist()
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)]:
        rows = [Row(key=i, prompt=[], temperature=temperature, top_p=top_p, uniforms=[u[i]]) for i in range(n)]
        ids = sample(logits.expand(n, -1), rows)
        p = torch.softmax(logits / temperature, -1)
        if top_p < 1:  # the smallest set of the likeliest (logits are sorted) reaching top_p: here the first two
            p = torch.where(p.cumsum(0) - p < top_p, p, 0)
            assert (p > 0).sum() == 2
            p = p / p.sum()
        freq = torch.bincount(ids, minlength=5) / n
        assert torch.allclose(freq, p, atol=0.015), (temperature, top_p, freq, p)
    greedy = [Row(key=0, prompt=[], temperature=0)]
    assert sample(logits[None], greedy).tolist() == [0]


def test_mixed_requests_in_one_batch_get_what_they_asked(teacher):
    ask = lambda q, **kw: TeacherRequest.chat([SYSTEM, {"role": "user", "content": q}], **kw)  # noqa: E731
    plain = teacher.generate(ask("What is 5 plus 5?", temperature=0, max_tokens=20))
    text = plain.choices[0].text
    assert len(text) > 6, "the greedy reference must be long enough to hold a stop string"
    stop = text[4:6]
    requests = [
        ask("What is 5 plus 5?", temperature=0, max_tokens=20, stop=(stop, "never-seen")),
        ask("What is 1 plus 2?", temperature=0, max_tokens=3),
        ask("Hi", temperature=1.0, top_p=0.5, max_tokens=7, n=3, seed=1),
        ask("What is 9 plus 9?", temperature=0.7, max_tokens=5, n=2, top_logprobs=3, seed=2),
        TeacherRequest(prompt="What is", max_tokens=1, n=4, seed=3),
    ]
    stopped, short, nucleus, with_logprobs, one_token = teacher.generate_batch(requests)
    assert stopped.choices[0].text == text[: text.find(stop)] and stopped.choices[0].finish_reason == "stop"
    assert short.usage.completion_tokens <= 3 and len(short.choices) == 1
    assert len(nucleus.choices) == 3 and all(c.tokens is None for c in nucleus.choices)
    assert nucleus.usage.completion_tokens <= 21
    for c in with_logprobs.choices:
        assert 1 <= len(c.tokens) <= 5 and all(len(t.top) == 3 for t in c.tokens)
        assert all(t.logprob <= t.top[0][1] + 1e-6 for t in c.tokens)
        assert "".join(t.token for t in c.tokens).startswith(c.text)  # EOS (if any) decodes to its own string
    assert len(one_token.choices) == 4 and one_token.usage.completion_tokens == 4
    for r in (short, nucleus, with_logprobs):
        assert all(c.finish_reason in ("stop", "length") for c in r.choices)
        assert r.usage.prompt_tokens > 0


def test_seeded_samples_do_not_depend_on_batch_mates(tiny_lm, teacher):
    request = TeacherRequest.chat([SYSTEM, {"role": "user", "content": "What is 3 plus 4?"}], max_tokens=8, n=3, seed=7)
    alone = [c.text for c in teacher.generate(request).choices]
    others = [
        TeacherRequest.chat([{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0.5, n=2, seed=1),
        TeacherRequest.chat([SYSTEM, {"role": "user", "content": "What is 100 plus 100?"}], max_tokens=3, top_p=0.8),
        TeacherRequest(prompt="Count", max_tokens=1, n=5),
    ]
    mixed = teacher.generate_batch([others[0], request, *others[1:]])[1]
    assert [c.text for c in mixed.choices] == alone
    wider = LocalTeacher(str(tiny_lm), batch_size=8)  # other slots, another batch layout
    try:
        assert [c.text for c in wider.generate_batch([*others, request])[3].choices] == alone
    finally:
        wider.close()
    assert len(set(alone)) > 1, "the samples of one request are independent draws"


def test_stream_refills_slots_and_pulls_lazily(teacher):
    requests = [TeacherRequest.chat([{"role": "user", "content": f"What is {i} plus {i}?"}], temperature=0,
                                    max_tokens=2 + i % 5, n=1 + i % 2) for i in range(11)]  # fmt: skip
    expected = [teacher.generate(r) for r in requests]
    pulled = []

    def feed():
        for i, r in enumerate(requests):
            pulled.append(i)
            yield r

    seen = []
    for i, result in teacher.stream(feed()):
        # rows in flight stay near batch_size (3 rows here): never more than 3 requests ahead of the results
        assert len(pulled) - len(seen) <= teacher.batch_size + 1
        seen.append(i)
        assert [c.text for c in result.choices] == [c.text for c in expected[i].choices]
        assert result.usage == expected[i].usage
    assert sorted(seen) == list(range(len(requests)))


def test_an_idle_decoder_lets_go_of_a_wide_cache(lm):
    tok, model = lm
    decoder = make_decoder(tok, model, slots=2)
    run(decoder, [Row(key=0, prompt=prompts(tok)[0], temperature=0, max_tokens=600)])
    assert decoder.cache.capacity == 0
    run(decoder, [Row(key=1, prompt=prompts(tok)[1], temperature=0, max_tokens=20)])
    assert 0 < decoder.cache.capacity <= 512  # a narrow cache is kept for the next rows


def test_too_long_request_is_refused_alone(teacher):
    ok = TeacherRequest.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
    too_long = TeacherRequest.chat([{"role": "user", "content": "Hi"}], max_tokens=teacher.context_length)
    first, refused, last = teacher.generate_batch([ok, too_long, ok])
    assert isinstance(refused, TeacherError) and refused.status == 400
    assert first.choices and last.choices


def test_bfloat16_weights_decode(tiny_lm):
    t = LocalTeacher(str(tiny_lm), dtype="bfloat16", batch_size=2)
    try:
        r = t.generate(TeacherRequest.chat([SYSTEM, {"role": "user", "content": "Hi"}], max_tokens=4, n=2, top_logprobs=2))
    finally:
        t.close()
    assert len(r.choices) == 2 and all(1 <= len(c.tokens) <= 4 for c in r.choices)
