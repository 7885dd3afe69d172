"""Compiled loops behind ``bayeskd.ngram.NGramPrior`` queries (numba, nogil, cached on disk).

Kept apart from ``ngram`` so that counting, merging and linking (and the processes that count)
never import numba; the first query of a process imports it and compiles these functions, or
reads them from numba's cache next to this file. The loops release the GIL: NGramPrior runs
them on slices of a batch in threads.

Tables reach them as tuples of per-level arrays: offs[i], toks[i], cnts[i], lows[i]
are order i+1's offsets, successors, counts and links (level i: contexts of i tokens). A
context is described by rows[i] (its level-i suffix's row in order i+1, -1 when unseen) and
dens[i] (that suffix's normaliser N(h_i) - s + mu), for i = 1..j; column 0 is unused.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _find(tok, lo, hi, w):
    """Index of w in the sorted slice tok[lo:hi], or -1."""
    end = hi
    while lo < hi:
        mid = (lo + hi) >> 1
        if tok[mid] < w:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < end and tok[lo] == w else -1


@numba.njit(nogil=True, cache=True)
def _select(a, n, t):
    """The t-th smallest (from 0) of a[:n], reordering a in place: quickselect with three-way
    partitions (counts repeat a lot). Written out because np.partition takes numba ~10 s to
    compile."""
    lo, hi = 0, n - 1
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
        p = max(min(x, y), min(max(x, y), z))  # median of three
        lt, i, gt = lo, lo, hi
        while i <= gt:
            if a[i] < p:
                a[lt], a[i] = a[i], a[lt]
                lt += 1
                i += 1
            elif a[i] > p:
                a[gt], a[i] = a[i], a[gt]
                gt -= 1
            else:
                i += 1
        if t < lt:
            hi = lt - 1
        elif t > gt:
            lo = gt + 1
        else:
            return p
    return a[t]


@numba.njit(nogil=True, cache=True)
def _top_sorted(cw, cv, n, k, out_w, out_v):
    """The k largest of cv[:n] (ties: first in index order) and their cw, descending, into
    out_w, out_v: a selection, then a sort of those k only."""
    sel = np.arange(n)
    if n > 2 * k:
        neg = np.empty(n)
        for i in range(n):
            neg[i] = -cv[i]
        thr = -_select(neg, n, k - 1)  # the k-th largest value
        m, ties = 0, 0
        for i in range(n):
            if cv[i] > thr:
                sel[m] = i
                m += 1
        for i in range(n):
            if m + ties >= k:
                break
            if cv[i] == thr:
                sel[m + ties] = i
                ties += 1
        sel = np.sort(sel[:k])  # back to index order, so that the stable sort below breaks ties by index
    vals = np.empty(len(sel))
    for i in range(len(sel)):
        vals[i] = -cv[sel[i]]
    o = np.argsort(vals, kind="mergesort")
    for a in range(k):
        out_w[a], out_v[a] = cw[sel[o[a]]], cv[sel[o[a]]]


@numba.njit(nogil=True, cache=True)
def _chain_counts(x, i, lows, cnts, cs):
    """cs[m] = N(h_m, w) for m = i..1, where x indexes (h_i, w) in level i: one read per level
    through the links."""
    cs[i] = cnts[i][x]
    for m in range(i - 1, 0, -1):
        x = lows[m + 1][x]
        cs[m] = cnts[m][x]


@numba.njit(nogil=True, cache=True)
def _q_one(w, rows, dens, j, offs, toks, cnts, lows, uni, den0, mu, dec, cs):
    """q_j(w | h) of one context; ``dec`` (0 or 1) removes one count of w at every level
    (leave-one-out). Finds w in the longest suffix row holding it (shorter suffixes hold it too:
    their counts follow the links; longer ones have none). Returns -1 when a count to remove is
    not in the table. ``cs`` is scratch [>= j+1]."""
    cs[:j + 1] = 0.0
    for i in range(j, 0, -1):
        r = rows[i]
        if r >= 0:
            x = _find(toks[i], offs[i][r], offs[i][r + 1], w)
            if x >= 0:
                _chain_counts(x, i, lows, cnts, cs)
                break
    if uni[w] < dec:
        return -1.0
    q = (uni[w] + 1.0 - dec) / den0
    for i in range(1, j + 1):
        if cs[i] < dec:
            return -1.0
        q = (cs[i] - dec + mu * q) / dens[i]
    return q


@numba.njit(nogil=True, cache=True)
def q_pairs(j, w, ctx, dec, rows, dens, offs, toks, cnts, lows, uni, den0, mu, out):
    """out[p] = q_j(w[p] | context ctx[p]) for pairs p, with leave-one-out where dec[p]."""
    cs = np.zeros(j + 1)
    for p in range(len(w)):
        c = ctx[p]
        out[p] = _q_one(w[p], rows[c], dens[c], j, offs, toks, cnts, lows, uni, den0, mu,
                        1.0 if dec[p] else 0.0, cs)


@numba.njit(nogil=True, cache=True)
def extend_top(j, rows, dens, pid, pq, offs, toks, cnts, lows, uni, den0, mu, out_ids, out_q):
    """Top-k of q_j(. | h) for level-j contexts c from their suffixes' top-k (pid, pq [C, k],
    descending) into out_ids, out_q [C, k].

    Exact: a word outside succ(h) has q_j = mu q_{j-1} / D, so the top-k lies in succ(h) united
    with the suffix's top-k. A successor outside the suffix's top-k has q_{j-1} <= pq[k-1], so one
    with count + mu pq[k-1] below the row's k-th largest count cannot reach the top-k (k
    successors are worth at least that count / D) and its q_{j-1} is never computed; the others
    read their lower-order counts through the links."""
    k = pid.shape[1]
    mark = np.full(len(uni), -1, np.int32)  # word -> its column in the suffix's top-k
    dup = np.zeros(k, np.bool_)
    cs = np.zeros(j + 1)
    tj, cj = toks[j], cnts[j]
    for c in range(rows.shape[0]):
        r, D = rows[c, j], dens[c, j]
        lo, hi = (offs[j][r], offs[j][r + 1]) if r >= 0 else (0, 0)
        n_s = hi - lo
        for a in range(k):
            mark[pid[c, a]] = a
            dup[a] = False
        kth, floor = -1.0, mu * pq[c, k - 1]
        if n_s > k:
            buf = np.empty(n_s, np.float64)
            for i in range(n_s):
                buf[i] = cj[lo + i]
            kth = _select(buf, n_s, n_s - k)
        cw = np.empty(n_s + k, np.int32)
        cv = np.empty(n_s + k, np.float64)
        n = 0
        for i in range(lo, hi):
            w, cnt = tj[i], float(cj[i])
            a = mark[w]
            if a >= 0:
                dup[a] = True
                qw = pq[c, a]
            elif cnt + floor < kth:
                continue
            else:
                if j > 1:
                    _chain_counts(lows[j][i], j - 1, lows, cnts, cs)
                qw = (uni[w] + 1.0) / den0
                for m in range(1, j):
                    qw = (cs[m] + mu * qw) / dens[c, m]
            cw[n], cv[n] = w, (cnt + mu * qw) / D
            n += 1
        for a in range(k):
            if not dup[a]:
                cw[n], cv[n] = pid[c, a], mu * pq[c, a] / D
                n += 1
            mark[pid[c, a]] = -1
        _top_sorted(cw, cv, n, k, out_ids[c], out_q[c])


@numba.njit(nogil=True, cache=True)
def leave_one_out_top(ids, q, inv, t, pt, out_ids, out_q):
    """Per position b: the top-K (K = out_ids.shape[1]) of its context's list ids, q[inv[b]]
    (descending) without the target t[b], merged with the target at its own probability pt[b]
    (placed after list items of equal value)."""
    K, n = out_ids.shape[1], ids.shape[1]
    for b in range(len(inv)):
        u, w, p = inv[b], t[b], pt[b]
        a, i, placed = 0, 0, False
        while a < K:
            if i < n and ids[u, i] == w:
                i += 1
            elif not placed and (i >= n or q[u, i] < p):
                out_ids[b, a], out_q[b, a] = w, p
                placed = True
                a += 1
            elif i < n:
                out_ids[b, a], out_q[b, a] = ids[u, i], q[u, i]
                i += 1
                a += 1
            else:
                break
