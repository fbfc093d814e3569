"""Batch API endpoints of the test teacher (``tests.teacher_server``): a test double, never product code.

``POST /v1/files`` (multipart, purpose "batch"), ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches`` (newest first, with metadata), ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``. A job waits ``BatchPlan.delay_s`` (status "validating"), then
answers its lines -- each one by the server's own ``/v1/chat/completions`` route, in process, so
the FaultPlan, billing and counters apply to every line exactly as to a chat call -- and ends
"completed" with an output file (200 lines) and an error file (every other status). Jobs named in
``expire`` / ``cancel`` (by creation order) answer only ``answered_share`` of their lines, then
end "expired" (the rest get ``batch_expired`` error lines, as OpenAI writes them) or "cancelled"
(the rest get nothing). Every line submitted is counted by custom_id and by chat content,
across runs (``stats()["batch_lines"]``, ``["batch_lines_by_content"]``).

Validation, as OpenAI's: a job fails as a whole (status "failed", ``errors`` naming the reason and
line, no line answered, nothing billed) when a line repeats a custom_id, has another ``url`` or a
``method`` other than POST, when it is named in ``fail``, or when the tokens it enqueues (its own
estimate: a quarter token per character of the messages + n * max_tokens) would take the model's
queue of unfinished jobs over ``enqueued_token_limit``. ``upload_error`` answers every file upload
with that status and message.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class BatchPlan:
    delay_s: float = 0.0  # a job answers nothing for this long (status "validating")
    slow_jobs: tuple[int, ...] = ()  # jobs (creation order) that wait slow_s instead
    slow_s: float = 10.0
    expire: tuple[int, ...] = ()  # jobs (0-based creation order, over the server's life) that expire
    cancel: tuple[int, ...] = ()  # jobs the server cancels part way
    answered_share: float = 0.5  # of an expiring / cancelled job's lines, the share answered first
    concurrency: int = 32  # lines answered at once
    fail: tuple[int, ...] = ()  # jobs (creation order) failed as a whole at validation, with fail_message
    fail_message: str = "The batch could not be processed (injected failure)."
    enqueued_token_limit: int | None = None  # per model, over the jobs not yet ended; None: no limit
    upload_error: tuple[int, str] | None = None  # (status, message) answered to every file upload


class BatchStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: Counter[str] = Counter()  # custom_id -> times submitted in a batch
        self.by_content: Counter[str] = Counter()  # chat content key -> times submitted
        self.files = 0
        self.batches: list[dict[str, Any]] = []  # every batch object, in creation order
        self.enqueued: dict[str, tuple[str, int]] = {}  # batch id -> (model, tokens it holds in the queue until it ends)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"batch_lines": dict(self.lines), "batch_lines_by_content": dict(self.by_content),
                    "batch_files": self.files, "batches": [dict(b) for b in self.batches]}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=status)


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body (stdlib parser: no extra dependency)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


def add_batch_routes(app: FastAPI, plan: BatchPlan, stats: BatchStats, content_key: Any) -> None:
    files: dict[str, bytes] = {}
    batches: dict[str, dict[str, Any]] = {}
    cancel_asked: set[str] = set()

    def new_file(data: bytes, purpose: str, filename: str) -> dict[str, Any]:
        fid = f"file-{uuid.uuid4().hex[:24]}"
        files[fid] = data
        with stats.lock:
            stats.files += 1
        return {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}

    @app.post("/v1/files")
    async def upload(request: Request) -> Response:
        if plan.upload_error is not None:
            return _error(*plan.upload_error)
        form = _multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in form or form.get("purpose", (None, b""))[1] != b"batch":
            return _error(400, "expected a multipart body with a file and purpose=batch")
        filename, data = form["file"]
        return JSONResponse(new_file(data, "batch", filename or "input.jsonl"))

    @app.get("/v1/files/{file_id}/content")
    async def content(file_id: str) -> Response:
        if file_id not in files:
            return _error(404, f"No such File object: {file_id}")
        return Response(files[file_id], media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create(request: Request) -> Response:
        body = await request.json()
        fid = body.get("input_file_id")
        if fid not in files or body.get("endpoint") != "/v1/chat/completions" \
                or body.get("completion_window") != "24h":
            return _error(400, "unknown input file, endpoint or completion window")
        try:
            lines = [json.loads(x) for x in files[fid].decode().splitlines() if x.strip()]
        except json.JSONDecodeError:
            return _error(400, "the input file is not JSONL")
        bid = f"batch_{uuid.uuid4().hex[:24]}"
        model = str(((lines[0].get("body") or {}) if lines else {}).get("model"))
        batch = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": fid, "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                 "in_progress_at": None, "expires_at": int(time.time()) + 86400, "finalizing_at": None,
                 "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
                 "cancelled_at": None, "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                 "metadata": body.get("metadata")}
        with stats.lock:
            index = len(stats.batches)
            invalid = validate(lines, index, model)
            if invalid is None:
                stats.enqueued[bid] = (model, sum(_tokens(x.get("body") or {}) for x in lines))
            stats.batches.append(batch)
            for line in lines:
                stats.lines[str(line.get("custom_id"))] += 1
                stats.by_content[content_key(line.get("body") or {})] += 1
        batches[bid] = batch
        auth = request.headers.get("authorization")
        asyncio.get_running_loop().create_task(run(batch, lines, index, auth, invalid))
        return JSONResponse(batch)

    def validate(lines: list[dict[str, Any]], index: int, model: str) -> dict[str, Any] | None:
        """The first reason this job fails as a whole (an OpenAI ``errors.data`` entry), or None."""
        seen: set[str] = set()
        for i, line in enumerate(lines, 1):
            cid = str(line.get("custom_id"))
            if cid in seen:
                return {"code": "duplicate_custom_id", "line": i, "param": "custom_id",
                        "message": f"The custom_id '{cid}' is used more than once in this batch."}
            seen.add(cid)
            if line.get("url") != "/v1/chat/completions":
                return {"code": "invalid_url", "line": i, "param": "url",
                        "message": f"The url '{line.get('url')}' does not match the batch's endpoint."}
            if line.get("method") != "POST":
                return {"code": "invalid_method", "line": i, "param": "method",
                        "message": f"The method '{line.get('method')}' is not supported; use POST."}
        if index in plan.fail:
            return {"code": "failed", "line": None, "param": None, "message": plan.fail_message}
        if plan.enqueued_token_limit is not None:
            mine = sum(_tokens(x.get("body") or {}) for x in lines)
            queued = sum(n for b, (m, n) in stats.enqueued.items() if m == model and batches[b]["status"] not in TERMINAL)
            if queued + mine > plan.enqueued_token_limit:
                return {"code": "token_limit_exceeded", "line": None, "param": None,
                        "message": f"Enqueued token limit reached for {model} in organization org-test. Limit: "
                                   f"{plan.enqueued_token_limit:,} enqueued tokens. Please try submitting your batch "
                                   "again once your queue has cleared."}
        return None

    @app.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None) -> dict[str, Any]:
        newest = sorted(batches.values(), key=lambda b: b["created_at"], reverse=True)
        ids = [b["id"] for b in newest]
        start = ids.index(after) + 1 if after in ids else 0
        page = newest[start:start + limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(newest)}

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str) -> Response:
        if batch_id not in batches:
            return _error(404, f"No such Batch object: {batch_id}")
        return JSONResponse(batches[batch_id])

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str) -> Response:
        batch = batches.get(batch_id)
        if batch is None:
            return _error(404, f"No such Batch object: {batch_id}")
        if batch["status"] not in TERMINAL:
            cancel_asked.add(batch_id)
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        return JSONResponse(batch)

    async def answer(client: httpx.AsyncClient, line: dict[str, Any], auth: str | None) -> dict[str, Any]:
        headers = {"authorization": auth} if auth else {}
        try:
            r = await client.post("/v1/chat/completions", json=line.get("body"), headers=headers)
            status, body = r.status_code, r.json()
        except Exception:  # an injected disconnect: the line failed on the server's side
            status, body = 500, {"error": {"message": "The server dropped the request (injected).",
                                           "type": "server_error", "param": None, "code": None}}
        return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line.get("custom_id"),
                "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": None}

    async def run(batch: dict[str, Any], lines: list[dict[str, Any]], index: int, auth: str | None,
                  invalid: dict[str, Any] | None) -> None:
        await asyncio.sleep(plan.slow_s if index in plan.slow_jobs else plan.delay_s)
        if invalid is not None:  # validation failed: no line runs, nothing is billed
            now = int(time.time())
            batch["request_counts"].update(completed=0, failed=0)
            return batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [invalid]})
        if batch["id"] in cancel_asked:
            return finish(batch, [], "cancelled")
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        cut = index in plan.expire or index in plan.cancel
        todo = lines[: int(len(lines) * plan.answered_share)] if cut else lines
        out: list[dict[str, Any]] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://teacher", timeout=None) as client:
            for start in range(0, len(todo), plan.concurrency):
                if batch["id"] in cancel_asked:
                    break
                out += await asyncio.gather(*(answer(client, x, auth) for x in todo[start:start + plan.concurrency]))
                ok = sum(o["response"]["status_code"] == 200 for o in out)
                batch["request_counts"].update(completed=ok, failed=len(out) - ok)
        if index in plan.expire:
            answered = {o["custom_id"] for o in out}
            out += [{"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": x.get("custom_id"), "response": None,
                     "error": {"code": "batch_expired", "message": "This request could not be executed before the "
                                                                   "completion window expired."}}
                    for x in lines if x.get("custom_id") not in answered]
            return finish(batch, out, "expired")
        finish(batch, out, "cancelled" if index in plan.cancel or batch["id"] in cancel_asked else "completed")

    def finish(batch: dict[str, Any], out: list[dict[str, Any]], status: str) -> None:
        good = [o for o in out if o["response"] and o["response"]["status_code"] == 200]
        bad = [o for o in out if not (o["response"] and o["response"]["status_code"] == 200)]
        if good:
            batch["output_file_id"] = new_file("".join(json.dumps(o) + "\n" for o in good).encode(),
                                               "batch_output", "output.jsonl")["id"]
        if bad:
            batch["error_file_id"] = new_file("".join(json.dumps(o) + "\n" for o in bad).encode(),
                                              "batch_output", "errors.jsonl")["id"]
        now = int(time.time())
        batch["request_counts"].update(completed=len(good), failed=len(bad))
        batch.update(status=status, finalizing_at=now, **{f"{status}_at": now})


def _tokens(body: dict[str, Any]) -> int:
    """The server's own estimate of what a request enqueues (lower than subq's bound)."""
    chars = sum(len(str(m.get("content") or "")) for m in body.get("messages") or [])
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return chars // 4 + 4 * len(body.get("messages") or []) + int(out) * int(body.get("n") or 1)
