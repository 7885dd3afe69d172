"""Asking through a Batch API (`collect.mode: batch`): OpenAI's `/v1/files` and `/v1/batches`.

Each missing sample is one line of an OpenAI Batch input file (JSONL):

    {"custom_id": <the sample's store key>, "method": "POST", "url": "/v1/chat/completions",
     "body": <the JSON body the same request sends online, with n = 1 and the sample's seed>}

One line per sample, not one per prompt, so that a line's answer is one store record whatever
the server does with `n` (llama.cpp ignores it), and a failed sample is asked again alone. The
cost is the prompt, paid once per sample instead of once per prompt.

The file is uploaded (`files.create(purpose="batch")`), the batch created, and its ids kept in
`batch.json` before the first look at its status, so that a command killed at any moment is
picked up by the next one: it finds the same batch (or, killed between the upload and the
creation, looks for a batch of the uploaded file before creating one) and never submits twice.
The status is polled with a growing delay; the output and error files are read line by line,
each answer checked as an online one is (`OpenAITeacher.chat_answer`) and stored as one
(`CachedTeacher._keep`, the records marked with the batch's id so that the ledger prices them at
`price.batch_discount`); lines that failed, or that a batch ended without, go to the failures,
and a later command submits a new batch of the samples still missing.

The budget is checked before submission: each line's token bound is reserved (at the batch
price), and the batch holds only the lines that fit, in order.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import openai
from tqdm.auto import tqdm

from bayeskd.artifacts import write_json_atomic, write_jsonl_atomic
from bayeskd.teachers.base import TeacherError, content_key
from bayeskd.teachers.cached import Ask, Bodies, CachedTeacher, Job
from bayeskd.teachers.config import CollectConfig
from bayeskd.teachers.openai_compat import OpenAITeacher, TeacherUnavailable
from bayeskd.teachers.store import Budget, ResponseStore

STATE = "batch.json"
"""In the stage folder: every batch this folder submitted, the last one unfinished while it runs."""
ENDPOINT = "/v1/chat/completions"
DONE = ("completed", "failed", "expired", "cancelled")
"""A batch's final statuses (OpenAI's)."""


def batch_line(teacher: OpenAITeacher, ask: Ask) -> dict:
    """The Batch API input line of a one-sample Ask: custom_id is its store key."""
    if len(ask.keys) != 1 or ask.request.n != 1:
        raise ValueError("a batch line asks for one sample (n = 1), which is one store key")
    return {"custom_id": ask.keys[0], "method": "POST", "url": ENDPOINT, "body": teacher.chat_body(ask.request)}


class BatchTeacher(CachedTeacher):
    """`CachedTeacher.ask` through a Batch API: one batch per call, or the unfinished one of an earlier command.

    `stats["requests"]` counts the lines this command submitted (0 when it picked up a batch);
    `batch_id` is the batch it finished (None: none).
    """

    def __init__(self, teacher: OpenAITeacher, store: ResponseStore, budget: Budget, name: str, folder: Path,
                 cfg: CollectConfig):  # fmt: skip
        super().__init__(teacher, store, budget, name)
        self.teacher: OpenAITeacher = teacher
        self.client = teacher.client
        self.folder, self.cfg = Path(folder), cfg
        self.batch_id: str | None = None
        self._reserved: dict[str, int] = {}

    # ------------------------------------------------------------------ the state file

    def _state(self) -> dict:
        path = self.folder / STATE
        return json.loads(path.read_text()) if path.exists() else {"batches": []}

    def _save(self, state: dict) -> None:
        write_json_atomic(self.folder / STATE, state)

    # ------------------------------------------------------------------ asking

    def ask(self, jobs: Iterable[tuple[Job, Ask]], bodies: Bodies) -> Iterator[tuple[Job, list[dict]]]:
        """(job, its stored records) for every answer of the batch, as its output is read.

        Each Ask has one key and asks for one sample. An unfinished batch of an earlier command is
        finished first, and is this call's batch; otherwise the samples the store lacks are submitted.
        """
        jobs = list(jobs)
        by_key = {ask.keys[0]: (job, ask) for job, ask in jobs}
        state = self._state()
        entry = state["batches"][-1] if state["batches"] and not state["batches"][-1].get("finished") else None
        if entry is not None:
            _say(f"picking up batch {entry.get('batch_id') or '(not yet created)'} of an earlier command "
                 f"({entry['requests']} requests, {STATE})")  # fmt: skip
        else:
            entry = self._submit([(job, ask) for job, ask in jobs if ask.keys[0] not in self.store], state)
            if entry is None:
                return
        if not entry.get("batch_id"):
            self._create(entry, state)
        self.batch_id = entry["batch_id"]
        batch = self._poll(entry["batch_id"])
        if batch is None:  # the server no longer knows it (`bayeskd serve` keeps batches in memory only)
            _say(f"batch {entry['batch_id']} is unknown to the server: its requests count as failed; a rerun submits them again")
            self._lost(entry, state, by_key)
            return
        yield from self._download(batch, entry, state, by_key, bodies)

    def _submit(self, todo: list[tuple[Job, Ask]], state: dict) -> dict | None:
        """Write and upload the input file of what fits in the budget; None when nothing is to be (or can be) asked."""
        if not todo:
            return None
        lines = []
        for _, ask in todo:
            bound = self.teacher.token_bound(ask.request)
            if not self.budget.take(bound, batch=True):
                break
            self._reserved[ask.keys[0]] = bound
            lines.append(batch_line(self.teacher, ask))
        if len(lines) < len(todo):
            _say(f"the budget (collect.budget_tokens / budget_cost) allows {len(lines)} of the {len(todo)} requests "
                 "left; " + (f"submitting {len(lines)}" if lines else "nothing is submitted"))  # fmt: skip
        if not lines:
            return None
        number = len(state["batches"])
        name = f"batch-input-{number:03d}.jsonl"
        write_jsonl_atomic(self.folder / name, lines)
        data = (self.folder / name).read_bytes()  # bytes, not a stream: a retried upload sends the whole file again
        uploaded = self._call("upload the batch input file", lambda: self.client.files.create(file=(name, data), purpose="batch"))
        entry = {"input": name, "input_file_id": uploaded.id, "batch_id": None, "requests": len(lines),
                 "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        state["batches"].append(entry)
        self._save(state)  # before the batch exists: a kill from here on is picked up by the next command
        self.stats["requests"] += len(lines)
        return entry

    def _create(self, entry: dict, state: dict) -> None:
        """Create the batch of the uploaded file, unless one exists already (a command killed right after creating it)."""
        found = self._call("list batches", lambda: [b for b in self.client.batches.list(limit=100)
                                                    if b.input_file_id == entry["input_file_id"]])  # fmt: skip
        if found:
            batch = found[0]
        else:
            batch = self._call("create the batch", lambda: self.client.batches.create(
                input_file_id=entry["input_file_id"], endpoint=ENDPOINT, completion_window=self.cfg.batch_window,
                metadata={"created_by": "bayeskd collect"}))  # fmt: skip
        entry["batch_id"] = batch.id
        self._save(state)
        _say(f"batch {batch.id}: {entry['requests']} requests submitted ({self.folder / STATE})")

    def _poll(self, batch_id: str):
        """The batch once it is done, looked at after growing delays (None: the server does not know it); progress on stderr."""
        delay, seen = self.cfg.batch_poll_s, None
        bar = None
        try:
            while True:
                batch = self._call(f"look at batch {batch_id}", lambda: self.client.batches.retrieve(batch_id), lost_ok=True)
                if batch is None:
                    return None
                counts = batch.request_counts
                if counts is not None and counts.total:
                    if bar is None:
                        bar = tqdm(total=counts.total, desc=f"batch {batch_id}", unit="req", dynamic_ncols=True, leave=False)
                    bar.n = counts.completed + counts.failed
                    bar.set_postfix(status=batch.status, failed=counts.failed, refresh=False)
                    bar.refresh()
                if batch.status != seen:
                    _say(f"batch {batch_id}: {batch.status}")
                    seen = batch.status
                if batch.status in DONE:
                    return batch
                time.sleep(delay)
                delay = min(delay * 1.5, self.cfg.batch_poll_max_s)
        finally:
            if bar is not None:
                bar.close()

    def _download(self, batch, entry: dict, state: dict, by_key: dict, bodies: Bodies) -> Iterator[tuple[Job, list[dict]]]:
        """Store every answer of a finished batch, list every line that has none as a failure, close the entry."""
        answered: set[str] = set()
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            text = self._call(f"download file {file_id}", lambda: self.client.files.content(file_id).text)
            for raw in text.splitlines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                key = line.get("custom_id")
                answered.add(key)
                if key in self.store:  # stored by an earlier command that was killed while reading this file
                    continue
                if key not in by_key:  # asked by a plan this command no longer has (the config changed): only paid for
                    self._paid_unused(key, line, batch.id)
                    continue
                job, ask = by_key[key]
                self.budget.release(self._reserved.pop(key, 0), batch=True)
                result = _answer(self.teacher, line, ask, batch.id)
                if isinstance(result, TeacherError):
                    self._failed(ask, result, batch=batch.id)
                    continue
                yield job, self._keep(ask, bodies(job, ask.request, result), result, batch=batch.id)
        why = _batch_errors(batch) or f"the batch ended {batch.status} without answering it"
        self._fail_unanswered(entry, by_key, answered, why)
        self._close(entry, state, batch)

    def _lost(self, entry: dict, state: dict, by_key: dict) -> None:
        self._fail_unanswered(entry, by_key, set(), "unknown to the server (lost)")
        entry.update(finished=True, status="lost")
        self._save(state)

    def _fail_unanswered(self, entry: dict, by_key: dict, answered: set[str], why: str) -> None:
        """Every line of the batch's input that has no answer (and is still wanted) is a failure, its reservation released."""
        for line in (self.folder / entry["input"]).read_text().splitlines():
            key = json.loads(line)["custom_id"]
            if key not in answered and key not in self.store and key in by_key:
                self.budget.release(self._reserved.pop(key, 0), batch=True)
                self._failed(by_key[key][1], TeacherError(f"batch {entry['batch_id']}: {why}"), batch=entry["batch_id"])

    def _close(self, entry: dict, state: dict, batch) -> None:
        counts = batch.request_counts
        entry.update(finished=True, status=batch.status, output_file_id=batch.output_file_id,
                     error_file_id=batch.error_file_id, **({"counts": counts.model_dump()} if counts else {}))  # fmt: skip
        self._save(state)

    def _paid_unused(self, key: str, line: dict, batch_id: str) -> None:
        usage = ((line.get("response") or {}).get("body") or {}).get("usage") or {}
        call = content_key(key, "call")
        self.budget.ledger.add(self.name, call, int(usage.get("prompt_tokens") or 0),
                               int(usage.get("completion_tokens") or 0), batch=True)  # fmt: skip

    def _call(self, what: str, fn, lost_ok: bool = False):
        """An API call of the batch cycle, retried as the online client retries (`teacher.max_retries`, backoff);
        a failure that stays names the endpoint and what was being done (batch.json keeps the batch for a rerun).
        `lost_ok`: a 404 returns None."""
        cfg = self.teacher.cfg
        where = cfg.base_url or "the OpenAI API"
        for attempt in range(cfg.max_retries + 1):
            try:
                return fn()
            except openai.AuthenticationError:
                raise TeacherUnavailable(f"teacher at {where}: authentication failed (401): check ${cfg.api_key_env}") from None
            except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError, openai.RateLimitError) as e:
                if attempt == cfg.max_retries:
                    raise TeacherUnavailable(f"teacher at {where}: could not {what} after {attempt + 1} attempts ({e}); "
                                             f"rerun to pick the batch up ({self.folder / STATE})") from None  # fmt: skip
                time.sleep(min(cfg.backoff_s * 2**attempt, 60.0))
            except openai.NotFoundError:
                if lost_ok:
                    return None
                raise
            except openai.APIStatusError as e:
                raise TeacherUnavailable(f"teacher at {where}: could not {what}: HTTP {e.status_code}: {e.message}") from None
        raise AssertionError("unreachable")


def _answer(teacher: OpenAITeacher, line: dict, ask: Ask, batch_id: str):
    """An output or error line -> the checked answer, or the TeacherError it amounts to."""
    response = line.get("response") or {}
    status, body = response.get("status_code"), response.get("body")
    if status == 200 and isinstance(body, dict):
        try:
            return teacher.chat_answer(body, ask.request)
        except TeacherError as e:
            e.args = (f"batch {batch_id}: {e.args[0]}",)
            return e
    error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
    message = error.get("message") if isinstance(error, dict) else str(error)
    return TeacherError(f"batch {batch_id}: HTTP {status}: {message or 'no answer'}", status=status)


def _batch_errors(batch) -> str | None:
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) if errors else None
    if not data:
        return None
    return "the batch failed: " + "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in data[:3])


def _say(message: str) -> None:
    tqdm.write(f"collect: {message}", file=sys.stderr)
