"""Reading a served proxy's echoed prompt logprobs (`estimate/served.py`), without a server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bayeskd.errors import BayeskdError
from bayeskd.estimate.config import PosteriorConfig
from bayeskd.estimate.served import ServedProxy

VOCAB = ["<s>", "a", "b", "c", "\ufffd", "\ufffd"]  # two byte fragments that decode alike


class Tok:
    bos_token, bos_token_id = "<s>", 0

    def __len__(self):
        return len(VOCAB)

    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids)


def proxy() -> ServedProxy:
    cfg = PosteriorConfig(proxy_backend="openai", proxy_base_url="http://proxy.example/v1", proxy_model="p")
    return ServedProxy(cfg, Tok())


def body(tokens, values, tops) -> dict:
    return {"choices": [{"index": 0, "text": "", "logprobs": {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops}}]}


def test_strings_and_token_ids_become_the_students_ids_and_the_rest_is_the_tail():
    p = proxy()
    ln = math.log
    # A server that put a BOS in front; the example is a b c, its response b c (n = 2).
    b = body(["<s>", "a", "b", "c"], [None, ln(0.5), ln(0.4), ln(0.3)],
             [None, {"a": ln(0.5)}, {"b": ln(0.4), "token_id:3": ln(0.2), "\ufffd": ln(0.1)}, {"c": ln(0.3), "a": ln(0.6)}])  # fmt: skip
    row = p.read(b, {"key": "r"}, [1, 2, 3], 2)
    np.testing.assert_allclose(row.token_logprobs, [ln(0.4), ln(0.3)])
    ids, probs, tail = row.dist
    assert ids[0].tolist() == [2, 3, -1] and np.allclose(probs[0], [0.4, 0.2, 0])  # U+FFFD: two ids, left in the tail
    assert ids[1].tolist() == [1, 3, -1] and np.allclose(probs[1], [0.6, 0.3, 0])
    np.testing.assert_allclose(tail, [0.4, 0.1])
    assert p.stats["unreadable_alternatives"] == 1 and p.stats["positions"] == 2


def test_another_tokenizer_is_refused_naming_the_endpoint():
    p = proxy()
    b = body(["a", "bc"], [None, -1.0], [None, {"bc": -1.0}])
    with pytest.raises(BayeskdError, match=r"proxy\.example.*record 'r'.*tokenizer is not the student's"):
        p.read(b, {"key": "r"}, [1, 2, 3], 2)
    b = body(["a", "c", "c"], [None, -1.0, -1.0], [None, {"c": -1.0}, {"c": -1.0}])
    with pytest.raises(BayeskdError, match="prompt token 1 is 'c' at the endpoint but 'b'"):
        p.read(b, {"key": "r"}, [1, 2, 3], 2)
    with pytest.raises(BayeskdError, match="no prompt logprobs"):
        p.read({"choices": [{"text": "", "logprobs": None}]}, {"key": "r"}, [1, 2, 3], 2)


def test_the_served_proxy_needs_an_endpoint_and_forbids_what_needs_dense_logits():
    with pytest.raises(BayeskdError, match="proxy_base_url"):
        PosteriorConfig(proxy_backend="openai", proxy_model="p").validate("posterior")
    base = dict(proxy_backend="openai", proxy_base_url="http://x/v1", proxy_model="p")
    for bad, field in ((dict(proxy_temperature=0.8), "proxy_temperature"), (dict(fit="auto"), "fit")):
        with pytest.raises(BayeskdError, match=field):
            PosteriorConfig(**base, **bad).validate("posterior")
    PosteriorConfig(**base).validate("posterior")
    # The local default keeps the stage fingerprints of runs made before the option existed.
    assert not any(k.startswith("proxy_") and k != "proxy_temperature" for k in PosteriorConfig().identity())
