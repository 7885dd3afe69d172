"""The claim in three API regimes: does the Bayesian estimate beat what a user would pick instead?

    HF_HUB_OFFLINE=1 python bench/studies/regimes.py [--config bench/studies/regimes.yaml] [--seeds 0 1 2]
        [--regimes 0 5 20] [--out bench/out/claim] [key=value ...]

One corpus (the teacher's top-20 logprobs, collected once) and one proxy serve every regime. A
regime r is `posterior.top_logprobs=r`: the method reads at most r of the API's alternatives
per token (r = 0: none, `posterior.use_logprobs=false`), as an API that returns r would. For
each regime, two posteriors: the configured defaults (`posterior.fit: none`) and `posterior.fit:
auto` (chosen by the black-box NLL on the validation split, no oracle). Per seed
(`distill.train.seed`, the data order), the students:

- `sft`, `proxy-kd` and `oracle-kd` (the upper bound), which read no logprobs: once per seed;
- `topk-kd` (the API's top-r alone) in every regime with logprobs: the baseline to beat there;
- `bayes` on each of the two posteriors.

The best non-Bayesian baseline of a regime is `proxy-kd` without logprobs and `topk-kd` with
them. Every run folder shares the base's collect, prior and proxy (symlinked, never rebuilt), and
each (regime, variant) its posterior; finished stages are skipped, so a rerun after a crash
resumes. Writes OUT/regimes.json and OUT/regimes.md (a students table and a fidelity table per
regime) and OUT/regimes.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (  # bench/studies/common.py
    STUDENT_FIELDS,
    bayeskd,
    link_stages,
    load_bench_config,
    regime_overrides,
    summarise,
    variant_dir,
    write_record,
)

SHARED = ("collect", "prior", "proxy")
FIDELITY = ("prior", "proxy", "posterior-no-logprobs", "posterior", "top-k alone", "posterior (top-k only)",
            "top-k alone (top-k only)", "one-hot+proxy", "one-hot+posterior")


def students_of(r: int, fit: bool, shared_here: bool) -> list[str]:
    if fit:
        return ["bayes"]
    return (["sft", "proxy-kd", "oracle-kd"] if shared_here else []) + (["topk-kd"] if r else []) + ["bayes"]


def run_variant(args, base: Path, r: int, fit: bool, shared_here: bool, overrides: list[str]) -> dict[int, dict]:
    """The posterior of one (regime, variant), then its students for every seed; metrics per seed."""
    root = variant_dir(base, r, fit)
    link_stages(base, root, SHARED)
    common = ["--config", args.config, *overrides, *regime_overrides(r), f"posterior.fit={'auto' if fit else 'none'}"]
    bayeskd("posterior", *common, f"run_dir={root}")
    modes = "[" + ", ".join(students_of(r, fit, shared_here)) + "]"
    out = {}
    first = root / f"seed{args.seeds[0]}"
    for seed in args.seeds:
        seed_root = root / f"seed{seed}"
        link_stages(root, seed_root, (*SHARED, "posterior"))
        if seed_root != first and (first / "oracle" / "manifest.json").exists():  # the oracle's targets, computed once
            link_stages(first, seed_root, ("oracle",))
        run = [*common, f"run_dir={seed_root}", f"distill.modes={modes}", f"distill.train.seed={seed}",
               f"eval.estimates={str(seed == args.seeds[0]).lower()}"]  # fmt: skip
        bayeskd("distill", *run)
        bayeskd("eval", *run)
        out[seed] = json.loads((seed_root / "eval" / "metrics.json").read_text())
    return out


def regime_record(r: int, default: dict[int, dict], fitted: dict[int, dict], shared: dict[int, dict], root: Path) -> dict:
    per_seed = {}
    for seed in default:
        s = {m: v for m, v in shared[seed]["students"].items() if m in ("sft", "proxy-kd", "oracle-kd")}
        s.update(default[seed]["students"])
        s["bayes (defaults)"] = s.pop("bayes")
        if fitted:
            s["bayes (fitted)"] = fitted[seed]["students"]["bayes"]
        per_seed[seed] = {k: v for k, v in s.items()}
    first = min(default)
    fitted_manifest = variant_dir(root, r, True) / "posterior" / "manifest.json"
    fit = json.loads(fitted_manifest.read_text())["summary"]["fit"] if fitted else None
    baseline = "topk-kd" if r else "proxy-kd"
    summary = summarise(per_seed)
    verdict = {}
    judged = "bayes (fitted)" if fitted else "bayes (defaults)"
    for f in ("bpb", "kl_teacher"):
        b, base = summary[judged][f], summary[baseline][f]
        gap = base["mean"] - b["mean"]
        verdict[f] = {"gap": gap, "two_std": 2 * max(b["std"], base["std"]), "beats": gap > 2 * max(b["std"], base["std"])}
    return {
        "regime": r,
        "baseline": baseline,
        "students": summary,
        "per_seed": per_seed,
        "judged": judged,
        "fidelity": {"defaults": default[first]["estimates"].get("heldout", {}),
                     "fitted": fitted[first]["estimates"].get("heldout", {}) if fitted else {}},  # fmt: skip
        "fit": fit,
        "verdict": verdict,
    }


def tables(record: dict) -> str:
    lines = []
    for reg in record["regimes"]:
        r = reg["regime"]
        title = "no logprobs" if r == 0 else f"top-{r} logprobs"
        lines += [f"### {title} (baseline to beat: `{reg['baseline']}`)", "",
                  "| student | bpb ↓ | KL(teacher ‖ student) ↓ | ROUGE-L ↑ |", "|---|---|---|---|"]  # fmt: skip
        for mode, s in reg["students"].items():
            cells = [f"{s[f]['mean']:.3f} ± {s[f]['std']:.3f}" if f in s else "-" for f in STUDENT_FIELDS[:3]]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        v = reg["verdict"]
        lines += ["", reg["judged"] + " − " + reg["baseline"] + ": " + "; ".join(
            f"{f} {-v[f]['gap']:+.3f} (2 std: {v[f]['two_std']:.3f}, {'beats' if v[f]['beats'] else 'does not beat'})"
            for f in ("bpb", "kl_teacher")) + ".", ""]  # fmt: skip
        c = (reg["fit"] or {}).get("chosen")
        lines += [] if c is None else [f"Fitted on {reg['fit']['positions']} validation positions: order {c['order']}, mu {c['mu']:g}, "
                  f"M {c['m']:g}, tau_P {c['proxy_temperature']:g} (black-box NLL {reg['fit']['nll']:.3f}; "
                  f"at the configured values {reg['fit']['nll_at_configured']})."]  # fmt: skip
        lines += ["", "| held-out estimate | KL, defaults | KL, fitted | black-box NLL, defaults | black-box NLL, fitted |",
                  "|---|---|---|---|---|"]  # fmt: skip
        fd, ff = reg["fidelity"]["defaults"], reg["fidelity"]["fitted"]
        bd, bf = (fd.get("blackbox") or {}).get("estimates", {}), (ff.get("blackbox") or {}).get("estimates", {})
        for name in FIDELITY:
            if name in fd or name in bd:
                kl = [f"{(f.get(name) or b.get(name))['kl']:.3f}" if name in f or name in b else "-" for f, b in ((fd, bd), (ff, bf))]  # noqa: E501
                nll = [f"{b[name]['nll']:.3f}" if name in b else "-" for b in (bd, bf)]
                lines.append(f"| {name} | {kl[0]} | {kl[1]} | {nll[0]} | {nll[1]} |")
        taus = [f"{(x.get('blackbox') or {}).get('kendall_tau', float('nan')):.2f}" for x in (fd, ff)]
        lines += ["", f"Black-box vs oracle rank agreement (Kendall's tau): defaults {taus[0]}, fitted {taus[1]}.", ""]
    return "\n".join(lines)


def plot(record: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = list(dict.fromkeys(n for reg in record["regimes"] for n in reg["students"]))  # one colour and slot per student
    for ax, f, title in zip(axes, ("bpb", "kl_teacher"), ("held-out bits per byte", "KL(teacher ‖ student)")):
        for j, reg in enumerate(record["regimes"]):
            for i, name in enumerate(names):
                if name not in reg["students"]:
                    continue
                vals = reg["students"][name][f]["values"]
                ax.scatter([j + (i - len(names) / 2) * 0.08] * len(vals), vals, s=12, color=f"C{i}",
                           label=name if all(name not in r["students"] for r in record["regimes"][:j]) else None)  # fmt: skip
        ax.set_xticks(range(len(record["regimes"])), ["no logprobs" if r["regime"] == 0 else f"top-{r['regime']}"
                                                     for r in record["regimes"]])  # fmt: skip
        ax.set(title=title + " (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "regimes.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/regimes.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", type=int, nargs="+", default=[0, 5, 20])
    parser.add_argument("--variants", nargs="+", choices=["default", "fit"], default=["default", "fit"],
                        help="the posteriors whose students to train: the configured defaults, posterior.fit: auto")
    parser.add_argument("--out", default="bench/out/claim")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args()
    cfg, base = load_bench_config(args.config, args.overrides)
    started = time.perf_counter()
    for stage in SHARED:
        bayeskd(stage, "--config", args.config, *args.overrides)
    shared_regime = max(args.regimes)  # sft, proxy-kd and oracle-kd train once per seed, in this regime's folder
    results = {}
    for r in args.regimes:
        for fit in (False, True):
            if ("fit" if fit else "default") in args.variants:
                results[r, fit] = run_variant(args, base, r, fit, r == shared_regime and not fit, args.overrides)
    shared = results[shared_regime, False]
    record = {
        "seeds": args.seeds,
        "corpus": json.loads((base / "collect" / "manifest.json").read_text())["summary"],
        "regimes": [regime_record(r, results[r, False], results.get((r, True)), shared, base) for r in args.regimes],
        "seconds": time.perf_counter() - started,
    }
    md = tables(record)
    out = write_record(args.out, "regimes", record, md)
    plot(record, out)
    print(md)
    print(f"wrote {out}/regimes.json, regimes.md, regimes.png ({record['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
