"""The posterior at the level of the stage: real n-gram prior, real proxy logits, real tokenizer."""

import numpy as np
import pytest
import torch

from bayeskd.estimate import ngram
from bayeskd.estimate.prior import NGramPrior
from bayeskd.estimate.config import PosteriorConfig
from bayeskd.estimate.distributions import SparseDist
from bayeskd.errors import BayeskdError
from bayeskd.estimate.evidence import EvidenceMapper
from bayeskd.models import build_tiny
from bayeskd.estimate.update import estimate
from bayeskd.estimate.targets import TargetStore, TargetWriter

V = 12


@pytest.fixture(scope="module")
def prior():
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, V, 3), rng.integers(0, V, 30)) for _ in range(20)]
    return NGramPrior(ngram.count(docs, 3, V), mu=2.0), docs


def dense(d: SparseDist) -> np.ndarray:
    out = np.zeros((len(d.ids), V))
    for i in range(len(d.ids)):
        for j, p in zip(d.ids[i], d.probs[i]):
            if j >= 0:
                out[i, j] += p
    return out


def setup(prior, n=6, seed=1):
    model, docs = prior
    ctx, tgt = ngram.corpus_contexts(docs[:2], 3, V)
    logits = torch.randn(len(ctx), V, generator=torch.Generator().manual_seed(seed)) * 2
    return model, ctx[:n], tgt[:n], logits[:n]


def test_expected_equals_the_closed_form_with_k_equal_v(prior):
    model, ctx, tgt, z = setup(prior)
    cfg = PosteriorConfig(mode="expected", m=3.0, top_k=V)
    dists, ent = estimate(model, ctx, tgt, z, cfg, k_prior=V)
    p_prior = model.dense(ctx, targets=tgt)
    kappa = model.query(ctx, V, targets=tgt).kappa[:, None]
    p_proxy = torch.softmax(z.double(), -1).numpy()
    want = (kappa * p_prior + 3.0 * p_proxy) / (kappa + 3.0)
    assert np.allclose(dense(dists["posterior"]), want, atol=1e-6)
    assert np.allclose(dists["posterior"].tail, 0, atol=1e-6)
    assert np.all(ent > 0)


def test_m_zero_is_the_prior_and_small_kappa_is_the_proxy(prior):
    model, ctx, tgt, z = setup(prior)
    post = estimate(model, ctx, None, z, PosteriorConfig(m=0.0, top_k=V), k_prior=V)[0]["posterior"]
    assert np.allclose(dense(post), model.dense(ctx), atol=1e-6)
    post = estimate(model, ctx, None, z, PosteriorConfig(m=1e9, top_k=V), k_prior=V)[0]["posterior"]
    assert np.allclose(dense(post), torch.softmax(z.double(), -1).numpy(), atol=1e-6)


@pytest.mark.parametrize("mode", ["expected", "sampled"])
def test_m_inf_is_the_proxy_alone_and_writes_finite_targets(prior, mode, tmp_path):
    """posterior.m = .inf (a point of posterior.fit_m) used to give NaN rows that the writer refused."""
    model, ctx, tgt, z = setup(prior)
    dists, ent = estimate(model, ctx, tgt, z, PosteriorConfig(mode=mode, m=float("inf"), top_k=V), k_prior=V,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert np.allclose(dense(dists["posterior"]), torch.softmax(z.double(), -1).numpy(), atol=1e-6)
    writer = TargetWriter(tmp_path / "t", ("prior", "posterior", "proxy"), V)
    writer.add(0, dists, ent)
    writer.close({})
    assert np.isfinite(TargetStore.open(tmp_path / "t").rows(0, "posterior_probs").astype(float)).all()


def test_stored_rows_never_sum_above_one(tmp_path):
    """float16 rounds 0.6 up to 0.60009...: rounded to nearest, rows of such values summed above 1
    and the tail (clipped at 0) could not absorb it. Stored values are rounded toward zero."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(8, 0.3), size=4000)
    probs[0] = [0.6, 0.2, 0.1, 0.1, 0, 0, 0, 0]
    assert (probs.astype(np.float16).astype(np.float64).sum(1) > 1).any()  # the failure this guards against
    ids = np.tile(np.arange(8, dtype=np.int32), (len(probs), 1))
    writer = TargetWriter(tmp_path / "t", ("posterior",), 8)
    writer.add(0, {"posterior": SparseDist(ids, probs, np.zeros(len(probs)))}, np.zeros(len(probs)))
    writer.close({})
    store = TargetStore.open(tmp_path / "t")
    stored = store.rows(0, "posterior_probs").astype(np.float64)
    tail = store.rows(0, "posterior_tail").astype(np.float64)
    assert (stored.sum(1) <= 1.0).all() and (tail >= 0).all()
    np.testing.assert_allclose(stored.sum(1) + tail, 1.0, atol=1e-6)
    np.testing.assert_allclose(stored, probs, atol=1e-3)


@pytest.mark.parametrize("mode", ["expected", "sampled", "product"])
def test_each_mode_is_a_distribution_with_its_tail(prior, mode):
    model, ctx, tgt, z = setup(prior)
    dists, _ = estimate(model, ctx, tgt, z, PosteriorConfig(mode=mode, m=16.0, top_k=4), k_prior=4,
                        generator=torch.Generator().manual_seed(0))
    for d in dists.values():
        assert np.allclose(d.probs.sum(1) + d.tail, 1.0, atol=1e-6)
        assert np.all(d.tail >= 0) and np.all(np.diff(d.probs, axis=1) <= 1e-12)


def test_sampled_converges_to_expected(prior):
    model, ctx, tgt, z = setup(prior)
    exp = dense(estimate(model, ctx, tgt, z, PosteriorConfig(mode="expected", m=4000.0, top_k=V), V)[0]["posterior"])
    errs = []
    for m in (20, 4000):
        cfg = PosteriorConfig(mode="sampled", m=float(m), top_k=V)
        d = estimate(model, ctx, tgt, z, cfg, V, generator=torch.Generator().manual_seed(3))[0]["posterior"]
        e = dense(estimate(model, ctx, tgt, z, PosteriorConfig(mode="expected", m=float(m), top_k=V), V)[0]["posterior"])
        errs.append(np.abs(dense(d) - e).max())
    assert errs[1] < errs[0] and errs[1] < 0.03
    assert exp.shape == (len(ctx), V)


def test_evidence_keeps_the_api_probabilities_on_mapped_tokens(prior):
    model, ctx, tgt, z = setup(prior, n=2)
    ev_ids = np.array([[3, 7, -1], [-1, -1, -1]])
    ev_p = np.array([[0.5, 0.2, 0.0], [0.0, 0.0, 0.0]])
    post = estimate(model, ctx, tgt, z, PosteriorConfig(m=2.0, top_k=V), V, evidence=(ev_ids, ev_p))[0]["posterior"]
    d = dense(post)
    assert d[0, 3] == pytest.approx(0.5) and d[0, 7] == pytest.approx(0.2)
    assert d[0].sum() + post.tail[0] == pytest.approx(1.0)
    plain = dense(estimate(model, ctx, tgt, z, PosteriorConfig(m=2.0, top_k=V), V)[0]["posterior"])
    assert np.allclose(d[1], plain[1])
    others = [w for w in range(V) if w not in (3, 7)]
    assert np.allclose(d[0, others] / d[0, others].sum(), plain[0, others] / plain[0, others].sum())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = build_tiny(tmp_path_factory.mktemp("tok"), ["the cat sat on the mat", "hello world"] * 30, vocab_size=300)
    return AutoTokenizer.from_pretrained(folder)


def test_evidence_mapping_aligns_by_characters(tok):
    mapper = EvidenceMapper(tok)
    text = "the cat"
    tokens = [
        {"token": "the", "logprob": -0.1, "top": [["the", -0.1], ["a", -2.5]]},
        {"token": " cat", "logprob": -0.3, "top": [[" cat", -0.3], [" mat", -1.9], [" cat sat", -3.0]]},
    ]
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = list(enc["offset_mapping"])
    ids, probs = mapper.evidence(text, tokens, spans)
    first = spans.index((0, 3)) if (0, 3) in spans else None
    assert first is not None, spans
    the_id = tok.encode("the", add_special_tokens=False)[0]
    assert ids[first, 0] == the_id and probs[first, 0] == pytest.approx(np.exp(-0.1))
    cat_pos = [j for j, (a, _) in enumerate(spans) if a == 3]
    assert cat_pos, spans
    row = dict(zip(ids[cat_pos[0]], probs[cat_pos[0]]))
    cat_id = tok.encode(" cat", add_special_tokens=False)[0]
    # " cat" and " cat sat" share their first student token: their probabilities add up.
    assert row[cat_id] == pytest.approx(np.exp(-0.3) + np.exp(-3.0))
    s = mapper.summary()
    assert s["positions_with_evidence"] == 2 and s["alternatives_first_token_credited"] >= 1


def test_evidence_keeps_the_api_top_n_and_the_sampled_token_only_when_asked(tok):
    """`top` keeps the n most probable alternatives, as an API that returns n would; `sampled=False`
    leaves out the sampled token's own logprob (black-box scoring must not see the scored token)."""
    mapper = EvidenceMapper(tok)
    text = "the"
    tokens = [{"token": "the", "logprob": -3.0, "top": [["a", -2.5], ["hello", -0.7], ["cat", -1.6]]}]
    spans = [(0, 3)]
    enc = {w: tok.encode(w, add_special_tokens=False)[0] for w in ("the", "a", "hello", "cat")}

    def got(**kw) -> dict:
        ids, probs = mapper.evidence(text, tokens, spans, **kw)
        return {int(i): float(p) for i, p in zip(ids[0], probs[0]) if i >= 0}

    assert got() == pytest.approx({enc["hello"]: np.exp(-0.7), enc["cat"]: np.exp(-1.6), enc["a"]: np.exp(-2.5),
                                   enc["the"]: np.exp(-3.0)})  # fmt: skip
    assert got(top=2) == pytest.approx({enc["hello"]: np.exp(-0.7), enc["cat"]: np.exp(-1.6), enc["the"]: np.exp(-3.0)})
    assert got(top=2, sampled=False) == pytest.approx({enc["hello"]: np.exp(-0.7), enc["cat"]: np.exp(-1.6)})


def test_misaligned_teacher_tokens_give_no_evidence_after_the_break(tok):
    mapper = EvidenceMapper(tok)
    text = "hello world"
    tokens = [{"token": "hello", "logprob": -0.1, "top": []}, {"token": "\ufffd", "logprob": -1.0, "top": []}]
    spans = list(tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"])
    ids, _ = mapper.evidence(text, tokens, spans)
    assert (ids[:, 0] >= 0).sum() == 1 and mapper.summary()["records_misaligned"] == 1


def test_target_store_round_trips_and_rejects_mismatches(tmp_path):
    rng = np.random.default_rng(0)
    writer = TargetWriter(tmp_path / "t", ("prior", "posterior"), k=4, shard_rows=5)
    written = {}
    for rec in (3, 0, 7):
        n = int(rng.integers(1, 4))
        ids = rng.integers(0, 50, (n, 4)).astype(np.int32)
        p = rng.dirichlet(np.ones(5), n)[:, :4]
        d = SparseDist(ids, p, 1 - p.sum(1))
        writer.add(rec, {"prior": d, "posterior": d}, np.ones(n))
        written[rec] = d
    writer.close({"tokenizer": "tokA", "corpus": "c1"})
    store = TargetStore.open(tmp_path / "t")
    assert len(list((tmp_path / "t").glob("shard-*"))) >= 2
    for rec, d in written.items():
        got = store.table("posterior").example(rec, len(d.ids))
        assert np.array_equal(got.ids.numpy(), d.ids)
        assert np.allclose(got.probs.numpy(), d.probs, atol=1e-3)
        assert np.allclose(got.probs.numpy().sum(1) + got.tail.numpy(), 1.0, atol=1e-6)
    assert store.bytes_per_entry("posterior") <= 7
    store.check("tokA", "c1")
    with pytest.raises(BayeskdError, match="another tokenizer"):
        store.check("tokB", "c1")
    with pytest.raises(BayeskdError, match="another corpus"):
        store.check("tokA", "c2")
    with pytest.raises(BayeskdError, match="no 'proxy' targets"):
        store.table("proxy")


@pytest.mark.parametrize("mode", ["expected", "sampled", "product"])
def test_teacher_counts_update_the_posterior_by_the_closed_form(prior, mode):
    """(kappa p_prior + M p_P + c_T) / (kappa + M + n_T): with K = V the stored posterior is exact."""
    model, ctx, tgt, logits = setup(prior)
    cfg = PosteriorConfig(mode=mode, m=8, top_k=V)
    rng = np.random.default_rng(3)
    c_ids = np.stack([rng.choice(V, 3, replace=False) for _ in range(len(ctx))])
    c_n = rng.integers(1, 5, size=c_ids.shape).astype(float)
    c_ids[0, 2], c_n[0, 2] = -1, 0.0  # an unused slot
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731  the same proxy draws with and without counts
    base, _ = estimate(model, ctx, tgt, logits, cfg, V, generator=gen())
    got, _ = estimate(model, ctx, tgt, logits, cfg, V, generator=gen(), teacher_counts=(c_ids, c_n))
    kappa = model.query(ctx, 1, targets=tgt).kappa[:, None]
    strength = kappa + (0 if mode == "product" else cfg.m)
    counts = np.zeros((len(ctx), V))
    for i in range(len(ctx)):
        for w, n in zip(c_ids[i], c_n[i]):
            if w >= 0:
                counts[i, w] += n
    want = (strength * dense(base["posterior"]) + counts) / (strength + counts.sum(1, keepdims=True))
    np.testing.assert_allclose(dense(got["posterior"]), want, atol=1e-9)
    if mode == "expected":  # the same as the method's formula written out
        p_prior = model.dense(ctx, targets=tgt)
        p_proxy = torch.softmax(logits.double(), -1).numpy()
        formula = (kappa * p_prior + cfg.m * p_proxy + counts) / (kappa + cfg.m + counts.sum(1, keepdims=True))
        np.testing.assert_allclose(dense(got["posterior"]), formula, atol=1e-9)
