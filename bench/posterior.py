"""Benchmark of the `posterior` stage (bayeskd.stages.posterior): throughput, the proxy forward's
share of the stage's time, and the target store's bytes per stored entry (issue 5).

    python bench/posterior.py [--docs 128] [--prompt-len 30] [--response-len 60] [--batch-size 8]
                              [--hidden 576] [--layers 4] [--modes expected sampled product]
                              [--ks 32 64] [--threads 2] [--profile MODE:K[:ev]] [--out bench/out/posterior.json]

Targets: the proxy forward is at least 80% of the stage's time (the Bayesian update is nearly
free) and the store costs at most 7 bytes per stored entry.

Setup. Synthetic corpus: Zipf(1.0)-distributed token ids over the default teacher's vocabulary
(49152, randomly permuted), `--docs` documents with prompts of U[prompt-len/2, 3 prompt-len/2]
tokens and responses of U[response-len/2, 3 response-len/2] tokens. Prior: `ngram.count` of
order 3 over the corpus, `NGramPrior(table, mu=2.0)`, queried with leave-one-out (every position
is a training position). Proxy: a randomly initialised LlamaForCausalLM of the quickstart's
proxy shape (the first 4 layers of SmolLM2-135M: hidden 576, 9 heads, 3 KV heads, intermediate
1536, tied embeddings), float32, eval mode. Teacher evidence (optional per configuration):
ids [P, E] (E = 5) per position, the position's own token and E-1 distinct others drawn from
the proxy's top-32 (so all are among the candidates), with sorted probabilities that sum to
U(0.5, 0.95) < 1.

Loop, as `_compute` does it: per batch of `--batch-size` documents, collate (pad) and run the
proxy under torch.inference_mode (the "proxy forward" time, collation included as in the stage);
then per document take the logits at the response positions (t-1 predicts t), call `estimate`
with leave-one-out targets, add the rows to a `TargetWriter`, and compute the proxy's mean
log-likelihood of the response (the stage's Proxy-KD weights). The stage's total time is forward
+ all of that (`writer.close` excluded, as in the stage).

The proxy's logits do not depend on the configuration, so one forward per batch serves every
configuration: each configuration's total is the shared forward time plus its own per-document
time, which is the stage's own accounting (t_proxy / t_total) for a run with that configuration.
The configurations take turns within each batch (order rotated per batch), so that a shared
machine's slow spells spread over all of them. Each configuration has its own fresh NGramPrior
(its caches start cold, as in a run of the stage), its own generator (seeded) and its own
TargetWriter under a temporary folder. Warm-up: the first batch once through the forward, and its
first `--warmup-docs` documents through every configuration with throwaway priors and writers,
before anything is timed.

Reported per configuration: positions, positions/s (stage total), proxy forward share of the
total, estimate() time per position (µs), the other per-document work per position (writer.add,
log-likelihood, slicing), and bytes per stored `posterior` entry from
`TargetStore.open(folder).bytes_per_entry("posterior")`. `--profile MODE:K[:ev]` additionally
runs that configuration's per-document work under cProfile (one pass, after the timed one) and
prints the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

VOCAB = 49152
ORDER = 3


# ----------------------------------------------------------------------------- setup


def make_corpus(args: argparse.Namespace) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, response ids) per document, Zipf(1.0) over a permuted vocabulary."""
    rng = np.random.default_rng(args.seed)
    cdf = np.cumsum(1.0 / np.arange(1, VOCAB + 1))
    cdf /= cdf[-1]
    perm = np.random.default_rng(1234).permutation(VOCAB).astype(np.int64)

    def lengths(mean: int) -> np.ndarray:
        return rng.integers(max(1, mean // 2), max(1, mean // 2) + mean + 1, args.docs)

    docs = []
    for pl, rl in zip(lengths(args.prompt_len), lengths(args.response_len)):
        toks = perm[np.searchsorted(cdf, rng.random(int(pl + rl)))]
        docs.append((toks[:pl], toks[pl:]))
    return docs


def make_proxy(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float().eval()


def make_evidence(z: torch.Tensor, targets: np.ndarray, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ids [P, width] int64 (own token + width-1 distinct others from the proxy's top-32 at the P
    positions, logits z [P, V]), probs [P, width]."""
    top = z.topk(32, dim=-1).indices.numpy()
    P = len(targets)
    ids = np.empty((P, width), np.int64)
    ids[:, 0] = targets
    for i in range(P):
        others = top[i][top[i] != targets[i]]
        ids[i, 1:] = rng.choice(others, width - 1, replace=False)
    rng.permuted(ids, axis=1, out=ids)
    probs = -np.sort(-rng.dirichlet(np.ones(width), P), axis=1) * rng.uniform(0.5, 0.95, (P, 1))
    return ids, probs


class Config:
    """One measured configuration: its settings, prior, writer, generator and timings."""

    def __init__(self, mode: str, k: int, evidence: bool, args: argparse.Namespace, table, root: Path | None):
        from bayeskd.estimate.prior import NGramPrior
        from bayeskd.estimate.config import PosteriorConfig
        from bayeskd.estimate.update import TARGET_SETS
        from bayeskd.estimate.targets import TargetWriter

        self.mode, self.k, self.evidence = mode, k, evidence
        self.name = f"{mode}-K{k}" + ("-ev" if evidence else "")
        self.cfg = PosteriorConfig(mode=mode, m=float(args.m), top_k=k, batch_size=args.batch_size, seed=args.seed)
        self.cfg.validate("posterior")
        self.k_prior = args.k_prior or k
        self.prior = NGramPrior(table, mu=args.mu, order=ORDER)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.folder = (root / self.name) if root is not None else Path(tempfile.mkdtemp())
        self.writer = TargetWriter(self.folder, TARGET_SETS, k)
        self.t_post = self.t_est = self.t_write = self.t_loglik = 0.0
        self.positions = 0

    def process(self, logits: torch.Tensor, labels: torch.Tensor, lo: int, ctx: dict) -> None:
        """The stage's per-document work for one batch (documents lo..lo+B), timed."""
        from bayeskd.data import response_logits, response_positions
        from bayeskd.estimate.update import estimate

        contexts, targets, starts, evidence = ctx["contexts"], ctx["targets"], ctx["starts"], ctx["evidence"]
        t0 = time.perf_counter()
        for b, z in enumerate(response_logits(logits, response_positions(labels))):
            d = lo + b
            sl = slice(int(starts[d]), int(starts[d + 1]))
            loo = targets[sl]
            ev = evidence[d] if self.evidence else None
            t1 = time.perf_counter()
            dists, ent = estimate(self.prior, contexts[sl], loo, z, self.cfg, self.k_prior, ev, self.generator)
            t2 = time.perf_counter()
            self.writer.add(d, dists, ent)
            t3 = time.perf_counter()
            lab = torch.from_numpy(targets[sl].astype(np.int64))
            _ = float(torch.log_softmax(z.float(), -1).gather(1, lab[:, None]).mean())
            t4 = time.perf_counter()
            self.t_est += t2 - t1
            self.t_write += t3 - t2
            self.t_loglik += t4 - t3
            self.positions += len(z)
        self.t_post += time.perf_counter() - t0


def doc_logits(logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """Per document of a batch: the logits [n_response, V] that predict its response tokens."""
    from bayeskd.data import response_logits, response_positions

    return response_logits(logits, response_positions(batch["labels"]))


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict:
    from bayeskd.estimate import ngram
    from bayeskd.data import Collator
    from bayeskd.estimate.update import TARGET_SETS
    from bayeskd.data import IGNORE_INDEX
    from bayeskd.estimate.targets import TargetStore

    t_setup = time.perf_counter()
    docs = make_corpus(args)
    table = ngram.count(docs, order=ORDER, vocab_size=VOCAB)
    contexts, targets = ngram.corpus_contexts(docs, ORDER, VOCAB)
    starts = np.concatenate([[0], np.cumsum([len(r) for _, r in docs])])
    rows = [
        {"input_ids": np.concatenate([p, r]).tolist(), "labels": [IGNORE_INDEX] * len(p) + r.tolist(), "index": i}
        for i, (p, r) in enumerate(docs)
    ]
    proxy = make_proxy(args)
    collate = Collator(pad_token_id=0)
    batches = [(lo, rows[lo : lo + args.batch_size]) for lo in range(0, len(rows), args.batch_size)]
    ev_rng = np.random.default_rng(args.seed + 1)
    specs = [(m, k, ev) for m in args.modes for k in args.ks for ev in (False, True)]
    t_setup = time.perf_counter() - t_setup
    n_params = sum(p.numel() for p in proxy.parameters())
    print(f"corpus: {len(docs)} docs, {len(targets)} response positions, "
          f"{sum(len(r['input_ids']) for r in rows)} tokens; proxy {n_params / 1e6:.1f}M params; "
          f"{len(specs)} configurations x {len(batches)} batches (setup {t_setup:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-posterior-") as tmp:
        root = Path(tmp)
        # Warm-up: the first batch through the forward and every configuration (throwaway priors and writers).
        lo, batch_rows = batches[0]
        batch = collate(batch_rows)
        with torch.inference_mode():
            logits = proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ev = {lo + b: make_evidence(z, targets[starts[lo + b] : starts[lo + b + 1]], args.evidence_width, ev_rng)
              for b, z in enumerate(doc_logits(logits, batch))}
        n_warm = min(args.warmup_docs, logits.shape[0])
        for m, k, e in specs:
            warm = Config(m, k, e, args, table, root / "warmup")
            warm.process(logits[:n_warm], batch["labels"][:n_warm], lo,
                         {"contexts": contexts, "targets": targets, "starts": starts, "evidence": ev})
        del logits, batch

        configs = [Config(m, k, e, args, table, root) for m, k, e in specs]
        ctx = {"contexts": contexts, "targets": targets, "starts": starts, "evidence": {}}
        t_fwd, t_wall = 0.0, time.perf_counter()
        for i, (lo, batch_rows) in enumerate(batches):
            t0 = time.perf_counter()
            batch = collate(batch_rows)
            with torch.inference_mode():
                logits = proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t_fwd += time.perf_counter() - t0
            ctx["evidence"] = {}  # not timed: stands in for the collect stage's stored logprobs
            for b, z in enumerate(doc_logits(logits, batch)):
                sl = slice(int(starts[lo + b]), int(starts[lo + b + 1]))
                ctx["evidence"][lo + b] = make_evidence(z, targets[sl], args.evidence_width, ev_rng)
            shift = i % len(configs)
            for c in configs[shift:] + configs[:shift]:
                c.process(logits, batch["labels"], lo, ctx)
            if (i + 1) % max(1, len(batches) // 5) == 0:
                print(f"batch {i + 1}/{len(batches)} ({time.perf_counter() - t_wall:.0f} s)", file=sys.stderr, flush=True)
        t_wall = time.perf_counter() - t_wall

        profile = None
        if args.profile:
            profile = profile_config(args, table, batches, collate, proxy, ctx, root)

        results = {}
        for c in configs:
            t = time.perf_counter()
            c.writer.close({"mode": c.mode, "m": args.m, "k": c.k, "bench": True})
            t_close = time.perf_counter() - t
            store = TargetStore.open(c.folder)
            total = t_fwd + c.t_post
            n = c.positions
            results[c.name] = {
                "mode": c.mode, "k": c.k, "k_prior": c.k_prior, "evidence": c.evidence,
                "positions": n,
                "positions_per_s": n / total,
                "proxy_forward_share": t_fwd / total,
                "total_s": total,
                "proxy_forward_s": t_fwd,
                "post_s": c.t_post,
                "estimate_us_per_position": 1e6 * c.t_est / n,
                "writer_us_per_position": 1e6 * c.t_write / n,
                "loglik_us_per_position": 1e6 * c.t_loglik / n,
                "other_us_per_position": 1e6 * (c.t_post - c.t_est - c.t_write - c.t_loglik) / n,
                "proxy_forward_us_per_position": 1e6 * t_fwd / n,
                "writer_close_s": t_close,
                "bytes_per_entry": store.bytes_per_entry("posterior"),
                "bytes_per_entry_all_sets": {s: store.bytes_per_entry(s) for s in TARGET_SETS},
            }  # fmt: skip
    return {
        "corpus": {"docs": len(docs), "positions": int(len(targets)), "tokens": sum(len(r["input_ids"]) for r in rows),
                   "batches": len(batches), "ngram_contexts": [len(o.ctx) for o in table.orders]},
        "proxy_params": n_params,
        "timed_wall_s": t_wall,
        "results": results,
        **({"profile": profile} if profile else {}),
    }  # fmt: skip


def profile_config(args, table, batches, collate, proxy, ctx, root: Path) -> dict:
    """One more pass of one configuration's per-document work under cProfile (forward not profiled)."""
    parts = args.profile.split(":")
    mode, k, ev = parts[0], int(parts[1]), len(parts) > 2 and parts[2] == "ev"
    c = Config(mode, k, ev, args, table, root / "profile")
    prof = cProfile.Profile()
    evidence = ctx["evidence"]
    for lo, batch_rows in batches:
        batch = collate(batch_rows)
        with torch.inference_mode():
            logits = proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if ev:
            ctx = dict(ctx, evidence={**evidence})
            for b, z in enumerate(doc_logits(logits, batch)):
                sl = slice(int(ctx["starts"][lo + b]), int(ctx["starts"][lo + b + 1]))
                ctx["evidence"][lo + b] = make_evidence(z, ctx["targets"][sl], args.evidence_width, np.random.default_rng(lo + b))
        prof.enable()
        c.process(logits, batch["labels"], lo, ctx)
        prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s).sort_stats("tottime")
    stats.print_stats(args.profile_top)
    print(s.getvalue(), file=sys.stderr)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.profile_top]
    return {
        "config": c.name,
        "post_s": c.t_post,
        "top_tottime": [{"function": f"{Path(f).name}:{line}({fn})", "calls": v[1], "tottime_s": v[2], "cumtime_s": v[3]}
                        for (f, line, fn), v in top],
    }  # fmt: skip


# ----------------------------------------------------------------------------- report


def report(args: argparse.Namespace, record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    res = record["results"]
    corpus = record["corpus"]
    table = Table(
        title=f"posterior stage: {corpus['docs']} docs, {corpus['positions']} positions, batch {args.batch_size}, "
        f"proxy L{args.layers} H{args.hidden} ({record['proxy_params'] / 1e6:.0f}M), V={VOCAB}, M={args.m}, "
        f"threads={torch.get_num_threads()}",
        caption="share = proxy forward / stage total (target >= 80%); B/entry = posterior store bytes per stored entry "
        "(target <= 7); µs/pos = per response position",
    )
    for col in ("config", "positions", "pos/s", "fwd share", "fwd µs/pos", "estimate µs/pos", "write µs/pos",
                "loglik µs/pos", "other µs/pos", "B/entry"):  # fmt: skip
        table.add_column(col, justify="left" if col == "config" else "right")
    for name, r in res.items():
        share = r["proxy_forward_share"]
        bpe = r["bytes_per_entry"]
        table.add_row(
            name, str(r["positions"]), f"{r['positions_per_s']:.0f}",
            f"[{'green' if share >= 0.8 else 'red'}]{100 * share:.1f}%[/]",
            f"{r['proxy_forward_us_per_position']:.0f}", f"{r['estimate_us_per_position']:.0f}",
            f"{r['writer_us_per_position']:.0f}", f"{r['loglik_us_per_position']:.0f}", f"{r['other_us_per_position']:.0f}",
            f"[{'green' if bpe <= 7 else 'red'}]{bpe:.3f}[/]",
        )  # fmt: skip
    console = Console(width=max(140, Console().width))
    console.print(table)
    ok_share = all(r["proxy_forward_share"] >= 0.8 for r in res.values())
    ok_bytes = all(r["bytes_per_entry"] <= 7 for r in res.values())
    console.print(f"forward share >= 80%: {'met' if ok_share else 'NOT met'} in "
                  f"{sum(r['proxy_forward_share'] >= 0.8 for r in res.values())}/{len(res)} configurations; "
                  f"bytes/entry <= 7: {'met' if ok_bytes else 'NOT met'}; timed wall {record['timed_wall_s']:.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=128, help="documents (128: about 1.5 minutes on 2 idle cores)")
    parser.add_argument("--prompt-len", type=int, default=30, help="mean prompt length (uniform over [n/2, 3n/2])")
    parser.add_argument("--response-len", type=int, default=60, help="mean response length (uniform over [n/2, 3n/2])")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per proxy forward (posterior.batch_size)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--modes", nargs="+", default=["expected", "sampled", "product"],
                        choices=["expected", "sampled", "product"])  # fmt: skip
    parser.add_argument("--ks", nargs="+", type=int, default=[32, 64], help="posterior.top_k values")
    parser.add_argument("--k-prior", type=int, default=0, help="prior candidates per position (0: the same as K)")
    parser.add_argument("--m", type=int, default=8, help="M (draws for sampled)")
    parser.add_argument("--mu", type=float, default=2.0)
    parser.add_argument("--evidence-width", type=int, default=5, help="teacher evidence entries per position")
    parser.add_argument("--warmup-docs", type=int, default=2, help="documents of the first batch each configuration warms up on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--profile", default=None, metavar="MODE:K[:ev]",
                        help="also profile this configuration's per-document work (e.g. sampled:32)")  # fmt: skip
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument("--out", default="bench/out/posterior.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    record = run(args)
    record["runtime_s"] = time.perf_counter() - t0
    report(args, record)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    head = {"device": "cpu", "threads": torch.get_num_threads(), "vocab": VOCAB, "torch": torch.__version__,
            "settings": settings}  # fmt: skip
    out.write_text(json.dumps(head | record, indent=2))
    print(f"wrote {out} (total {record['runtime_s']:.0f} s)")


if __name__ == "__main__":
    main()
