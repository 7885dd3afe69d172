"""Does preference alignment (`proxy.align: sft+dpo`, Proxy-KD's second step) make the proxy, the
posterior without logprobs, and the students built on them closer to the teacher?

    HF_HUB_OFFLINE=1 python bench/studies/align.py [--config bench/studies/regimes.yaml] [--seeds 0 1 2]
        [--out bench/out/align] [key=value ...]

The claim benchmark's corpus (bench/studies/regimes.yaml: the built-in prompts, 2 samples each, the local
teacher stand-in; the method sees text only here) is collected once in the base run, with its
prior and both proxies: the SFT proxy (`proxy/final/`) and the DPO one made from it
(`proxy/dpo/final/`; the DPO settings are DPO below, overridable). Then, for each proxy, in its
own run folder that links the base's collect, prior and proxy (never rebuilt): the posterior
without logprobs (`posterior.use_logprobs=false`, the regime where the proxy is the posterior's
only evidence besides the counts), and per seed (`distill.train.seed`, the data order) the
`bayes` and `proxy-kd` students, seed by seed for both proxies, the record rewritten after
each seed (the `sft` student reads no proxy: bench/studies/regimes.py has it on this corpus). Eval's fidelity (oracle KL and black-box NLL on held-out positions) is measured on
the first seed of each variant; the DPO variant's eval scores both proxies side by side.
Finished stages are skipped, so a rerun after a crash resumes. Writes OUT/align.json and
OUT/align.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import STUDENT_FIELDS, bayeskd, load_bench_config, summarise, write_record  # bench/studies/common.py
from common import link_stages  # bench/studies/common.py

SHARED = ("collect", "prior", "proxy")
NO_LOGPROBS = ["posterior.use_logprobs=false", "posterior.top_logprobs=0"]
DPO = ["proxy.dpo.beta=0.1", "proxy.dpo.lr=2e-4", "proxy.dpo.max_steps=30", "proxy.dpo.batch_size=4",
       "proxy.dpo.warmup_steps=3", "proxy.dpo.save_every=10"]  # fmt: skip
SIZE = ["eval.max_examples=24"]  # with the 40-step students of bench/studies/regimes.yaml: about an hour on a loaded 2-core CPU
VARIANTS = {"sft": "sft", "dpo": "sft+dpo"}  # run folder -> proxy.align
FIDELITY = ("prior", "proxy (sft)", "proxy", "posterior-no-logprobs", "one-hot+proxy", "one-hot+posterior")


def common_args(args, name: str, overrides: list[str]) -> list[str]:
    return ["--config", args.config, *overrides, *NO_LOGPROBS, f"proxy.align={VARIANTS[name]}"]


def run_posterior(args, base: Path, name: str, overrides: list[str]) -> None:
    """One proxy's posterior without logprobs, in its own run folder beside the base."""
    root = base.parent / name
    link_stages(base, root, SHARED)
    bayeskd("posterior", *common_args(args, name, overrides), f"run_dir={root}")


def run_students(args, base: Path, name: str, seed: int, overrides: list[str]) -> dict:
    """The `bayes` and `proxy-kd` students of one proxy's posterior for one seed; their eval metrics."""
    root = base.parent / name
    seed_root = root / f"seed{seed}"
    link_stages(root, seed_root, (*SHARED, "posterior"))
    run = [*common_args(args, name, overrides), f"run_dir={seed_root}", "distill.modes=[bayes, proxy-kd]",
           f"distill.train.seed={seed}", f"eval.estimates={str(seed == args.seeds[0]).lower()}"]  # fmt: skip
    bayeskd("distill", *run)
    bayeskd("eval", *run)
    return json.loads((seed_root / "eval" / "metrics.json").read_text())


def record_of(args, base: Path, results: dict[str, dict[int, dict]], seconds: float) -> dict:
    per_seed = {}
    for seed in args.seeds:
        if any(seed not in results[name] for name in VARIANTS):
            continue  # not finished (yet): the record holds whole seeds only
        s = {}
        for name, label in (("sft", "SFT proxy"), ("dpo", "SFT+DPO proxy")):
            for mode in ("bayes", "proxy-kd"):
                s[f"{mode} ({label})"] = results[name][seed]["students"][mode]
        per_seed[seed] = s
    first = args.seeds[0]
    fidelity = {name: results[name][first]["estimates"] for name in VARIANTS}
    dpo = json.loads((base / "proxy" / "dpo" / "manifest.json").read_text())
    return {
        "seeds": sorted(per_seed),
        "seeds_asked": args.seeds,
        "corpus": json.loads((base / "collect" / "manifest.json").read_text())["summary"],
        "dpo": {"config": dpo["config"]["dpo"], "summary": dpo["summary"]},
        "sft_proxy": json.loads((base / "proxy" / "manifest.json").read_text())["summary"],
        "students": summarise(per_seed),
        "per_seed": per_seed,
        "fidelity": fidelity,
        "seconds": seconds,
    }


def tables(record: dict) -> str:
    lines = ["### Students (no logprobs), mean ± std over seeds " + ", ".join(map(str, record["seeds"])), "",
             "| student | bpb ↓ | KL(teacher ‖ student) ↓ | ROUGE-L ↑ |", "|---|---|---|---|"]  # fmt: skip
    for mode, s in record["students"].items():
        cells = [f"{s[f]['mean']:.3f} ± {s[f]['std']:.3f}" if f in s else "-" for f in STUDENT_FIELDS[:3]]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "### Fidelity to the teacher (first seed's eval)", "",
              "| estimate | SFT proxy: train KL | held-out KL | held-out black-box NLL "
              "| SFT+DPO proxy: train KL | held-out KL | held-out black-box NLL |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for est in FIDELITY:
        cells = []
        for name in VARIANTS:
            f = record["fidelity"][name]
            tr, ho = f.get("train", {}).get(est), f.get("heldout", {}).get(est)
            bb = (f.get("heldout", {}).get("blackbox") or {}).get("estimates", {}).get(est)
            cells += [f"{tr['kl']:.3f}" if tr else "-", f"{ho['kl']:.3f}" if ho else "-", f"{bb['nll']:.3f}" if bb else "-"]
        lines.append(f"| {est} | " + " | ".join(cells) + " |")
    d = record["dpo"]["summary"]
    lines += ["", f"DPO: {d['pairs']} pairs from {d['prompts']} training prompts ({d['rejected_unfinished']} proxy "
              f"samples cut at max_new_tokens), {d['steps']} steps; last step's loss {d['dpo']:.3f}, reward margin "
              f"{d['margin']:.3f} (chosen {d.get('chosen_reward', float('nan')):+.3f}, rejected "
              f"{d.get('rejected_reward', float('nan')):+.3f}), pair accuracy {d['accuracy']:.2f}. In the SFT proxy's run, `proxy` is the SFT "
              "proxy itself; in the DPO run it is the DPO proxy and `proxy (sft)` the one it started from."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/regimes.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="bench/out/align")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run (after DPO's)")
    args = parser.parse_args()
    overrides = ["run_dir=runs/align/base", *DPO, *SIZE, *args.overrides]
    cfg, base = load_bench_config(args.config, overrides)
    started = time.perf_counter()
    for stage in SHARED:  # the base builds both proxies: the SFT one, then DPO from it
        bayeskd(stage, "--config", args.config, *overrides, "proxy.align=sft+dpo")
    for name in VARIANTS:
        run_posterior(args, base, name, overrides)
    # Seed by seed, both proxies: what has finished is always a like-for-like comparison, written each time.
    results: dict[str, dict[int, dict]] = {name: {} for name in VARIANTS}
    for seed in args.seeds:
        for name in VARIANTS:
            results[name][seed] = run_students(args, base, name, seed, overrides)
        record = record_of(args, base, results, time.perf_counter() - started)
        md = tables(record)
        out = write_record(args.out, "align", record, md)
    print(md)
    print(f"wrote {out}/align.json, align.md ({record['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
