"""How to spend API tokens on the teacher's evidence: fidelity per token for three ways to spend
one budget, and the end effect on the `bayes` student (method.md, section 2).

    HF_HUB_OFFLINE=1 python bench/studies/budget.py [--config bench/studies/budget.yaml] [--budget 16000] [--out bench/out/budget]

1. `bayeskd collect/prior/proxy/posterior` on the embedded default (SmolLM2-135M-Instruct,
   a local teacher standing in for an API that returns text and no logprobs).
2. The same budget of API tokens (prompt + completion), spent three ways through
   `bayeskd.stages.probe` (the stage's own code, with its ledger and store):
   - `whole`: more whole responses to random training prompts (probe.samples per request),
     counted at every corpus prefix they share;
   - `random`: prefix queries (probe.samples one-token continuations) at random positions;
   - `active`: prefix queries where they reduce the posterior's variance most per token.
   After every round: KL(teacher || target) per training position, with the target's tail as
   one bucket (the distribution the student trains on), and top-1 agreement, averaged over
   all training positions. The teacher's true distribution comes from the oracle (the same
   open model), used by this evaluator only. Held-out positions: probing changes no held-out
   target (its counts do not enter the n-gram tables), so their fidelity is the posterior's.
3. The end effect: `bayes` students trained on the plain posterior and on the targets that
   the strategies in --students (default: active) left at the full budget (one seed), scored
   by `bayeskd eval`.

Writes OUT/budget.json, OUT/budget.md and OUT/budget.png. Reruns replay stored answers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from common import ROOT, bayeskd  # bench/studies/common.py

import numpy as np

STRATEGIES = ("whole", "random", "active")


def oracle_probs(cfg, corpus, prober) -> np.ndarray:
    """p_T [P, V] (float32) at every response position, from the oracle (this evaluator only)."""
    from bayeskd.evaluate.oracle import load_oracle, teacher_probs

    model = load_oracle(cfg, corpus.tokenizer_fp)
    out = np.zeros((len(prober.tokens), len(corpus.tokenizer)), dtype=np.float32)
    for rb in corpus.batches(range(len(corpus.dataset)), 8, "oracle (evaluator)"):
        for r, z in zip(rb.indices, rb.logits(model)):
            out[prober.starts[r] : prober.starts[r + 1]] = teacher_probs(cfg, z).numpy()
    return out


def fidelity(p_t: np.ndarray, prober, mask: np.ndarray) -> dict:
    """Mean KL(p_T || target) with the target's tail as one bucket, and top-1 agreement, over `mask`."""
    ids, q, tail = prober.post_ids[mask], prober.post_probs[mask], prober.post_tail[mask]
    pt = p_t[mask]
    valid = ids >= 0
    p_k = np.where(valid, np.take_along_axis(pt, np.where(valid, ids, 0), 1), 0.0).astype(np.float64)
    r_t = np.clip(1.0 - p_k.sum(1), 1e-12, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_k = np.where(valid & (p_k > 0), p_k * (np.log(np.maximum(p_k, 1e-30)) - np.log(np.maximum(q, 1e-30))), 0.0).sum(1)
    kl = kl_k + r_t * (np.log(r_t) - np.log(np.clip(tail, 1e-12, 1)))
    top_q = np.take_along_axis(ids, q.argmax(1)[:, None], 1)[:, 0]
    return {"kl": float(kl.mean()), "top1": float((top_q == pt.argmax(1)).mean()), "positions": int(mask.sum())}


def spend(cfg, corpus, prior, proxy, source, teacher, p_t, strategy: str, budget: int, out: Path) -> list[dict]:
    from bayeskd.stages.probe import Prober, probe
    from bayeskd.teachers.store import Budget, Ledger, ResponseStore
    from bayeskd.teachers.cached import CachedTeacher

    prober = Prober(cfg, corpus, prior, proxy, source, cfg.teacher.key_name)
    curve = [{"tokens": 0, **fidelity(p_t, prober, prober.train), "positions_probed": 0}]

    def on_round(entry: dict) -> None:
        curve.append({"tokens": entry["tokens"], **fidelity(p_t, prober, prober.train), "positions_probed": entry["positions"]})
        print(f"  {strategy:>6}: {entry['tokens']:>6} tokens  KL {curve[-1]['kl']:.4f}  top-1 {curve[-1]['top1']:.4f}  "
              f"positions {entry['positions']}", flush=True)  # fmt: skip

    store = ResponseStore(out / strategy / "store")
    try:
        paid = CachedTeacher(teacher, store, Budget(Ledger(), budget), cfg.teacher.key_name)  # closes nothing: the teacher is shared
        probe(prober, paid, strategy, on_round=on_round, progress=False)
    finally:
        store.close()
    return curve


def student(args, base: Path, strategy: str | None, budget: int) -> dict:
    """`bayes` on the plain posterior (strategy None) or on a strategy's targets at the full budget."""
    root = base.parent / (strategy or "posterior")
    if not root.exists():
        root.mkdir(parents=True)
        for stage in ("collect", "prior", "proxy", "posterior"):
            shutil.copytree(base / stage, root / stage, symlinks=True)
        if strategy:  # the bench's answers, so that the stage replays them instead of asking again
            shutil.copytree(ROOT / args.out / strategy / "store", root / "probe" / "store")
    extra = [f"probe.budget_tokens={budget}", f"probe.strategy={strategy}"] if strategy else []
    if strategy == "whole":
        extra += [f"probe.samples={args.whole_samples}", f"probe.round_size={args.whole_round}"]
    for stage in (["probe"] if strategy else []) + ["distill", "eval"]:
        bayeskd(stage, "--config", args.config, f"run_dir={root}", *extra)
    return json.loads((root / "eval" / "metrics.json").read_text())["students"]["bayes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/budget.yaml")
    parser.add_argument("--budget", type=int, default=16000, help="API tokens per strategy")
    parser.add_argument("--whole-samples", type=int, default=4, help="whole responses per request for `whole`")
    parser.add_argument("--whole-round", type=int, default=8, help="requests per round for `whole`")
    parser.add_argument("--out", default="bench/out/budget")
    parser.add_argument("--students", nargs="*", default=["active"], choices=STRATEGIES,
                        help="strategies whose targets train a `bayes` student, beside the plain posterior's (none: no students)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    from bayeskd.artifacts import Run
    from bayeskd.config import load_config
    from bayeskd.models import load_causal_lm
    from bayeskd.corpus import load_corpus
    from bayeskd.estimate.update import load_prior
    from bayeskd.teachers.build import build_teacher
    from bayeskd.estimate.targets import TargetStore

    started = time.perf_counter()
    cfg = load_config(args.config)
    base = ROOT / cfg.run_dir
    for stage in ("collect", "prior", "proxy", "posterior"):
        bayeskd(stage, "--config", args.config)
    run = Run(base)
    corpus = load_corpus(cfg, run)
    prior, source = load_prior(cfg, run), TargetStore.open(run.output("posterior", "targets"))
    proxy = load_causal_lm(str(run.output("proxy", "final")))
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    from bayeskd.stages.probe import Prober

    p_t = oracle_probs(cfg, corpus, Prober(cfg, corpus, prior, proxy, source, cfg.teacher.key_name))
    teacher = build_teacher(cfg.teacher)
    curves, heldout = {}, None
    for strategy in STRATEGIES:
        scfg = cfg
        if strategy == "whole":
            scfg = load_config(args.config, [f"probe.samples={args.whole_samples}", f"probe.round_size={args.whole_round}"])
        curves[strategy] = spend(scfg, corpus, prior, proxy, source, teacher, p_t, strategy, args.budget, out)
    prober = Prober(cfg, corpus, prior, proxy, source, cfg.teacher.key_name)
    heldout = fidelity(p_t, prober, ~prober.train)
    teacher.close()
    students = {}
    if args.students:
        students["posterior (no probes)"] = student(args, base, None, args.budget)
        for strategy in args.students:
            students[strategy] = student(args, base, strategy, args.budget)
    record = {"budget_tokens": args.budget, "collect_tokens": (run.manifest("collect") or {}).get("summary", {}).get("tokens"),
              "samples_per_prefix_query": cfg.probe.samples, "whole_samples_per_request": args.whole_samples,
              "curves": curves, "heldout": heldout, "students": students, "seconds": time.perf_counter() - started}  # fmt: skip
    (out / "budget.json").write_text(json.dumps(record, indent=2))
    md = table(record)
    (out / "budget.md").write_text(md)
    plot(record, out / "budget.png")
    print(md)
    print(f"wrote {out}/budget.json, budget.md, budget.png ({record['seconds'] / 60:.1f} min)")


def at(curve: list[dict], tokens: int) -> dict:
    """The last point of a curve within `tokens`."""
    return [c for c in curve if c["tokens"] <= tokens][-1]


def table(record: dict) -> str:
    b = record["budget_tokens"]
    marks = [b // 4, b // 2, b]
    lines = [f"Training positions: KL(teacher ‖ target), tail as one bucket, after spending this many API tokens "
             f"(the corpus itself cost {record['collect_tokens']} tokens):", "",
             "| strategy | " + " | ".join(f"≤ {m} tokens" for m in marks) + " | top-1 at the budget | positions probed |",
             "|---|" + "---|" * (len(marks) + 2)]  # fmt: skip
    start = next(iter(record["curves"].values()))[0]
    lines.append(f"| none (posterior) | " + " | ".join(f"{start['kl']:.4f}" for _ in marks) + f" | {start['top1']:.4f} | 0 |")
    for name, curve in record["curves"].items():
        end = at(curve, b)
        lines.append(f"| {name} | " + " | ".join(f"{at(curve, m)['kl']:.4f}" for m in marks) +
                     f" | {end['top1']:.4f} | {end['positions_probed']} |")  # fmt: skip
    h = record["heldout"]
    lines += ["", f"Held-out positions ({h['positions']}): KL {h['kl']:.4f}, top-1 {h['top1']:.4f}, the same for every "
              "strategy (probes change only the positions they reach).", ""]  # fmt: skip
    if record["students"]:
        lines += ["`bayes` students (one seed) on each strategy's targets at the full budget:", "",
                  "| targets | bpb ↓ | KL(teacher ‖ student) ↓ | ROUGE-L ↑ |", "|---|---|---|---|"]  # fmt: skip
        for name, s in record["students"].items():
            lines.append(f"| {name} | {s['bpb']:.4f} | {s.get('kl_teacher', float('nan')):.4f} | {s['rouge_l']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in record["curves"].items():
        ax.plot([c["tokens"] for c in curve], [c["kl"] for c in curve], marker="o", ms=3, label=name)
    ax.set_xlabel("API tokens spent (prompt + completion)")
    ax.set_ylabel("KL(teacher ‖ target), training positions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
