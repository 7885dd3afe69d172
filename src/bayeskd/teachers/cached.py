"""The one way bayeskd pays for teacher answers: within a budget, content-cached, every answer kept.

`collect` (whole responses) and `probe` (continuations of response prefixes) both ask through
`CachedTeacher.ask`, as lm-evaluation-harness wraps its model once (`CachingLM`) so that every
caller gets caching for free:

- an answer whose keys are all in the response store is replayed from it: free, but counted
  against this run's budget, so that a rerun spends what the first run spent;
- otherwise the request is sent, after its most expensive outcome (`Teacher.token_bound`) has
  been reserved against the budget; dispatching stops at the first request that no longer fits;
- an answer is appended to the store (one record per key) and its usage to the ledger before
  the caller sees it, so that a crash right after loses nothing that was paid for;
- a request that fails after the client's retries is listed in `failures` (and retried by the
  next run: nothing is stored for it), with what it cost: answers the client rejected, or the
  samples that a server ignoring `n` did return, are paid for. This run's ledger counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from bayeskd.teachers.store import Budget, ResponseStore
from bayeskd.teachers.base import Teacher, TeacherError, TeacherRequest, TeacherResponse, content_key

Job = TypeVar("Job")


@dataclass(frozen=True)
class Ask:
    """One answer to get: the request, the store key of each record it becomes, and what a failure names."""

    request: TeacherRequest
    keys: tuple[str, ...]
    """One per record: one per sample (collect), or one for the whole answer (probe)."""
    about: dict = field(default_factory=dict, hash=False)
    """Copied into the failure entry, e.g. the prompt id."""


Bodies = Callable[[Job, TeacherRequest, TeacherResponse], list[dict]]
"""(job, request, response) -> one record body per key of the job's Ask; `ask` adds key, usage, call, teacher."""


class CachedTeacher:
    """A teacher behind a response store and a budget. `stats` counts requests sent and the client's retries."""

    def __init__(self, teacher: Teacher, store: ResponseStore, budget: Budget, name: str):
        self.teacher, self.store, self.budget, self.name = teacher, store, budget, name
        self.failures: list[dict] = []
        self.stats = {"requests": 0, "retries": 0, "replayed": 0}

    def ask(self, jobs: Iterable[tuple[Job, Ask]], bodies: Bodies) -> Iterator[tuple[Job, list[dict]]]:
        """(job, its stored records) for every job answered, replays first, then as answers arrive.

        Jobs whose Asks have the same keys share one request. Stops early when the budget allows
        no more (`budget.reached` says so).
        """
        todo: dict[tuple[str, ...], tuple[Ask, list[Job]]] = {}
        for job, ask in jobs:
            if ask.keys in todo:
                todo[ask.keys][1].append(job)
            elif all(k in self.store for k in ask.keys):
                records = [self.store.get(k) for k in ask.keys]
                u = records[0]["usage"]  # the records of one call share its usage
                if not self.budget.admit(u["prompt_tokens"] + u["completion_tokens"], batch=bool(records[0].get("batch"))):
                    return
                for record in records:
                    self.budget.ledger.add_record(record)
                self.stats["replayed"] += 1
                yield job, records
            else:
                todo[ask.keys] = (ask, [job])
        asks = list(todo.values())
        cost: dict[int, int] = {}  # reserved when sent: the teacher's bound may change as it learns the server

        def requests() -> Iterator[TeacherRequest]:
            for j, (ask, _) in enumerate(asks):
                cost[j] = self.teacher.token_bound(ask.request)
                if not self.budget.take(cost[j]):
                    return
                self.stats["requests"] += 1
                yield ask.request

        for j, result in self.teacher.stream(requests()):
            self.budget.release(cost[j])
            ask, waiting = asks[j]
            if isinstance(result, TeacherError):
                self._failed(ask, result)
                continue
            self.stats["retries"] += result.retries
            records = self._keep(ask, bodies(waiting[0], ask.request, result), result)
            for job in waiting:
                yield job, records

    def _failed(self, ask: Ask, error: TeacherError, batch: str | None = None) -> None:
        """`batch`: the id of the Batch API batch the request failed in (its cost is discounted)."""
        usage = {"prompt_tokens": error.usage.prompt_tokens, "completion_tokens": error.usage.completion_tokens}
        self.failures.append({**ask.about, "keys": list(ask.keys), "reason": str(error), "status": error.status, "usage": usage,
                              **({"batch": batch} if batch else {})})  # fmt: skip
        if error.usage.total:
            call = content_key(ask.keys[0], "failed", len(self.failures), *((batch,) if batch else ()))
            self.budget.ledger.add(self.name, call, usage["prompt_tokens"], usage["completion_tokens"], batch=bool(batch))

    def _keep(self, ask: Ask, bodies: list[dict], response: TeacherResponse, batch: str | None = None) -> list[dict]:
        """`batch`: the id of the Batch API batch that answered; the records carry it (the ledger prices them by it)."""
        call = content_key(ask.keys[0], "call")
        usage = {"prompt_tokens": response.usage.prompt_tokens, "completion_tokens": response.usage.completion_tokens}
        via = {"batch": batch} if batch else {}
        records = [{"key": key, **body, "usage": usage, "call": call, "teacher": self.name, **via}
                   for key, body in zip(ask.keys, bodies)]  # fmt: skip
        for record in records:
            self.store.append(record)
        self.budget.ledger.add(self.name, call, usage["prompt_tokens"], usage["completion_tokens"], batch=bool(batch))
        return records

    def close(self) -> None:
        self.teacher.close()


def unanswered(failures: list[dict], store: ResponseStore) -> list[dict]:
    """The failed queries that no later round answered, each once (its last failure)."""
    last = {tuple(f["keys"]): f for f in failures}
    return [f for keys, f in last.items() if not all(k in store for k in keys)]
