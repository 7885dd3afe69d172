"""bayeskd.estimate.ngram against a brute-force reference written with plain dictionaries."""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayeskd.estimate import kernels, ngram, prior
from bayeskd.estimate.prior import NGramPrior, table_summary
from bayeskd.estimate.ngram import NGramTable, contexts, corpus_contexts, count, link
from bayeskd.estimate.ngram_build import build, merge

# ----------------------------------------------------------------------------- reference


def ref_counts(docs, n, V, skip=None):
    """counts[k][context tuple][w] for orders k = 1..n (context length k-1); ``skip`` =
    (doc, t) leaves out that response position as a target."""
    counts = {k: defaultdict(Counter) for k in range(1, n + 1)}
    for d, (pre, resp) in enumerate(docs):
        seq = [V] * (n - 1) + list(pre) + list(resp)
        for t, w in enumerate(resp):
            if (d, t) == skip:
                continue
            pos = n - 1 + len(pre) + t
            for k in range(1, n + 1):
                counts[k][tuple(seq[pos - (k - 1):pos])][w] += 1
    return counts


def ref_dist(counts, ctx, n, V, mu):
    """(p over all V words, kappa) of the prior at context ``ctx`` (tuple, oldest first)."""
    uni = counts[1][()]
    N = sum(uni.values())
    p = [(uni[w] + 1) / (N + V) for w in range(V)]
    kappa = N + V
    for k in range(1, n):
        c = counts[k + 1].get(tuple(ctx[len(ctx) - k:]), Counter())
        nh = sum(c.values())
        p = [(c[w] + mu * p[w]) / (nh + mu) for w in range(V)]
        kappa = nh + mu
    return p, kappa


def table_dict(table):
    """The table's counts as {k: {context tuple: {w: count}}} (contexts unpacked)."""
    bits, out = ngram._bits(table.vocab_size), {}
    for k, o in enumerate(table.orders, 1):
        d = {}
        for r, key in enumerate(np.asarray(o.ctx).tolist()):
            ctx = tuple((key >> (bits * i)) & ((1 << bits) - 1) for i in range(k - 1))  # oldest first
            lo, hi = o.offsets[r], o.offsets[r + 1]
            d[ctx] = dict(zip(o.tok[lo:hi].tolist(), o.count[lo:hi].tolist()))
            assert o.ctx_count[r] == sum(d[ctx].values())
        out[k] = d
    return out


def ref_dict(counts):
    return {k: {h: dict(c) for h, c in cs.items()} for k, cs in counts.items()}


@st.composite
def corpora(draw, max_order=4):
    V = draw(st.integers(2, 7))
    n = draw(st.integers(1, max_order))
    tok = st.integers(0, V - 1)
    docs = draw(st.lists(st.tuples(st.lists(tok, max_size=4), st.lists(tok, max_size=8)), min_size=1, max_size=6))
    if not any(r for _, r in docs):
        docs.append(([], [draw(tok)]))
    mu = draw(st.floats(0.05, 20.0))
    return docs, n, V, mu


@contextmanager
def knob(name, value):
    """Temporarily set a module constant of the counting (`ngram`) or the queries (`prior`) (None:
    leave it). Lowering _MIN_SLICE splits even tiny batches across the prior's threads; lowering
    _GROUP splits a batch's contexts into groups (0: one context each)."""
    module = prior if hasattr(prior, name) else ngram
    old = getattr(module, name)
    setattr(module, name, old if value is None else value)
    try:
        yield
    finally:
        setattr(module, name, old)


def check_batch(batch, refs, K):
    """Compare a PriorBatch with reference distributions (ties: compare sorted probabilities)."""
    for b, (p, kappa) in enumerate(refs):
        top = sorted(p, reverse=True)[:K]
        np.testing.assert_allclose(batch.probs[b], top, atol=1e-9)
        np.testing.assert_allclose([p[i] for i in batch.ids[b]], batch.probs[b], atol=1e-9)
        assert len(set(batch.ids[b].tolist())) == K
        assert batch.tail[b] == pytest.approx(max(1 - sum(top), 0), abs=1e-9)
        assert batch.kappa[b] == pytest.approx(kappa)


# ----------------------------------------------------------------------------- contexts


def test_contexts_pad_with_bos_and_use_the_prompt():
    V = 10
    assert contexts([1, 2], [3, 4, 5], 4, V).tolist() == [[V, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert contexts([], [3, 4], 3, V).tolist() == [[V, V], [V, 3]]
    assert contexts([7, 8, 9], [3], 3, V).tolist() == [[8, 9]]
    assert contexts([1], [3, 4], 1, V).shape == (2, 0)


@given(corpora())
@settings(max_examples=40, deadline=None)
def test_corpus_contexts_match_per_document(case):
    docs, n, V, _ = case
    ctx, tgt = corpus_contexts(docs, n, V)
    want = [contexts(p, r, n, V) for p, r in docs]
    np.testing.assert_array_equal(ctx, np.concatenate(want))
    assert tgt.tolist() == [w for _, r in docs for w in r]


def test_rejects_out_of_range_tokens():
    with pytest.raises(ValueError):
        count([([], [5])], 2, 5)  # 5 is BOS, never a target


# ----------------------------------------------------------------------------- counting


@given(corpora())
@settings(max_examples=60, deadline=None)
def test_counts_match_reference(case):
    docs, n, V, _ = case
    table = count(docs, n, V)
    assert table_dict(table) == ref_dict(ref_counts(docs, n, V))
    assert table.total_tokens == sum(len(r) for _, r in docs)


@given(corpora())
@settings(max_examples=25, deadline=None)
def test_counts_with_unpacked_keys(case):
    docs, n, V, _ = case
    with knob("_PACK_BITS", 4):  # forces the dense-rank fallback of _group
        table = count(docs, n, V)
    assert table.equals(count(docs, n, V))


@given(corpora(), st.data())
@settings(max_examples=40, deadline=None)
def test_merge_equals_counting_at_once(case, data):
    docs, n, V, _ = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(docs)), max_size=3)))
    parts = [docs[a:b] for a, b in zip([0] + cuts, cuts + [len(docs)])]
    whole = count(docs, n, V)
    shards = [count(p, n, V) for p in parts]
    assert merge(shards).equals(whole)
    assert merge(shards, chunk_ngrams=data.draw(st.integers(1, 4))).equals(whole)


@given(corpora(), st.sampled_from([0, 64]), st.integers(1, 5))
@settings(max_examples=40, deadline=None)
def test_links_point_to_the_suffix_ngram(case, dense_rows, chunk):
    """low[x] indexes the n-gram (context without its oldest token, same w) in the order below,
    whichever way (dense maps or searchsorted) and in whatever chunks it was found."""
    docs, n, V, _ = case
    table, bits = count(docs, n, V), ngram._bits(V)
    want = [np.array(o.low) for o in table.orders]
    with knob("_DENSE_ROWS", dense_rows):
        link(table, chunk_ngrams=chunk, threads=2)
    for k in range(1, n):
        hi, lo = table.orders[k], table.orders[k - 1]
        np.testing.assert_array_equal(hi.low, want[k])
        lo_row = np.searchsorted(lo.offsets, hi.low, side="right") - 1
        hi_row = np.repeat(np.arange(len(hi.ctx)), np.diff(hi.offsets))
        np.testing.assert_array_equal(lo.tok[hi.low], hi.tok)
        np.testing.assert_array_equal(lo.ctx[lo_row], hi.ctx[hi_row] >> np.uint64(bits))


@given(st.lists(st.integers(0, 6), min_size=1, max_size=60), st.data())
@settings(max_examples=60, deadline=None)
def test_select_finds_the_order_statistic(values, data):
    t = data.draw(st.integers(0, len(values) - 1))
    a = np.array(values + [99.0], np.float64)  # a tail past n stays untouched
    assert kernels._select(a, len(values), t) == sorted(values)[t]
    assert sorted(a[:-1].tolist()) == sorted(values) and a[-1] == 99.0


def test_merge_streams_to_disk_and_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    V, n = 50, 4
    docs = [(rng.integers(0, V, rng.integers(0, 6)), rng.zipf(1.3, rng.integers(1, 40)) % V) for _ in range(200)]
    whole = count(docs, n, V)
    whole.save(tmp_path / "whole")
    loaded = NGramTable.load(tmp_path / "whole")
    assert isinstance(loaded.orders[2].tok, np.memmap) and loaded.linked and loaded.equals(whole)
    assert NGramTable.load(tmp_path / "whole", mmap=False).equals(whole)
    for i in range(4):
        count(docs[i::4], n, V).save(tmp_path / f"s{i}")
    shards = [NGramTable.load(tmp_path / f"s{i}") for i in range(4)]
    merged = merge(shards, tmp_path / "merged", chunk_ngrams=400)
    assert merged.equals(whole) and NGramTable.load(tmp_path / "merged").equals(whole)
    ctx, tgt = corpus_contexts(docs, n, V)
    a, b = NGramPrior(whole, mu=2.0).query(ctx, 8, tgt), NGramPrior(merged, mu=2.0).query(ctx, 8, tgt)
    np.testing.assert_array_equal(a.probs, b.probs)


@pytest.mark.parametrize("workers", [1, 2])
def test_build_in_shards_equals_count(tmp_path, workers):
    rng = np.random.default_rng(1)
    V, n = 30, 3
    docs = [(rng.integers(0, V, 3), rng.integers(0, V, rng.integers(0, 30))) for _ in range(60)]
    table = build(iter(docs), n, V, tmp_path / "t", shard_tokens=150, num_workers=workers, chunk_ngrams=64)
    assert table.equals(count(docs, n, V))
    assert not (tmp_path / "t" / "shards").exists()
    one = build(iter(docs), n, V, tmp_path / "one", shard_tokens=10**9)
    assert one.equals(table)


# ----------------------------------------------------------------------------- prior


@given(corpora(), st.data())
@settings(max_examples=50, deadline=None)
def test_query_matches_reference(case, data):
    docs, n, V, mu = case
    counts = ref_counts(docs, n, V)
    prior = NGramPrior(count(docs, n, V), mu=mu, threads=data.draw(st.sampled_from([1, 3])))
    with (knob("_MIN_SLICE", data.draw(st.sampled_from([None, 1]))),
          knob("_GROUP", data.draw(st.sampled_from([None, 0, 5])))):
        _check_query(prior, docs, n, V, mu, counts, data)


def _check_query(prior, docs, n, V, mu, counts, data):
    ctx, _ = corpus_contexts(docs, n, V)
    extra = data.draw(st.lists(st.lists(st.integers(0, V), min_size=n - 1, max_size=n - 1), max_size=4))
    ctx = np.concatenate([ctx, np.array(extra, dtype=np.int32).reshape(len(extra), n - 1)])
    refs = [ref_dist(counts, tuple(c), n, V, mu) for c in ctx.tolist()]
    full = prior.query(ctx, V)
    np.testing.assert_allclose(full.probs.sum(1) + full.tail, 1, atol=1e-12)
    np.testing.assert_allclose(full.tail, 0, atol=1e-12)
    check_batch(full, refs, V)
    K = data.draw(st.integers(1, V))
    check_batch(prior.query(ctx, K), refs, K)
    np.testing.assert_allclose(prior.dense(ctx), [p for p, _ in refs], atol=1e-12)
    w = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=len(ctx), max_size=len(ctx))))
    np.testing.assert_allclose(prior.prob(ctx, w), [p[i] for (p, _), i in zip(refs, w)], atol=1e-12)


@given(corpora(), st.data())
@settings(max_examples=50, deadline=None)
def test_leave_one_out_removes_exactly_one_count(case, data):
    docs, n, V, mu = case
    prior = NGramPrior(count(docs, n, V), mu=mu, threads=data.draw(st.sampled_from([1, 3])))
    with (knob("_MIN_SLICE", data.draw(st.sampled_from([None, 1]))),
          knob("_GROUP", data.draw(st.sampled_from([None, 0, 5])))):
        _check_loo(prior, docs, n, V, mu, data)


def _check_loo(prior, docs, n, V, mu, data):
    ctx, tgt = corpus_contexts(docs, n, V)
    where = [(d, t) for d, (_, r) in enumerate(docs) for t in range(len(r))]
    refs = [ref_dist(ref_counts(docs, n, V, skip=pos), tuple(c), n, V, mu) for pos, c in zip(where, ctx.tolist())]
    K = data.draw(st.integers(1, V))
    check_batch(prior.query(ctx, K, targets=tgt), refs, K)
    check_batch(prior.query(ctx, V, targets=tgt), refs, V)
    np.testing.assert_allclose(prior.dense(ctx, tgt), [p for p, _ in refs], atol=1e-12)
    np.testing.assert_allclose(prior.prob(ctx, tgt, tgt), [p[w] for (p, _), w in zip(refs, tgt)], atol=1e-12)


def test_lower_order_prior_and_leave_one_out_checks():
    docs = [([1, 2], [3, 4, 3, 4, 0]), ([], [1, 1, 2])]
    V, mu = 5, 1.5
    table = count(docs, 4, V)
    ctx, tgt = corpus_contexts(docs, 4, V)
    low = NGramPrior(table, mu=mu, order=2)
    ref = ref_counts(docs, 2, V)
    np.testing.assert_allclose(low.dense(ctx), [ref_dist(ref, tuple(c), 2, V, mu)[0] for c in ctx.tolist()])
    with pytest.raises(ValueError):
        NGramPrior(table, mu=mu).query(ctx, 3, targets=(tgt + 1) % V)  # not the corpus's own targets
    with pytest.raises(ValueError):
        NGramPrior(table, mu=mu, order=5)
    with pytest.raises(ValueError, match="top_k=0"):
        NGramPrior(table, mu=mu).query(ctx, 0)


def test_empty_batches():
    prior = NGramPrior(count([([1], [2, 3, 2])], 3, 5), mu=1.0)
    none = np.zeros((0, 2), np.int32)
    batch = prior.query(none, 2, targets=np.zeros(0, np.int32))
    assert batch.ids.shape == batch.probs.shape == (0, 2) and batch.tail.shape == batch.kappa.shape == (0,)
    assert prior.prob(none, np.zeros(0, np.int64)).shape == (0,)
    assert prior.prob(none, np.zeros((0, 3), np.int64), targets=np.zeros(0, np.int64)).shape == (0, 3)


@pytest.mark.parametrize("threads,group", [(1, None), (2, None), (2, 200)])
def test_query_at_realistic_sizes_matches_dense(threads, group):
    """Many successors per context (the kernel prunes successors by a running k-th count), a
    cache filled by the first call, batches split across threads, and contexts in groups."""
    rng = np.random.default_rng(2)
    V, n = 300, 4
    docs = [(rng.zipf(1.2, 5) % V, rng.zipf(1.2, rng.integers(20, 200)) % V) for _ in range(300)]
    prior = NGramPrior(count(docs, n, V), mu=3.0, threads=threads)
    ctx, tgt = corpus_contexts(docs, n, V)
    ctx, tgt = ctx[::7], tgt[::7]
    with knob("_MIN_SLICE", 16), knob("_GROUP", group):
        for targets in (None, tgt, None):
            _check_dense(prior, ctx, targets)


def _check_dense(prior, ctx, targets):
    batch, dense = prior.query(ctx, 16, targets), prior.dense(ctx, targets)
    np.testing.assert_allclose(batch.probs, -np.sort(-dense, axis=1)[:, :16], atol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(dense, batch.ids.astype(np.int64), 1), batch.probs, atol=1e-12)
    np.testing.assert_allclose(batch.tail, 1 - batch.probs.sum(1), atol=1e-12)


def test_summary():
    docs = [([1], [2, 3, 2, 3]), ([1], [2, 3])]
    V, mu = 4, 2.0
    table = count(docs, 2, V)
    s = table_summary(table, mu)
    # contexts of the 6 positions: 1,2,3,2,1,2 -> N(1)=2, N(2)=3, N(3)=1
    assert s["tokens"] == 6 and s["unique_contexts"] == [1, 3]
    assert s["share_context_seen_more_than_once"] == pytest.approx(5 / 6)
    assert s["mean_kappa"] == pytest.approx((4 + 9 + 1) / 6 + mu)
    _, tgt = corpus_contexts(docs, 2, V)
    kappa = NGramPrior(table, mu).query(corpus_contexts(docs, 2, V)[0], 2, tgt).kappa
    assert s["mean_kappa_loo"] == pytest.approx(kappa.mean())
