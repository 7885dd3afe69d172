"""`bayeskd serve`'s Batch API: `/v1/files` and `/v1/batches`, enough for the official `openai` SDK's whole cycle.

- `POST /v1/files` (multipart: `file`, `purpose`), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`;
- `POST /v1/batches` (`input_file_id`, `endpoint` `/v1/chat/completions`, `completion_window`,
  `metadata`), `GET /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`.

A batch is validated (every line JSON with a unique `custom_id`, `method` POST, the batch's
`url` and a `body`; else the batch `failed` with its `errors`), then its lines are answered in the
background as `/v1/chat/completions` requests are (the same checks, quirks and billing; not shed
with 429: up to `serve.max_batch` lines wait in the batcher at once). Status moves `validating` ->
`in_progress` -> `finalizing` -> `completed` (or `cancelling` -> `cancelled`), with
`request_counts`; answers with status 200 go to the output file, others to the error file, one
line each as OpenAI writes them. `serve.faults` strikes batch lines as it strikes requests (a
status fault or `drop` becomes an error line; `malformed`, `empty`, `truncated` spoil the body).

State is kept in memory (a restarted server knows no batch) and files in a temporary folder.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

ENDPOINTS = ("/v1/chat/completions",)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


class BatchAPI:
    """The files and batches a server holds, and how many batches were created (`created`: tests count them)."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="bayeskd-serve-files-")
        self.folder = Path(self._folder.name)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.created = 0
        self.tasks: set[asyncio.Task] = set()
        self.cancelled: set[str] = set()

    def add_file(self, filename: str, purpose: str, data: bytes) -> dict:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        (self.folder / file_id).write_bytes(data)
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}  # fmt: skip
        self.files[file_id] = meta
        return meta

    def content(self, file_id: str) -> bytes:
        return (self.folder / file_id).read_bytes()


def add_batch_api(app: FastAPI, cfg: Any, answer: Callable[[Any], Awaitable[JSONResponse]], body_model: type[BaseModel]) -> None:
    """Register the routes on `app`; `answer(body)` answers one line's validated `body_model` as the endpoint does."""
    api = app.state.batch_api = BatchAPI()

    @app.post("/v1/files")
    async def upload(request: Request):
        try:
            parts = _multipart(request.headers.get("content-type", ""), await request.body())
        except ValueError as e:
            return _error(400, f"a file upload is multipart/form-data with `file` and `purpose`: {e}")
        if "file" not in parts or "purpose" not in parts:
            return _error(400, "a file upload needs the fields `file` and `purpose`")
        filename, data = parts["file"]
        return JSONResponse(api.add_file(filename or "upload.jsonl", parts["purpose"][1].decode(), data))

    @app.get("/v1/files/{file_id}")
    async def file_meta(file_id: str):
        meta = api.files.get(file_id)
        return JSONResponse(meta) if meta else _error(404, f"no file {file_id!r}", "not_found_error")

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        if file_id not in api.files:
            return _error(404, f"no file {file_id!r}", "not_found_error")
        return Response(api.content(file_id), media_type="application/jsonl")

    @app.post("/v1/batches")
    async def create(request: Request):
        try:
            spec = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        input_file_id, endpoint = spec.get("input_file_id"), spec.get("endpoint")
        if input_file_id not in api.files:
            return _error(400, f"input_file_id: no file {input_file_id!r}")
        if endpoint not in ENDPOINTS:
            return _error(400, f"endpoint: {endpoint!r} is not supported; this server batches {', '.join(ENDPOINTS)}")
        if spec.get("completion_window") != "24h":
            return _error(400, f"completion_window: {spec.get('completion_window')!r}: only '24h' is supported")
        now = int(time.time())
        batch = {"id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": spec.get("metadata")}  # fmt: skip
        api.batches[batch["id"]] = batch
        api.created += 1
        task = asyncio.create_task(_process(api, batch, answer, body_model, cfg, getattr(app.state, "faults", None)))
        api.tasks.add(task)
        task.add_done_callback(api.tasks.discard)
        return JSONResponse(batch)

    @app.get("/v1/batches")
    async def listed(limit: int = 20):
        data = sorted(api.batches.values(), key=lambda b: b["created_at"], reverse=True)
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}  # fmt: skip

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str):
        batch = api.batches.get(batch_id)
        return JSONResponse(batch) if batch else _error(404, f"no batch {batch_id!r}", "not_found_error")

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str):
        batch = api.batches.get(batch_id)
        if batch is None:
            return _error(404, f"no batch {batch_id!r}", "not_found_error")
        if batch["status"] in ("validating", "in_progress"):
            api.cancelled.add(batch_id)
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        return JSONResponse(batch)


async def _process(api: BatchAPI, batch: dict, answer, body_model, cfg, faults) -> None:
    """Validate the input file, answer its lines (at most serve.max_batch at once), write the output and error files."""
    await asyncio.sleep(0.05)  # a client that looks at once sees it validating, as at a real API
    lines, errors = _validate(api.content(batch["input_file_id"]).decode(errors="replace"), batch["endpoint"])
    if errors:
        batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors[:100]})
        return
    counts = batch["request_counts"]
    counts["total"] = len(lines)
    if batch["id"] not in api.cancelled:
        batch.update(status="in_progress", in_progress_at=int(time.time()))
    room = asyncio.Semaphore(cfg.max_batch)
    results: list[dict | None] = [None] * len(lines)

    async def one(i: int, line: dict) -> None:
        async with room:
            if batch["id"] in api.cancelled:
                return
            status, body = await _answer_line(line["body"], answer, body_model, faults)
        results[i] = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": None}  # fmt: skip
        counts["completed" if status == 200 else "failed"] += 1

    await asyncio.gather(*(one(i, line) for i, line in enumerate(lines)))
    cancelled = batch["id"] in api.cancelled
    if not cancelled:
        batch.update(status="finalizing", finalizing_at=int(time.time()))
    done = [r for r in results if r is not None]
    for name, rows in (("output_file_id", [r for r in done if r["response"]["status_code"] == 200]),
                       ("error_file_id", [r for r in done if r["response"]["status_code"] != 200])):  # fmt: skip
        if rows:
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            kind = "output" if name == "output_file_id" else "error"
            batch[name] = api.add_file(f"{batch['id']}_{kind}.jsonl", "batch_output", data)["id"]
    now = int(time.time())
    batch.update(status="cancelled", cancelled_at=now) if cancelled else batch.update(status="completed", completed_at=now)


async def _answer_line(body: Any, answer, body_model, faults) -> tuple[int, Any]:
    """(status, body) of one line, as /v1/chat/completions would answer it; `serve.faults` strike it first."""
    from bayeskd.teachers import faults as F

    fault, variant, number = None, 0, 0
    if faults is not None:
        faults.requests += 1
        number = faults.requests
        fault, variant = faults.choose(number)
        if fault:
            faults.injected[fault] += 1
    status, generated = None, False
    try:
        if fault in F._STATUS or fault == "drop":
            status, kind = F._STATUS.get(fault, (500, "server_error"))
            return status, {"error": {"message": f"injected fault: {fault}", "type": kind, "code": status}}
        if fault == "slow":
            await asyncio.sleep(faults.cfg.slow_s)
        try:
            parsed = body_model.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            status = 400
            return 400, {"error": {"message": f"{where}: {first.get('msg')}", "type": "invalid_request_error", "code": 400}}
        response = await answer(parsed)
        status, raw = response.status_code, bytes(response.body)
        generated = status == 200
        if generated and fault in ("malformed", "empty", "truncated"):
            raw, _ = F.rewrite(fault, variant, raw, chat=True)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")  # a spoiled body stays a string, as a proxy would pass it on
    finally:
        if faults is not None:
            faults.record(number, "batch:/v1/chat/completions", fault, status, generated)


def _validate(text: str, endpoint: str) -> tuple[list[dict], list[dict]]:
    """The input file's lines, or the errors that fail the batch (OpenAI's shape: code, message, line)."""
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append({"code": "invalid_json_line", "message": "this line is not JSON", "param": None, "line": number})
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            why = "custom_id is missing or not a string"
        elif custom_id in seen:
            why = f"custom_id {custom_id!r} is used twice"
        elif line.get("method") != "POST":
            why = f"method {line.get('method')!r}: must be POST"
        elif line.get("url") != endpoint:
            why = f"url {line.get('url')!r}: must be the batch's endpoint {endpoint}"
        elif not isinstance(line.get("body"), dict):
            why = "body is missing or not an object"
        else:
            seen.add(custom_id)
            lines.append(line)
            continue
        errors.append({"code": "invalid_request", "message": why, "param": None, "line": number})
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no lines", "param": None, "line": None})
    return lines, errors


def _multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body -> {field: (filename, bytes)} (the standard library's parser: no extra package)."""
    if not content_type.startswith("multipart/form-data"):
        raise ValueError(f"content type {content_type!r}")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + data)
    if not message.is_multipart():
        raise ValueError("no parts")
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            parts[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return parts
