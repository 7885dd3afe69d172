"""Counting a corpus too large for memory: shards counted to disk in worker processes, then merged
chunk by chunk into one table (`build`), and the merge of any tables counted apart (`merge`).
The table format and the counting itself are in `ngram`."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from bayeskd.estimate.ngram import (
    _FIELDS,
    Docs,
    FlatDocs,
    NGramTable,
    OrderCounts,
    _Sink,
    _reopen,
    _bits,
    _count_dtype,
    _count_orders,
    _group,
    link,
)


# ----------------------------------------------------------------------------- merging


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
