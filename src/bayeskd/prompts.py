"""Prompts for `collect`: the built-in set, a .jsonl or .txt file, or a `datasets` folder.

The built-in set (`builtin/prompts.jsonl`, written by `scripts/make_prompts.py`) holds 323
short instructions, 180 of them tasks with checkable answers (`answers.is_correct` scores
them). Every source becomes `{"id", "messages", "answer"}` per prompt.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from bayeskd.teachers.config import CollectConfig
from bayeskd.data import SPLITS
from bayeskd.errors import BayeskdError


def load_prompts(cfg: CollectConfig, seed: int) -> list[dict]:
    """Prompts as {"id", "messages", "answer"}: builtin, .jsonl, .txt, or a `datasets` folder."""
    rows = _read_prompt_rows(cfg)
    prompts = []
    for i, row in enumerate(rows):
        messages = row.get("messages")
        if messages is None:
            text = row.get(cfg.prompt_field)
            if not isinstance(text, str) or not text.strip():
                raise BayeskdError(f"collect.prompts: prompt {i} has no text in field {cfg.prompt_field!r}")
            messages = [{"role": "user", "content": text}]
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        prompt = {"id": str(row.get("id", i)), "messages": messages, "answer": row.get("answer")}
        if row.get("split") is not None:  # a suite's own split (`data.split: prompts`)
            if row["split"] not in SPLITS:
                raise BayeskdError(f"collect.prompts: prompt {i} has split {row['split']!r}; expected one of {', '.join(SPLITS)}")
            prompt["split"] = row["split"]
        prompts.append(prompt)
    if cfg.shuffle:
        random.Random(seed).shuffle(prompts)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise BayeskdError(f"collect.prompts={cfg.prompts!r}: no prompts found")
    return prompts


def _read_prompt_rows(cfg: CollectConfig) -> list[dict]:
    if cfg.prompts == "builtin":
        return load_builtin_prompts()
    path = Path(cfg.prompts)
    if not path.exists():
        raise BayeskdError(f"collect.prompts={cfg.prompts!r}: no such file or folder")
    if path.is_dir():
        from datasets import load_from_disk

        return [dict(r) for r in load_from_disk(str(path))]
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BayeskdError(f"collect.prompts: {path}:{n} is not valid JSON ({e.msg})") from None
        return rows
    return [{cfg.prompt_field: line} for line in path.read_text().splitlines() if line.strip()]


def load_builtin_prompts() -> list[dict]:
    """The shipped prompt set: ``[{"id", "prompt", "kind", "answer"}, ...]`` in file order."""
    path = resources.files("bayeskd") / "builtin" / "prompts.jsonl"
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
