import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayeskd.estimate import distributions as D


def rand_dist(rng, n, v):
    p = rng.dirichlet(np.ones(v) * 0.5, size=n)
    return p


def test_union_ids_removes_duplicates_and_keeps_first_order():
    a = np.array([[3, 1, 2], [0, 1, 2]])
    b = np.array([[2, 5, -1], [7, 0, 0]])
    u = D.union_ids(a, b)
    assert u.tolist() == [[3, 1, 2, -1, 5, -1], [0, 1, 2, 7, -1, -1]]


def test_expected_closed_form_on_a_hand_built_case():
    prior = np.array([[0.5, 0.25]])  # tail 0.25
    proxy = np.array([[0.1, 0.8]])  # tail 0.1
    post = D.expected(prior, proxy, kappa=np.array([3.0]), m=1.0)
    assert post[0].tolist() == pytest.approx([(3 * 0.5 + 0.1) / 4, (3 * 0.25 + 0.8) / 4])
    assert 1 - post.sum() == pytest.approx((3 * 0.25 + 0.1) / 4)


def test_expected_limits():
    rng = np.random.default_rng(0)
    prior, proxy = rand_dist(rng, 5, 7), rand_dist(rng, 5, 7)
    kappa = rng.uniform(1, 10, 5)
    assert np.allclose(D.expected(prior, proxy, kappa, m=0), prior)  # M = 0: the prior
    assert np.allclose(D.expected(prior, proxy, kappa * 1e-12, m=5), proxy)  # kappa -> 0: the proxy


def test_an_infinite_proxy_strength_is_the_proxy_alone_not_nan():
    rng = np.random.default_rng(2)
    prior, proxy = rand_dist(rng, 5, 7), rand_dist(rng, 5, 7)
    kappa = rng.uniform(1, 10, 5)
    post = D.expected(prior, proxy, kappa, m=np.inf)
    assert np.array_equal(post, proxy)
    counts = np.zeros_like(proxy)
    counts[:, 0] = 3
    # Teacher counts on top of an infinite strength do not move it (and give no inf / inf).
    assert np.array_equal(D.add_counts(post, counts, kappa + np.inf), proxy)
    assert np.isfinite(D.with_teacher_counts(prior, proxy, counts, kappa, m=np.inf)).all()


def test_sampled_converges_to_expected():
    rng = np.random.default_rng(1)
    v = 6
    prior, proxy = rand_dist(rng, 4, v), rand_dist(rng, 4, v)
    kappa = np.full(4, 2.0)
    exact = D.expected(prior, proxy, kappa, m=10**6)
    errors = []
    for m in (10, 1000, 10**6):
        counts = D.sample_counts(proxy, m, rng)
        errors.append(np.abs(D.sampled(prior, counts, kappa, m) - D.expected(prior, proxy, kappa, m)).max())
        assert D.sampled(prior, counts, kappa, m).sum(1) == pytest.approx(np.ones(4))
    assert errors[-1] < errors[0] and errors[-1] < 2e-3
    assert np.abs(D.sampled(prior, D.sample_counts(proxy, 10**6, rng), kappa, 10**6) - exact).max() < 2e-3


def test_teacher_counts_closed_form():
    prior = np.array([[0.6, 0.4, 0.0]])
    proxy = np.array([[0.2, 0.3, 0.5]])
    counts = np.array([[0, 2, 1]])
    post = D.with_teacher_counts(prior, proxy, counts, np.array([2.0]), m=4.0)
    assert post[0].tolist() == pytest.approx([(1.2 + 0.8) / 9, (0.8 + 1.2 + 2) / 9, (0 + 2 + 1) / 9])
    assert post.sum() == pytest.approx(1.0)


def test_product_is_normalised_with_the_tail_bucket():
    prior = np.array([[0.5, 0.3]])
    proxy = np.array([[0.2, 0.6]])
    post = D.product(prior, proxy, np.array([0.2]), np.array([0.2]), a=1.0, b=1.0)
    z = 0.5 * 0.2 + 0.3 * 0.6 + 0.2 * 0.2
    assert post[0].tolist() == pytest.approx([0.1 / z, 0.18 / z])
    assert 1 - post.sum() == pytest.approx(0.04 / z)


def test_evidence_keeps_the_api_probabilities_exactly():
    cand = np.array([[4, 2, 9, 1], [4, 2, 9, 1]])
    post = np.array([[0.4, 0.3, 0.2, 0.05], [0.4, 0.3, 0.2, 0.05]])  # tail 0.05
    ev_ids = np.array([[9, 4], [-1, -1]])
    ev_p = np.array([[0.5, 0.25], [0.0, 0.0]])
    out = D.apply_evidence(post, cand, ev_ids, ev_p)
    assert out[0, 2] == 0.5 and out[0, 0] == 0.25
    # the rest (0.25) is spread over token 2, token 1 and the tail in proportion 0.3 : 0.05 : 0.05
    assert out[0, 1] == pytest.approx(0.25 * 0.3 / 0.4)
    assert 1 - out[0].sum() == pytest.approx(0.25 * 0.05 / 0.4)
    assert np.array_equal(out[1], post[1])  # no evidence: unchanged


def test_top_k_sorts_and_moves_the_rest_to_the_tail():
    cand = np.array([[5, -1, 3, 8]])
    probs = np.array([[0.1, 0.0, 0.6, 0.2]])
    d = D.top_k(cand, probs, 2)
    assert d.ids.tolist() == [[3, 8]] and d.probs[0].tolist() == pytest.approx([0.6, 0.2])
    assert d.tail.tolist() == pytest.approx([0.2])
    dense = D.top_k(cand, probs, 4).dense(10)
    assert dense.sum() == pytest.approx(1.0) and dense[0, 3] == pytest.approx(0.6)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(2, 12), st.floats(0.0, 50.0), st.floats(0.01, 30.0), st.integers(0, 2**31))
def test_every_mode_is_a_distribution(n, v, m, kappa, seed):
    rng = np.random.default_rng(seed)
    prior, proxy = rand_dist(rng, n, v), rand_dist(rng, n, v)
    k = np.full(n, kappa)
    ids = np.tile(np.arange(v), (n, 1))
    outs = [
        D.expected(prior, proxy, k, m),
        D.sampled(prior, D.sample_counts(proxy, int(m), rng), k, int(m)),
        D.product(prior, proxy, np.zeros(n), np.zeros(n), 1.0, 1.0),
    ]
    for out in outs:
        d = D.top_k(ids, out, max(1, v // 2))
        assert np.all(d.probs >= 0) and np.all(d.tail >= 0)
        assert (d.probs.sum(1) + d.tail) == pytest.approx(np.ones(n))
        assert np.all(D.entropy(d) >= -1e-12)
