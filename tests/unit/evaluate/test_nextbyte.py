"""The next-byte measure: exact byte marginals of next-token distributions, on a real byte-level BPE."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bayeskd.evaluate import metrics as M
from bayeskd.evaluate import nextbyte
from bayeskd.models import build_tiny


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["the cat sat on the mat", "hello world", "café au lait"] * 30
    return AutoTokenizer.from_pretrained(build_tiny(tmp_path_factory.mktemp("nb"), texts, vocab_size=300))


def test_first_bytes_are_the_tokens_own_first_bytes(tok):
    firsts = nextbyte.first_bytes(tok)
    cat = tok.encode(" cat", add_special_tokens=False)
    assert len(cat) == 1 and firsts[cat[0]] == ord(" ")
    e_acute = tok.encode("é", add_special_tokens=False)  # bytes C3 A9; a byte-level token may hold either
    assert firsts[e_acute[0]] == 0xC3
    assert firsts[tok.eos_token_id] == nextbyte.EOS
    assert all(firsts[i] == -1 for i in tok.all_special_ids if i != tok.eos_token_id)
    for i in range(len(tok)):  # every ordinary token: its decoded bytes start with that byte, where they decode
        s = tok.decode([i])
        if i not in tok.all_special_ids and "\ufffd" not in s:
            assert s.encode()[0] == firsts[i]


def test_next_byte_sums_the_tokens_that_start_with_each_byte(tok):
    firsts = nextbyte.first_bytes(tok)
    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.dirichlet(np.ones(len(tok)), 3))
    q = nextbyte.next_byte(p, firsts)
    assert q.shape == (3, nextbyte.SYMBOLS) and np.allclose(q.sum(1), 1)
    keep = firsts >= 0
    by_hand = np.array([p[:, keep & (firsts == ord("t"))].sum(1).numpy()]).T / p[:, keep].sum(1, keepdim=True).numpy()
    assert np.allclose(q[:, [ord("t")]], by_hand)


def test_with_one_tokenizer_the_byte_kl_is_at_most_the_token_kl(tok):
    firsts = nextbyte.first_bytes(tok)
    rng = np.random.default_rng(1)
    p = torch.from_numpy(rng.dirichlet(np.full(len(tok), 0.1), 20))
    q = torch.from_numpy(rng.dirichlet(np.full(len(tok), 0.1), 20))
    keep = torch.from_numpy(firsts >= 0)
    p, q = p * keep / (p * keep).sum(1, keepdim=True), q * keep / (q * keep).sum(1, keepdim=True)  # no dropped specials
    kl_tok = M.kl_dense(p, q)
    kl_byte = M.kl_dense(nextbyte.next_byte(p, firsts), nextbyte.next_byte(q, firsts))
    assert (kl_byte <= kl_tok + 1e-9).all() and (kl_byte > 0).all()
    assert M.kl_dense(nextbyte.next_byte(p, firsts), nextbyte.next_byte(p, firsts)) == pytest.approx(0, abs=1e-12)


def test_token_starts_are_the_responses_offsets_and_the_end_of_turn(tok):
    record = {"messages": [{"role": "user", "content": "hello"}], "text": "the cat sat"}
    starts, ids = nextbyte.token_starts(record, tok)
    offsets = [o for _, o in starts]
    own = [a for a, _ in tok(record["text"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    assert offsets == own + [len(record["text"])]
    k_end = starts[-1][0]
    assert int(ids[0, k_end]) == tok.eos_token_id  # the distribution at the end is the one that predicts the EOS
