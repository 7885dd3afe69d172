"""Hierarchical Dirichlet n-gram prior over tokenized teacher responses (numpy only).

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
int32 sorted within a row, count uint32/uint64). Each array is a ``.npy`` file that loads
with ``mmap_mode='r'``; ``meta.json`` holds order, vocab size, total tokens and version.

Queries are exact and never build [B, V] arrays: level by level, the top-K of p_k(. | h_k)
lies in succ(h_k) united with the top-K of p_{k-1}(. | h_{k-1}) (a word with N(h_k, w) = 0
has p_k = mu p_{k-1} / (N(h_k) + mu)), computed once per distinct context in a batch and
cached across calls for one-token contexts and contexts with many successors.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT, VERSION = "bayeskd.ngram", 1
_FIELDS = ("ctx", "ctx_count", "offsets", "tok", "count")
_PACK_BITS = 64  # width of the packed (context, token) sort key; tests lower it to hit the fallback
_HEADER = 128  # bytes reserved for the header of a .npy file written in pieces
_TOP_T = 256  # queries first try a row with more successors than this on its _TOP_T most frequent ones

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
    tok [M] int32 successors (sorted within a row); count [M] N(h, w)."""

    ctx: np.ndarray
    ctx_count: np.ndarray
    offsets: np.ndarray
    tok: np.ndarray
    count: np.ndarray


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
        return sum(getattr(o, f).nbytes for o in self.orders for f in _FIELDS)

    def meta(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "order": self.order,
                "vocab_size": self.vocab_size, "bos": self.bos, "total_tokens": self.total_tokens,
                "context_bits": _bits(self.vocab_size), "key_layout": "most recent token in the highest bits",
                "contexts": [len(o.ctx) for o in self.orders], "ngrams": [len(o.tok) for o in self.orders]}

    def save(self, folder: str | Path, first_order: int = 1) -> None:
        """Write ``order{k}.{field}.npy`` files and ``meta.json`` (written last) to ``folder``;
        ``first_order`` > 1 numbers ``orders`` from there and skips the meta (orders saved one
        at a time)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for k, o in enumerate(self.orders, first_order):
            for f in _FIELDS:
                np.save(folder / f"order{k}.{f}.npy", np.asarray(getattr(o, f)))
        if first_order == 1:
            (folder / "meta.json").write_text(json.dumps(self.meta(), indent=1))

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = True) -> NGramTable:
        """Read a saved table; with ``mmap`` the arrays are memory-mapped read-only."""
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{folder}: not a {FORMAT} v{VERSION} table")
        mode = "r" if mmap else None
        orders = [OrderCounts(*(np.load(folder / f"order{k}.{f}.npy", mmap_mode=mode) for f in _FIELDS))
                  for k in range(1, meta["order"] + 1)]
        return cls(meta["order"], meta["vocab_size"], meta["total_tokens"], orders, folder)

    def equals(self, other: NGramTable) -> bool:
        """Same order, vocabulary, totals and counts (dtypes aside)."""
        head = (self.order, self.vocab_size, self.total_tokens)
        return head == (other.order, other.vocab_size, other.total_tokens) and all(
            np.array_equal(getattr(a, f), getattr(b, f)) for a, b in zip(self.orders, other.orders) for f in _FIELDS)


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
    """Count orders 1..order of an in-memory shard, vectorised."""
    flat = _as_flat(docs)
    return NGramTable(order, vocab_size, flat.num_tokens, list(_count_orders(flat, order, vocab_size)))


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


def _sizes(folder: Path, order: int) -> tuple[list[int], list[int]]:
    """Numbers of contexts and of n-grams per order of the arrays saved in ``folder``."""
    n = [[int(np.load(folder / f"order{k}.{f}.npy", mmap_mode="r").shape[0]) for k in range(1, order + 1)]
         for f in ("ctx", "tok")]
    return n[0], n[1]


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
    returned memory-mapped."""
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
        return NGramTable(t0.order, t0.vocab_size, total, orders)
    meta = NGramTable(t0.order, t0.vocab_size, total, []).meta()
    meta["contexts"], meta["ngrams"] = _sizes(folder, t0.order)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return NGramTable.load(folder)


def _count_to(flat: FlatDocs, order: int, vocab_size: int, folder: Path) -> Path:
    """Count a shard into ``folder``, writing each order as soon as it is counted."""
    for k, o in enumerate(_count_orders(flat, order, vocab_size), 1):
        NGramTable(k, vocab_size, flat.num_tokens, [o]).save(folder, first_order=k)
    meta = NGramTable(order, vocab_size, flat.num_tokens, []).meta()
    meta["contexts"], meta["ngrams"] = _sizes(folder, order)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder


def _shards(docs: Docs, shard_tokens: int) -> Iterator[FlatDocs]:
    """Group documents into shards of at least ``shard_tokens`` response tokens (the last may be smaller)."""
    buf, n, any_yielded = [], 0, False
    for p, r in docs:
        buf.append((p, r))
        n += len(r)
        if n >= shard_tokens:
            yield FlatDocs.from_docs(buf)
            buf, n, any_yielded = [], 0, True
    if buf or not any_yielded:
        yield FlatDocs.from_docs(buf)


def build(docs: Docs, order: int, vocab_size: int, out_folder: str | Path, *,
          shard_tokens: int = 4_000_000, num_workers: int = 1, chunk_ngrams: int = 1 << 21) -> NGramTable:
    """Count a corpus shard by shard (in ``num_workers`` processes), write the shards under
    ``out_folder/shards``, merge them into ``out_folder`` and return the table memory-mapped.

    Workers are spawned: a script calling this with num_workers > 1 needs the usual
    ``if __name__ == "__main__":`` guard."""
    out = Path(out_folder)
    (out / "meta.json").unlink(missing_ok=True)
    shard_dir = out / "shards"
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


def _bisect(vals: np.ndarray, lo: np.ndarray, hi: np.ndarray, before) -> np.ndarray:
    """Per element, the first index i in [lo, hi) with not before(vals[i]), where ``before``
    (elementwise over all elements) is monotone, True then False, along each slice: a
    vectorised bisection of ceil(log2(longest slice + 1)) steps."""
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    if len(vals) == 0 or len(lo) == 0:
        return lo
    for _ in range(int((hi - lo).max(initial=0)).bit_length()):
        mid = (lo + hi) >> 1
        go = before(vals[np.minimum(mid, len(vals) - 1)]) & (lo < hi)
        lo = np.where(go, mid + 1, lo)
        hi = np.where(go, hi, mid)
    return lo


def _ragged_search(vals: np.ndarray, lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per element, the index of w in the sorted slice vals[lo:hi], or -1."""
    i = _bisect(vals, lo, hi, lambda v: v < w)
    ok = i < hi
    ok[ok] = vals[i[ok]] == w[ok]
    return np.where(ok, i, -1)


def _group_order(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Permutation sorting items by group g ascending, then value v descending: one argsort
    of v, then one sort of packed (group, rank) keys."""
    o = np.argsort(-v)
    rank = np.empty(len(o), np.uint64)
    rank[o] = np.arange(len(o), dtype=np.uint64)
    key = (g.astype(np.uint64) << np.uint64(32)) | rank
    key.sort()
    return o[(key & np.uint64(0xFFFFFFFF)).astype(np.int64)]


def _merge_top(pid: np.ndarray, pv: np.ndarray, dup: np.ndarray, si: np.ndarray, sw: np.ndarray,
               sv: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row r, the top-k of P_r (pid, pv [U, k], descending; entries where ``dup`` left
    out) united with S_r (items of row si, token sw, value sv [S]). Needs |P_r| + |S_r| >= k.
    Returns ids [U, k] int32 and values [U, k], descending."""
    n = len(pid)
    o = _group_order(si, sv)
    si, sw, sv = si[o], sw[o], sv[o]
    size = np.bincount(si, minlength=n)
    start = np.cumsum(size) - size
    rank_s = np.arange(len(si)) - start[si]
    keep = rank_s < k  # only a row's k best S items can matter
    si, sw, sv, rank_s = si[keep], sw[keep], sv[keep], rank_s[keep]
    size = np.minimum(size, k)
    start = np.cumsum(size) - size
    base = np.arange(n) * k
    cum = np.cumsum(dup, axis=1).ravel()  # dup items among a row's first j+1
    before = _bisect(pv.ravel(), base[si], base[si] + k, lambda v: v > sv)  # P items > each S item
    pos = rank_s + before - base[si] - np.where(before > base[si], cum[np.maximum(before - 1, 0)], 0)
    m = pos < k
    ids, vals = np.zeros((n, k), np.int32), np.zeros((n, k))
    ids[si[m], pos[m]], vals[si[m], pos[m]] = sw[m], sv[m]
    free = np.ones((n, k), bool)
    free[si[m], pos[m]] = False
    kept = ~dup & (np.cumsum(~dup, axis=1) <= free.sum(1, keepdims=True))  # P items fill the rest, in order
    ids[free], vals[free] = pid[kept], pv[kept]
    return ids, vals


def _kth_largest(g: np.ndarray, c: np.ndarray, n: int, k: int) -> np.ndarray:
    """Per group 0..n-1 the k-th largest of the counts c [P] of its items g [P] (0 when fewer)."""
    inv = np.uint64(0xFFFFFFFF) - np.minimum(c, 0xFFFFFFFF).astype(np.uint64)
    key = (g.astype(np.uint64) << np.uint64(32)) | inv
    key.sort()
    size = np.bincount(g, minlength=n)
    at = np.minimum(np.cumsum(size) - size + k - 1, max(len(key) - 1, 0))
    kth = np.float64(0xFFFFFFFF) - (key[at] & np.uint64(0xFFFFFFFF)).astype(np.float64) if len(key) else np.zeros(n)
    return np.where(size >= k, kth, 0.0)


def _top_index(o: OrderCounts, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the rows with more than t successors: rows [H] (sorted), the positions (into tok and
    count) of their t most frequent successors [H, t], and the largest other count [H] (an
    upper bound, inf when counts reach 2^23). One sort of packed (row, -count, index) keys,
    in chunks of at most 2^22 n-grams and 2^16 rows."""
    off = np.asarray(o.offsets)
    lens = np.diff(off)
    rows = np.flatnonzero(lens > t)
    pos, rest = np.zeros((len(rows), t), np.int64), np.zeros(len(rows))
    cum = np.cumsum(lens[rows])
    cuts = np.searchsorted(cum, np.arange(1 << 22, cum[-1] if len(cum) else 0, 1 << 22))
    cuts = np.unique(np.concatenate((cuts, np.arange(0, len(rows), 1 << 16), [len(rows)])))
    cmax, eb = (1 << 23) - 1, max(int(lens.max(initial=1)).bit_length(), 1)  # eb + 23 + 16 <= 64 for V <= 2^24
    for a, b in zip(cuts[:-1], cuts[1:]):
        r, n = rows[a:b], lens[rows[a:b]]
        e, rl = _ragged_arange(n), np.repeat(np.arange(b - a), n)
        cnt = np.minimum(np.asarray(o.count[off[r][rl] + e]), cmax).astype(np.uint64)
        key = (rl.astype(np.uint64) << np.uint64(23 + eb)) | ((cmax - cnt) << np.uint64(eb)) | e.astype(np.uint64)
        key.sort()
        top = (key[(np.cumsum(n) - n)[:, None] + np.arange(t + 1)] & np.uint64((1 << eb) - 1)).astype(np.int64)
        top += off[r][:, None]
        pos[a:b], rest[a:b] = top[:, :t], np.asarray(o.count[top[:, t]], np.float64)
    rest[rest >= cmax] = np.inf
    return rows, pos, rest


class NGramPrior:
    """Batched queries of the hierarchical Dirichlet prior p_{n-1}(. | h) of a table.

    ``order`` (default: the table's) may be lower than the table's; contexts [B, m] need
    m >= order-1 columns (oldest first) and only the last order-1 are used."""

    def __init__(self, table: NGramTable, mu: float, order: int | None = None, smoothing: str = "dirichlet") -> None:
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
        self._tops: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # per level, built on first use

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
            ctx = self.table.orders[j].ctx
            row = np.minimum(np.searchsorted(ctx, u), max(len(ctx) - 1, 0))
            found = ctx[row] == u if len(ctx) else np.zeros(len(u), bool)
            n_h = np.where(found, self.table.orders[j].ctx_count[row] if len(ctx) else 0, 0).astype(np.float64)
            levels.append(_Level(u, inv.ravel(), parent, row, found, n_h))
        return levels

    def _slices(self, lv: list[_Level], j: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Successor range [lo, hi) in table order j+1 of level-j contexts u (empty when unseen)."""
        off, L = self.table.orders[j].offsets, lv[j]
        lo = np.where(L.found[u], off[L.row[u]], 0)
        return lo, np.where(L.found[u], off[L.row[u] + 1], 0)

    def _count(self, lv: list[_Level], j: int, u: np.ndarray, w: np.ndarray) -> np.ndarray:
        """N(h_j, w) for pairs (level-j context index u [P], token w [P]); 0 when absent."""
        o = self.table.orders[j]
        lo, hi = self._slices(lv, j, u)
        srt = np.argsort((lo.astype(np.uint64) << np.uint64(_tbits(self.V))) | w.astype(np.uint64))
        idx = np.empty(len(w), np.int64)  # searched in (row, token) order: memory accesses stay local
        idx[srt] = _ragged_search(o.tok, lo[srt], hi[srt], w[srt])
        return np.where(idx >= 0, o.count[np.maximum(idx, 0)], 0).astype(np.float64)

    def _q(self, lv: list[_Level], j: int, u: np.ndarray, w: np.ndarray, s: int,
           dec: np.ndarray | None = None) -> np.ndarray:
        """q_j(w | h_j) for pairs [P]: p_j with every normaliser shifted by -s and, where ``dec``,
        the pair's own count removed (leave-one-out of target w)."""
        chain = [u]
        for i in range(j, 1, -1):
            chain.append(lv[i].parent[chain[-1]])
        d = 0.0 if dec is None else dec.astype(np.float64)
        q = None
        for i, ui in zip(range(0, j + 1), [None] + chain[::-1]):
            cnt = self._uni[w] if i == 0 else self._count(lv, i, ui, w)
            if dec is not None and np.any(cnt[dec] < 1):
                raise ValueError("leave-one-out: some (context, target) pairs are not in the table")
            if i == 0:
                q = (cnt + 1 - d) / (self.N - s + self.V)
            else:
                q = (cnt - d + self.mu * q) / (lv[i].n_h[ui] - s + self.mu)
        return q

    def _extend(self, lv: list[_Level], j: int, u: np.ndarray, pid: np.ndarray, pq: np.ndarray,
                k: int, s: int, index: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of q_j for level-j contexts u [U] from their suffixes' top-k (pid, pq [U, k]).

        Exact: a word outside succ(h_j) has q_j = mu q_{j-1} / D_j, so the top-k of q_j lies
        in succ(h_j) united with the top-k of q_{j-1}. A successor outside the parent's top-k
        with (count + mu q_{j-1,(k)}) below the row's k-th largest count cannot reach the top-k
        either, so its q_{j-1} is never looked up. A row with many successors is first
        tried on its _TOP_T most frequent ones (and the parent's top-k); that result stands
        when its k-th value is at least (largest other count + mu q_{j-1,(k)}) / D_j, a bound
        on every word left out, else the row is redone in full."""
        o, L, n = self.table.orders[j], lv[j], len(u)
        den = L.n_h[u] - s + self.mu
        lo, hi = self._slices(lv, j, u)
        if j not in self._tops:
            self._tops[j] = _top_index(o, _TOP_T)
        t_rows, t_pos, t_rest = self._tops[j]
        h = np.minimum(np.searchsorted(t_rows, L.row[u]), max(len(t_rows) - 1, 0))
        use = index and k < _TOP_T and len(t_rows) > 0
        use = L.found[u] & (t_rows[h] == L.row[u]) if use else np.zeros(n, bool)
        lens = np.where(use, 0, hi - lo)
        gi = np.repeat(np.arange(n), lens)
        g = _ragged_arange(lens) + lo[gi]
        ui = np.flatnonzero(use)
        if ui.size:  # listed frequent successors, plus parent's top items found among the others
            pu = np.repeat(ui, k)
            f = _ragged_search(o.tok, lo[pu], hi[pu], pid[ui].ravel())
            f[(t_pos[h[pu]] == f[:, None]).any(1)] = -1
            gi = np.concatenate((gi, np.repeat(ui, _TOP_T), pu[f >= 0]))
            g = np.concatenate((g, t_pos[h[ui]].ravel(), f[f >= 0]))
        gw = np.asarray(o.tok[g]).astype(np.int64)
        dup, col = np.zeros((n, k), bool), np.full(len(gi), -1)  # parent's top items that are successors
        for a in range(0, len(gi), 1 << 20):
            eq = pid[gi[a:a + 1 << 20]] == gw[a:a + 1 << 20, None]
            hit = np.flatnonzero(eq.any(1))
            col[a + hit] = eq[hit].argmax(1)
            dup[gi[a + hit], col[a + hit]] = True
        cnt = np.asarray(o.count[g])
        keep = (col >= 0) | (cnt + self.mu * pq[gi, k - 1] >= _kth_largest(gi, cnt, n, k)[gi])
        gi, gw, col, cnt = gi[keep], gw[keep], col[keep], cnt[keep]
        qp = np.where(col >= 0, pq[gi, col], 0.0)  # q_{j-1} of successors: known when in the parent's top
        rest = np.flatnonzero(col < 0)
        qp[rest] = self._q(lv, j - 1, L.parent[u][gi[rest]], gw[rest], s)
        gq = (cnt + self.mu * qp) / den[gi]
        ids, vals = _merge_top(pid, self.mu * pq / den[:, None], dup, gi, gw, gq, k)
        redo = ui[vals[ui, k - 1] < (t_rest[h[ui]] + self.mu * pq[ui, k - 1]) / den[ui]]
        if redo.size:
            ids[redo], vals[redo] = self._extend(lv, j, u[redo], pid[redo], pq[redo], k, s, index=False)
        return ids, vals

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
            t_ids, t_q = self._extend(lv, j, todo, ids[L.parent[todo]], q[L.parent[todo]], k, s)
            ids, q = np.zeros((len(L.keys), k), np.int32), np.zeros((len(L.keys), k))
            ids[hit], q[hit], ids[todo], q[todo] = cid[pos[hit]], cq[pos[hit]], t_ids, t_q
            new = heavy[todo]
            if new.any():
                ck = np.concatenate((ck, L.keys[todo[new]]))
                o = np.argsort(ck)
                self._cache[k, s, j] = (ck[o], np.concatenate((cid, t_ids[new]))[o], np.concatenate((cq, t_q[new]))[o])
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
        lv = self._levels(contexts)
        s = 0 if targets is None else 1
        k = min(int(top_k), self.V)
        ids, q = self._top(lv, min(k + s, self.V), s)
        last = lv[-1]
        ids, q = ids[last.inv], q[last.inv]
        if targets is not None:
            t = self._targets(lv, targets)
            pt = self._q(lv, self.order - 1, last.inv, t, 1, np.ones(len(t), bool))
            q = np.concatenate((np.where(ids == t[:, None], -1.0, q), pt[:, None]), axis=1)
            ids = np.concatenate((ids, t[:, None].astype(np.int32)), axis=1)
            o = np.argsort(-q, axis=1, kind="stable")
            ids, q = np.take_along_axis(ids, o, 1), np.take_along_axis(q, o, 1)
        ids, q = ids[:, :k], q[:, :k]
        kappa = last.n_h[last.inv] - s + (self.mu if self.order > 1 else self.V)
        return PriorBatch(ids, q, np.maximum(1.0 - q.sum(axis=1), 0.0), kappa)

    def prob(self, contexts: np.ndarray, token_ids: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
        """p_{n-1}(w | h) for token_ids [B] or [B, J] (same shape out, float64); with
        ``targets`` [B], leave-one-out of each position's own target."""
        lv = self._levels(contexts)
        w = np.asarray(token_ids).astype(np.int64)
        B = len(lv[0].inv)
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
