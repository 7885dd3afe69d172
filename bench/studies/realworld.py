"""The real-world case: a closed specialist teacher, a strong open proxy that is not the teacher,
students trained to convergence, judged on the teacher's tasks and on the API tokens saved.

    HF_HUB_OFFLINE=1 python bench/studies/realworld.py [--size smoke|cpu|gpu] [--seeds 0 1 2]
        [--regimes 0 5 20] [--phases teacher base students ablation efficiency deep scratch fit]
        [--out bench/out/realworld] [key=value ...]

1. **Teacher** (`bench/studies/realworld_teacher.py`): SmolLM2-135M-Instruct fine-tuned privately on the
   `teacher` split of `bayeskd.evaluate.suite`, cached under $BAYESKD_CACHE. It is served by `bayeskd serve`
   in its own process; the method's stages reach it only over HTTP (`teacher.backend: openai`),
   and only `eval` and `oracle-kd` load it, as the oracle (`eval.oracle_model`).
2. **Prompts**: the suite's `train`, `validation` and `heldout` items (never the teacher's), each
   with its split (`data.split: prompts`) and its gold answer, which only the evaluation reads.
3. **Base run**: collect (`collect.n` samples of each prompt, the API's top-20 logprobs), prior,
   and the proxy: the whole public model aligned by SFT on the teacher's corpus. Its held-out KL to
   the teacher and its task accuracy, before and after alignment, are measured here.
4. **Regimes**: r = 0 (no logprobs), 5, 20 (`posterior.top_logprobs`, one corpus for all). Per
   regime, two posteriors (`posterior.fit: none` and `auto`). Students per seed, all cut from the
   public model (first `distill.train.init_layers` layers), trained `epochs` passes over the
   training split and kept at their best validation NLL (`train.select: best_validation`; the
   table reports the epoch): `sft`, `proxy-kd`, `oracle-kd` (upper bound) once per seed;
   `topk-kd` in the regimes with logprobs; `bayes` on both posteriors. Every KD mode has the same
   KD weight (`distill.kd_weight`).
5. **Ablation** (phase `ablation`, seed 0): `prior-only` and `posterior-only` per regime.
6. **Efficiency** (phase `efficiency`, seed 0, regime 0): `sft` and `bayes` on 1/4 and 1/2 of the
   training prompts (prior, proxy and posterior rebuilt on that share: a user with fewer tokens has
   a proxy aligned on fewer), against both on all of it: how many API tokens `sft` needs to match
   `bayes`.
7. **Deeper students** (phase `deep`, seed 0, top-5): `sft`, `topk-kd` and `bayes` cut at the
   size's `deep_layers` layers, for when the 2-layer students cannot do the tasks at all.
8. **Scratch** (phase `scratch`, seed 0, top-5): `sft`, `topk-kd` and `bayes` students with the same
   shape and random weights.

Every student is scored here on all held-out prompts: greedy exact-match accuracy against the gold
answers (`suite.grade`), agreement with the teacher's own greedy answer, and `eval`'s bits per
byte and KL to the teacher. Every stage is a `bayeskd` command whose finished outputs are skipped
on a rerun, and student scores are cached per model: a killed run resumes (its recorded time adds
to the earlier run's; delete OUT/realworld.json to start the clock again). Tables (mean ± sample
std over seeds) and OUT/realworld.json are rewritten after each phase, so a partial run reports
what finished; `--tables` rebuilds the tables and verdicts from the JSON alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from common import ROOT, bayeskd, load_bench_config, write_record  # bench/studies/common.py
from common import link_stages, regime_overrides  # bench/studies/common.py

import realworld_teacher as rt  # bench/studies/realworld_teacher.py

SHARED = ("collect", "prior", "proxy")
BASELINES = ("sft", "proxy-kd", "topk-kd")
SIZES = {
    # suite: items per family and split, as the teacher is built and cached (bench/studies/realworld_teacher.py's
    # defaults, so that one fine-tune serves both scripts); use: how many of each split's items per
    # family the distillation reads; n: teacher samples per prompt; epochs: student passes.
    "smoke": {"families": ("add", "parity"), "suite": {"teacher": 48, "train": 16, "validation": 6, "heldout": 10},
              "use": {"train": 16, "validation": 6, "heldout": 10}, "teacher_epochs": 1.0, "n": 2, "epochs": 1.0,
              "proxy_epochs": 0.5, "proxy_layers": 4, "deep_layers": 3},
    "cpu": {"families": None, "suite": {"teacher": 160, "train": 200, "validation": 40, "heldout": 100},
            "use": {"train": 40, "validation": 12, "heldout": 40}, "teacher_epochs": None, "n": 2, "epochs": 3.0,
            "proxy_epochs": 1.0, "proxy_layers": None, "deep_layers": 10},
    # On paper, for a lent GPU (not run): 5 families x (200 train, 40 validation, 100 held-out)
    # prompts, n = 4 samples: 4,000 training responses (~200k tokens with the prompt); students of 4
    # layers for 3 epochs: 3 seeds x 3 regimes x ~9 students ~ 80 students x 600k tokens; at ~50k
    # tokens/s in bf16 on one H100 (bench/gpu.py's step rate for this vocabulary) about 20 minutes
    # of training, plus the proxy (1 epoch of the whole 135M model, a minute), collect (~2,000
    # requests through bayeskd serve, a few minutes) and eval: under an hour.
    "gpu": {"families": None, "suite": {"teacher": 160, "train": 200, "validation": 40, "heldout": 100},
            "use": {"train": 200, "validation": 40, "heldout": 100}, "teacher_epochs": None, "n": 4, "epochs": 3.0,
            "proxy_epochs": 1.0, "proxy_layers": None, "deep_layers": 10},
}


# ------------------------------------------------------------------------------ teacher and prompts


class Used:
    """The part of the suite the distillation reads: the first `use[split]` items of each family."""

    def __init__(self, suite, use: dict[str, int]):
        self.suite, self.use, self.config = suite, use, suite.config

    def items(self, split: str, family: str | None = None) -> list:
        """Families in turn (a prefix, as `data.train_prompts` takes one, is balanced across them)."""
        families = [family] if family else list(self.config.families)
        per = [self.suite.items(split, f)[: self.use.get(split, 10**9)] for f in families]
        return [q[i] for i in range(max(map(len, per), default=0)) for q in per if i < len(q)]

    def chance(self, family: str) -> float:
        return self.suite.chance(family)


def recipe(size: dict, seed: int):
    """The teacher's fine-tune: bench/studies/realworld_teacher.py's recipe (its epochs unless the size says)."""
    return rt.Recipe(seed=seed, **({"epochs": size["teacher_epochs"]} if size["teacher_epochs"] else {}))


def make_teacher(size: dict, seed: int) -> tuple[Used, Path, dict]:
    suite = rt.build_suite(seed, size["families"], **size["suite"])
    folder = rt.teacher_folder(suite, recipe(size, seed))
    return Used(suite, size["use"]), folder, json.loads((folder / rt.INFO).read_text())


def write_prompts(suite: Used, path: Path) -> Path:
    """The distillation prompts: every split but the teacher's, with its split and gold answer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": it.id, "prompt": it.prompt, "answer": it.answer, "split": split}
            for split in ("train", "validation", "heldout") for it in suite.items(split)]  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


@contextlib.contextmanager
def served(model: Path, config: str):
    """`bayeskd serve` on a free loopback port, in its own process: the teacher's weights stay there."""
    from bayeskd.teachers.hosting import ServerProcess, free_port

    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "bayeskd.cli", "serve", "--config", config, "teacher.backend=local",
           f"teacher.model={model}", "serve.model_name=teacher", f"serve.port={port}", "serve.max_n=16", "serve.max_batch=64"]  # fmt: skip
    with ServerProcess(cmd, f"http://127.0.0.1:{port}/v1", cwd=str(ROOT), log=os.devnull) as server:
        yield server.base_url


# ------------------------------------------------------------------------------ the runs


@functools.cache
def corpus_rows(path: Path) -> list[dict]:
    """A finished collect's records (read once: every variant and seed links the same corpus)."""
    return [json.loads(x) for x in path.resolve().read_text().splitlines()]


class Bench:
    def __init__(self, args, size: dict, base: Path, suite, teacher: Path, url: str):
        self.args, self.size, self.base, self.suite, self.teacher = args, size, base, suite, teacher
        self.common = ["--config", args.config, f"collect.prompts={write_prompts(suite, base.parent / 'prompts.jsonl')}",
                       f"collect.n={size['n']}", f"teacher.base_url={url}", f"eval.oracle_model={teacher}",
                       *args.overrides]  # fmt: skip

    def steps(self, examples: int, epochs: float, batch: int) -> int:
        return max(1, math.ceil(epochs * examples / batch))

    def train_examples(self, root: Path) -> int:
        return sum(r.get("split") == "train" for r in corpus_rows(root / "collect" / "corpus.jsonl"))

    def base_run(self) -> None:
        bayeskd("collect", *self.common)
        bayeskd("prior", *self.common)
        bayeskd("proxy", *self.common, *self.proxy_overrides(self.train_examples(self.base)))

    def proxy_overrides(self, examples: int) -> list[str]:
        steps = self.steps(examples, self.size["proxy_epochs"], 8)
        layers = self.size["proxy_layers"]
        return [f"proxy.train.max_steps={steps}", f"proxy.train.init_layers={'null' if layers is None else layers}"]

    def student_overrides(self, examples: int, seed: int, init: str = "pretrained") -> list[str]:
        steps = self.steps(examples, self.size["epochs"], 16)
        every = max(1, self.steps(examples, 0.5, 16))  # scored on validation twice an epoch
        return [f"distill.train.max_steps={steps}", f"distill.train.eval_every={every}", f"distill.train.save_every={every}",
                f"distill.train.seed={seed}", f"distill.train.init={init}",
                *self.proxy_overrides(examples)]  # fmt: skip

    def variant(self, r: int, fit: bool, base: Path | None = None, tag: str = "",
                extra: tuple[str, ...] = ()) -> tuple[Path, list[str]]:  # fmt: skip
        """The posterior of one (regime, fit) over `base`'s shared stages; returns its folder and overrides."""
        base = base or self.base
        root = base.parent / f"top{r}-{'fit' if fit else 'default'}{tag}"
        link_stages(base, root, SHARED)
        over = [*self.common, *regime_overrides(r), f"posterior.fit={'auto' if fit else 'none'}", *extra]
        bayeskd("posterior", *over, f"run_dir={root}", *self.proxy_overrides(self.train_examples(base)))
        return root, over

    def students(self, root: Path, over: list[str], seed: int, modes: list[str], init: str = "pretrained",
                 name: str | None = None, extra: tuple[str, ...] = (), examples: int | None = None) -> Path:  # fmt: skip
        """Train and evaluate `modes` in root/<name or seed{seed}> for `epochs` over `examples` (the
        whole training split unless given); returns that folder."""
        run = root / (name or f"seed{seed}")
        link_stages(root, run, (*SHARED, "posterior"))
        examples = examples or self.train_examples(root)
        args = [*over, *extra, f"run_dir={run}", f"distill.modes=[{', '.join(modes)}]",
                *self.student_overrides(examples, seed, init), f"eval.estimates={str(seed == self.args.seeds[0]).lower()}"]
        bayeskd("distill", *args)
        bayeskd("eval", *args)
        return run


# ------------------------------------------------------------------------------ scoring


def normalise(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def weights_key(model_dir: Path) -> str:
    """A cache key for a model folder's weights: its path, size and modification time."""
    stat = (model_dir / "model.safetensors").stat()
    return f"{model_dir}:{stat.st_size}:{stat.st_mtime_ns}"


class Scorer:
    """Greedy answers on every held-out prompt: accuracy against the gold answers, agreement with
    the teacher's own greedy answers (this evaluator loads the teacher; the method never does)."""

    def __init__(self, suite, teacher: Path, out: Path):
        from bayeskd.models import load_causal_lm, load_tokenizer

        self.items = suite.items("heldout")
        self.cache_path = out / "scores.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        self.scoring = rt.Scoring()  # bench/studies/realworld_teacher.py's: 24 tokens, room for the public model's wordy answers
        key = f"teacher:{teacher}"
        if key not in self.cache:
            self.cache[key] = {"responses": rt.generate(load_causal_lm(str(teacher)), load_tokenizer(str(teacher)),
                                                        [it.prompt for it in self.items], self.scoring)}  # fmt: skip
        self.teacher_answers = [normalise(r) for r in self.cache[key]["responses"]]

    def score(self, model_dir: Path) -> dict:
        from bayeskd.models import load_causal_lm, load_tokenizer
        from bayeskd.evaluate.suite import grade

        key = weights_key(model_dir)
        if key not in self.cache:
            responses = rt.generate(load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir)),
                                    [it.prompt for it in self.items], self.scoring)  # fmt: skip
            right = [grade(it, r) for it, r in zip(self.items, responses)]
            agree = [normalise(r) == t for r, t in zip(responses, self.teacher_answers)]
            fam = defaultdict(list)
            for it, ok in zip(self.items, right):
                fam[it.family].append(ok)
            self.cache[key] = {"accuracy": sum(right) / len(right), "agreement": sum(agree) / len(agree),
                               "families": {f: sum(v) / len(v) for f, v in fam.items()}}  # fmt: skip
            self.save()
        return self.cache[key]

    def save(self) -> None:
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache))
        os.replace(tmp, self.cache_path)


def student_rows(run: Path, scorer: Scorer, examples: int) -> dict[str, dict]:
    """Per mode of a finished eval: task accuracy, agreement, bpb, KL and the epoch it was kept at."""
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["students"]
    rows = {}
    for mode, m in metrics.items():
        summary = json.loads((run / "distill" / mode / "manifest.json").read_text())["summary"]
        s = scorer.score(run / "distill" / mode / "final")
        best = summary.get("best_step", summary["steps"])
        rows[mode] = {"accuracy": s["accuracy"], "agreement": s["agreement"], "bpb": m["bpb"],
                      "kl_teacher": m.get("kl_teacher"), "epoch": best * 16 / max(examples, 1),
                      "families": s["families"], **({"fit": summary["fit"]["chosen"]} if "fit" in summary else {})}  # fmt: skip
    return rows


FIELDS = ("accuracy", "agreement", "bpb", "kl_teacher", "epoch")


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict:
    out: dict = {}
    for mode in dict.fromkeys(m for s in per_seed.values() for m in s):
        out[mode] = {}
        for f in FIELDS:
            vals = [s[mode][f] for s in per_seed.values() if mode in s and s[mode].get(f) is not None]
            if vals:
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                out[mode][f] = {"mean": mean, "std": std, "values": vals}
    return out


def verdict(students: dict, r: int) -> dict:
    """bayes (each posterior) against the best non-Bayesian baseline of the regime, per measure: a
    lead counts when it passes two standard deviations (the larger of the two students')."""
    out = {}
    for measure, higher in (("accuracy", True), ("bpb", False)):
        cands = [m for m in BASELINES if m in students and measure in students[m] and (r or m != "topk-kd")]
        if not cands:
            continue
        sign = 1 if higher else -1
        best = max(cands, key=lambda m: sign * students[m][measure]["mean"])
        for b in ("bayes (defaults)", "bayes (fitted)"):
            if b in students and measure in students[b]:
                gap = sign * (students[b][measure]["mean"] - students[best][measure]["mean"])
                two_std = 2 * max(students[b][measure]["std"], students[best][measure]["std"])
                said = "beats" if gap > two_std else "loses to" if gap < -two_std else "ties (within 2 std)"
                out[f"{b} / {measure}"] = {"baseline": best, "gap": gap, "two_std": two_std, "beats": gap > two_std, "verdict": said}
    return out


def tables(record: dict) -> str:
    lines = []
    t = record.get("teacher")
    if t:
        lines += ["### The teacher, the public model and the proxy (held-out task accuracy)", "",
                  "| model | accuracy | KL to the teacher (held-out tokens) |", "|---|---|---|"]  # fmt: skip
        for name, row in t["models"].items():
            kl = f"{row['kl']:.3f}" if row.get("kl") is not None else "-"
            lines.append(f"| {name} | {row['accuracy']:.3f} | {kl} |")
        lines += ["", "| family | chance | public | format-only | teacher | proxy after alignment |", "|---|---|---|---|---|---|"]
        for f, row in t["families"].items():
            lines.append(f"| {f} | {row['chance']:.3f} | {row['public']:.3f} | {row['format']:.3f} | {row['teacher']:.3f} "
                         f"| {row['proxy']:.3f} |")  # fmt: skip
        lines.append("")
    for reg in record.get("regimes", []):
        r = reg["regime"]
        lines += [f"### {'no logprobs' if r == 0 else f'top-{r} logprobs'} (seeds {reg['seeds']})", "",
                  "| student | accuracy ↑ | agreement with teacher ↑ | bpb ↓ | KL(teacher ‖ student) ↓ | kept at epoch |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for mode, s in reg["students"].items():
            cells = [f"{s[f]['mean']:.3f} ± {s[f]['std']:.3f}" if f in s else "-" for f in FIELDS[:4]]
            ep = f"{s['epoch']['mean']:.2f}" if "epoch" in s else "-"
            lines.append(f"| {mode} | " + " | ".join(cells) + f" | {ep} |")
        for k, v in reg["verdict"].items():
            lines.append(f"\n{k} vs `{v['baseline']}` (the best baseline; + is better for bayes): {v['gap']:+.3f}, "
                         f"2 std {v['two_std']:.3f}: {v['verdict']}")  # fmt: skip
        lines.append("")
    for title, key in (("Ablation (seed 0)", "ablation"), ("Deeper students (seed 0)", "deep"),
                       ("Scratch-initialised students (seed 0, top-5)", "scratch")):  # fmt: skip
        if record.get(key):
            lines += [f"### {title}", "", "| run | student | accuracy | agreement | bpb | KL |", "|---|---|---|---|---|---|"]
            for run, rows in record[key].items():
                for mode, s in rows.items():
                    kl = f"{s['kl_teacher']:.3f}" if s.get("kl_teacher") is not None else "-"
                    lines.append(f"| {run} | {mode} | {s['accuracy']:.3f} | {s['agreement']:.3f} | {s['bpb']:.3f} | {kl} |")
            lines.append("")
    eff = record.get("efficiency")
    if eff:
        lines += ["### API tokens (seed 0, no logprobs)", "", "| share of the training prompts | teacher tokens | student | accuracy | bpb |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for row in eff["rows"]:
            lines.append(f"| {row['share']} | {row['tokens']} | {row['mode']} | {row['accuracy']:.3f} | {row['bpb']:.3f} |")
        lines += ["", eff["answer"], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/realworld.yaml")
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", type=int, nargs="+", default=[0, 5, 20])
    parser.add_argument("--phases", nargs="+", default=["teacher", "base", "students", "ablation", "efficiency", "deep", "scratch", "fit"])
    parser.add_argument("--out", default="bench/out/realworld")
    parser.add_argument("--tables", action="store_true", help="only rebuild OUT/realworld.md from OUT/realworld.json")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args()
    if args.tables:
        return retable(ROOT / args.out)
    size = SIZES[args.size]
    cfg, base = load_bench_config(args.config, args.overrides)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"size": args.size, "sizes": size, "seeds": args.seeds, "seconds": {}}
    previous = json.loads((out / "realworld.json").read_text()) if (out / "realworld.json").is_file() else {}
    if previous.get("size") == args.size:  # a resumed run: time adds up
        record["seconds"] = previous.get("seconds", {})
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        record["seconds"][name] = record["seconds"].get(name, 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()
        md = tables(record)
        write_record(args.out, "realworld", record, md)

    suite, teacher, info = make_teacher(size, args.seeds[0])
    lap("teacher")
    with served(teacher, args.config) as url:
        bench = Bench(args, size, base, suite, teacher, url)
        bench.base_run()
        lap("base")
        scorer = Scorer(suite, teacher, out)
        record["teacher"] = teacher_report(bench, suite, teacher, info, scorer)
        lap("proxy_report")
        examples = bench.train_examples(base)
        top = max(args.regimes)
        per: dict = defaultdict(lambda: defaultdict(dict))
        if "students" in args.phases:
            for seed in args.seeds:
                for r in sorted(args.regimes, key=lambda x: x != top):  # the shared students first
                    root, over = bench.variant(r, False)
                    modes = (["sft", "proxy-kd", "oracle-kd"] if r == top else []) + (["topk-kd"] if r else []) + ["bayes"]
                    rows = student_rows(bench.students(root, over, seed, modes), scorer, examples)
                    rows["bayes (defaults)"] = rows.pop("bayes")
                    per[r][seed].update(rows)
                    if r != top:  # the shared students count in every regime
                        per[r][seed].update({m: v for m, v in per[top][seed].items() if m in ("sft", "proxy-kd", "oracle-kd")})
                record["regimes"] = regimes_record(per, args)
                lap(f"students seed {seed}")
        if "ablation" in args.phases:
            record["ablation"] = {}
            for r in args.regimes:
                root, over = bench.variant(r, False)
                run = bench.students(root, over, args.seeds[0], ["prior-only", "posterior-only"], name="ablation")
                record["ablation"][f"top{r}"] = student_rows(run, scorer, examples)
            lap("ablation")
        if "efficiency" in args.phases:
            record["efficiency"] = efficiency(bench, scorer, args.seeds[0], top)
            lap("efficiency")
        if "fit" in args.phases:
            for seed in args.seeds:
                for r in args.regimes:
                    root, over = bench.variant(r, True)
                    rows = student_rows(bench.students(root, over, seed, ["bayes"]), scorer, examples)
                    per[r][seed]["bayes (fitted)"] = rows["bayes"]
                record["regimes"] = regimes_record(per, args)
                lap(f"fit seed {seed}")
        if "deep" in args.phases:
            r, layers = (5 if 5 in args.regimes else top), size["deep_layers"]
            root, over = bench.variant(r, False)
            run = bench.students(root, over, args.seeds[0], ["sft", "topk-kd", "bayes"], name=f"deep{layers}",
                                 extra=(f"distill.train.init_layers={layers}",))  # fmt: skip
            record["deep"] = {f"top{r}, {layers} layers": student_rows(run, scorer, examples)}
            lap("deep")
        if "scratch" in args.phases:
            r = 5 if 5 in args.regimes else top
            root, over = bench.variant(r, False)
            run = bench.students(root, over, args.seeds[0], ["sft", "topk-kd", "bayes"], init="scratch", name="scratch")
            record["scratch"] = {f"top{r}": student_rows(run, scorer, examples)}
            lap("scratch")
    print(tables(record))
    print(f"wrote {out}/realworld.json and realworld.md ({sum(record['seconds'].values()) / 60:.1f} min)")


def regimes_record(per: dict, args) -> list[dict]:
    out = []
    for r in args.regimes:
        if not per.get(r):
            continue
        students = summarise(per[r])
        order = ["sft", "proxy-kd", "topk-kd", "bayes (defaults)", "bayes (fitted)", "oracle-kd"]
        students = {m: students[m] for m in sorted(students, key=lambda m: order.index(m) if m in order else 99)}
        out.append({"regime": r, "seeds": sorted(per[r]), "students": students, "verdict": verdict(students, r),
                    "per_seed": {s: dict(v) for s, v in per[r].items()}})  # fmt: skip
    return out


def teacher_report(bench: Bench, suite, teacher: Path, info: dict, scorer: Scorer) -> dict:
    """Accuracy of the public model, the format-only control, the teacher and the proxy before and
    after alignment, and the held-out KL of the proxy to the teacher (dense, at the teacher's
    held-out response tokens: the evaluator's oracle)."""
    from bayeskd.models import resolve

    public = Path(resolve(rt.MODEL))
    proxy = bench.base / "proxy" / "final"
    fmt = rt.teacher_folder(suite.suite, recipe(bench.size, bench.args.seeds[0]), "format")
    models = {"public SmolLM2-135M-Instruct (the proxy before alignment)": public, "format-only fine-tune": fmt,
              "teacher (private fine-tune)": teacher, "proxy after alignment": proxy}  # fmt: skip
    key = f"proxy_kl:{weights_key(proxy)}"  # cached with the scores: a resumed run skips it
    if key not in scorer.cache:
        scorer.cache[key] = proxy_kl(bench, teacher, {"public SmolLM2-135M-Instruct (the proxy before alignment)": public,
                                                      "proxy after alignment": proxy})  # fmt: skip
        scorer.save()
    kls = scorer.cache[key]
    rows = {n: {"accuracy": scorer.score(p)["accuracy"], "kl": kls.get(n)} for n, p in models.items()}
    fam = {f: {"chance": suite.chance(f), **{k: scorer.score(p)["families"].get(f, 0.0) for k, p in
               (("public", public), ("format", fmt), ("teacher", teacher), ("proxy", proxy))}}
           for f in suite.config.families}  # fmt: skip
    return {"models": rows, "families": fam, "teacher_info": {k: info[k] for k in ("train_s", "steps", "recipe")}}


def proxy_kl(bench: Bench, teacher: Path, models: dict[str, Path], positions: int = 1500) -> dict[str, float]:
    import torch

    from bayeskd.evaluate import metrics as M
    from bayeskd.artifacts import Run
    from bayeskd.config import load_config
    from bayeskd.corpus import load_corpus
    from bayeskd.models import load_causal_lm
    from bayeskd.evaluate.oracle import teacher_probs

    cfg = load_config(bench.args.config, [*bench.common[2:], f"run_dir={bench.base}"])
    corpus = load_corpus(cfg, Run(bench.base))
    idx = corpus.indices("heldout")
    oracle = load_causal_lm(str(teacher))
    loaded = {n: load_causal_lm(str(p)) for n, p in models.items()}
    sums, n = defaultdict(float), 0
    for rb in corpus.batches(idx, 8, "realworld: proxy KL"):
        if n >= positions:
            break
        zt = rb.logits(oracle)
        outs = {name: rb.logits(m) for name, m in loaded.items()}
        for b, z in enumerate(zt):
            p_t = teacher_probs(cfg, z)
            for name in loaded:
                sums[name] += float(M.kl_dense(p_t, torch.softmax(outs[name][b], -1)).sum())
            n += len(z)
    return {name: sums[name] / max(n, 1) for name in loaded}


def api_tokens(records: list[dict], prompt_ids: set[str]) -> int:
    """What the API billed for these prompts' records: each call's usage once (the `n` samples of
    one call share its usage, whose prompt tokens are billed once and completion tokens summed)."""
    calls = {r["call"]: r["usage"] for r in records if r["prompt_id"] in prompt_ids}
    return sum(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0) for u in calls.values())


def efficiency(bench: Bench, scorer: Scorer, seed: int, top: int) -> dict:
    """sft and bayes (no logprobs) on 1/4, 1/2 and all of the training prompts: what sft needs to
    match bayes on all. On all of them both students are the students phase's (seed `seed`)."""
    n_train = len(bench.suite.items("train"))
    rows = []
    for share, part in (("1/4", 4), ("1/2", 2), ("1", 1)):
        k = n_train // part
        examples = bench.train_examples(bench.base) // part
        tag = "" if share == "1" else f"-share{k}"
        sub_base = bench.base if share == "1" else bench.base.parent / f"base{tag}"
        extra = () if share == "1" else (f"data.train_prompts={k}",)
        if share != "1":
            link_stages(bench.base, sub_base, ("collect",))
            for stage in ("prior", "proxy"):
                bayeskd(stage, *bench.common, *extra, f"run_dir={sub_base}",
                        *bench.proxy_overrides(examples))  # fmt: skip
        root, over = bench.variant(0, False, base=sub_base, tag=tag, extra=extra)
        if share == "1":  # the students phase's: bayes of regime 0, and sft (the same in every regime)
            found = {**student_rows(bench.base.parent / f"top{top}-default" / f"seed{seed}", scorer, examples),
                     **student_rows(bench.students(root, over, seed, ["bayes"]), scorer, examples)}  # fmt: skip
            found = {m: found[m] for m in ("sft", "bayes")}
        else:
            run = bench.students(root, over, seed, ["sft", "bayes"], name=f"eff-seed{seed}", examples=examples)
            found = student_rows(run, scorer, examples)
        kept = {it.id for it in bench.suite.items("train")[:k]}
        tokens = api_tokens(corpus_rows(bench.base / "collect" / "corpus.jsonl"), kept)
        for mode, s in found.items():
            rows.append({"share": share, "tokens": tokens, "mode": mode, **{f: s[f] for f in ("accuracy", "bpb")}})
    return {"rows": rows, "answer": efficiency_answer(rows)}


def efficiency_answer(rows: list[dict]) -> str:
    """How many API tokens `sft` needs to match `bayes` trained on all of them, per measure."""
    full = next(r for r in rows if r["share"] == "1" and r["mode"] == "bayes")
    out = []
    for measure, higher in (("accuracy", True), ("bpb", False)):
        match = [r for r in rows if r["mode"] == "sft" and (r[measure] >= full[measure] if higher else r[measure] <= full[measure])]
        if match:
            need = min(r["tokens"] for r in match)
            out.append(f"{measure}: sft matches bayes-on-all ({full[measure]:.3f}) with {need} of {full['tokens']} API tokens, "
                       f"so bayes saves {full['tokens'] - need} ({1 - need / full['tokens']:.0%})")  # fmt: skip
        else:
            out.append(f"{measure}: sft never reaches bayes-on-all's {full[measure]:.3f} within {full['tokens']} API tokens")
    return "; ".join(out)


def retable(out: Path) -> None:
    """Rebuild OUT/realworld.md (and the verdicts and the efficiency answer in the JSON) from the
    recorded measurements, without running anything."""
    record = json.loads((out / "realworld.json").read_text())
    for reg in record.get("regimes", []):
        reg["verdict"] = verdict(reg["students"], reg["regime"])
    if record.get("efficiency"):
        record["efficiency"]["answer"] = efficiency_answer(record["efficiency"]["rows"])
    write_record(str(out), "realworld", record, tables(record))
    print(tables(record))


if __name__ == "__main__":
    main()
