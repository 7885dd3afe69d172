"""The method's claim, measured: every student and ablation over several seeds, a TRL baseline,
and the estimates' fidelity as the corpus grows (method.md, section 5).

    HF_HUB_OFFLINE=1 python bench/studies/claim.py [--config bench/studies/claim.yaml] [--seeds 0 1 2] [--out bench/out/claim]

1. `bayeskd serve` puts the embedded teacher (SmolLM2-135M-Instruct) behind an OpenAI-compatible
   API on 127.0.0.1; the pipeline reaches it only over HTTP (text and top-5 logprobs), as it
   would a closed API. The evaluator alone loads the same open model as an oracle.
2. Seed 0 runs the whole pipeline (`bayeskd run`). Every other seed reuses its collect, prior,
   proxy, posterior and oracle stages (copied; the same inputs, so they are skipped) and trains
   every student again with `distill.train.seed` = the seed, which sets the data order.
3. For each seed, the `sft` student is trained a second time with TRL's SFTTrainer on the same
   records, initialisation, steps, batch, learning rate and schedule, and scored by the same
   evaluator (`sft-trl`), to show that our `sft` baseline is not a weakened one.
4. Scaling: the prior's and the posterior's fidelity at four corpus sizes, the training prompts
   cut to 1/4, 1/2 and all of them with one sample each (data.train_prompts, data.samples) and
   all of them with two (seed 0's run), on the same held-out prompts. The proxy is seed 0's,
   trained on the whole corpus, at every size: the curve isolates what more counts buy.

Everything resumes: rerun the same command after a crash and finished parts are skipped.
Writes OUT/claim.json, OUT/claim.md (the tables) and OUT/students.png, OUT/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import ROOT, STUDENT_FIELDS, bayeskd, load_bench_config, summarise, write_record  # bench/studies/common.py

SHARED_STAGES = ("collect", "prior", "proxy", "posterior", "oracle")


def server(model: str, port: int):
    """`bayeskd serve` of `model` in a child process, for as long as the `with` block lasts."""
    from bayeskd.teachers.hosting import ServerProcess

    cmd = [sys.executable, "-m", "bayeskd.cli", "serve", "teacher.backend=local", f"teacher.model={model}",
           f"serve.port={port}", "serve.max_batch=16"]  # fmt: skip
    return ServerProcess(cmd, f"http://127.0.0.1:{port}/v1", cwd=str(ROOT))


def seed_dir(base: Path, seed: int) -> Path:
    return base.parent / f"seed{seed}"


def run_seed(args, base: Path, seed: int, first: int, overrides: list[str]) -> None:
    root = seed_dir(base, seed)
    if seed != first:
        for stage in SHARED_STAGES:
            src, dst = seed_dir(base, first) / stage, root / stage
            if src.exists() and not dst.exists():
                shutil.copytree(src, dst, symlinks=True)
    bayeskd("run", "--config", args.config, f"run_dir={root}", f"distill.train.seed={seed}",
            f"eval.estimates={str(seed == first).lower()}", *overrides)  # fmt: skip


def trl_sft(cfg, root: Path, seed: int) -> dict:
    """The `sft` student trained by TRL's SFTTrainer, scored by bayeskd's evaluator."""
    out = root / "trl-sft"
    metrics_path = out / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bayeskd.artifacts import Run
    from bayeskd.models import load_causal_lm
    from bayeskd.corpus import load_corpus
    from bayeskd.evaluate.oracle import load_oracle
    from bayeskd.stages.evaluate import score_students
    from bayeskd.train.loop import resolve_mixed_precision

    run = Run(root)
    corpus = load_corpus(cfg, run)
    train = corpus.subset("train")
    # The same records bayeskd's `sft` trains on: prompt messages, the teacher's text as the completion.
    rows = [{"prompt": corpus.records[i]["messages"],
             "completion": [{"role": "assistant", "content": corpus.records[i]["text"]}]} for i in train["index"]]  # fmt: skip
    t = cfg.distill.train
    sft_args = SFTConfig(
        output_dir=str(out / "trainer"), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine" if t.schedule == "cosine" else "constant_with_warmup", weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, seed=seed, data_seed=seed, max_length=cfg.data.max_length, packing=False,
        completion_only_loss=True, report_to="none", save_strategy="no", logging_steps=10,
        # The precision bayeskd's loop uses (mixed_precision auto: bf16 on a bf16 GPU, else fp32), no
        # gradient checkpointing. SFTConfig's defaults (bf16, checkpointing) ran 8x slower on this CPU.
        use_cpu=not torch.cuda.is_available(), bf16=resolve_mixed_precision(t.mixed_precision) == "bf16",
        gradient_checkpointing=False, dataloader_num_workers=0,
    )  # fmt: skip
    model = load_causal_lm(t.model, init_layers=t.init_layers)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(rows), processing_class=corpus.tokenizer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model = trainer.model.eval()
    heldout = corpus.indices("heldout")[: cfg.eval.max_examples]
    with torch.inference_mode():
        teacher = load_oracle(cfg, corpus.tokenizer_fp)
    metrics = score_students(cfg, corpus, {"sft-trl": model}, teacher, heldout)["sft-trl"]
    metrics |= {"train_seconds": seconds, "log": trainer.state.log_history}
    out.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return metrics


def scaling(args, cfg, base: Path, first: int, overrides: list[str]) -> list[dict]:
    """Fidelity of the estimates at four corpus sizes (the proxy fixed: seed `first`'s)."""
    from bayeskd.artifacts import Run
    from bayeskd.config import load_config
    from bayeskd.corpus import load_corpus
    from bayeskd.evaluate.oracle import load_oracle
    from bayeskd.stages.evaluate import score_estimates

    full = seed_dir(base, first)
    full_cfg = load_config(args.config, [f"run_dir={full}", *overrides])
    full_corpus = load_corpus(full_cfg, Run(full))
    n_train = len({r["prompt_id"] for r in full_corpus.records if full_corpus.split_of(r["prompt_id"]) == "train"})
    sizes = [(max(1, n_train // 4), 1), (max(1, n_train // 2), 1), (n_train, 1), (n_train, None)]
    results = []
    teacher = None
    for prompts, samples in sizes:
        label = f"p{prompts}-s{samples or 'all'}"
        root = base.parent / f"scale-{label}" if samples is not None else full
        path = root / "scaling.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        size_overrides = [f"run_dir={root}", f"data.train_prompts={prompts}", f"data.samples={'null' if samples is None else samples}"]
        if root != full:
            for stage in ("collect",):
                if not (root / stage).exists():
                    shutil.copytree(full / stage, root / stage)
            if not (root / "proxy").exists():
                (root / "proxy").mkdir(parents=True)
                (root / "proxy" / "final").symlink_to((full / "proxy" / "final").resolve())
                shutil.copy(full / "proxy" / "manifest.json", root / "proxy" / "manifest.json")
            bayeskd("prior", "--config", args.config, *overrides, *size_overrides)
        size_cfg = load_config(args.config, [*overrides, *size_overrides])
        run = Run(root)
        corpus = load_corpus(size_cfg, run)
        if teacher is None:
            teacher = load_oracle(size_cfg, corpus.tokenizer_fp)
        train_tokens = sum(corpus.dataset["n_response"][i] for i in corpus.indices("train"))
        record = {"label": label, "train_prompts": prompts, "samples": samples or cfg.collect.n, "train_tokens": train_tokens,
                  "estimates": {s: score_estimates(size_cfg, run, corpus, teacher, heldout=s == "heldout")
                                for s in ("train", "heldout")}}  # fmt: skip
        path.write_text(json.dumps(record, indent=2))
        results.append(record)
    return results


def tables(record: dict) -> str:
    from bayeskd.evaluate.report import ESTIMATES

    lines = [f"Students: mean ± sample std over seeds {record['seeds']} (held-out prompts: "
             f"{record['students_measured_on']['prompts']} prompts, {record['students_measured_on']['tokens']} response tokens)", "",
             "| student | bpb ↓ | KL(teacher ‖ student) ↓ | ROUGE-L ↑ | accuracy ↑ |", "|---|---|---|---|---|"]  # fmt: skip
    for mode, s in record["students"].items():
        cells = [f"{s[f]['mean']:.3f} ± {s[f]['std']:.3f}" if f in s else "-" for f in STUDENT_FIELDS]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    for setting, est in record["estimates"].items():
        n = est.get("posterior", {})
        lines += ["", f"Estimates, {setting} positions ({n.get('tokens')} tokens, {n.get('prompts')} prompts"
                  f"{'; leave-one-out counts' if est.get('leave_one_out') else ''})", "",
                  "| estimate | KL(teacher ‖ estimate) ↓ | top-1 agreement ↑ | teacher-token NLL ↓ |", "|---|---|---|---|"]  # fmt: skip
        for name in ESTIMATES:
            if name in est:
                e = est[name]
                tag = f" (λ={e['lambda']})" if "lambda" in e else ""
                lines.append(f"| {name}{tag} | {e['kl']:.3f} | {e['top1']:.3f} | {e['nll']:.3f} |")
    lines += ["", "Scaling (proxy fixed), KL(teacher ‖ estimate):", "",
              "| training prompts × samples | training tokens | prior train | prior held-out | posterior-no-logprobs held-out | posterior held-out | one-hot+proxy held-out |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in record["scaling"]:
        tr, ho = r["estimates"]["train"], r["estimates"]["heldout"]
        lines.append(f"| {r['train_prompts']} × {r['samples']} | {r['train_tokens']} | {tr['prior']['kl']:.3f} | "
                     f"{ho['prior']['kl']:.3f} | {ho['posterior-no-logprobs']['kl']:.3f} | {ho['posterior']['kl']:.3f} | "
                     f"{ho['one-hot+proxy']['kl']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plots(record: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = record["students"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, field, title in ((axes[0], "bpb", "bits per byte (held-out)"), (axes[1], "kl_teacher", "KL(teacher ‖ student) per token")):
        names = [m for m in students if field in students[m]]
        means = [students[m][field]["mean"] for m in names]
        ax.bar(names, means, yerr=[students[m][field]["std"] for m in names], capsize=4,
               color=["#888" if m.startswith("sft") else "#c44" if m == "oracle-kd" else "#37a" for m in names])  # fmt: skip
        for i, m in enumerate(names):
            ax.scatter([i] * len(students[m][field]["values"]), students[m][field]["values"], color="k", s=8, zorder=3)
        ax.set_title(title)
        ax.set_ylim(min(means) * 0.9, max(means) * 1.05)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "students.png", dpi=120)
    plt.close(fig)
    if not record["scaling"]:
        return

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    tokens = [r["train_tokens"] for r in record["scaling"]]
    for ax, setting in zip(axes, ("train", "heldout")):
        for name in ("prior", "proxy", "posterior-no-logprobs", "posterior", "one-hot+proxy"):
            if setting == "heldout" or name != "one-hot+proxy":
                ax.plot(tokens, [r["estimates"][setting][name]["kl"] for r in record["scaling"]], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("training response tokens")
        ax.set_title(f"{setting} positions")
    axes[0].set_ylabel("KL(teacher ‖ estimate), nats/token")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/claim.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--port", type=int, default=8765, help="serve's port (part of nothing that is stored)")
    parser.add_argument("--out", default="bench/out/claim")
    parser.add_argument("--skip", nargs="*", default=[], choices=["trl", "scaling"])
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args()
    overrides = [f"teacher.base_url=http://127.0.0.1:{args.port}/v1", *args.overrides]
    cfg, base = load_bench_config(args.config, overrides)
    from bayeskd.config import load_config

    first = args.seeds[0]
    started = time.perf_counter()
    with server(cfg.eval.oracle_model or cfg.teacher.model, args.port):
        run_seed(args, base, first, first, overrides)  # collect happens here, over HTTP
    for seed in args.seeds[1:]:
        run_seed(args, base, seed, first, overrides)
    per_seed = {s: json.loads((seed_dir(base, s) / "eval" / "metrics.json").read_text()) for s in args.seeds}
    students = {s: dict(m["students"]) for s, m in per_seed.items()}
    if "trl" not in args.skip:
        for seed in args.seeds:
            students[seed]["sft-trl"] = trl_sft(load_config(args.config, [*overrides, f"run_dir={seed_dir(base, seed)}"]),
                                                seed_dir(base, seed), seed)  # fmt: skip
    scale = [] if "scaling" in args.skip else scaling(args, cfg, base, first, overrides)
    first_run = seed_dir(base, first)
    manifests = {s: json.loads((first_run / s / "manifest.json").read_text()) for s in ("collect", "prior", "proxy")}
    some = next(iter(students[first].values()))
    record = {
        "seeds": args.seeds,
        "models": {
            "teacher": f"{cfg.eval.oracle_model} through bayeskd serve (HTTP, OpenAI-compatible); top-{cfg.collect.top_logprobs} logprobs",
            "proxy": f"{cfg.proxy.train.model}, first {cfg.proxy.train.init_layers} layers (+ final norm and tied head), "
                     f"trained {cfg.proxy.train.max_steps} steps x {cfg.proxy.train.batch_size} on the corpus",
            "student": f"{cfg.distill.train.model}, first {cfg.distill.train.init_layers} layers, "
                       f"{cfg.distill.train.max_steps} steps x {cfg.distill.train.batch_size} per student",
        },  # fmt: skip
        "corpus": {"collect": manifests["collect"].get("summary"), "prior": manifests["prior"].get("summary")},
        "students_measured_on": {"prompts": some["prompts"], "tokens": some["tokens"]},
        "students": summarise(students),
        "per_seed": students,
        "estimates": per_seed[first]["estimates"],
        "scaling": scale,
        "seconds": time.perf_counter() - started,
    }
    md = tables(record)
    out = write_record(args.out, "claim", record, md)
    plots(record, out)
    print(md)
    print(f"wrote {out}/claim.json, claim.md, students.png, scaling.png ({record['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
