"""Distillation into a student whose tokenizer is not the teacher's (issue 14), on the claim
benchmark's corpus: does the Bayesian estimate still beat what a user would pick instead?

    HF_HUB_OFFLINE=1 python bench/studies/xtok.py [--config bench/studies/xtok.yaml] [--seeds 0 1 2] [--out bench/out/xtok]
        [key=value ...]

1. `collect`: the embedded teacher (SmolLM2-135M-Instruct, a 49k-token BPE) answers the first
   160 built-in prompts twice, 48 tokens, with its top-20 logprobs (bench/studies/regimes.yaml's corpus
   settings; `collect.limit=null` asks all 323).
2. `bayeskd student`: a 4096-token byte-level BPE trained on the training split's text and a
   fresh 4-layer Llama on it (the proxy; the students keep 2 of its layers). Nothing starts from
   the teacher's weights or vocabulary.
3. `prior`, `proxy`, `posterior` once, in the student's token space; the teacher's top-20 strings
   are mapped by `evidence.py` (the share of the API's mass mapped exactly, by prefix and dropped
   is reported).
4. Per seed (`distill.train.seed`: the data order), the students `sft`, `topk-kd` (the API's
   mapped top-20 alone) and `bayes`, each scored by `eval`: bits per byte, the next-byte KL to
   the teacher (the per-token KL is undefined across vocabularies), ROUGE-L and accuracy.

Every seed's folder links the base's shared stages (never rebuilt); finished stages are skipped,
so a rerun after a crash resumes. Writes OUT/xtok.json and OUT/xtok.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, bayeskd, load_bench_config, summarise, write_record  # bench/studies/common.py
from common import link_stages  # bench/studies/common.py
SHARED = ("collect", "prior", "proxy", "posterior")
MODES = ("sft", "topk-kd", "bayes")
FIELDS = ("bpb", "kl_teacher_byte", "rouge_l", "accuracy")


def verdict(summary: dict, baseline: str) -> dict:
    """bayes minus the baseline on the two fidelity measures (lower is better), against 2 sample stds."""
    out = {}
    for f in ("bpb", "kl_teacher_byte"):
        b, base = summary["bayes"][f], summary[baseline][f]
        gap = base["mean"] - b["mean"]
        two_std = 2 * max(b["std"], base["std"])
        wins = sum(x < y for x, y in zip(b["values"], base["values"]))  # per seed: the same data order
        out[f] = {"gap": gap, "two_std": two_std, "beats": gap > two_std, "seeds_won": wins, "seeds": len(b["values"])}
    return out


def tables(record: dict) -> str:
    ev = record["evidence"]
    lines = [f"Students: mean ± sample std over seeds {record['seeds']}, {record['students']['sft']['tokens']} held-out "
             f"response tokens (student tokenizer) of {record['students']['sft']['prompts']} prompts.", "",
             "| student | bpb ↓ | next-byte KL(teacher ‖ student) ↓ | ROUGE-L ↑ | accuracy ↑ |", "|---|---|---|---|---|"]  # fmt: skip
    for mode, s in record["summary"].items():
        cells = [f"{s[f]['mean']:.4f} ± {s[f]['std']:.4f}" if f in s else "-" for f in FIELDS]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    for base, v in record["verdict"].items():
        lines.append(f"bayes − {base}: " + "; ".join(
            f"{f} {-v[f]['gap']:+.4f} (2 std {v[f]['two_std']:.4f}; lower in {v[f]['seeds_won']}/{v[f]['seeds']} seeds; "
            f"{'beats' if v[f]['beats'] else 'does not beat'})" for f in ("bpb", "kl_teacher_byte")) + ".")  # fmt: skip
    lines += ["", f"Tokenizers: teacher {record['tokenizers']['teacher']} tokens, student {record['tokenizers']['student']}; "
              f"{record['students']['sft']['share_positions_shared']:.1%} of the student's held-out positions are offsets "
              "where both start a token (where the next-byte KL is measured).", "",
              "Evidence (the API's top-20 strings mapped onto the student's tokens, all positions):", "",
              "| positions with evidence | API mass mapped exactly | by prefix (first token) | dropped | "
              "positions inside a teacher token | straddles |", "|---|---|---|---|---|---|",
              f"| {ev['share_with_evidence']:.1%} | {ev['share_mass_exact']:.1%} | {ev['share_mass_prefix']:.1%} | "
              f"{ev['share_mass_dropped']:.1%} | {ev['positions_inside_teacher_token']} | {ev['straddles']} |", "",
              f"Wall time: {record['seconds'] / 60:.0f} minutes."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/xtok.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="bench/out/xtok")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args()
    cfg, base = load_bench_config(args.config, args.overrides)
    from bayeskd.models import load_tokenizer

    common = ["--config", args.config, *args.overrides]
    started = time.perf_counter()
    bayeskd("collect", *common)
    model = Path(cfg.student_model) if Path(cfg.student_model).is_absolute() else ROOT / cfg.student_model
    if not (model / "config.json").is_file():
        bayeskd("student", *common)
    for stage in SHARED[1:]:
        bayeskd(stage, *common)
    per_seed = {}
    for seed in args.seeds:
        root = base.parent / f"seed{seed}"
        link_stages(base, root, SHARED)
        run = [*common, f"run_dir={root}", f"distill.modes=[{', '.join(MODES)}]", f"distill.train.seed={seed}"]
        bayeskd("distill", *run)
        bayeskd("eval", *run)
        per_seed[seed] = json.loads((root / "eval" / "metrics.json").read_text())["students"]
    summary = summarise(per_seed, FIELDS)
    posterior = json.loads((base / "posterior" / "manifest.json").read_text())["summary"]
    record = {
        "seeds": args.seeds,
        "corpus": json.loads((base / "collect" / "manifest.json").read_text())["summary"],
        "tokenizers": {"teacher": len(load_tokenizer(cfg.teacher.model)), "student": len(load_tokenizer(str(model)))},
        "evidence": posterior["evidence"],
        "summary": summary,
        "students": per_seed[args.seeds[0]],
        "per_seed": per_seed,
        "verdict": {b: verdict(summary, b) for b in ("sft", "topk-kd")},
        "seconds": time.perf_counter() - started,
    }
    md = tables(record)
    write_record(args.out, "xtok", record, md)
    print(md)


if __name__ == "__main__":
    main()
