import email.utils
import time

import pytest

from bayeskd.teachers.base import TeacherError, TeacherRequest
from bayeskd.teachers.openai_compat import parse_chat, parse_completion, retry_after_seconds

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-x",
    "choices": [
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Hi!"},
            "finish_reason": "length",
            "logprobs": None,
        },
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "finish_reason": "stop",
            "logprobs": {
                "content": [
                    {
                        "token": "Hello",
                        "logprob": -0.25,
                        "bytes": [72],
                        "top_logprobs": [{"token": "Hello", "logprob": -0.25}, {"token": "Hi", "logprob": -1.75}],
                    }
                ]
            },
        },
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}

COMPLETION = {
    "object": "text_completion",
    "model": "m",
    "choices": [
        {
            "index": 0,
            "text": " world",
            "finish_reason": "length",
            "logprobs": {
                "tokens": [" world"],
                "token_logprobs": [-0.5],
                "top_logprobs": [{" there": -2.0, " world": -0.5}],
                "text_offset": [0],
            },
        }
    ],
    "usage": None,
}


def test_parse_chat_orders_choices_and_keeps_logprobs():
    r = parse_chat(CHAT)
    assert [c.text for c in r.choices] == ["Hello", "Hi!"]
    assert [c.finish_reason for c in r.choices] == ["stop", "length"]
    tok = r.choices[0].tokens[0]
    assert (tok.token, tok.logprob) == ("Hello", -0.25)
    assert tok.top == [("Hello", -0.25), ("Hi", -1.75)]
    assert r.choices[1].tokens is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total) == (12, 3, 15)


def test_parse_completion_sorts_top_alternatives_and_tolerates_missing_usage():
    r = parse_completion(COMPLETION)
    assert r.choices[0].text == " world"
    assert r.choices[0].tokens[0].top == [(" world", -0.5), (" there", -2.0)]
    assert r.usage.total == 0


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "message": {}}]},
    ],
)
def test_empty_content_is_a_retryable_error(body):
    with pytest.raises(TeacherError) as e:
        parse_chat(body)
    assert e.value.retryable


def test_retry_after_forms():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({}) is None
    date = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.0 <= retry_after_seconds({"retry-after": date}) <= 5.5


def test_request_validation():
    with pytest.raises(ValueError, match="exactly one of messages or prompt"):
        TeacherRequest()
    with pytest.raises(ValueError, match="top_logprobs=21"):
        TeacherRequest(prompt="x", top_logprobs=21)
    r = TeacherRequest.chat([{"role": "user", "content": "hi"}], n=2)
    assert r.message_dicts() == [{"role": "user", "content": "hi"}]
    assert hash(r) == hash(TeacherRequest.chat([{"role": "user", "content": "hi"}], n=2))


def _chat_body(*choices: tuple[str, str], completion_tokens: int) -> dict:
    """A chat body with (text, finish_reason) choices and 9 prompt tokens."""
    return {
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                    for i, (text, finish) in enumerate(choices)],  # fmt: skip
        "usage": {"prompt_tokens": 9, "completion_tokens": completion_tokens},
    }


def test_what_an_answer_may_lack():
    from bayeskd.teachers.openai_compat import _checked

    one, two, three = (TeacherRequest.chat([{"role": "user", "content": "hi"}], n=n) for n in (1, 2, 3))
    # An immediate end of turn, as llama.cpp reports it: a valid sample (the EOS).
    assert _checked(parse_chat, _chat_body(("", "stop"), completion_tokens=0), one).choices[0].text == ""
    # One choice for n = 2: a server that ignores n; the caller asks for the rest.
    assert len(_checked(parse_chat, _chat_body(("a", "stop"), completion_tokens=1), two).choices) == 1
    # Nothing and not an end of turn, or a count that is neither n nor 1: refused, retryably, with what was paid.
    for body, request in [(_chat_body(("", "length"), completion_tokens=0), one),
                          (_chat_body(("a", "stop"), ("b", "stop"), completion_tokens=2), three)]:  # fmt: skip
        with pytest.raises(TeacherError) as e:
            _checked(parse_chat, body, request)
        assert e.value.retryable and e.value.usage.prompt_tokens == 9


def test_a_sampled_token_added_to_the_alternatives_is_not_stored_as_one_of_the_top_k():
    """llama.cpp lists the sampled token as a k + 1-th alternative when it is outside the top k."""
    from bayeskd.teachers.openai_compat import _checked

    request = TeacherRequest.chat([{"role": "user", "content": "hi"}], top_logprobs=2)
    body = _chat_body(("x", "stop"), completion_tokens=1)
    alts = [("a", -0.5), ("b", -1.0), ("x", -4.0)]  # the sampled "x" is third
    body["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": -4.0,
                                                   "top_logprobs": [{"token": s, "logprob": lp} for s, lp in alts]}]}  # fmt: skip
    (token,) = _checked(parse_chat, body, request).choices[0].tokens
    assert token.top == [("a", -0.5), ("b", -1.0)]  # the top 2: "b" still bounds every unlisted token
    assert (token.token, token.logprob) == ("x", -4.0)  # the sampled token's own logprob is kept on the token
