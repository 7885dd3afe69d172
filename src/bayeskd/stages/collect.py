"""Stage `collect`: the teacher's responses to prompts, through its API.

Reads prompts, asks the teacher for `n` samples of each, and keeps every answer in the
run's append-only response store (`collect/store/`). Resumable: a rerun, or a resume after a
crash, asks only for what the store lacks. A budget (tokens or cost) stops dispatching
cleanly; failed requests go to `failures.jsonl` and are retried by the next run. At the end
the corpus (`corpus.jsonl`, one record per prompt and sample, in prompt order) is written
for the later stages.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from bayeskd.artifacts import Run, fingerprint_file, write_json_atomic, write_jsonl_atomic
from bayeskd.config import CollectConfig, Config
from bayeskd.errors import BayeskdError
from bayeskd.store import Budget, Ledger, ResponseStore
from bayeskd.teachers import build_teacher
from bayeskd.teachers.base import TeacherError, TeacherRequest, TeacherResponse, content_key

CORPUS = "corpus.jsonl"


# ---------------------------------------------------------------- prompts


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
        prompts.append({"id": str(row.get("id", i)), "messages": messages, "answer": row.get("answer")})
    if cfg.shuffle:
        random.Random(seed).shuffle(prompts)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise BayeskdError(f"collect.prompts={cfg.prompts!r}: no prompts found")
    return prompts


def _read_prompt_rows(cfg: CollectConfig) -> list[dict]:
    if cfg.prompts == "builtin":
        from bayeskd.answers import load_builtin_prompts

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


# ---------------------------------------------------------------- the plan


def request_for(prompt: dict, cfg: CollectConfig, n: int) -> TeacherRequest:
    seed = None if cfg.seed is None else (cfg.seed + int(content_key(prompt["messages"]), 16)) % 2**31
    return TeacherRequest.chat(
        prompt["messages"],
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        n=n,
        seed=seed,
        stop=tuple(cfg.stop),
        top_logprobs=cfg.top_logprobs,
    )


def sample_key(teacher: str, prompt: dict, cfg: CollectConfig, sample_index: int) -> str:
    return content_key(teacher, prompt["messages"], request_for(prompt, cfg, 1).sampling(), sample_index)


def stage_config(cfg: Config) -> dict:
    """What the corpus depends on (not how fast it was fetched)."""
    t = cfg.teacher
    teacher = {"name": t.key_name, "backend": t.backend, "model": t.model, "base_url": t.base_url, "endpoint": t.endpoint}
    collect = asdict(cfg.collect)
    collect.pop("flush_every")
    return {"teacher": teacher, "collect": collect, "seed": cfg.seed}


# ---------------------------------------------------------------- the stage


def run_collect(cfg: Config, run: Run, force: bool = False) -> dict | None:
    c = cfg.collect
    prompts = load_prompts(c, cfg.seed)
    inputs = {} if c.prompts == "builtin" else {"prompts": fingerprint_file(Path(c.prompts))}
    out = run.begin("collect", stage_config(cfg), inputs, force, keep_outputs=True)
    if out is None:
        return None
    teacher_name = cfg.teacher.key_name
    keys = [[sample_key(teacher_name, p, c, s) for s in range(c.n)] for p in prompts]
    store = ResponseStore(out / "store", flush_every=c.flush_every)
    ledger = Ledger(price=c.price)
    for record in store.records():
        ledger.add_record(record)
    todo = [(i, [s for s in range(c.n) if keys[i][s] not in store]) for i in range(len(prompts))]
    todo = [(i, missing) for i, missing in todo if missing]
    reqs = [request_for(prompts[i], c, len(missing)) for i, missing in todo]
    total = len(prompts) * c.n
    stats = {"requests": 0, "retries": 0, "failures": 0, "cut_short": 0, "store_repaired": store.repaired}
    failures: list[dict] = []

    teacher = build_teacher(cfg.teacher) if todo else None
    bar = tqdm(total=total, initial=total - sum(len(m) for _, m in todo), desc="collect", unit="resp", dynamic_ncols=True)
    budget = Budget(ledger, c.budget_tokens, c.budget_cost)

    def requests() -> Iterator[TeacherRequest]:
        for request in reqs:
            if not budget.take(request.token_bound()):
                return
            stats["requests"] += 1
            yield request

    try:
        for j, result in teacher.stream(requests()) if teacher else ():
            i, missing = todo[j]
            budget.release(reqs[j].token_bound())
            if isinstance(result, TeacherError):
                stats["failures"] += 1
                failures.append({"prompt_id": prompts[i]["id"], "keys": [keys[i][s] for s in missing],
                                 "reason": str(result), "status": result.status})
                continue
            stats["retries"] += result.retries
            stats["cut_short"] += sum(c.finish_reason == "length" for c in result.choices)  # kept: what an API returns
            _save(store, ledger, teacher_name, prompts[i], missing, keys[i], result)
            bar.update(len(missing))
            bar.set_postfix(tokens=ledger.tokens, cost=f"{ledger.cost:.4f}", refresh=False)
    finally:
        store.close()
        bar.close()
        if teacher:
            teacher.close()
        write_json_atomic(out / "ledger.json", ledger.to_dict())
        _write_jsonl(out / "failures.jsonl", failures)

    refused = [f for f in failures if f["status"] == 400]
    if refused:  # bad input: retrying cannot help, so say so now (the stage stays unfinished)
        raise BayeskdError(
            f"the teacher refused {len(refused)} request(s) as invalid, e.g. prompt {refused[0]['prompt_id']!r}: "
            f"{refused[0]['reason']}; all are listed in {out / 'failures.jsonl'}"
        )
    n_records = _write_corpus(out / CORPUS, store, prompts, keys)
    summary = {
        "prompts": len(prompts),
        "records": n_records,
        "expected": total,
        "tokens": ledger.tokens,
        "cost": round(ledger.cost, 6),
        **stats,
        "budget_reached": budget.reached,
    }
    done = n_records == total
    run.finish("collect", "done" if done else "partial", summary, {"corpus": fingerprint_file(out / CORPUS)})
    return summary


def _save(store, ledger, teacher_name, prompt, missing, keys, response: TeacherResponse) -> None:
    call = content_key(keys[missing[0]], "call")
    usage = {"prompt_tokens": response.usage.prompt_tokens, "completion_tokens": response.usage.completion_tokens}
    for s, choice in zip(missing, response.choices):
        record = {
            "key": keys[s],
            "prompt_id": prompt["id"],
            "messages": prompt["messages"],
            "sample_index": s,
            "text": choice.text,
            "finish_reason": choice.finish_reason,
            "answer": prompt["answer"],
            "tokens": None if choice.tokens is None else [
                {"token": t.token, "logprob": t.logprob, "top": [list(a) for a in t.top]} for t in choice.tokens
            ],
            "usage": usage,
            "call": call,
            "teacher": teacher_name,
        }
        store.append(record)
    ledger.add(teacher_name, call, usage["prompt_tokens"], usage["completion_tokens"])


def _write_corpus(path: Path, store: ResponseStore, prompts: list[dict], keys: list[list[str]]) -> int:
    rows = [store.get(k) for ks in keys for k in ks if k in store]
    _write_jsonl(path, rows)
    return len(rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_jsonl_atomic(path, rows)  # fsynced, renamed into place; a full disk names the path
