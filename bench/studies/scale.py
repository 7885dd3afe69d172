"""Scale: the estimates' fidelity as the corpus grows from about 20k to 400k+ response tokens,
and students that do not inherit the teacher's weights (issue 13).

    HF_HUB_OFFLINE=1 python bench/studies/scale.py [--config bench/studies/scale.yaml] [--sizes 20000 100000 400000]
        [--proxy-steps 60] [--student-steps 50] [--students-at SIZE | --no-students]
        [--frozen-only] [--out bench/out/scale] [key=value ...]

1. The prompt pool (runs/scale/prompts.jsonl, written once, deterministic): the 323 built-in
   prompts first, then templated tasks interleaved so that every prefix mixes them: word tasks
   (define, use in a sentence, synonyms, a haiku, ...) on whole-word tokens of the teacher's
   own vocabulary, arithmetic and word problems from scripts/make_prompts.py's generators.
2. One collect (the embedded teacher in process, top-20 logprobs, one sample a prompt) that
   grows by `--chunk` prompts until the training split holds the largest size: each step is
   the previous corpus plus more (the store is content-keyed, so no answer is paid for twice).
   A kill loses nothing the store has; a rerun asks only for what it lacks.
3. At each size, a run folder that holds a frozen copy of the corpus as it was when it first
   reached the size, and trains on its first N training prompts (data.train_prompts; N chosen
   so that the training responses hold the size in tokens), on the same held-out positions
   (the held-out prompts of a smaller corpus are a prefix of a larger one's): the prior, and
   the fidelity of every estimate (oracle KL and black-box NLL, held out) with no logprobs,
   top-5 (--fidelity-regimes). The proxy is trained once, at the smallest size, for --proxy-steps, and
   shared: a pass over 400k tokens costs hours on 2 CPU cores, so the curve isolates what the
   counts buy (the prior, the posterior), with the proxy held fixed.
4. At one size (--students-at, default the largest): the `sft`, `proxy-kd`, `topk-kd` (top-5)
   and `bayes` (no logprobs and top-5) students, all trained for the same steps, under two
   initialisations: the teacher's first layers (`init: pretrained`, what every earlier result
   used) and `init: scratch` (the same architecture, random weights: no teacher knowledge).

Everything resumes: finished stages are skipped and each size's fidelity is kept in its
folder. Writes OUT/scale.json, OUT/scale.md and OUT/scale.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from pathlib import Path

from common import ROOT, bayeskd, load_bench_config, write_record  # bench/studies/common.py
from common import link_stages  # bench/studies/common.py

POOL_SEED = 20261202
WORD_TEMPLATES = [
    'Define the word "{w}" in one sentence.',
    'Use the word "{w}" in a sentence.',
    'Give two synonyms for the word "{w}".',
    "Write a haiku about {w}.",
    'Explain the word "{w}" to a child.',
    'What is the opposite of "{w}"?',
    'Write a short tweet that uses the word "{w}".',
    'Is "{w}" a noun, a verb or an adjective? Explain briefly.',
]


# ---------------------------------------------------------------- 1. the prompt pool


def _make_prompts():
    spec = importlib.util.spec_from_file_location("make_prompts", ROOT / "scripts" / "make_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vocabulary_words(tokenizer) -> list[str]:
    """Whole-word tokens of a byte-level BPE vocabulary: a leading space, 5 to 10 lowercase letters."""
    words = {t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and 5 <= len(t) - 1 <= 10}
    return sorted(w for w in words if w.isascii() and w.isalpha() and w.islower())


def build_pool(words: list[str], n_arithmetic: int = 900, n_word_problems: int = 1800, n_word_tasks: int = 14000) -> list[dict]:
    """The built-in prompts, then the templated ones interleaved evenly (ids say the kind)."""
    mp = _make_prompts()
    rng = random.Random(POOL_SEED)
    chosen = rng.sample(words, min(len(words), n_word_tasks))
    word_tasks = [(WORD_TEMPLATES[i % len(WORD_TEMPLATES)].format(w=w), None) for i, w in enumerate(chosen)]
    kinds = [
        ("word_task", "wt", word_tasks),
        ("arithmetic", "sarith", mp._arithmetic(random.Random(POOL_SEED + 1), n_arithmetic)),
        ("word_problem", "sword", mp._word_problem(random.Random(POOL_SEED + 2), n_word_problems)),
    ]
    groups = [[{"id": f"{prefix}-{i:05d}", "prompt": p, "kind": kind, "answer": a} for i, (p, a) in enumerate(items, 1)]
              for kind, prefix, items in kinds]  # fmt: skip
    builtin = mp.build_prompts()
    seen = {r["prompt"] for r in builtin}
    rest = [r for r in mp._interleave(groups) if r["prompt"] not in seen]
    return builtin + rest


def write_pool(path: Path, teacher: str) -> int:
    if path.exists():
        return sum(1 for _ in path.open())
    from bayeskd.models import load_tokenizer

    pool = build_pool(vocabulary_words(load_tokenizer(teacher)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool))
    tmp.replace(path)
    return len(pool)


# ---------------------------------------------------------------- 2. one growing collect


def train_tokens_by_prompt(cfg, corpus_path: Path) -> list[int]:
    """Response tokens (as the teacher counted them) of each training prompt, in corpus order."""
    from bayeskd.data import split_of

    out: dict[str, int] = {}
    for line in corpus_path.open():
        r = json.loads(line)
        if split_of(r["prompt_id"], cfg.data.heldout_fraction, cfg.data.validation_fraction) == "train":
            out[r["prompt_id"]] = out.get(r["prompt_id"], 0) + len(r["tokens"] or [])
    return list(out.values())


def grow_collect(args, cfg, base: Path, pool_size: int, sizes: list[int], reached) -> list[int]:
    """Collect `--chunk` more prompts at a time until the training split holds the largest size;
    `reached(size)` as soon as it holds each (a frozen copy that a second process may work on)."""
    target = sizes[-1]
    path = base / "collect" / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    limit = (manifest.get("config", {}).get("collect", {}).get("limit") if manifest else 0) or pool_size
    corpus = base / "collect" / "corpus.jsonl"
    tokens = train_tokens_by_prompt(cfg, corpus) if corpus.exists() and manifest.get("status") == "done" else []
    if not tokens:
        limit = min(limit, args.chunk)
    while True:
        bayeskd("collect", "--config", args.config, *args.overrides, f"collect.limit={limit}", "--force")
        tokens = train_tokens_by_prompt(cfg, corpus)
        print(f"scale: {limit} prompts collected, {sum(tokens)} training response tokens (target {target})", flush=True)
        for size in sizes:
            if sum(tokens) >= size:
                reached(size)
        if sum(tokens) >= target or limit >= pool_size:
            return tokens
        limit = min(pool_size, limit + args.chunk)


# ---------------------------------------------------------------- 3. fidelity at each size


def size_dir(base: Path, size: int) -> Path:
    return base.parent / f"size-{size // 1000}k"


def freeze(base: Path, root: Path) -> None:
    """root/collect: the base's corpus as it is now (corpus and manifest; the store stays in the
    base). The held-out prompts are a prefix of every later corpus's, in corpus order."""
    import shutil

    if (root / "collect" / "manifest.json").exists():
        return
    tmp = root / "collect.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("corpus.jsonl", "manifest.json"):
        shutil.copy2(base / "collect" / name, tmp / name)
    tmp.replace(root / "collect")


def prompts_for(tokens: list[int], size: int) -> int:
    """The fewest training prompts, in corpus order, whose responses hold `size` tokens."""
    total = 0
    for n, t in enumerate(tokens, 1):
        total += t
        if total >= size:
            return n
    raise ValueError(f"the corpus holds {total} training tokens < {size}")


def size_overrides(args, root: Path, n_prompts: int) -> list[str]:
    return [*args.overrides, f"run_dir={root}", f"data.train_prompts={n_prompts}", f"proxy.train.max_steps={args.proxy_steps}"]


def share_proxy(src: Path, root: Path) -> None:
    """root/proxy: the smallest size's proxy (its final weights linked, its manifest copied)."""
    import shutil

    if (root / "proxy" / "manifest.json").exists():
        return
    (root / "proxy").mkdir(parents=True, exist_ok=True)
    (root / "proxy" / "final").symlink_to((src / "proxy" / "final").resolve(), target_is_directory=True)
    shutil.copy(src / "proxy" / "manifest.json", root / "proxy" / "manifest.json")


def fidelity_at(args, size: int, root: Path, overrides: list[str], proxy_from: Path | None = None) -> dict:
    """The prior at one size and the proxy (trained here, or `proxy_from`'s), then every
    estimate's held-out fidelity in the two logprob regimes (the estimates without logprobs are
    the same in both)."""
    from bayeskd.artifacts import Run
    from bayeskd.config import load_config
    from bayeskd.corpus import load_corpus
    from bayeskd.evaluate.oracle import load_oracle
    from bayeskd.stages.evaluate import score_estimates

    path = root / "fidelity.json"
    if path.exists():
        return json.loads(path.read_text())
    if proxy_from is not None and proxy_from != root:
        share_proxy(proxy_from, root)
    for stage in ("prior", "proxy"):
        if (root / stage / "manifest.json").exists() and stage == "proxy" and proxy_from not in (None, root):
            continue  # shared, not retrained
        bayeskd(stage, "--config", args.config, *overrides)
    cfg = load_config(args.config, overrides)
    run = Run(root)
    corpus = load_corpus(cfg, run)
    teacher = load_oracle(cfg, corpus.tokenizer_fp)
    record = {
        "size": size,
        "train_prompts": cfg.data.train_prompts,
        "train_tokens": int(sum(corpus.dataset["n_response"][i] for i in corpus.indices("train"))),
        "proxy": json.loads((root / "proxy" / "manifest.json").read_text())["summary"],
        "regimes": {},
    }
    for r in args.fidelity_regimes:
        started = time.perf_counter()
        r_cfg = load_config(args.config, [*overrides, f"posterior.top_logprobs={r}"])
        record["regimes"][f"top{r}"] = score_estimates(r_cfg, run, corpus, teacher, heldout=True)
        print(f"scale: size {size}: fidelity at top-{r} in {time.perf_counter() - started:.0f} s", flush=True)
    path.write_text(json.dumps(record, indent=2))
    return record


def overrides_at(args, cfg, base: Path, size: int) -> list[str]:
    root = size_dir(base, size)
    return size_overrides(args, root, prompts_for(train_tokens_by_prompt(cfg, root / "collect" / "corpus.jsonl"), size))


# ---------------------------------------------------------------- 4. students at the largest size

STUDENTS = {0: ["sft", "proxy-kd", "bayes"], 5: ["topk-kd", "bayes"]}  # by regime (top-r logprobs; 0: none)
INITS = ("pretrained", "scratch")


def students_at(args, root: Path, overrides: list[str]) -> dict:
    """Each regime's posterior, then its students under each initialisation, same steps for all."""
    from common import regime_overrides, variant_dir  # bench/studies/common.py
    out: dict = {}
    for r, modes in STUDENTS.items():
        variant = variant_dir(root / "x", r, False)  # root/top{r}-default
        link_stages(root, variant, ("collect", "prior", "proxy"))
        common = [*overrides, *regime_overrides(r), f"distill.train.max_steps={args.student_steps}"]
        bayeskd("posterior", "--config", args.config, *common, f"run_dir={variant}")
        for init in INITS:
            folder = variant / init
            link_stages(variant, folder, ("collect", "prior", "proxy", "posterior"))
            run = [*common, f"run_dir={folder}", f"distill.train.init={init}", "distill.modes=[" + ", ".join(modes) + "]",
                   "eval.estimates=false"]  # fmt: skip
            bayeskd("distill", "--config", args.config, *run)
            bayeskd("eval", "--config", args.config, *run)
            students = json.loads((folder / "eval" / "metrics.json").read_text())["students"]
            for mode, m in students.items():
                name = mode if mode != "bayes" else ("bayes (no logprobs)" if r == 0 else f"bayes (top-{r})")
                out.setdefault(init, {})[name if mode != "topk-kd" else f"topk-kd (top-{r})"] = m
    return out


# ---------------------------------------------------------------- the record

NO_LOGPROBS = ("prior", "proxy", "posterior-no-logprobs", "one-hot+proxy", "one-hot+posterior")  # the same in every regime
FIDELITY_ROWS = (*NO_LOGPROBS, "top-k alone", "posterior (top-k only)", "posterior")


def _value(est: dict, name: str, metric: str) -> float | None:
    """An estimate's oracle KL (`kl`) or black-box NLL (`nll`, only where it is defined) in one regime's scores."""
    if metric == "kl":
        return est.get(name, {}).get("kl")
    return (est.get("blackbox") or {}).get("estimates", {}).get(name, {}).get("nll")


def tables(record: dict) -> str:
    sizes = record["sizes"]
    head = "| held-out estimate | " + " | ".join(f"{s['train_tokens']:,} tokens" for s in sizes) + " |"
    lines = []
    for regime in sizes[0]["regimes"]:
        for metric, title in (("kl", "oracle KL(teacher ‖ estimate), nats/token"), ("nll", "black-box NLL of the teacher's tokens, nats/token")):
            lines += [f"**{title}, API top-{regime[3:]}** (the rows without logprobs are the same in every regime)", "",
                      head, "|---|" + "---|" * len(sizes)]  # fmt: skip
            for name in FIDELITY_ROWS:
                values = [_value(s["regimes"][regime], name, metric) for s in sizes]
                cells = ["-" if v is None else f"{v:.3f}" for v in values]
                if any(c != "-" for c in cells):
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    est = next(iter(sizes[0]["regimes"].values()))
    lines.append(f"Measured on the first {est['prior']['tokens']} response positions of the held-out prompts, the same "
                 "positions at every size. The one-hot controls use their best lambda at each size; their black-box NLL "
                 "is left out (they contain the scored token).")  # fmt: skip
    lines.append("")
    for s in sizes:
        p = s["proxy"]
        lines.append(f"- {s['train_tokens']:,} tokens: {s['train_prompts']} training prompts, proxy {p['steps']} steps "
                     f"(held-out loss {p.get('eval_loss', float('nan')):.3f}; shared by every size)")  # fmt: skip
    if "students" in record:
        lines += ["", f"Students at {sizes[-1]['train_tokens']:,} tokens, {record['student_steps']} steps each, one seed:", "",
                  "| student | init | bpb ↓ | KL(teacher ‖ student) ↓ | ROUGE-L ↑ | accuracy ↑ |", "|---|---|---|---|---|---|"]  # fmt: skip
        for init, students in record["students"].items():
            for mode, m in students.items():
                acc = "-" if m.get("accuracy") is None else f"{m['accuracy']:.3f}"
                lines.append(f"| {mode} | {init} | {m['bpb']:.3f} | {m.get('kl_teacher', float('nan')):.3f} | {m['rouge_l']:.3f} | {acc} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = record["sizes"]
    x = [s["train_tokens"] for s in sizes]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric, title in zip(axes, ("kl", "nll"), ("oracle KL(teacher ‖ estimate)", "black-box held-out NLL")):
        for i, name in enumerate(FIDELITY_ROWS):
            for regime, style in zip(sizes[0]["regimes"], ("-", ":", "--")):
                if regime != "top5" and name in NO_LOGPROBS:
                    continue  # the same in every regime
                ys = [_value(s["regimes"][regime], name, metric) for s in sizes]
                if all(y is not None for y in ys):
                    label = name if name in NO_LOGPROBS else f"{name}, {regime}"
                    ax.plot(x, ys, style, marker="o", color=f"C{i}", label=label)
        ax.set(xscale="log", xlabel="training response tokens", ylabel="nats/token", title=title + " (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)

# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/scale.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 400_000])
    parser.add_argument("--chunk", type=int, default=1500, help="prompts added to the collect per step")
    parser.add_argument("--collect-only", action="store_true", help="stop after the collect")
    parser.add_argument("--fidelity-regimes", type=int, nargs="+", default=[5],
                        help="API top-k of the fidelity tables (each costs a pass over the held-out positions)")
    parser.add_argument("--proxy-steps", type=int, default=60,
                        help="the proxy's steps, trained once at the smallest size and shared by every size")
    parser.add_argument("--student-steps", type=int, default=50, help="steps of every student")
    parser.add_argument("--students-at", type=int, default=None, help="the size the students train at (default: the largest)")
    parser.add_argument("--no-students", action="store_true", help="fidelity only")
    parser.add_argument("--frozen-only", action="store_true",
                        help="no collect: the fidelity of the sizes the corpus already reached (frozen by a running scale.py)")
    parser.add_argument("--out", default="bench/out/scale")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args()
    cfg, base = load_bench_config(args.config, args.overrides)
    started = time.perf_counter()
    pool_size = write_pool(ROOT / cfg.collect.prompts, cfg.teacher.model)
    sizes = sorted(args.sizes)
    if args.frozen_only:
        sizes = [size for size in sizes if (size_dir(base, size) / "collect" / "manifest.json").exists()]
        for size in sizes:
            fidelity_at(args, size, size_dir(base, size), overrides_at(args, cfg, base, size), size_dir(base, sizes[0]))
        print(f"scale: fidelity done for sizes {sizes}", flush=True)
        if args.students_at in sizes and not args.no_students:
            students_at(args, size_dir(base, args.students_at), overrides_at(args, cfg, base, args.students_at))
        return
    tokens = grow_collect(args, cfg, base, pool_size, sizes, lambda size: freeze(base, size_dir(base, size)))
    print(f"scale: corpus ready: {len(tokens)} training prompts, {sum(tokens)} tokens "
          f"({(time.perf_counter() - started) / 60:.1f} min)", flush=True)  # fmt: skip
    if args.collect_only:
        return
    record = {"sizes": [], "corpus": json.loads((base / "collect" / "manifest.json").read_text())["summary"]}
    for size in sizes:
        freeze(base, size_dir(base, size))
        record["sizes"].append(fidelity_at(args, size, size_dir(base, size), overrides_at(args, cfg, base, size), size_dir(base, sizes[0])))
    if not args.no_students:
        at = args.students_at or sizes[-1]
        record["students"] = students_at(args, size_dir(base, at), overrides_at(args, cfg, base, at))
        record["student_steps"], record["students_at"] = args.student_steps, at
    record["seconds"] = time.perf_counter() - started
    md = tables(record)
    out = write_record(args.out, "scale", record, md)
    plot(record, out)
    print(md)
    print(f"wrote {out}/scale.json, scale.md, scale.png")


if __name__ == "__main__":
    main()
