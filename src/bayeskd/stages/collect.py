"""Stage `collect`: the teacher's responses to prompts, through its API.

Reads prompts, asks the teacher for `n` samples of each, and keeps every answer in the
run's append-only response store (`collect/store/`): online (`CachedTeacher`), or through a
Batch API (`collect.mode: batch`, `BatchTeacher`: one batch per command, `collect/batch.json`). Resumable: a rerun, or a resume after a
crash, asks only for what the store lacks. A budget (tokens or cost) stops dispatching
cleanly; failed requests go to `failures.jsonl` and are retried by the next run. At the end
the corpus (`corpus.jsonl`, one record per prompt and sample, in prompt order) is written
for the later stages.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from bayeskd.artifacts import Run, fingerprint_file, write_json_atomic, write_jsonl_atomic
from bayeskd.teachers.config import CollectConfig
from bayeskd.config import Config
from bayeskd.errors import BayeskdError
from bayeskd.prompts import load_prompts
from bayeskd.teachers.store import Budget, Ledger, ResponseStore
from bayeskd.teachers.build import build_teacher
from bayeskd.teachers.base import Choice, TeacherRequest, TeacherResponse, content_key
from bayeskd.teachers.cached import Ask, CachedTeacher

CORPUS = "corpus.jsonl"
TEACHER_CHECK = "teacher_check.json"


# ---------------------------------------------------------------- the plan


def request_for(prompt: dict, cfg: CollectConfig, n: int, first: int = 0) -> TeacherRequest:
    """The request for samples first .. first + n - 1 of a prompt. A teacher that seeds per sample
    (the local one; vLLM) would repeat samples 0 .. n - 1 for a request that asks again for later
    ones with the same seed, so the seed moves with `first`."""
    seed = None if cfg.seed is None else (cfg.seed + int(content_key(prompt["messages"]), 16) + first) % 2**31
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


def sample_key(teacher: str, prompt: dict, cfg: CollectConfig, sample_index: int, extra_body: dict | None = None) -> str:
    """A sample's store key. A server's own sampling parameters (`teacher.extra_body`) key it too, when set."""
    extra = (extra_body,) if extra_body else ()
    return content_key(teacher, prompt["messages"], request_for(prompt, cfg, 1).sampling(), sample_index, *extra)


def stage_config(cfg: Config) -> dict:
    """What the corpus depends on (not how fast it was fetched). A teacher the user names
    (`teacher.name`) is that name wherever it is served: its address is left out, so that a
    server moved to another port keeps the finished corpus valid (its answers are keyed by the
    name too)."""
    t = cfg.teacher
    teacher = {"name": t.key_name, "backend": t.backend, "model": t.model, "endpoint": t.endpoint,
               **({} if t.name else {"base_url": t.base_url})}  # fmt: skip
    if t.extra_body:  # only when set, so that runs from before the option keep their fingerprint
        teacher["extra_body"] = t.extra_body
    collect = asdict(cfg.collect)
    for how in ("flush_every", "teacher_check", "mode", "batch_poll_s", "batch_poll_max_s", "batch_window"):
        collect.pop(how)  # how the answers are fetched, not which: an online corpus stays done in batch mode
    collect["price"].pop("batch_discount")  # added later: runs from before it keep their fingerprint
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
    keys = [[sample_key(teacher_name, p, c, s, cfg.teacher.extra_body) for s in range(c.n)] for p in prompts]
    store = ResponseStore(out / "store", flush_every=c.flush_every)
    ledger = Ledger(price=c.price)
    for record in store.records():
        ledger.add_record(record)
    todo = [(i, [s for s in range(c.n) if keys[i][s] not in store]) for i in range(len(prompts))]
    todo = [(i, missing) for i, missing in todo if missing]
    total = len(prompts) * c.n
    checked = _teacher_checked(cfg, out, prompts[todo[0][0]]["messages"] if todo else None)
    if checked:
        ledger.add(teacher_name, "teacher-check", *checked)
    budget = Budget(ledger, c.budget_tokens, c.budget_cost)
    if c.mode == "batch":  # one line per sample (n = 1, the sample's seed): one store key per custom_id
        from bayeskd.teachers.batch import BatchTeacher  # the openai SDK, only when used

        paid = BatchTeacher(build_teacher(cfg.teacher), store, budget, teacher_name, out, c) if todo else None
        jobs = [((i, [s]), Ask(request_for(prompts[i], c, 1, first=s), (keys[i][s],), {"prompt_id": prompts[i]["id"]}))
                for i, missing in todo for s in missing]  # fmt: skip
    else:
        paid = CachedTeacher(build_teacher(cfg.teacher), store, budget, teacher_name) if todo else None
        jobs = [((i, missing), Ask(request_for(prompts[i], c, len(missing), first=missing[0]),
                                   tuple(keys[i][s] for s in missing), {"prompt_id": prompts[i]["id"]}))
                for i, missing in todo]  # fmt: skip
    bar = tqdm(total=total, initial=total - sum(len(m) for _, m in todo), desc="collect", unit="resp", dynamic_ncols=True)
    cut_short = 0

    def bodies(job: tuple[int, list[int]], _: TeacherRequest, response: TeacherResponse) -> list[dict]:
        i, missing = job
        return [_body(prompts[i], s, choice) for s, choice in zip(missing, response.choices)]

    try:
        for _, records in paid.ask(jobs, bodies) if paid else ():
            cut_short += sum(r["finish_reason"] == "length" for r in records)  # kept: what an API returns
            bar.update(len(records))
            bar.set_postfix(tokens=ledger.tokens, cost=f"{ledger.cost:.4f}", refresh=False)
    finally:
        store.close()
        bar.close()
        if paid:
            paid.close()
        write_json_atomic(out / "ledger.json", ledger.to_dict())
        write_jsonl_atomic(out / "failures.jsonl", paid.failures if paid else [])

    failures = paid.failures if paid else []
    refused = [f for f in failures if f["status"] == 400]
    if refused:  # bad input: retrying cannot help, so say so now (the stage stays unfinished)
        raise BayeskdError(
            f"the teacher refused {len(refused)} request(s) as invalid, e.g. prompt {refused[0]['prompt_id']!r}: "
            f"{refused[0]['reason']}; all are listed in {out / 'failures.jsonl'}"
        )
    n_records = _write_corpus(out / CORPUS, store, prompts, keys)
    stats = paid.stats if paid else {"requests": 0, "retries": 0}
    summary = {
        "prompts": len(prompts),
        "records": n_records,
        "expected": total,
        "tokens": ledger.tokens,
        "cost": round(ledger.cost, 6),
        "requests": stats["requests"],
        "retries": stats["retries"],
        "failures": len(failures),
        "cut_short": cut_short,
        "store_repaired": store.repaired,
        "budget_reached": budget.reached,
    }
    if c.mode == "batch":
        summary["batch"] = paid.batch_id if paid else None
    done = n_records == total
    run.finish("collect", "done" if done else "partial", summary, {"corpus": fingerprint_file(out / CORPUS)})
    return summary


def _teacher_checked(cfg: Config, out: Path, messages: list[dict] | None) -> tuple[int, int] | None:
    """`teacher-check` once per collect folder, before its first paid request (`collect.teacher_check`):
    (prompt, completion) tokens it cost, or None when it did not run. A failed row stops the stage
    (exit 2) before anything is paid for; a rerun checks again."""
    path = out / TEACHER_CHECK
    if path.exists():
        done = json.loads(path.read_text())
        if not done["failed"]:
            return done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]
    if messages is None or not cfg.collect.teacher_check or cfg.teacher.backend != "openai":
        return None
    from bayeskd.teachers.check import check_teacher, print_report

    report = check_teacher(cfg, messages)
    usage = {"prompt_tokens": report.usage.prompt_tokens, "completion_tokens": report.usage.completion_tokens}
    write_json_atomic(path, {"rows": [asdict(r) for r in report.rows], "usage": usage, "requests": report.requests,
                             "failed": bool(report.failed)})  # fmt: skip
    print_report(report)
    if report.failed:
        reasons = "; ".join(f"{r.name}: {r.found} ({r.note})" for r in report.failed)
        raise BayeskdError(f"teacher-check found what would break this collect: {reasons}. Nothing was collected; "
                           f"the table is in {path}. Fix the server or the config, or set collect.teacher_check=false "
                           "to collect anyway")  # fmt: skip
    return usage["prompt_tokens"], usage["completion_tokens"]


def _body(prompt: dict, sample_index: int, choice: Choice) -> dict:
    """A sample's record, as the next stages read it (`CachedTeacher` adds key, usage, call and teacher)."""
    return {
        "prompt_id": prompt["id"],
        "messages": prompt["messages"],
        "sample_index": sample_index,
        "text": choice.text,
        "finish_reason": choice.finish_reason,
        "answer": prompt["answer"],
        "tokens": None if choice.tokens is None else [
            {"token": t.token, "logprob": t.logprob, "top": [list(a) for a in t.top]} for t in choice.tokens
        ],
    }


def _write_corpus(path: Path, store: ResponseStore, prompts: list[dict], keys: list[list[str]]) -> int:
    # A prompt's own split (`data.split: prompts`) comes from the prompts file as it is now, not
    # from the store: the same answer may have been paid for under another split.
    rows = [{**store.get(k), **({"split": p["split"]} if "split" in p else {})}
            for p, ks in zip(prompts, keys) for k in ks if k in store]  # fmt: skip
    write_jsonl_atomic(path, rows)  # fsynced, renamed into place; a full disk names the path
    return len(rows)
