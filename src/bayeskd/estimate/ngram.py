"""Hierarchical Dirichlet n-gram prior over tokenized teacher responses (numpy; no torch).

A corpus is a list of documents ``(prefix_ids, response_ids)``; only response tokens are
targets. The context of response token t is the last n-1 tokens of
``prefix + response[:t]``, left-padded with the sentinel ``BOS = vocab_size``. With
N(h, w) the number of times context h is followed by w, N(h) = sum_w N(h, w), N(w) the
unigram count, N the number of targets and V the vocabulary size::

    p_0(w)       = (N(w) + 1) / (N + V)
    p_k(w | h_k) = (N(h_k, w) + mu p_{k-1}(w | h_{k-1})) / (N(h_k) + mu),   k = 1..n-1

where h_k is the last k context tokens. The prior at a position is p_{n-1}(. | h) with
Dirichlet concentration kappa = N(h_{n-1}) + mu. Leave-one-out (for a position of the
corpus itself, target t) subtracts that occurrence: 1 from N(h_k, t) and N(h_k) at every
level, from N(t) and from N.

Tables: counts at order k (context length k-1, k = 1..n) are stored in CSR form: sorted
packed context keys (uint64; the most recent token in the highest bits, so the key of a
context's suffix is ``key >> bits``) with N(h) and offsets into successor arrays (token
int32 sorted within a row, count uint32/uint64), and per n-gram the index of its suffix
n-gram in the order below (``low``, the links: found once after counting). Each array is a
``.npy`` file that loads with ``mmap_mode='r'``; ``meta.json`` holds order, vocab size, total
tokens and version.

Queries are exact and never build [B, V] arrays: level by level, the top-K of p_k(. | h_k)
lies in succ(h_k) united with the top-K of p_{k-1}(. | h_{k-1}) (a word with N(h_k, w) = 0
has p_k = mu p_{k-1} / (N(h_k) + mu)), computed once per distinct context in a batch and
cached across calls for one-token contexts and contexts with many successors. Counting,
merging and linking are vectorised numpy; the per-context top-K and the probability lookups
are compiled loops (``kernels``, numba, imported by queries only) run on slices of a
batch in threads.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT, VERSION = "bayeskd.ngram", 2  # the tables' format name (meta.json), kept when the module moved
_FIELDS = ("ctx", "ctx_count", "offsets", "tok", "count")
_PACK_BITS = 64  # width of the packed (context, token) sort key; tests lower it to hit the fallback
_HEADER = 128  # bytes reserved for the header of a .npy file written in pieces
_DENSE_ROWS = 64  # linking gathers from dense maps when a chunk's suffixes span at most this many rows

Docs = Iterable[tuple[Sequence[int], Sequence[int]]]


def _bits(vocab_size: int) -> int:
    """Bits per context token (ids 0..V, V being BOS)."""
    return int(vocab_size).bit_length()


def _tbits(vocab_size: int) -> int:
    """Bits per target token (ids 0..V-1)."""
    return max(int(vocab_size - 1).bit_length(), 1)


def _count_dtype(total: int) -> type:
    return np.uint32 if total < 2**32 else np.uint64


def _ragged_arange(lens: np.ndarray) -> np.ndarray:
    """[0..lens[0]), [0..lens[1]), ... concatenated (int64 [sum(lens)])."""
    lens = np.asarray(lens, np.int64)
    return np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)


def _threads(n: int | None) -> int:
    """n, or by default the CPUs this process may run on (its affinity, not the host's count)."""
    if n:
        return max(int(n), 1)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_starts(a: np.ndarray) -> np.ndarray:
    """Indices where a new run of equal values starts in ``a`` (int64)."""
    if len(a) == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.concatenate(([True], a[1:] != a[:-1])))


# ----------------------------------------------------------------------------- documents


@dataclass
class FlatDocs:
    """Documents concatenated: prefix [P] int32 with prefix_offsets [D+1] int64, response [R] int32
    with response_offsets [D+1] int64 (document d's response is response[off[d]:off[d+1]])."""

    prefix: np.ndarray
    prefix_offsets: np.ndarray
    response: np.ndarray
    response_offsets: np.ndarray

    @classmethod
    def from_docs(cls, docs: Docs) -> FlatDocs:
        """Concatenate ``(prefix_ids, response_ids)`` pairs (one Python step per document)."""
        pre, res = [], []
        for p, r in docs:
            pre.append(np.asarray(p, np.int32).ravel())
            res.append(np.asarray(r, np.int32).ravel())
        return cls(*_flat(pre), *_flat(res))

    @property
    def num_tokens(self) -> int:
        return len(self.response)


def _flat(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(p) for p in parts), np.int64, len(parts))
    arr = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return arr.astype(np.int32, copy=False), np.concatenate(([0], np.cumsum(lens)))


def _as_flat(docs: FlatDocs | Docs) -> FlatDocs:
    return docs if isinstance(docs, FlatDocs) else FlatDocs.from_docs(docs)


def _stream(flat: FlatDocs, order: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document as [BOS.., last n-1 prefix tokens, response] so that every target has n-1
    tokens before it. Returns stream int32 [R + D(n-1)] and target positions tpos int64 [R]."""
    h, V = order - 1, vocab_size
    for name, a in (("prefix", flat.prefix), ("response", flat.response)):
        if len(a) and (a.min() < 0 or a.max() >= V):
            raise ValueError(f"{name} token ids must lie in [0, {V})")
    pl, rl = np.diff(flat.prefix_offsets), np.diff(flat.response_offsets)
    seg = h + rl
    start = np.cumsum(seg) - seg
    stream = np.full(int(seg.sum()), V, np.int32)
    m = np.minimum(pl, h)
    j, d = _ragged_arange(m), np.repeat(np.arange(len(m)), m)
    stream[start[d] + h - m[d] + j] = flat.prefix[flat.prefix_offsets[d + 1] - m[d] + j]
    tpos = np.arange(len(flat.response), dtype=np.int32 if len(stream) < 2**31 else np.int64)
    tpos += np.repeat(start + h - flat.response_offsets[:-1], rl)
    stream[tpos] = flat.response
    return stream, tpos


def corpus_contexts(docs: FlatDocs | Docs, order: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Contexts and targets of all response positions, vectorised over documents.

    Returns contexts int32 [R, order-1] (oldest token first, BOS-padded) and targets int32 [R]."""
    flat = _as_flat(docs)
    stream, tpos = _stream(flat, order, vocab_size)
    ctx = stream[tpos[:, None] - np.arange(order - 1, 0, -1)[None, :]]
    return ctx.reshape(len(tpos), order - 1), flat.response.copy()


def contexts(prefix: Sequence[int], response: Sequence[int], order: int, vocab_size: int) -> np.ndarray:
    """Contexts [len(response), order-1] int32 of one document's response tokens (BOS-padded)."""
    return corpus_contexts([(prefix, response)], order, vocab_size)[0]


# ----------------------------------------------------------------------------- tables


@dataclass
class OrderCounts:
    """Counts at order k (contexts of length k-1) in CSR form.

    ctx [C] uint64 sorted packed contexts; ctx_count [C] N(h); offsets [C+1] int64;
    tok [M] int32 successors (sorted within a row); count [M] N(h, w); low [M] int32/int64
    (set by linking; empty at order 1): the index of each n-gram's suffix (its context without
    the oldest token, same w) in order k-1's arrays, so that lower-order counts of a successor
    are one read away."""

    ctx: np.ndarray
    ctx_count: np.ndarray
    offsets: np.ndarray
    tok: np.ndarray
    count: np.ndarray
    low: np.ndarray | None = None


def _group(ctx: np.ndarray, tok: np.ndarray, ctx_bits: int, vocab_size: int,
           weights: np.ndarray | None = None, count_dtype: type = np.uint32, inplace: bool = False) -> OrderCounts:
    """Count (context, token) pairs [P] (each weighted by ``weights`` if given) into CSR.

    Packs ``ctx << tbits | tok`` into one uint64 sort key when it fits, else replaces the
    contexts by their dense rank first (exact either way). ``inplace``: ctx may be overwritten."""
    tb = _tbits(vocab_size)
    base = None
    if ctx_bits + tb > _PACK_BITS:
        base, ctx = np.unique(ctx, return_inverse=True)
    if inplace and ctx.dtype == np.uint64:
        key = ctx
        key <<= np.uint64(tb)
    else:
        key = np.left_shift(ctx, np.uint64(tb), dtype=np.uint64, casting="unsafe")
    np.bitwise_or(key, tok, out=key, dtype=np.uint64, casting="unsafe")
    if weights is None:
        key.sort()
        starts = _run_starts(key)
        counts = np.empty(len(starts), count_dtype)
        np.subtract(starts[1:], starts[:-1], out=counts[:-1], casting="unsafe")
        counts[-1:] = len(key) - starts[-1:]
    else:
        o = np.argsort(key, kind="stable")  # inputs are a few sorted runs: timsort merges them
        key = key[o]
        starts = _run_starts(key)
        w = weights[o].astype(count_dtype)
        del o
        counts = np.add.reduceat(w, starts, dtype=count_dtype) if len(starts) else w
        del w
    key = key[starts]
    del starts
    tok_out = key.astype(np.int32)  # keeps the low 32 bits
    tok_out &= (1 << tb) - 1
    hi = key
    hi >>= np.uint64(tb)
    if base is not None:
        hi = base[hi.astype(np.int64)]
    cs = _run_starts(hi)
    ctx_count = np.add.reduceat(counts, cs, dtype=count_dtype) if len(cs) else counts
    return OrderCounts(hi[cs], ctx_count, np.append(cs, len(key)).astype(np.int64), tok_out, counts)


class NGramTable:
    """Counts of orders 1..order over a corpus; ``orders[k-1]`` holds order k."""

    def __init__(self, order: int, vocab_size: int, total_tokens: int,
                 orders: list[OrderCounts], folder: Path | None = None) -> None:
        self.order, self.vocab_size, self.total_tokens = order, vocab_size, total_tokens
        self.orders, self.folder = orders, folder

    @property
    def bos(self) -> int:
        return self.vocab_size

    @property
    def nbytes(self) -> int:
        return sum(getattr(o, f).nbytes for o in self.orders for f in _FIELDS) + sum(
            o.low.nbytes for o in self.orders if o.low is not None)

    @property
    def linked(self) -> bool:
        return all(o.low is not None for o in self.orders)

    def meta(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "order": self.order,
                "vocab_size": self.vocab_size, "bos": self.bos, "total_tokens": self.total_tokens,
                "context_bits": _bits(self.vocab_size), "key_layout": "most recent token in the highest bits",
                "contexts": [len(o.ctx) for o in self.orders], "ngrams": [len(o.tok) for o in self.orders],
                "linked": self.linked}

    def save(self, folder: str | Path, first_order: int = 1) -> None:
        """Write ``order{k}.{field}.npy`` files and ``meta.json`` (written last) to ``folder``;
        ``first_order`` > 1 numbers ``orders`` from there and skips the meta (orders saved one
        at a time)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for k, o in enumerate(self.orders, first_order):
            for f in _FIELDS + (("low",) if o.low is not None else ()):
                np.save(folder / f"order{k}.{f}.npy", np.asarray(getattr(o, f)))
        if first_order == 1:
            (folder / "meta.json").write_text(json.dumps(self.meta(), indent=1))

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = True) -> NGramTable:
        """Read a saved table; with ``mmap`` the arrays are memory-mapped read-only."""
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{folder}: not a {FORMAT} v{VERSION} table (found {meta.get('format')} "
                             f"v{meta.get('version')}); rebuild it (`bayeskd prior --force`)")
        mode = "r" if mmap else None
        orders = [OrderCounts(*(np.load(folder / f"order{k}.{f}.npy", mmap_mode=mode) for f in _FIELDS))
                  for k in range(1, meta["order"] + 1)]
        for k, o in enumerate(orders, 1):
            if (folder / f"order{k}.low.npy").exists():
                o.low = np.load(folder / f"order{k}.low.npy", mmap_mode=mode)
        return cls(meta["order"], meta["vocab_size"], meta["total_tokens"], orders, folder)

    def equals(self, other: NGramTable) -> bool:
        """Same order, vocabulary, totals, counts and (where both are linked) links, dtypes aside."""
        head = (self.order, self.vocab_size, self.total_tokens)
        fields = _FIELDS + (("low",) if self.linked and other.linked else ())
        return head == (other.order, other.vocab_size, other.total_tokens) and all(
            np.array_equal(getattr(a, f), getattr(b, f)) for a, b in zip(self.orders, other.orders) for f in fields)


def _count_orders(flat: FlatDocs, order: int, vocab_size: int) -> Iterator[OrderCounts]:
    """Counts of orders 1..order of a shard, one order at a time (one sort each)."""
    if order < 1 or (order - 1) * _bits(vocab_size) > 64:
        raise ValueError(f"order {order} with vocab {vocab_size}: contexts must fit 64 bits")
    stream, tpos = _stream(flat, order, vocab_size)
    bits, cdt = _bits(vocab_size), _count_dtype(len(tpos))
    ctx = np.zeros(len(tpos), np.uint64)
    for k in range(1, order + 1):
        if k > 1:  # prepend the next older token: the suffix of a context is key >> bits
            ctx <<= np.uint64(bits)
            np.bitwise_or(ctx, stream[tpos - (k - 1)], out=ctx, dtype=np.uint64, casting="unsafe")
        if k == order:
            del stream, tpos
        yield _group(ctx, flat.response, (k - 1) * bits, vocab_size, count_dtype=cdt, inplace=k == order)


def count(docs: FlatDocs | Docs, order: int, vocab_size: int) -> NGramTable:
    """Count orders 1..order of an in-memory shard, vectorised, and link them."""
    flat = _as_flat(docs)
    return link(NGramTable(order, vocab_size, flat.num_tokens, list(_count_orders(flat, order, vocab_size))))


class _Sink:
    """Collects CSR chunks in memory, or appends them to .npy files in ``folder``."""

    def __init__(self, folder: Path | None) -> None:
        self.folder, self.parts, self.files = folder, {}, {}

    def add(self, name: str, arr: np.ndarray) -> None:
        if self.folder is None:
            self.parts.setdefault(name, []).append(arr)
            return
        if name not in self.files:
            f = open(self.folder / f"{name}.npy", "wb")
            f.write(b"\0" * _HEADER)
            self.files[name] = [f, arr.dtype, 0]
        entry = self.files[name]
        np.ascontiguousarray(arr, entry[1]).tofile(entry[0])
        entry[2] += len(arr)

    def close(self, name: str) -> np.ndarray | None:
        if self.folder is None:
            return np.concatenate(self.parts.pop(name))
        f, dtype, n = self.files.pop(name)
        head = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
        head = head.encode("latin1").ljust(_HEADER - 11) + b"\n"
        f.seek(0)
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head)
        f.close()
        return None


def _reopen(t: NGramTable, k: int) -> dict[str, np.ndarray]:
    """ctx, offsets, tok, count of order k+1, freshly mapped when saved (so that pages read for
    one chunk leave the RSS with it)."""
    if t.folder is None:
        return {f: getattr(t.orders[k], f) for f in ("ctx", "offsets", "tok", "count")}
    return {f: np.load(t.folder / f"order{k + 1}.{f}.npy", mmap_mode="r") for f in ("ctx", "offsets", "tok", "count")}


# ----------------------------------------------------------------------------- linking


def _link_chunk(hi: dict, lo: dict, r0: int, r1: int, vocab_size: int, dtype) -> np.ndarray:
    """Links of the n-grams of rows r0..r1-1 of a higher order (arrays ``hi``) into the next
    lower order (``lo``). The chunk's suffix contexts span a contiguous range of lower rows
    (suffix keys do not decrease along the rows). Over a few lower rows, each row's tokens are
    scattered into a dense position map and its n-grams gathered from it; over many, one
    searchsorted of packed (suffix row, token) keys."""
    bits, tb = np.uint64(_bits(vocab_size)), _tbits(vocab_size)
    off = np.asarray(hi["offsets"][r0:r1 + 1])
    srow = np.searchsorted(lo["ctx"], np.asarray(hi["ctx"][r0:r1]) >> bits)
    s0, s1 = int(srow[0]), int(srow[-1]) + 1
    lo_off = np.asarray(lo["offsets"][s0:s1 + 1])
    tok = np.asarray(hi["tok"][off[0]:off[-1]])
    if s1 - s0 <= _DENSE_ROWS:
        pos, out = np.empty(vocab_size, dtype), np.empty(len(tok), dtype)
        seg = off[np.searchsorted(srow, np.arange(s0, s1 + 1))] - off[0]  # n-grams whose suffix row is s
        for i in range(s1 - s0):
            pos[np.asarray(lo["tok"][lo_off[i]:lo_off[i + 1]])] = np.arange(lo_off[i], lo_off[i + 1], dtype=dtype)
            out[seg[i]:seg[i + 1]] = pos[tok[seg[i]:seg[i + 1]]]
        return out
    hay = np.repeat(np.arange(s1 - s0, dtype=np.uint64), np.diff(lo_off)) << np.uint64(tb)
    hay |= np.asarray(lo["tok"][lo_off[0]:lo_off[-1]]).astype(np.uint64)
    needle = np.repeat((srow - s0).astype(np.uint64), np.diff(off)) << np.uint64(tb)
    needle |= tok.astype(np.uint64)
    return (np.searchsorted(hay, needle) + lo_off[0]).astype(dtype)


def link(table: NGramTable, *, chunk_ngrams: int = 1 << 18, threads: int | None = None) -> NGramTable:
    """Set each order's ``low`` (see OrderCounts) and return the table. Rows are linked in
    chunks of about ``chunk_ngrams`` n-grams, ``threads`` chunks at a time (default: the CPUs
    this process may use). A saved table (``table.folder``) gets its links written there chunk
    by chunk, each chunk reading freshly mapped arrays so that memory stays bounded, then mapped
    back, and ``meta.json`` rewritten."""
    folder = table.folder
    threads = _threads(threads)
    orders = table.orders
    orders[0].low = np.zeros(0, np.int32)
    if folder is not None:
        np.save(folder / "order1.low.npy", orders[0].low)
    for k in range(1, table.order):
        name = f"order{k + 1}.low"
        off = np.asarray(orders[k].offsets)
        dt = np.int32 if len(orders[k - 1].tok) < 2**31 else np.int64
        starts = np.searchsorted(off, np.arange(0, int(off[-1]), chunk_ngrams), side="right") - 1
        cuts = np.unique(np.append(starts, len(off) - 1))

        def one(r0: int, r1: int) -> np.ndarray:
            return _link_chunk(_reopen(table, k), _reopen(table, k - 1), r0, r1, table.vocab_size, dt)

        sink = _Sink(folder)
        sink.add(name, np.zeros(0, dt))
        with ThreadPoolExecutor(threads) as pool:
            for a in range(0, len(cuts) - 1, threads):  # `threads` chunks at a time: memory stays bounded
                for out in pool.map(one, cuts[a:a + threads], cuts[a + 1:a + threads + 1]):
                    sink.add(name, out)
        arr = sink.close(name)
        orders[k].low = arr if folder is None else np.load(folder / f"{name}.npy", mmap_mode="r")
    if folder is not None:
        (folder / "meta.json").write_text(json.dumps(table.meta(), indent=1))
    return table
