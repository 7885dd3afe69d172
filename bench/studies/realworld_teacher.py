"""The real-world case's private "closed" teacher: a specialist fine-tune, and what the public model scores.

    HF_HUB_OFFLINE=1 python bench/studies/realworld_teacher.py [--out bench/out/realworld] [--seed 0]
        [--teacher 160] [--train 200] [--validation 40] [--heldout 100] [--families antonym,category,...]
        [--epochs 1] [--lr 2e-4] [--rows 4] [--max-new-tokens 24] [--threads 2]

Suite: `bayeskd.evaluate.suite` (short answers, exact match; its docstring says how it is built and split).

Teacher: the embedded public model SmolLM2-135M-Instruct, fully fine-tuned (fp32, CPU) on the
suite's `teacher` split: the prompt as the user turn of the model's chat template (default
system prompt included, as `bayeskd.data` renders records), the gold answer as the reply, the
loss on the reply's tokens and its end-of-turn only (`data.build_dataset` labels,
`losses.make_loss_fn()` = cross-entropy, `training.train`). AdamW, cosine schedule, `--epochs`
passes. A user of the closed API sees only its answers, so the weights stay private to this bench.

Format-only control: the same recipe on the same prompts, each answered with another item's
answer from the same family (a random derangement): right format, right only by chance. A
systematically wrong answer would teach the inverse skill on two-option families (parity), so
the answers are shuffled, not negated. The gap teacher - format-only is the skill the teacher
holds; format-only - public is what learning the answer format alone buys.

Both fine-tunes are cached at `$BAYESKD_CACHE/realworld/{teacher,format}-<hash>/` (a Hugging Face
folder with tokenizer and `teacher.json`: recipe, suite, accuracies, seconds), the hash over the
suite config, the teacher split's items, the recipe and the base model. They are trained under
`<folder>.work/` (resumable from its checkpoints) and renamed into place when done, so a kill
never leaves a half folder.

Scoring: greedy decoding, `--max-new-tokens` at most (24: the public model's "The opposite of
'less' is 'more'." needs about 14; the fine-tunes stop after 2-4), batched with left padding;
`suite.grade` = `answers.is_correct` plus no other option named (multiple choice). Chance per
family as `Suite.chance` defines it. Prints a table and writes OUT/teacher.json.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "smollm2-135m-instruct"
KINDS = ("teacher", "format")
INFO = "teacher.json"


@dataclass(frozen=True)
class Recipe:
    """How a fine-tune is made (all of it goes into the cache key)."""

    epochs: float = 1.0
    lr: float = 2e-4
    rows: int = 4
    """Packed rows per optimizer step (about 5 examples a row at pack_length 256)."""
    pack_length: int = 256
    """Examples are packed into rows of this many tokens: no padding (mixed families differ 4x in length)."""
    warmup_steps: int = 3
    seed: int = 0
    model: str = MODEL

    def steps(self, n_rows: int) -> int:
        return max(1, math.ceil(self.epochs * n_rows / self.rows))


@dataclass(frozen=True)
class Scoring:
    """How responses are generated for scoring (accuracies cached with other settings are recomputed)."""

    max_new_tokens: int = 24
    batch_size: int = 50


# ------------------------------------------------------------------------------ suite and records


def build_suite(seed: int = 0, families: Sequence[str] | None = None, **sizes: int):
    """The suite, as `bayeskd.evaluate.suite.build_suite`, from a seed and per-split sizes (teacher=..., heldout=...)."""
    from bayeskd.evaluate.suite import FAMILIES, SplitSizes, SuiteConfig, build_suite as build

    return build(SuiteConfig(seed=seed, families=tuple(families or FAMILIES), sizes=SplitSizes(**sizes)))


def format_only_answers(items: Sequence, seed: int) -> list[str]:
    """Each item's answer replaced by another item's of its family (a seeded random derangement)."""
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_family[it.family].append(i)
    answers = [it.answer for it in items]
    rng = random.Random(f"format/{seed}")
    for family, idx in sorted(by_family.items()):
        if len(idx) < 2:
            raise ValueError(f"format-only: family {family!r} has {len(idx)} teacher item(s), needs 2 to swap answers")
        shifted = idx[:]
        rng.shuffle(shifted)
        for src, dst in zip(shifted, shifted[1:] + shifted[:1]):  # a cycle: nobody keeps its own answer
            answers[dst] = items[src].answer
    return answers


def records(items: Sequence, answers: Sequence[str] | None = None) -> list[dict]:
    """Corpus-style records (`data.build_dataset` input): the prompt as the user turn, the answer as the reply."""
    answers = answers or [it.answer for it in items]
    return [
        {"prompt_id": it.id, "messages": [{"role": "user", "content": it.prompt}], "text": a}
        for it, a in zip(items, answers)
    ]


# ------------------------------------------------------------------------------ scoring


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], scoring: Scoring = Scoring()) -> list[str]:
    """Greedy replies to user prompts, in batches with left padding (prompts sorted by length to pad less)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), scoring.batch_size):
            idx = order[start : start + scoring.batch_size]
            enc = tokenizer([_chat(tokenizer, prompts[i]) for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False)  # fmt: skip
            gen = model.generate(**enc, max_new_tokens=scoring.max_new_tokens, do_sample=False, top_p=None,
                                 top_k=None, temperature=None, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1] :]):
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def accuracy(model, tokenizer, items: Sequence, scoring: Scoring = Scoring()) -> dict:
    """Greedy exact-match accuracy, overall and per family, with a few responses per family to read."""
    from bayeskd.evaluate.suite import grade

    responses = generate(model, tokenizer, [it.prompt for it in items], scoring)
    right: dict[str, list[bool]] = defaultdict(list)
    samples: dict[str, list] = defaultdict(list)
    for it, r in zip(items, responses):
        right[it.family].append(grade(it, r))
        if len(samples[it.family]) < 3:
            samples[it.family].append({"id": it.id, "answer": it.answer, "response": r})
    flat = [x for v in right.values() for x in v]
    return {
        "overall": sum(flat) / max(len(flat), 1),
        "n": len(flat),
        "families": {f: {"accuracy": sum(v) / len(v), "n": len(v)} for f, v in right.items()},
        "samples": dict(samples),
    }


# ------------------------------------------------------------------------------ fine-tunes


def cache_key(suite, recipe: Recipe, kind: str) -> str:
    """A short hash of what the fine-tune depends on: suite config, teacher items, recipe, kind."""
    teacher = [(it.id, it.prompt, it.answer) for it in suite.items("teacher")]
    blob = json.dumps({"suite": suite.config.identity(), "items": teacher, "recipe": asdict(recipe), "kind": kind},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def folder_for(suite, recipe: Recipe, kind: str) -> Path:
    """Where the fine-tune of this kind lives in the cache (whether or not it exists yet)."""
    from bayeskd.models import cache_root

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    return cache_root() / "realworld" / f"{kind}-{cache_key(suite, recipe, kind)}"


def teacher_folder(suite, recipe: Recipe = Recipe(), kind: str = "teacher", scoring: Scoring = Scoring(),
                   progress: bool = True) -> Path:  # fmt: skip
    """The cached fine-tune (`teacher`, or the `format` control) for this suite and recipe; trains it if missing.

    Its `teacher.json` holds the recipe, the suite config, the training seconds and the held-out
    accuracy under `scoring`."""
    folder = folder_for(suite, recipe, kind)
    if (folder / INFO).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is making this very folder: wait for it, then reuse it
            print(f"realworld: waiting for another process to finish {folder}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / INFO).is_file():
            _make(folder, suite, recipe, kind, scoring, progress)
    return folder


def _make(folder: Path, suite, recipe: Recipe, kind: str, scoring: Scoring, progress: bool) -> None:
    """Train under folder.work, score, write teacher.json, rename into place (under the caller's lock)."""
    work = folder.with_name(folder.name + ".work")
    info = _finetune(suite, recipe, kind, work, progress)
    final = work / "final"
    from bayeskd.models import load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    info["heldout"] = accuracy(load_causal_lm(str(final)), load_tokenizer(str(final)), suite.items("heldout"), scoring)
    info["scoring"], info["eval_s"] = asdict(scoring), time.perf_counter() - t0
    (final / INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(final, folder)  # atomic: readers see no folder or a complete one
    shutil.rmtree(work, ignore_errors=True)


def _finetune(suite, recipe: Recipe, kind: str, work: Path, progress: bool) -> dict:
    """Full fine-tune of the base model on the teacher split (gold or shuffled answers) into work/final."""
    from bayeskd.train.config import TrainConfig
    from bayeskd.data import Collator, build_dataset, pack
    from bayeskd.train.losses import make_loss_fn
    from bayeskd.models import load_causal_lm, load_tokenizer
    from bayeskd.train.loop import train

    items = suite.items("teacher")
    answers = format_only_answers(items, recipe.seed) if kind == "format" else None
    tokenizer = load_tokenizer(recipe.model)
    data = pack(build_dataset(records(items, answers), tokenizer, "chat", recipe.pack_length), recipe.pack_length,
                seed=recipe.seed)  # fmt: skip
    cfg = TrainConfig(model=recipe.model, batch_size=recipe.rows, max_steps=recipe.steps(len(data)), lr=recipe.lr,
                      warmup_steps=recipe.warmup_steps, schedule="cosine", mixed_precision="no", save_every=50,
                      keep_checkpoints=1, seed=recipe.seed, log_every=5)  # fmt: skip
    print(f"realworld: fine-tuning the {kind} model ({len(items)} examples in {len(data)} rows, {cfg.max_steps} steps) "
          f"in {work}",
          file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    result = train(load_causal_lm(recipe.model), data, make_loss_fn(), cfg, work,
                   collate_fn=Collator(tokenizer.pad_token_id), tokenizer=tokenizer, progress=progress)  # fmt: skip
    return {
        "kind": kind,
        "base_model": recipe.model,
        "recipe": asdict(recipe),
        "suite": suite.config.identity(),
        "teacher_items": len(items),
        "rows": len(data),
        "steps": result.step,
        "train_s": time.perf_counter() - t0,
        "final_loss": result.last.get("loss"),
        "format_only": kind == "format",
    }


def heldout_accuracy(folder: Path, suite, scoring: Scoring) -> tuple[dict, float]:
    """A cached fine-tune's held-out accuracy: from its teacher.json when scored the same way, else measured."""
    from bayeskd.models import load_causal_lm, load_tokenizer

    info = json.loads((folder / INFO).read_text())
    if info.get("scoring") == asdict(scoring) and "heldout" in info:
        return info["heldout"], 0.0
    t0 = time.perf_counter()
    return accuracy(load_causal_lm(str(folder)), load_tokenizer(str(folder)), suite.items("heldout"), scoring), \
        time.perf_counter() - t0  # fmt: skip


def public_accuracy(suite, scoring: Scoring = Scoring(), model: str = MODEL) -> tuple[dict, float]:
    """The public model's held-out accuracy and the seconds it took, cached (0 s) by held-out items and scoring."""
    from bayeskd.models import cache_root, load_causal_lm, load_tokenizer

    held = suite.items("heldout")
    blob = json.dumps({"items": [(it.id, it.prompt, it.answer, it.options) for it in held], "model": model,
                       "scoring": asdict(scoring)}, sort_keys=True)  # fmt: skip
    path = cache_root() / "realworld" / f"public-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.json"
    if path.is_file():
        return json.loads(path.read_text()), 0.0
    t0 = time.perf_counter()
    scores = accuracy(load_causal_lm(model), load_tokenizer(model), held, scoring)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(scores, indent=2))
    os.replace(tmp, path)
    return scores, time.perf_counter() - t0


# ------------------------------------------------------------------------------ CLI


def print_table(report: dict) -> None:
    cols = ("public", "format", "teacher")
    print(f"{'family':<10} {'chance':>7} {'public':>7} {'format':>7} {'teacher':>8} {'n':>5}")
    for family, row in report["families"].items():
        print(f"{family:<10} {row['chance']:>7.3f} " + " ".join(f"{row[c]:>7.3f}" for c in cols[:2])
              + f" {row['teacher']:>8.3f} {row['n']:>5}")  # fmt: skip
    o = report["overall"]
    print(f"{'overall':<10} {o['chance']:>7.3f} {o['public']:>7.3f} {o['format']:>7.3f} {o['teacher']:>8.3f} {o['n']:>5}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/out/realworld")
    ap.add_argument("--seed", type=int, default=0)
    for split, n in (("teacher", 160), ("train", 200), ("validation", 40), ("heldout", 100)):
        ap.add_argument(f"--{split}", type=int, default=n, help=f"{split} items per family (default {n})")
    ap.add_argument("--families", default=None, help="comma-separated (default: suite.FAMILIES)")
    ap.add_argument("--epochs", type=float, default=Recipe.epochs)
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--rows", type=int, default=Recipe.rows, help="packed rows per step")
    ap.add_argument("--max-new-tokens", type=int, default=Scoring.max_new_tokens)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    families = args.families.split(",") if args.families else None
    suite = build_suite(args.seed, families, teacher=args.teacher, train=args.train, validation=args.validation,
                        heldout=args.heldout)  # fmt: skip
    seconds["suite"] = time.perf_counter() - t0
    recipe = Recipe(epochs=args.epochs, lr=args.lr, rows=args.rows, seed=args.seed)
    scoring = Scoring(max_new_tokens=args.max_new_tokens)
    heldout = suite.items("heldout")

    scores = {}
    scores["public"], seconds["public_eval"] = public_accuracy(suite, scoring)
    folders = {}
    reused = {}
    for kind in ("teacher", "format"):
        reused[kind] = (folder_for(suite, recipe, kind) / INFO).is_file()  # then its seconds are the first run's
        folders[kind] = teacher_folder(suite, recipe, kind, scoring)
        info = json.loads((folders[kind] / INFO).read_text())
        scores[kind], seconds[f"{kind}_eval_rerun"] = heldout_accuracy(folders[kind], suite, scoring)
        seconds[f"{kind}_train"], seconds[f"{kind}_eval"] = info["train_s"], info["eval_s"]

    fams = list(suite.config.families)
    n = {f: len(suite.items("heldout", f)) for f in fams}
    chance = {f: suite.chance(f) for f in fams}
    report = {
        "model": MODEL,
        "suite": suite.config.identity(),
        "recipe": asdict(recipe),
        "scoring": asdict(scoring),
        "folders": {k: str(v) for k, v in folders.items()},
        "families": {
            f: {"chance": chance[f], "n": n[f], **{k: s["families"][f]["accuracy"] for k, s in scores.items()}}
            for f in fams
        },
        "overall": {"chance": sum(chance[f] * n[f] for f in fams) / len(heldout), "n": len(heldout),
                    **{k: s["overall"] for k, s in scores.items()}},  # fmt: skip
        "seconds": seconds,
        "reused": reused,
        "samples": {k: s["samples"] for k, s in scores.items()},
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"wrote {out / 'teacher.json'}")


if __name__ == "__main__":
    main()
