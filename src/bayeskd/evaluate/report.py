"""The eval report: Markdown with PNG plots, from `metrics.json` and the training logs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bayeskd.artifacts import Run  # noqa: E402

# posterior-no-logprobs: prior and proxy alone, before the teacher's top-k logprobs fix their
# tokens; it isolates what the Bayesian update itself adds. one-hot+proxy: the control that
# Proxy-KD's loss implies, at its best lambda; one-hot+posterior: the same mix with the
# posterior-no-logprobs in the proxy's place (what the bayes student's CE + KL trains towards).
TOPK = "top-k alone"
ESTIMATES = ("one-hot", "prior", "proxy", "posterior-no-logprobs", "posterior", "one-hot+proxy", "one-hot+posterior")
# proxy (sft): with proxy.align sft+dpo, the SFT proxy before DPO; `proxy` is then the DPO one.
SFT_PROXY = "proxy (sft)"


def estimate_names(scored) -> list[str]:
    """ESTIMATES, with `proxy (sft)` after `proxy` where it was scored (`scored`: names or `name/...` keys)."""
    def has(name: str) -> bool:
        return any(k == name or k.startswith(f"{name}/") for k in scored)

    names = list(ESTIMATES)
    if has(TOPK):  # with logprobs: what topk-kd trains on, beside the posterior that reads the same top-k
        names.insert(names.index("posterior") + 1, TOPK)
    return names[:3] + [SFT_PROXY] + names[3:] if has(SFT_PROXY) else names


def comparison_table(metrics: dict) -> str:
    byte = any("kl_teacher_byte" in s for s in metrics["students"].values())
    rows = ["| student | bpb | KL to teacher |" + (" next-byte KL |" if byte else "") + " ROUGE-L | accuracy |",
            "|---|---|---|" + ("---|" if byte else "") + "---|---|"]  # fmt: skip
    for mode, s in metrics["students"].items():
        acc = "-" if s.get("accuracy") is None else f"{s['accuracy']:.3f}"
        kl = f"{s['kl_teacher']:.3f}" if "kl_teacher" in s else "-"
        kb = (f" {s['kl_teacher_byte']:.4f} |" if "kl_teacher_byte" in s else " - |") if byte else ""
        rows.append(f"| {mode} | {s['bpb']:.4f} | {kl} |{kb} {s['rouge_l']:.3f} | {acc} |")
    if metrics.get("skipped"):
        rows += ["", f"Skipped: {metrics['skipped']}."]
    return "\n".join(rows)


def _training_curves(run: Run, out: Path) -> str | None:
    logs = {"proxy": run.root / "proxy" / "train_log.jsonl"}
    logs.update({f"student {p.parent.name}": p for p in sorted((run.root / "distill").glob("*/train_log.jsonl"))})
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for name, path in logs.items():
        if not path.is_file():
            continue
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        key = "ce" if rows and "ce" in rows[0] else "loss"
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="optimizer step", ylabel="cross-entropy on the teacher's tokens (nats/token)", title="Training")
    ax.legend(fontsize=8)
    return _save(fig, out / "training.png")


def _students(metrics: dict, out: Path) -> str:
    s = metrics["students"]
    keys = [k for k in ("bpb", "kl_teacher") if all(k in v for v in s.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        names = list(s)
        ax.bar(names, [s[n][key] for n in names], color=["#888" if n == "sft" else "#36c" for n in names])
        ax.set(title={"bpb": "held-out bits per byte (lower is better)",
                      "kl_teacher": "KL(teacher || student), nats/token"}[key])
        ax.tick_params(axis="x", rotation=30)
    return _save(fig, out / "students.png")


def _fidelity(metrics: dict, out: Path) -> str | None:
    est = metrics.get("estimates") or {}
    settings = [k for k in ("train", "heldout") if est.get(k)]
    if not settings:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = estimate_names(est[settings[0]])
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [est[setting][n]["kl"] for n in names], width, label=setting)
    axes[0].set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(names))], names, rotation=25, fontsize=8)
    axes[0].set(title="KL(teacher || estimate), nats/token (lower is better)")
    axes[0].legend()
    bp = est[settings[-1]]["by_position"]
    for n in ("prior", "proxy", "posterior-no-logprobs", "posterior"):
        axes[1].plot(bp["buckets"], bp[n], marker="o", label=n)
    axes[1].set(title=f"KL by response position ({settings[-1]})", xlabel="token position", ylabel="nats/token")
    axes[1].legend()
    return _save(fig, out / "fidelity.png")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _blackbox_table(bb: dict | None) -> list[str]:
    if not bb:
        return []
    lines = ["## Fidelity without an oracle", "",
             "The held-out NLL of the teacher's own sampled tokens ranks estimates as the oracle KL does "
             "(it is H(p_T) + KL in expectation); it needs no oracle, so it is what a closed teacher allows.", "",
             "| estimate (held-out) | black-box NLL | oracle KL |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {r['nll']:.3f} | {r['kl']:.3f} |" for name, r in bb["estimates"].items()]
    return lines + ["", f"Rank agreement (Kendall's tau, 1 = the same order): {bb['kendall_tau']:.2f}", ""]


def write_report(run: Run, metrics: dict, out: Path) -> Path:
    lines = ["# bayeskd evaluation", "", f"Run: `{run.root}`", "", "## Students (held-out prompts)", "",
             comparison_table(metrics), ""]
    n = next(iter(metrics["students"].values()))
    lines += [f"Measured on {n['tokens']} response tokens of {n['prompts']} held-out prompts "
              f"({n['answer_prompts']} with checkable answers). `oracle-kd`, where present, is an upper bound.", ""]
    for plot in (_students(metrics, out), _training_curves(run, out)):
        if plot:
            lines += [f"![{plot}]({plot})", ""]
    est = metrics.get("estimates") or {}
    if est:
        lines += ["## Estimates against the teacher", "", "| setting | estimate | KL | top-1 | teacher-token NLL |",
                  "|---|---|---|---|---|"]
        for setting, rows in est.items():
            for name in estimate_names(rows):
                r = rows[name]
                label = f"{name} (lambda={r['lambda']})" if "lambda" in r else name
                lines.append(f"| {setting} | {label} | {r['kl']:.3f} | {r['top1']:.3f} | {r['nll']:.3f} |")
        lines.append("")
        plot = _fidelity(metrics, out)
        if plot:
            lines += [f"![{plot}]({plot})", ""]
        lines += _blackbox_table((est.get("heldout") or {}).get("blackbox"))
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
