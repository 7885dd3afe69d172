"""Batched, exact queries of the hierarchical Dirichlet prior of an n-gram table (`NGramPrior`): the
top-K of p_{n-1}(. | h) and kappa at many positions at once, with leave-one-out; and `summary`,
the corpus statistics of a table. The formulas are in `ngram`'s docstring."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bayeskd.estimate.ngram import NGramTable, _bits, _ragged_arange, _threads, link

_MIN_SLICE = 512  # queries give a thread at least this many contexts or pairs; tests lower it
_GROUP = 1 << 16  # extend_top reads the lower-order counts of at most this many successors at once; tests lower it


def _frozen(a: np.ndarray, dtype) -> np.ndarray:
    """A read-only ndarray view of ``a`` (memory maps stay mapped), converted only if its dtype
    differs."""
    v = np.asarray(a)
    v = (v.astype(dtype) if v.dtype != dtype else v).view()
    v.flags.writeable = False
    return v


# ----------------------------------------------------------------------------- queries


@dataclass
class PriorBatch:
    """Top-K of the prior at B positions: ids [B, K] int32 (by probability, descending),
    probs [B, K] float64, tail [B] float64 = 1 - probs.sum(1) (mass outside the top-K),
    kappa [B] float64 (Dirichlet concentration)."""

    ids: np.ndarray
    probs: np.ndarray
    tail: np.ndarray
    kappa: np.ndarray


@dataclass
class _Level:
    """Distinct contexts of length j in a batch: keys [U] sorted, inv [B] (row -> index),
    parent [U] (index of the suffix h_{j-1} at level j-1), row [U] in table order j+1,
    found [U], n_h [U] float64 N(h) (0 when unseen)."""

    keys: np.ndarray
    inv: np.ndarray
    parent: np.ndarray
    row: np.ndarray
    found: np.ndarray
    n_h: np.ndarray


class NGramPrior:
    """Batched queries of the hierarchical Dirichlet prior p_{n-1}(. | h) of a table.

    ``order`` (default: the table's) may be lower than the table's; contexts [B, m] need
    m >= order-1 columns (oldest first) and only the last order-1 are used. ``threads``
    (default: the CPUs this process may use) run the compiled loops on slices of a batch. An unlinked table
    is linked first (see ``link``)."""

    def __init__(self, table: NGramTable, mu: float, order: int | None = None, smoothing: str = "dirichlet",
                 threads: int | None = None) -> None:
        if smoothing != "dirichlet":
            raise ValueError(f"smoothing={smoothing!r}: only 'dirichlet' is implemented")
        self.order = table.order if order is None else int(order)
        if not 1 <= self.order <= table.order:
            raise ValueError(f"order={order}: must lie in [1, {table.order}]")
        if not mu > 0:
            raise ValueError(f"mu={mu}: must be > 0")
        self.table, self.mu, self.smoothing = table, float(mu), smoothing
        self.V, self.N = table.vocab_size, table.total_tokens
        uni = table.orders[0]
        self._uni = np.zeros(self.V)
        self._uni[np.asarray(uni.tok)] = uni.count
        self._rank = np.argsort(-self._uni, kind="stable").astype(np.int32)  # ids by N(w), descending
        self._cache: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.threads = _threads(threads)
        from bayeskd.estimate import kernels  # numba: imported (and compiled, or read from its cache) by queries only

        self._kernels = kernels
        if not table.linked:
            link(table)
        dts = {"offsets": np.int64, "tok": np.int32}
        dts |= {f: np.result_type(*(getattr(o, f).dtype for o in table.orders)) for f in ("count", "low")}
        self._arrays = tuple(tuple(_frozen(getattr(o, f), dt) for o in table.orders) for f, dt in dts.items())
        self._ctx = tuple(_frozen(o.ctx, np.uint64) for o in table.orders)

    def _levels(self, contexts: np.ndarray) -> list[_Level]:
        c = np.asarray(contexts)
        n1 = self.order - 1
        if c.ndim != 2 or c.shape[1] < n1:
            raise ValueError(f"contexts must be [B, >= {n1}], got shape {c.shape}")
        if c.size and (c.min() < 0 or c.max() > self.V):
            raise ValueError(f"context ids must lie in [0, {self.V}] ({self.V} = BOS)")
        B, bits = len(c), np.uint64(_bits(self.V))
        zero = np.zeros(1, np.int64)
        levels = [_Level(np.zeros(1, np.uint64), np.zeros(B, np.int64), zero, zero, np.ones(1, bool),
                         np.array([float(self.N)]))]
        key = np.zeros(B, np.uint64)
        for j in range(1, n1 + 1):
            key = (key << bits) | c[:, c.shape[1] - j].astype(np.uint64)
            u, inv = np.unique(key, return_inverse=True)
            parent = np.searchsorted(levels[-1].keys, u >> bits)
            ctx, row = self._ctx[j], np.empty(len(u), np.int64)
            self._parallel(len(u), lambda a, b: self._kernels.search_sorted(ctx, u[a:b], row[a:b]))
            row = np.minimum(row, max(len(ctx) - 1, 0))
            found = ctx[row] == u if len(ctx) else np.zeros(len(u), bool)
            n_h = np.where(found, self.table.orders[j].ctx_count[row] if len(ctx) else 0, 0).astype(np.float64)
            levels.append(_Level(u, inv.ravel(), parent, row, found, n_h))
        return levels

    def _slices(self, lv: list[_Level], j: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Successor range [lo, hi) in table order j+1 of level-j contexts u (empty when unseen)."""
        off, L = self.table.orders[j].offsets, lv[j]
        lo = np.where(L.found[u], off[L.row[u]], 0)
        return lo, np.where(L.found[u], off[L.row[u] + 1], 0)

    def _chain(self, lv: list[_Level], j: int, u: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [U, j+1] int64 and normalisers [U, j+1] of level-j contexts u and their suffixes
        (column i: the level-i suffix; -1 where unseen), as the kernels read them."""
        rows, dens = np.full((len(u), j + 1), -1, np.int64), np.ones((len(u), j + 1))
        for i in range(j, 0, -1):
            L = lv[i]
            rows[:, i] = np.where(L.found[u], L.row[u], -1)
            dens[:, i] = L.n_h[u] - s + self.mu
            u = L.parent[u]
        return rows, dens

    def _table_args(self, s: int) -> tuple:
        """What the kernels take after their own arguments: the table's arrays, the unigram
        counts N(w), the unigram normaliser N - s + V and mu."""
        return (*self._arrays, self._uni, float(self.N - s + self.V), self.mu)

    def _parallel(self, n: int, fn) -> None:
        """fn(a, b) over slices [a, b) of n items, in up to ``threads`` threads (the kernels
        release the GIL)."""
        parts = min(self.threads, max(n // _MIN_SLICE, 1))
        if parts == 1:
            fn(0, n)
            return
        cuts = np.linspace(0, n, parts + 1).astype(np.int64)
        with ThreadPoolExecutor(parts) as pool:
            list(pool.map(fn, cuts[:-1], cuts[1:]))

    def _q(self, lv: list[_Level], j: int, u: np.ndarray, w: np.ndarray, s: int,
           dec: np.ndarray | None = None) -> np.ndarray:
        """q_j(w | h_j) for pairs (level-j context index u [P], token w [P]): p_j with every
        normaliser shifted by -s and, where ``dec``, the pair's own count removed (leave-one-out
        of target w)."""
        rows, dens = self._chain(lv, j, np.arange(len(lv[j].keys)), s)
        u, w = np.ascontiguousarray(u, np.int64), np.ascontiguousarray(w, np.int64)
        dec = np.zeros(len(w), bool) if dec is None else np.ascontiguousarray(dec, bool)
        out, args, kernel = np.empty(len(w)), self._table_args(s), self._kernels.q_pairs
        self._parallel(len(w), lambda a, b: kernel(j, w[a:b], u[a:b], dec[a:b], rows, dens, *args, out[a:b]))
        if (out < 0).any():
            raise ValueError("leave-one-out: some (context, target) pairs are not in the table")
        return out

    def _extend(self, lv: list[_Level], j: int, u: np.ndarray, pid: np.ndarray, pq: np.ndarray,
                s: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of q_j for level-j contexts u [U] from their suffixes' top-k (pid, pq [U, k])."""
        rows, dens = self._chain(lv, j, u, s)
        pid, pq = np.ascontiguousarray(pid, np.int32), np.ascontiguousarray(pq, np.float64)
        ids, q = np.empty(pid.shape, np.int32), np.empty(pq.shape)
        args, kernel = self._table_args(s), self._kernels.extend_top
        self._parallel(len(u), lambda a, b: kernel(j, rows[a:b], dens[a:b], pid[a:b], pq[a:b], *args, _GROUP,
                                                   ids[a:b], q[a:b]))
        return ids, q

    def _top(self, lv: list[_Level], k: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of q_{n-1}(. | h) for each distinct full context: ids [U, k], q [U, k], level
        by level. One-token contexts, and longer ones with more than 4k successors, are cached
        across calls, per (k, s)."""
        ids = self._rank[None, :k]
        q = (self._uni[ids] + 1) / (self.N - s + self.V)
        for j in range(1, self.order):
            L = lv[j]
            lo, hi = self._slices(lv, j, np.arange(len(L.keys)))
            ck, cid, cq = self._cache.setdefault((k, s, j), (np.zeros(0, np.uint64), np.zeros((0, k), np.int32),
                                                            np.zeros((0, k))))
            pos = np.minimum(np.searchsorted(ck, L.keys), max(len(ck) - 1, 0))
            heavy = hi - lo > (4 * k if j > 1 else -1)  # all one-token contexts, then those with many successors
            hit = heavy & (ck[pos] == L.keys) if len(ck) else np.zeros(len(L.keys), bool)
            todo = np.flatnonzero(~hit)
            t_ids, t_q = self._extend(lv, j, todo, ids[L.parent[todo]], q[L.parent[todo]], s)
            ids, q = np.zeros((len(L.keys), k), np.int32), np.zeros((len(L.keys), k))
            ids[hit], q[hit], ids[todo], q[todo] = cid[pos[hit]], cq[pos[hit]], t_ids, t_q
            new = heavy[todo]
            if new.any():  # sorted keys, none in the cache yet: merged in at their places, no re-sort
                at = np.searchsorted(ck, L.keys[todo[new]])
                self._cache[k, s, j] = (np.insert(ck, at, L.keys[todo[new]]), np.insert(cid, at, t_ids[new], axis=0),
                                        np.insert(cq, at, t_q[new], axis=0))
        return ids, q

    def _targets(self, lv: list[_Level], targets: np.ndarray) -> np.ndarray:
        t = np.asarray(targets).astype(np.int64).ravel()
        if len(t) != len(lv[0].inv) or (len(t) and (t.min() < 0 or t.max() >= self.V)):
            raise ValueError(f"targets must be [B] ids in [0, {self.V})")
        return t

    def query(self, contexts: np.ndarray, top_k: int, targets: np.ndarray | None = None) -> PriorBatch:
        """Exact top-K of p_{n-1}(. | h) for contexts [B, >= n-1] without dense [B, V] arrays.

        With ``targets`` [B] the positions are the corpus's own and each is left out
        (leave-one-out). Words other than the target then follow q (normalisers shifted by
        one), so the top-(K+1) of q plus the target's own probability give the top-K."""
        if int(top_k) < 1:
            raise ValueError(f"top_k={top_k}: must be >= 1")
        lv = self._levels(contexts)
        s = 0 if targets is None else 1
        k = min(int(top_k), self.V)
        ids, q = self._top(lv, min(k + s, self.V), s)
        last = lv[-1]
        if targets is None:
            ids, q = ids[last.inv, :k], q[last.inv, :k]
        else:
            t = self._targets(lv, targets)
            pt = self._q(lv, self.order - 1, last.inv, t, 1, np.ones(len(t), bool))
            inv = np.ascontiguousarray(last.inv, np.int64)
            top_ids, top_q, ids, q = ids, q, np.empty((len(t), k), np.int32), np.empty((len(t), k))
            kernel = self._kernels.leave_one_out_top
            self._parallel(len(t), lambda a, b: kernel(top_ids, top_q, inv[a:b], t[a:b], pt[a:b], ids[a:b], q[a:b]))
        kappa = last.n_h[last.inv] - s + (self.mu if self.order > 1 else self.V)
        return PriorBatch(ids, q, np.maximum(1.0 - q.sum(axis=1), 0.0), kappa)

    def prob(self, contexts: np.ndarray, token_ids: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
        """p_{n-1}(w | h) for token_ids [B] or [B, J] (same shape out, float64); with
        ``targets`` [B], leave-one-out of each position's own target."""
        lv = self._levels(contexts)
        w = np.asarray(token_ids).astype(np.int64)
        B = len(lv[0].inv)
        if w.size == 0:
            return np.zeros(w.shape)
        w2 = w.reshape(B, -1)
        u = np.repeat(lv[-1].inv, w2.shape[1])
        if targets is None:
            return self._q(lv, self.order - 1, u, w2.ravel(), 0).reshape(w.shape)
        t = np.repeat(self._targets(lv, targets), w2.shape[1])
        return self._q(lv, self.order - 1, u, w2.ravel(), 1, w2.ravel() == t).reshape(w.shape)

    def dense(self, contexts: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
        """The full distributions [B, V] float64 (for small V and tests)."""
        lv = self._levels(contexts)
        B, s = len(lv[0].inv), 0 if targets is None else 1
        rows = np.arange(B)
        t = None if targets is None else self._targets(lv, targets)
        p = np.tile((self._uni + 1) / (self.N - s + self.V), (B, 1))
        if t is not None:
            p[rows, t] -= 1 / (self.N - 1 + self.V)
        for j in range(1, self.order):
            u = lv[j].inv
            lo, hi = self._slices(lv, j, u)
            g = _ragged_arange(hi - lo) + np.repeat(lo, hi - lo)
            c = np.zeros((B, self.V))
            c[np.repeat(rows, hi - lo), self.table.orders[j].tok[g]] = self.table.orders[j].count[g]
            if t is not None:
                c[rows, t] -= 1
            p = (c + self.mu * p) / (lv[j].n_h[u] - s + self.mu)[:, None]
        return p


def table_summary(table: NGramTable, mu: float, order: int | None = None) -> dict:
    """Corpus statistics: tokens, distinct contexts and n-grams per order, the share of corpus
    positions whose full context occurs more than once, and the mean kappa over the corpus
    positions (a context h is the context of N(h) positions: mean = sum N(h)^2 / N + mu),
    plainly and with leave-one-out."""
    n = table.order if order is None else order
    n_h = np.asarray(table.orders[n - 1].ctx_count, np.float64)
    N = max(table.total_tokens, 1)
    extra = mu if n > 1 else table.vocab_size
    mean_kappa = float((n_h * n_h).sum() / N) + extra
    return {"tokens": table.total_tokens, "order": n,
            "unique_contexts": [len(o.ctx) for o in table.orders[:n]],
            "unique_ngrams": [len(o.tok) for o in table.orders[:n]],
            "share_context_seen_more_than_once": float(n_h[n_h > 1].sum() / N),
            "mean_kappa": mean_kappa, "mean_kappa_loo": mean_kappa - 1}
