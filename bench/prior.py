"""Benchmark of the n-gram prior (bayeskd.estimate.ngram): build throughput and peak memory, size on
disk, batched query throughput, and nltk.lm side by side on the same 1M-token corpus.

    python bench/prior.py [--sizes 1e6 1e7 1e8] [--orders 3 4] [--out bench/out/prior.json]

Synthetic corpus: Zipf(1.0)-distributed ids over a 49152-token vocabulary (randomly permuted),
documents of 100-500 response tokens after a 10-60-token prompt. Each corpus is written to a
scratch folder first (not timed) and read back in blocks; each build and each query run is a
child process whose process tree's RSS is sampled every 20 ms (peak = the high-water mark of the
sum over the tree). Wall-clock and CPU seconds are both reported: the machine may be shared.
Queries: "cold" is the first 100k positions after loading (caches empty, table pages not yet
touched), "warm" the next 100k; the query child's startup (loading the table, importing numba
and its compiled loops from the cache, one tiny query) is reported apart. The first query on a
fresh install also compiles the loops (about 13 s, once). Needs psutil and nltk (the bench
extra); --no-nltk skips the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

V = 49152
MU = 10.0
TOP_K = 32


# ----------------------------------------------------------------------------- corpus


def write_corpus(folder: Path, n_tokens: int, seed: int = 0) -> dict:
    """tokens.bin (int32: each document's prompt then response), docs.npy [D, 3]
    (start, prompt length, response length)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, V + 1))
    cdf /= cdf[-1]
    perm = np.random.default_rng(1234).permutation(V).astype(np.int32)
    docs, start, done = [], 0, 0
    with open(folder / "tokens.bin", "wb") as f:
        while done < n_tokens:
            rl = rng.integers(100, 501, 4096)
            rl = rl[: np.searchsorted(np.cumsum(rl), n_tokens - done) + 1]
            rl[-1] -= max(int(rl.sum()) - (n_tokens - done), 0)
            pl = rng.integers(10, 61, len(rl))
            toks = perm[np.searchsorted(cdf, rng.random(int(rl.sum() + pl.sum())))]
            toks.tofile(f)
            starts = start + np.concatenate(([0], np.cumsum(rl + pl)[:-1]))
            docs.append(np.stack([starts, pl, rl], 1))
            start += int((rl + pl).sum())
            done += int(rl.sum())
    np.save(folder / "docs.npy", np.concatenate(docs))
    return {"tokens": done, "docs": int(sum(len(d) for d in docs))}


def iter_docs(folder: Path, block_tokens: int = 1 << 20):
    """(prompt, response) pairs read block by block with plain file reads (no mapping)."""
    docs = np.load(folder / "docs.npy")
    ends = docs[:, 0] + docs[:, 1] + docs[:, 2]
    i = 0
    with open(folder / "tokens.bin", "rb") as f:
        while i < len(docs):
            j = max(int(np.searchsorted(ends, docs[i, 0] + block_tokens)), i + 1)
            j = min(j, len(docs))
            f.seek(int(docs[i, 0]) * 4)
            block = np.fromfile(f, np.int32, int(ends[j - 1] - docs[i, 0]))
            for s, p, r in docs[i:j] - np.array([docs[i, 0], 0, 0]):
                yield block[s:s + p], block[s + p:s + p + r]
            i = j


def sample_docs(folder: Path, n_docs: int, seed: int = 1) -> list:
    docs = np.load(folder / "docs.npy")
    toks = np.memmap(folder / "tokens.bin", np.int32, "r")
    pick = np.sort(np.random.default_rng(seed).choice(len(docs), min(n_docs, len(docs)), replace=False))
    return [(np.array(toks[s:s + p]), np.array(toks[s + p:s + p + r])) for s, p, r in docs[pick]]


# ----------------------------------------------------------------------------- children


def child_build(p: dict) -> dict:
    from bayeskd.estimate.ngram_build import build
    from bayeskd.estimate.prior import table_summary

    import psutil

    # One interpreter with numpy and bayeskd.estimate.ngram loaded: its current RSS (ru_maxrss would not do:
    # Linux carries the parent's high-water mark across fork and exec).
    base_rss = psutil.Process().memory_info().rss
    out = Path(p["out"])
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    table = build(iter_docs(Path(p["corpus"])), p["order"], V, out, shard_tokens=p["shard_tokens"],
                        num_workers=p["workers"])
    wall = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in out.iterdir())
    return {"build_s": wall, "main_cpu_s": time.process_time() - c0, "base_rss": base_rss, "disk_bytes": disk,
            "ngrams": [len(o.tok) for o in table.orders], "contexts": [len(o.ctx) for o in table.orders],
            "summary": table_summary(table, MU)}


def child_query(p: dict) -> dict:
    from bayeskd.estimate import ngram
    from bayeskd.estimate.prior import NGramPrior

    t0 = time.perf_counter()
    table = ngram.NGramTable.load(p["table"])
    prior = NGramPrior(table, mu=MU, threads=p["threads"])
    ctx, tgt = ngram.corpus_contexts(sample_docs(Path(p["corpus"]), 4000), table.order, V)
    sel = np.random.default_rng(2).permutation(len(tgt))
    prior.query(ctx[sel[-1:]], TOP_K)  # startup: numba's import and compiled code (from its cache)
    res = {"startup_s": time.perf_counter() - t0}
    for name, loo in (("loo", True), ("plain", False)):
        for phase in ("cold", "warm"):  # warm: new positions, contexts cache already filled
            part = sel[: p["positions"]] if phase == "cold" else sel[p["positions"]: 2 * p["positions"]]
            t0, c0 = time.perf_counter(), time.process_time()
            for a in range(0, len(part), p["batch"]):
                b = part[a:a + p["batch"]]
                prior.query(ctx[b], TOP_K, tgt[b] if loo else None)
            res[f"{name}_{phase}"] = {"positions": len(part), "s": time.perf_counter() - t0,
                                      "cpu_s": time.process_time() - c0}
    b = sel[: p["positions"]]
    t0 = time.perf_counter()
    prior.prob(ctx[b], tgt[b], tgt[b])
    res["prob_loo"] = {"positions": len(b), "s": time.perf_counter() - t0}
    return res


def child_nltk(p: dict) -> dict:
    from nltk.lm import KneserNeyInterpolated, WittenBellInterpolated
    from nltk.lm.preprocessing import padded_everygram_pipeline

    docs = [[str(w) for w in r.tolist()] for _, r in iter_docs(Path(p["corpus"]))]
    n_fit = int(p["fit_tokens"])
    fit_docs, n = [], 0
    for d in docs:
        if n >= n_fit:
            break
        fit_docs.append(d)
        n += len(d)
    res = {"fit_tokens": n, "corpus_tokens": sum(map(len, docs))}
    t0 = time.perf_counter()
    train, vocab = padded_everygram_pipeline(p["order"], fit_docs)
    lm = WittenBellInterpolated(p["order"])
    lm.fit(train, vocab)
    res["wb_fit_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(3)
    pairs = [(d[i], d[i - p["order"] + 1:i]) for d in (fit_docs[j] for j in rng.integers(0, len(fit_docs), 200))
             for i in rng.integers(p["order"], len(d), 10)]
    t0 = time.perf_counter()
    for w, c in pairs:
        lm.score(w, c)
    res["wb_score_s_per_call"] = (time.perf_counter() - t0) / len(pairs)
    train, vocab = padded_everygram_pipeline(p["order"], fit_docs[: max(1, len(fit_docs) // 10)])
    kn = KneserNeyInterpolated(p["order"])
    t0 = time.perf_counter()
    kn.fit(train, vocab)
    res["kn_fit_s_tenth"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for w, c in pairs[:5]:
        kn.score(w, c)
    res["kn_score_s_per_call"] = (time.perf_counter() - t0) / 5
    return res


CHILDREN = {"build": child_build, "query": child_query, "nltk": child_nltk}


def run_child(kind: str, params: dict) -> dict:
    """Run a child; returns its result plus wall seconds, CPU seconds of the whole tree and the
    peak summed RSS of the tree."""
    import psutil

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, json.dumps(params)], stdout=subprocess.PIPE)
    peak = [0]

    def watch() -> None:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [ps] + ps.children(recursive=True)
                peak[0] = max(peak[0], sum(q.memory_info().rss for q in tree if q.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"child {kind} failed ({proc.returncode})")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(out.decode().strip().splitlines()[-1])
    res.update(wall_s=time.perf_counter() - t0, tree_cpu_s=(r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
               peak_rss=peak[0], loadavg_before=load0,
               loadavg_after=os.getloadavg()[0])
    return res


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7], help="corpus sizes in tokens (add 1e8 for the big one)")
    ap.add_argument("--orders", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--out", default="bench/out/prior.json")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-tokens", type=float, default=4e6)
    ap.add_argument("--positions", type=int, default=100_000, help="query positions per measurement")
    ap.add_argument("--batch", type=int, default=16384, help="positions per query call")
    ap.add_argument("--threads", type=int, default=None, help="query threads (default: the CPUs this process may use)")
    ap.add_argument("--nltk-fit-tokens", type=float, default=1e6, help="tokens nltk fits on (extrapolated to 1M)")
    ap.add_argument("--no-nltk", action="store_true")
    ap.add_argument("--scratch", default=None, help="folder for corpora and tables (default: a temp dir)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_prior_"))
    report = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__},
              "settings": {k: v for k, v in vars(args).items() if k != "child"} | {"vocab": V, "mu": MU, "top_k": TOP_K},
              "runs": []}
    rows = []
    for size in args.sizes:
        corpus = scratch / f"corpus_{int(size)}"
        t0 = time.perf_counter()
        info = write_corpus(corpus, int(size))
        console.print(f"corpus {int(size):,} tokens ({info['docs']:,} docs) written in {time.perf_counter() - t0:.1f}s")
        for order in args.orders:
            tdir = scratch / f"table_{int(size)}_{order}"
            b = run_child("build", {"corpus": str(corpus), "order": order, "out": str(tdir),
                                    "shard_tokens": int(args.shard_tokens), "workers": args.workers})
            q = run_child("query", {"corpus": str(corpus), "table": str(tdir), "positions": args.positions,
                                    "batch": args.batch, "threads": args.threads})
            run = {"tokens": info["tokens"], "order": order, "build": b, "query": q}
            report["runs"].append(run)
            uniq = sum(b["ngrams"])
            shards = -(-info["tokens"] // int(args.shard_tokens))
            procs = 1 + min(args.workers, shards) if shards > 1 and args.workers > 1 else 1  # interpreters in the tree
            lw, lc = q["loo_warm"], q["loo_cold"]
            rows.append([f"{info['tokens']:.0e}", str(order), f"{b['build_s']:.1f}",
                         f"{info['tokens'] / b['build_s'] / 1e6:.2f}", f"{info['tokens'] / b['tree_cpu_s'] / 1e6:.2f}",
                         f"{b['disk_bytes'] / 2**20:.0f}", f"{b['disk_bytes'] / uniq:.1f}",
                         f"{b['peak_rss'] / 2**20:.0f}", f"{b['peak_rss'] / b['disk_bytes']:.2f}",
                         f"{(b['peak_rss'] - procs * b['base_rss']) / b['disk_bytes']:.2f}",
                         f"{lc['positions'] / lc['s'] / 1e3:.0f}", f"{lw['positions'] / lw['s'] / 1e3:.0f}",
                         f"{lw['positions'] / lw['cpu_s'] / 1e3:.0f}",
                         f"{q['plain_warm']['positions'] / q['plain_warm']['s'] / 1e3:.0f}",
                         f"{q['prob_loo']['positions'] / q['prob_loo']['s'] / 1e3:.0f}", f"{q['startup_s']:.2f}",
                         f"{b['loadavg_before']:.1f}/{q['loadavg_after']:.1f}"])
            console.print(f"  order {order}: built in {b['build_s']:.1f}s, queried in {q['wall_s']:.1f}s")
            shutil.rmtree(tdir, ignore_errors=True)
        if size == args.sizes[0] and not args.no_nltk and int(size) == 1_000_000:
            report["nltk"] = nltk_side_by_side(console, corpus, args, report["runs"])
        shutil.rmtree(corpus, ignore_errors=True)
    from bayeskd.estimate import ngram

    threads = ngram._threads(args.threads)  # what the query children use
    table = Table(title=f"bayeskd.estimate.ngram (vocab {V}, K={TOP_K}, mu={MU}, {args.workers} build workers, "
                        f"query batches of {args.batch} in {threads} threads)")
    for h in ("tokens", "n", "build s", "build Mtok/s", "Mtok/cpu-s", "disk MiB", "B/ngram", "peak MiB", "peak/disk",
              "(peak-interps)/disk", "LOO cold kpos/s", "LOO warm kpos/s", "kpos/cpu-s", "plain warm kpos/s",
              "prob kpos/s", "query startup s", "load"):
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    if "nltk" in report:
        console.print(report["nltk"]["text"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    console.print(f"wrote {args.out}")
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)


def nltk_side_by_side(console, corpus: Path, args, runs: list) -> dict:
    """nltk.lm WittenBellInterpolated (and KneserNeyInterpolated on a tenth) at order 3 on the
    1M-token corpus, against this module's build and queries on the same corpus."""
    ours = next(r for r in runs if r["order"] == 3 and r["tokens"] == 1_000_000)
    n = run_child("nltk", {"corpus": str(corpus), "order": 3, "fit_tokens": args.nltk_fit_tokens})
    scale = n["corpus_tokens"] / n["fit_tokens"]
    wb_fit = n["wb_fit_s"] * scale
    kn_fit = n["kn_fit_s_tenth"] * 10 * scale
    q = ours["query"]["loo_warm"]
    our_topk = q["s"] / q["positions"]
    our_prob = ours["query"]["prob_loo"]["s"] / ours["query"]["prob_loo"]["positions"]
    wb_topk = n["wb_score_s_per_call"] * V  # a top-K needs all V scores
    lines = [
        f"nltk.lm on the same {n['corpus_tokens']:,}-token corpus, order 3"
        + (f" (fitted on {n['fit_tokens']:,} tokens, times scaled linearly)" if scale > 1.01 else ""),
        f"  build: WittenBellInterpolated {wb_fit:.1f}s, KneserNeyInterpolated {kn_fit:.1f}s (fitted on a tenth, x10)"
        f" vs ours {ours['build']['build_s']:.2f}s -> {wb_fit / ours['build']['build_s']:.0f}x faster than WB",
        f"  one probability: WB {n['wb_score_s_per_call'] * 1e6:.0f} us, KN {n['kn_score_s_per_call'] * 1e3:.0f} ms"
        f" vs ours {our_prob * 1e6:.2f} us (batched prob) -> {n['wb_score_s_per_call'] / our_prob:.0f}x",
        f"  top-{TOP_K} at one position: WB needs {V} scores = {wb_topk:.1f}s (extrapolated from single scores)"
        f" vs ours {our_topk * 1e6:.1f} us -> {wb_topk / our_topk:.1e}x",
    ]
    return n | {"wb_fit_s_1M": wb_fit, "kn_fit_s_1M": kn_fit, "ours_build_s": ours["build"]["build_s"],
                "ours_prob_s_per_position": our_prob, "ours_topk_s_per_position": our_topk,
                "wb_topk_s_per_position": wb_topk, "text": "\n".join(lines)}


if __name__ == "__main__":
    main()
