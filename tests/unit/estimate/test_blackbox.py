"""Black-box fidelity: the teacher's own samples rank estimates as the oracle KL does, and the fit's closed form."""

import numpy as np
import pytest
import torch

from bayeskd.estimate import blackbox, ngram
from bayeskd.estimate.prior import NGramPrior
from bayeskd.estimate import distributions as D
from bayeskd.evaluate import metrics as M

V = 12


def test_the_teachers_samples_rank_estimates_as_the_oracle_kl_does(teacher_logits):
    """A real tiny teacher: its next-token distributions at every response position of the corpus, and
    tokens drawn from them (what its API returns). Five estimates of it at known distances: the
    black-box NLL of the drawn tokens orders them exactly as KL(p_T || q) does."""
    z = teacher_logits
    p_t = torch.softmax(z, -1)
    gen = torch.Generator().manual_seed(0)
    samples = 8  # the teacher sampled 8 times at each prefix
    y = torch.multinomial(p_t, samples, replacement=True, generator=gen)
    vocab = p_t.shape[1]
    estimates = {
        "teacher, a little smoothed": 0.9 * p_t + 0.1 / vocab,
        "teacher at temperature 1.5": torch.softmax(z / 1.5, -1),
        "half teacher, half uniform": 0.5 * p_t + 0.5 / vocab,
        "teacher at temperature 3": torch.softmax(z / 3, -1),
        "uniform": torch.full_like(p_t, 1 / vocab),
    }
    kl = [float(M.kl_dense(p_t, q).mean()) for q in estimates.values()]
    bb = [blackbox.nll(q.gather(1, y).numpy().ravel()) for q in estimates.values()]
    assert len(y) > 200
    assert blackbox.kendall_tau(bb, kl) == 1.0, dict(zip(estimates, zip(bb, kl)))
    # In expectation the NLL is H(p_T) + KL: the same offset for every estimate.
    entropy = float(-(p_t * p_t.clamp_min(1e-30).log()).sum(-1).mean())
    np.testing.assert_allclose(np.array(bb) - entropy, kl, atol=0.15)


@pytest.fixture(scope="module")
def prior():
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, V, 3), rng.integers(0, V, 30)) for _ in range(20)]
    return NGramPrior(ngram.count(docs, 3, V), mu=2.0), docs


@pytest.mark.parametrize("m", [0.0, 3.0, float("inf")])
def test_the_fits_closed_form_equals_the_dense_posterior_at_the_realised_token(prior, m):
    """posterior_at_y, from values at the realised token and the API's top-k only, against the dense
    expected update with the evidence applied (distributions.apply_evidence) over the whole vocabulary."""
    model, docs = prior
    ctx, y = ngram.corpus_contexts(docs[:3], 3, V)
    n = len(y)
    rng = np.random.default_rng(1)
    p_proxy = torch.softmax(torch.randn(n, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64), -1).numpy()
    ev_ids = np.full((n, 3), -1)
    ev_p = np.zeros((n, 3))
    for i in range(0, n, 2):  # every other position has the API's top-2 (sometimes the realised token)
        ids = rng.choice(V, 2, replace=False)
        ev_ids[i, :2], ev_p[i, :2] = ids, [0.4, 0.25]
    cand = np.concatenate([y[:, None].astype(np.int64), ev_ids], 1)
    pos = blackbox.Positions(ctx, cand, {1.0: ev_p}, {1.0: np.take_along_axis(p_proxy, np.where(cand >= 0, cand, 0), 1)})
    kappa = model.query(ctx, 1).kappa
    got = blackbox.posterior_at_y(model.prob(ctx, np.where(cand >= 0, cand, 0)), kappa, m, 1.0, pos)
    p_prior = model.dense(ctx)
    post = D.expected(p_prior, p_proxy, kappa, m)  # M = inf: the proxy alone
    want = D.apply_evidence(post, np.tile(np.arange(V), (n, 1)), ev_ids, ev_p)[np.arange(n), y]
    np.testing.assert_allclose(got, want, rtol=1e-9)
