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
are compiled loops (``ngram_kernels``, numba, imported by queries only) run on slices of a
batch in threads.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT, VERSION = "bayeskd.ngram", 2
_FIELDS = ("ctx", "ctx_count", "offsets", "tok", "count")
_PACK_BITS = 64  # width of the packed (context, token) sort key; tests lower it to hit the fallback
_HEADER = 128  # bytes reserved for the header of a .npy file written in pieces
_DENSE_ROWS = 64  # linking gathers from dense maps when a chunk's suffixes span at most this many rows
_MIN_SLICE = 512  # queries give a thread at least this many contexts or pairs; tests lower it
_GROUP = 1 << 16  # extend_top reads the lower-order counts of at most this many successors at once; tests lower it

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


def _frozen(a: np.ndarray, dtype) -> np.ndarray:
    """A read-only ndarray view of ``a`` (memory maps stay mapped), converted only if its dtype
    differs."""
    v = np.asarray(a)
    v = (v.astype(dtype) if v.dtype != dtype else v).view()
    v.flags.writeable = False
    return v


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


# ----------------------------------------------------------------------------- merging


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


def _bounds(parts: list[OrderCounts], chunk: int) -> np.ndarray:
    """Context keys splitting the union of ``parts`` into chunks of about ``chunk`` n-grams."""
    nchunks = -(-sum(len(p.tok) for p in parts) // chunk)
    if nchunks <= 1:
        return np.zeros(0, np.uint64)
    samples = []
    for p in parts:
        if len(p.tok):
            pos = np.linspace(0, len(p.tok) - 1, 8 * nchunks).astype(np.int64)
            samples.append(np.asarray(p.ctx[np.searchsorted(p.offsets, pos, side="right") - 1]))
    s = np.sort(np.concatenate(samples))
    return np.unique(s[(np.arange(1, nchunks) * len(s)) // nchunks])


def _write_meta(folder: Path, order: int, vocab_size: int, total: int) -> None:
    """meta.json of the arrays saved in ``folder`` (sizes read from their headers)."""
    meta = NGramTable(order, vocab_size, total, []).meta()
    meta["contexts"], meta["ngrams"] = ([int(np.load(folder / f"order{k}.{f}.npy", mmap_mode="r").shape[0])
                                         for k in range(1, order + 1)] for f in ("ctx", "tok"))
    meta["linked"] = all((folder / f"order{k}.low.npy").exists() for k in range(1, order + 1))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _reopen(t: NGramTable, k: int) -> dict[str, np.ndarray]:
    """ctx, offsets, tok, count of order k+1, freshly mapped when saved (so that pages read for
    one chunk leave the RSS with it)."""
    if t.folder is None:
        return {f: getattr(t.orders[k], f) for f in ("ctx", "offsets", "tok", "count")}
    return {f: np.load(t.folder / f"order{k + 1}.{f}.npy", mmap_mode="r") for f in ("ctx", "offsets", "tok", "count")}


def _merge_chunk(tables: Sequence[NGramTable], k: int, rows: list[tuple[int, int]], vocab_size: int,
                 count_dtype: type) -> OrderCounts:
    """Sum order k+1 of shards over context rows [r0, r1) of each shard (one chunk)."""
    ctx, tok, cnt = [], [], []
    for t, (r0, r1) in zip(tables, rows):
        p = _reopen(t, k)
        off = np.array(p["offsets"][r0:r1 + 1])
        ctx.append(np.repeat(np.array(p["ctx"][r0:r1]), np.diff(off)))
        tok.append(np.array(p["tok"][off[0]:off[-1]]))
        cnt.append(np.array(p["count"][off[0]:off[-1]]))
        del p
    return _group(np.concatenate(ctx), np.concatenate(tok), k * _bits(vocab_size), vocab_size,
                  np.concatenate(cnt), count_dtype, inplace=True)


def merge(tables: Sequence[NGramTable], out: str | Path | None = None, *, chunk_ngrams: int = 1 << 21) -> NGramTable:
    """Sum the counts of shards exactly (same result as counting all at once).

    Each order is merged in chunks of context-key ranges of about ``chunk_ngrams`` n-grams, so
    memory stays bounded by a chunk; with ``out`` the chunks stream to disk and the result is
    returned memory-mapped. The result is linked."""
    t0 = tables[0]
    if any((t.order, t.vocab_size) != (t0.order, t0.vocab_size) for t in tables):
        raise ValueError("tables differ in order or vocabulary size")
    total = sum(t.total_tokens for t in tables)
    folder = None if out is None else Path(out)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    sink, cdt = _Sink(folder), _count_dtype(total)
    for k in range(t0.order):
        bounds = _bounds([t.orders[k] for t in tables], chunk_ngrams)
        splits = [np.concatenate(([0], np.searchsorted(t.orders[k].ctx, bounds), [len(t.orders[k].ctx)]))
                  for t in tables]
        done = 0
        for c in range(len(bounds) + 1):
            g = _merge_chunk(tables, k, [(int(sp[c]), int(sp[c + 1])) for sp in splits], t0.vocab_size, cdt)
            for f in ("ctx", "ctx_count", "tok", "count"):
                sink.add(f"order{k + 1}.{f}", getattr(g, f))
            sink.add(f"order{k + 1}.offsets", g.offsets[:-1] + done)
            done += len(g.tok)
        sink.add(f"order{k + 1}.offsets", np.array([done], np.int64))
    arrays = {name: sink.close(name) for name in list(sink.parts) + list(sink.files)}
    if folder is None:
        orders = [OrderCounts(*(arrays[f"order{k}.{f}"] for f in _FIELDS)) for k in range(1, t0.order + 1)]
        return link(NGramTable(t0.order, t0.vocab_size, total, orders))
    _write_meta(folder, t0.order, t0.vocab_size, total)
    return link(NGramTable.load(folder))


def _count_to(flat: FlatDocs, order: int, vocab_size: int, folder: Path) -> Path:
    """Count a shard into ``folder``, writing each order as soon as it is counted."""
    for k, o in enumerate(_count_orders(flat, order, vocab_size), 1):
        NGramTable(k, vocab_size, flat.num_tokens, [o]).save(folder, first_order=k)
        del o  # written: not held while the next order is counted
    _write_meta(folder, order, vocab_size, flat.num_tokens)
    return folder


def _shards(docs: Docs, shard_tokens: int) -> Iterator[FlatDocs]:
    """Group documents into shards of at least ``shard_tokens`` response tokens (the last may be smaller)."""
    buf, n, any_yielded = [], 0, False
    for p, r in docs:
        buf.append((p, r))
        n += len(r)
        if n >= shard_tokens:
            flat = FlatDocs.from_docs(buf)
            buf, n, any_yielded = [], 0, True  # the documents are let go before the shard is counted
            yield flat
    if buf or not any_yielded:
        flat = FlatDocs.from_docs(buf)
        del buf
        yield flat


def build(docs: Docs, order: int, vocab_size: int, out_folder: str | Path, *,
          shard_tokens: int = 4_000_000, num_workers: int = 1, chunk_ngrams: int = 1 << 21) -> NGramTable:
    """Count a corpus shard by shard (in ``num_workers`` processes), write the shards under
    ``out_folder/shards``, merge them into ``out_folder``, link it and return it memory-mapped.

    Workers are spawned: a script calling this with num_workers > 1 needs the usual
    ``if __name__ == "__main__":`` guard."""
    out = Path(out_folder)
    # From nothing: an interrupted build's files (a link file cut short by a kill) must not be loaded.
    for stale in [out / "meta.json", *out.glob("order*.npy")]:
        stale.unlink(missing_ok=True)
    shard_dir = out / "shards"
    shutil.rmtree(shard_dir, ignore_errors=True)
    paths, pending, held, pool = [], [], None, None

    def submit(flat: FlatDocs, path: Path) -> None:
        while len(pending) >= num_workers:  # bounded: at most num_workers shards in flight
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()
                pending.remove(f)
        pending.append(pool.submit(_count_to, flat, order, vocab_size, path))

    try:
        for flat in _shards(docs, shard_tokens):
            paths.append(shard_dir / f"{len(paths):05d}")
            if num_workers <= 1:
                _count_to(flat, order, vocab_size, paths[-1])
            elif pool is None and held is None:
                held = (flat, paths[-1])  # a single shard is counted here, without a pool
            else:
                if pool is None:
                    pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"))
                    submit(*held)
                    held = None
                submit(flat, paths[-1])
            del flat
        if held is not None:
            _count_to(held[0], order, vocab_size, held[1])
        for f in pending:
            f.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if len(paths) == 1:
        for f in paths[0].iterdir():
            os.replace(f, out / f.name)
        link(NGramTable.load(out))
    else:
        merge([NGramTable.load(p) for p in paths], out, chunk_ngrams=chunk_ngrams)
    shutil.rmtree(shard_dir)
    return NGramTable.load(out)


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
        from bayeskd import ngram_kernels  # numba: imported (and compiled, or read from its cache) by queries only

        self._kernels = ngram_kernels
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


def summary(table: NGramTable, mu: float, order: int | None = None) -> dict:
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
