"""One target distribution: the teacher as `collect` sampled it (temperature, top-p), and raw API logprobs converted to it."""

import numpy as np
import pytest
import torch

from bayeskd.estimate import blackbox
from bayeskd.estimate import distributions as D
from bayeskd.evaluate import metrics as M
from bayeskd.estimate.update import evidence_in_target, topk_targets
from bayeskd.teachers.decoding import Row, sample, sampling_probs


def nucleus(z: np.ndarray, t: float, top_p: float) -> np.ndarray:
    """A plain reference of the sampled distribution: softmax(z / t), tokens kept while the mass before them < top_p."""
    q = np.exp(z / t - (z / t).max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    order = np.argsort(-q, 1)
    sq = np.take_along_axis(q, order, 1)
    keep_sorted = np.cumsum(sq, 1) - sq < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, 1)
    out = np.where(keep, q, 0.0)
    return out / out.sum(1, keepdims=True)


def test_the_decoders_draws_follow_sampling_probs():
    """The oracle's distribution is the one the local teacher draws from: empirical frequencies of `sample`."""
    z = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    rng = np.random.default_rng(0)
    n = 20000
    rows = [Row(key=i, prompt=[0], temperature=0.7, top_p=0.9, uniforms=[float(rng.random())]) for i in range(n)]
    drawn = sample(z.repeat(n, 1), rows).numpy()
    freq = np.bincount(drawn, minlength=6) / n
    want = sampling_probs(z, 0.7, 0.9)[0].numpy()
    np.testing.assert_allclose(freq, want, atol=0.01)
    assert want[-2:].sum() == 0  # outside the nucleus: never drawn
    np.testing.assert_allclose(want, nucleus(z.numpy(), 0.7, 0.9)[0], atol=1e-6)


@pytest.mark.parametrize("t, top_p", [(0.7, 1.0), (1.0, 0.9), (0.7, 0.9), (1.4, 0.8)])
def test_raw_topk_converted_with_the_exact_shape_is_exact(t, top_p):
    """Temperature: exact when the unlisted mass's shape is known. Top-p: exact where the nucleus
    closes among the listed tokens; elsewhere its mass is taken as top_p (error at most the largest
    unlisted probability)."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 40)) * 2.5
    raw = np.exp(z - z.max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    target = nucleus(z, t, top_p)
    tempered = nucleus(z, t, 1.0)
    ids = np.argsort(-raw, 1)[:, :5]
    got = D.to_sampling(np.take_along_axis(raw, ids, 1), D.Sampling(t, top_p), D.tail_power(tempered, ids, t))
    want = np.take_along_axis(target, ids, 1)
    closed = np.take_along_axis(tempered, ids, 1).sum(1) >= top_p + 1e-4
    # (a nucleus that closes within 1e-4 of top_p is taken as open: off by at most that share)
    np.testing.assert_allclose(got[closed], want[closed], rtol=2e-4, atol=1e-12)
    largest_unlisted = np.sort(tempered, 1)[:, -6]
    assert (np.abs(got - want).max(1)[~closed] <= largest_unlisted[~closed] / top_p + 1e-12).all()
    if top_p == 1.0:
        np.testing.assert_allclose(got, want, atol=1e-12)
    # The identity changes nothing, and no evidence stays no evidence.
    ev = np.take_along_axis(raw, ids, 1)
    assert np.array_equal(D.to_sampling(ev, D.Sampling(), 1.0), ev)
    assert not D.to_sampling(np.zeros((2, 5)), D.Sampling(t, top_p)).any()


def test_greedy_collect_targets_the_argmax():
    ev = np.array([[0.5, 0.2, 0.1], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(D.to_sampling(ev, D.Sampling(0.0, 1.0)), [[1, 0, 0], [0, 0, 0]])


def test_at_t07_top_p09_the_posterior_with_logprobs_is_closest_and_the_black_box_ranks_as_the_oracle(teacher_logits):
    """A real tiny teacher collected at T = 0.7, top_p = 0.9 (the declared target), with an API that
    reports its raw top-5. Estimates: an imperfect proxy; the posterior (the proxy updated with the
    converted top-5, as the posterior stage does); the same with the raw top-5 pinned as they are
    (what the code did before); the API's top-5 alone (topk-kd's target). The converted posterior
    is the closest to the target, and the NLL of the teacher's sampled tokens (no oracle) orders
    the estimates as the oracle KL does."""
    z = teacher_logits * 4  # a sharper teacher than an untrained tiny model, so that top-p bites
    sampling = D.Sampling(0.7, 0.9)
    p_t = sampling_probs(z, *sampling).numpy()
    raw = torch.softmax(z, -1).numpy()
    n, vocab = p_t.shape
    gen = torch.Generator().manual_seed(0)
    y = torch.multinomial(torch.from_numpy(p_t), 8, replacement=True, generator=gen).numpy()
    noise = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    proxy = sampling_probs(z + 0.5 * noise, 0.7, 1.0).numpy()
    ids = np.argsort(-raw, 1)[:, :5]
    ev_raw = (ids, np.take_along_axis(raw, ids, 1))
    every = np.tile(np.arange(vocab), (n, 1))
    estimates = {
        "proxy": proxy,
        "posterior": D.apply_evidence(proxy, every, *evidence_in_target(ev_raw, sampling, proxy)),
        "posterior, raw logprobs pinned": D.apply_evidence(proxy, every, *ev_raw),
        "top-k alone": topk_targets(ev_raw, n, sampling).dense(vocab),
    }
    kl = {k: float(M.kl_dense(p_t, q).mean()) for k, q in estimates.items()}
    assert kl["posterior"] < min(kl["top-k alone"], kl["posterior, raw logprobs pinned"], kl["proxy"]), kl
    bb = {k: blackbox.nll(np.take_along_axis(q, y, 1).ravel()) for k, q in estimates.items()}
    assert n > 200
    assert blackbox.kendall_tau(list(bb.values()), list(kl.values())) == 1.0, (bb, kl)
