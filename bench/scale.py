"""Scale: the estimates' fidelity as the corpus grows from about 20k to 400k+ response tokens,
and students that do not inherit the teacher's weights (issue 13).

    HF_HUB_OFFLINE=1 python bench/scale.py [--config bench/scale.yaml] [--sizes 20000 100000 400000]
        [--out bench/out/scale] [--students | --no-students] [key=value ...]

1. The prompt pool (runs/scale/prompts.jsonl, written once, deterministic): the 323 built-in
   prompts first, then templated tasks interleaved so that every prefix mixes them: word tasks
   (define, use in a sentence, synonyms, a haiku, ...) on whole-word tokens of the teacher's
   own vocabulary, arithmetic and word problems from scripts/make_prompts.py's generators.
2. One collect (the embedded teacher in process, top-20 logprobs, one sample a prompt) that
   grows by `--chunk` prompts until the training split holds the largest size: each step is
   the previous corpus plus more (the store is content-keyed, so no answer is paid for twice).
   A kill loses nothing the store has; a rerun asks only for what it lacks.
3. At each size, a run folder that links the final collect and trains on its first N training
   prompts (data.train_prompts; N chosen so that the training responses hold about the size in
   tokens), on the same held-out prompts: the prior, the proxy (trained for one pass over its
   corpus, at least --min-proxy-steps), then the fidelity of every estimate (oracle KL and
   black-box NLL, held out) with no logprobs, top-5 and top-20.
4. At the largest size: the `sft`, `proxy-kd`, `topk-kd` (top-5) and `bayes` (no logprobs and
   top-5) students, all trained for the same steps, under two initialisations: the teacher's
   first layers (`init: pretrained`, what every earlier result used) and `init: scratch` (the
   same architecture, random weights: no teacher knowledge).

Everything resumes: finished stages are skipped and each size's fidelity is kept in its
folder. Writes OUT/scale.json, OUT/scale.md and OUT/scale.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

from claim import ROOT, bayeskd, write_record  # bench/claim.py, beside this script
from regimes import link_stages  # bench/regimes.py

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


def grow_collect(args, cfg, base: Path, pool_size: int, target: int) -> list[int]:
    """Collect `--chunk` more prompts at a time until the training split holds `target` tokens."""
    manifest = base / "collect" / "manifest.json"
    limit = json.loads(manifest.read_text())["config"]["collect"]["limit"] if manifest.exists() else 0
    limit = limit or pool_size
    corpus = base / "collect" / "corpus.jsonl"
    tokens = train_tokens_by_prompt(cfg, corpus) if corpus.exists() and json.loads(manifest.read_text())["status"] == "done" else []
    if not tokens:
        limit = min(limit, args.chunk)
    while True:
        bayeskd("collect", "--config", args.config, *args.overrides, f"collect.limit={limit}", "--force")
        tokens = train_tokens_by_prompt(cfg, corpus)
        print(f"scale: {limit} prompts collected, {sum(tokens)} training response tokens (target {target})", flush=True)
        if sum(tokens) >= target or limit >= pool_size:
            return tokens
        limit = min(pool_size, limit + args.chunk)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/scale.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 400_000])
    parser.add_argument("--chunk", type=int, default=1500, help="prompts added to the collect per step")
    parser.add_argument("--collect-only", action="store_true", help="stop after the collect")
    parser.add_argument("--out", default="bench/out/scale")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    from bayeskd.config import load_config

    cfg = load_config(args.config, args.overrides)
    base = ROOT / cfg.run_dir
    started = time.perf_counter()
    pool_size = write_pool(ROOT / cfg.collect.prompts, cfg.teacher.model)
    tokens = grow_collect(args, cfg, base, pool_size, max(args.sizes))
    print(f"scale: corpus ready: {len(tokens)} training prompts, {sum(tokens)} tokens "
          f"({(time.perf_counter() - started) / 60:.1f} min)", flush=True)  # fmt: skip
    if args.collect_only:
        return


if __name__ == "__main__":
    main()
