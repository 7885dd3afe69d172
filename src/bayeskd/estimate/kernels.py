"""Compiled loops behind ``bayeskd.estimate.ngram.NGramPrior`` queries (numba, nogil, cached on disk).

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
def search_sorted(a, keys, out):
    """out[i] = the index of the first item of sorted ``a`` not below keys[i] (np.searchsorted).
    The keys take their bisection steps together, so each step's reads are independent and the
    CPU overlaps them (a bisection alone waits on each read of a large table in turn)."""
    n = len(keys)
    lo, hi = np.zeros(n, np.int64), np.full(n, len(a), np.int64)
    busy = n > 0
    while busy:
        busy = False
        for i in range(n):
            if lo[i] < hi[i]:
                mid = (lo[i] + hi[i]) >> 1
                if a[mid] < keys[i]:
                    lo[i] = mid + 1
                else:
                    hi[i] = mid
                busy = True
    out[:] = lo


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
def _sift_up(heap, i):
    """Restore a min-heap after heap[i] was set (the items before it form a heap)."""
    while i > 0:
        p = (i - 1) >> 1
        if heap[p] <= heap[i]:
            return
        heap[p], heap[i] = heap[i], heap[p]
        i = p


@numba.njit(nogil=True, cache=True)
def _sift_down(heap, n):
    """Restore the min-heap heap[:n] after its root was replaced."""
    i = 0
    while 2 * i + 1 < n:
        m = 2 * i + 1
        if m + 1 < n and heap[m + 1] < heap[m]:
            m += 1
        if heap[i] <= heap[m]:
            return
        heap[i], heap[m] = heap[m], heap[i]
        i = m


@numba.njit(nogil=True, cache=True)
def _top_sorted(cw, cv, n, k, out_w, out_v, scratch):
    """The k largest of cv[:n] (ties: first in index order) and their cw, descending, into
    out_w, out_v: insertion into the k slots, of only the items not below the k-th largest
    value when n is large (found by a selection in scratch [>= n])."""
    thr = -np.inf
    if n > 2 * k:
        for i in range(n):
            scratch[i] = -cv[i]
        thr = -_select(scratch, n, k - 1)
    m = 0
    for i in range(n):
        v = cv[i]
        if v < thr or (m == k and v <= out_v[k - 1]):
            continue
        if m < k:
            m += 1
        p = m - 1
        while p > 0 and out_v[p - 1] < v:  # after the equal ones: ties keep index order
            out_v[p], out_w[p] = out_v[p - 1], out_w[p - 1]
            p -= 1
        out_v[p], out_w[p] = v, cw[i]


@numba.njit(nogil=True, cache=True)
def _link_counts(x, lev, top, lows, cnts, cs):
    """cs[i, t] = N(h_i, w_t) for levels i = top..1 at or below lev[t], where item t's n-gram
    (h_lev, w_t) is x[t] in level lev[t] (higher levels: left as they are). The links are read
    one level at a time over all items: independent reads, which the CPU overlaps (one chain
    alone waits on each read). Overwrites x."""
    for i in range(top, 0, -1):
        ci = cnts[i]
        for t in range(len(x)):
            if lev[t] > i:
                x[t] = lows[i + 1][x[t]]
            if lev[t] >= i:
                cs[i, t] = ci[x[t]]


@numba.njit(nogil=True, cache=True)
def _recurrence(top, w, ctx, dec, cs, dens, uni, den0, mu, out):
    """out[t] = q_top(w[t] | context ctx[t]) from its counts cs[1..top, t], with one count of w
    removed at every level where dec[t] (-1 where a count to remove is not there)."""
    for t in range(len(w)):
        d = 1.0 if dec[t] else 0.0
        q = (uni[w[t]] + 1.0 - d) / den0 if uni[w[t]] >= d else -1.0
        for i in range(1, top + 1):
            if q < 0 or cs[i, t] < d:
                q = -1.0
                break
            q = (cs[i, t] - d + mu * q) / dens[ctx[t], i]
        out[t] = q


@numba.njit(nogil=True, cache=True)
def q_pairs(j, w, ctx, dec, rows, dens, offs, toks, cnts, lows, uni, den0, mu, out):
    """out[p] = q_j(w[p] | context ctx[p]) for pairs p, with leave-one-out where dec[p]: one
    count of w removed at every level (-1 where a count to remove is not in the table). Each w is
    found in the longest suffix row holding it (shorter suffixes hold it too: their counts follow
    the links; longer ones have none)."""
    P = len(w)
    x, lev, cs = np.full(P, -1, np.int64), np.zeros(P, np.int64), np.zeros((j + 1, P))
    for p in range(P):
        for i in range(j, 0, -1):
            r = rows[ctx[p], i]
            if r >= 0:
                y = _find(toks[i], offs[i][r], offs[i][r + 1], w[p])
                if y >= 0:
                    x[p], lev[p] = y, i
                    break
    _link_counts(x, lev, j, lows, cnts, cs)
    _recurrence(j, w, ctx, dec, cs, dens, uni, den0, mu, out)


@numba.njit(nogil=True, cache=True)
def _lower_q(j, xs, ws, ctx, dens, lows, cnts, uni, den0, mu, out):
    """out[t] = q_{j-1}(ws[t] | the level-(j-1) suffix of context ctx[t]), where xs[t] indexes
    (that context, ws[t]) in level j."""
    n = len(xs)
    cs = np.zeros((j, n))
    _link_counts(xs.copy(), np.full(n, j), j - 1, lows, cnts, cs)
    _recurrence(j - 1, ws, ctx, np.zeros(n, np.bool_), cs, dens, uni, den0, mu, out)


@numba.njit(nogil=True, cache=True)
def extend_top(j, rows, dens, pid, pq, offs, toks, cnts, lows, uni, den0, mu, group, out_ids, out_q):
    """Top-k of q_j(. | h) for level-j contexts c from their suffixes' top-k (pid, pq [C, k],
    descending) into out_ids, out_q [C, k].

    Exact: a word outside succ(h) has q_j = mu q_{j-1} / D, so the top-k lies in succ(h) united
    with the suffix's top-k. A successor outside the suffix's top-k has q_{j-1} <= pq[k-1], so one
    with count + mu pq[k-1] below the row's k-th largest count (or below any lower bound of it)
    cannot reach the top-k (k successors are worth at least that count / D) and its q_{j-1} is
    never computed; the others read their lower-order counts through the links, for a group of
    contexts at once (as many as hold at most ``group`` successors, one at least)."""
    C, k = pid.shape
    mark = np.full(len(uni), -1, np.int32)  # word -> its column in the suffix's top-k
    dup = np.zeros(k, np.bool_)
    tj, cj = toks[j], cnts[j]
    heap = np.empty(k)
    lo_of, n_of = np.zeros(C, np.int64), np.zeros(C, np.int64)
    for c in range(C):
        r = rows[c, j]
        if r >= 0:
            lo_of[c], n_of[c] = offs[j][r], offs[j][r + 1] - offs[j][r]
    c0 = 0
    while c0 < C:
        c1, room = c0 + 1, n_of[c0]  # the group: contexts [c0, c1)
        while c1 < C and room + n_of[c1] <= group:
            room += n_of[c1]
            c1 += 1
        cw, cc, cq, scratch = np.empty(room, np.int32), np.empty(room), np.empty(room), np.empty(room + k)
        ends = np.zeros(c1 - c0 + 1, np.int64)
        at, xs, xc = np.empty(room, np.int64), np.empty(room, np.int64), np.empty(room, np.int64)
        n, n_x = 0, 0
        for c in range(c0, c1):  # 1. the candidate successors, in table order, the pruned ones left out
            lo, n_s = lo_of[c], n_of[c]
            for a in range(k):
                mark[pid[c, a]] = a
            # kth: the k-th largest count among the successors scanned so far (heap[:filled]: a
            # min-heap of the k largest). It only grows towards the row's own k-th count, so
            # pruning by it as the scan goes is safe; a row of at most k successors keeps them all.
            floor, kth, filled, heaped = mu * pq[c, k - 1], -1.0, 0, n_s > k
            for i in range(lo, lo + n_s):
                w, cnt = tj[i], float(cj[i])
                if heaped:
                    if filled < k:
                        heap[filled] = cnt
                        filled += 1
                        _sift_up(heap, filled - 1)
                        if filled == k:
                            kth = heap[0]
                    elif cnt > kth:
                        heap[0] = cnt
                        _sift_down(heap, k)
                        kth = heap[0]
                a = mark[w]
                if a >= 0:
                    cq[n] = pq[c, a]
                elif cnt + floor < kth:
                    continue
                else:
                    at[n_x], xs[n_x], xc[n_x] = n, i, c
                    n_x += 1
                cw[n], cc[n] = w, cnt
                n += 1
            for a in range(k):
                mark[pid[c, a]] = -1
            ends[c - c0 + 1] = n
        ql = np.empty(n_x)  # 2. q_{j-1} of the others, all at once
        _lower_q(j, xs[:n_x], cw[at[:n_x]], xc[:n_x], dens, lows, cnts, uni, den0, mu, ql)
        for t in range(n_x):
            cq[at[t]] = ql[t]
        vw, vv = np.empty(room + k, np.int32), np.empty(room + k)
        for c in range(c0, c1):  # 3. each context's top-k of its successors and its suffix's top-k
            a0, a1, D = ends[c - c0], ends[c - c0 + 1], dens[c, j]
            for a in range(k):
                mark[pid[c, a]] = a
                dup[a] = False
            m = 0
            for i in range(a0, a1):
                a = mark[cw[i]]
                if a >= 0:
                    dup[a] = True
                vw[m], vv[m] = cw[i], (cc[i] + mu * cq[i]) / D
                m += 1
            for a in range(k):
                if not dup[a]:
                    vw[m], vv[m] = pid[c, a], mu * pq[c, a] / D
                    m += 1
                mark[pid[c, a]] = -1
            _top_sorted(vw, vv, m, k, out_ids[c], out_q[c], scratch)
        c0 = c1


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
