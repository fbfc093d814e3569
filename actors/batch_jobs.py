"""Batch API jobs: their bookkeeping in the store, and the files / batches calls.

Order of writes (so that a kill at any moment loses nothing and submits nothing twice):

1. the job's requests (``batch_requests``: custom_id, submission, sample keys, the stage's
   input) and the job itself (``batch_jobs``, status ``preparing``) are stored;
2. the JSONL is uploaded (``files.create``, purpose "batch") and the batch created
   (``batches.create``, ``completion_window`` "24h") with the job's key in its metadata;
3. the batch id is stored. A run killed between 2 and 3 finds the batch by its metadata
   (``batches.list``) instead of creating a second one.

A job stays *live* until its results are stored (``ingested``); no sample key of a live job is
submitted again. A job that ended (completed, expired, cancelled, failed) is ingested by
``actors.batch_collect``: requests it left unanswered are submitted again by the next batch.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import openai
from subq.actors.batch_requests import BatchRequest, decode_item, encode_item
from subq.actors.stages import StageSettings
from subq.actors.teacher import (
    TeacherConfig,
    TeacherFatalError,
    api_key_from_env,
    fatal_message,
    fatal_reason,
)
from subq.data_store.store import Store

Row = dict[str, Any]
PREPARING = "preparing"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchLimits:
    max_requests: int = 50_000  # request lines per batch (the OpenAI limit)
    max_bytes: int = 200_000_000  # bytes of JSONL per batch (the OpenAI limit: 200 MB, decimal)
    # tokens one model may have enqueued over all live batches (the account's "batch queue limit",
    # per model and tier: see the organisation's limits page); None: unknown, not enforced
    max_enqueued_tokens: int | None = None


def split(requests: list[BatchRequest], limits: BatchLimits) -> list[list[BatchRequest]]:
    """Consecutive groups within every limit (one line over a limit on its own is an error)."""
    groups: list[list[BatchRequest]] = []
    size = tokens = 0
    for r in requests:
        n = len(r.line().encode()) + 1
        if n > limits.max_bytes:
            raise ValueError(f"request {r.custom_id} alone is {n} bytes, over the batch limit of {limits.max_bytes}")
        cap = limits.max_enqueued_tokens
        if cap is not None and r.tokens > cap:
            raise ValueError(f"request {r.custom_id} alone may enqueue {r.tokens} tokens, over the limit of {cap}: "
                             "lower max_tokens or raise --max-enqueued-tokens")
        if (not groups or len(groups[-1]) >= limits.max_requests or size + n > limits.max_bytes
                or (cap is not None and tokens + r.tokens > cap)):
            groups.append([])
            size = tokens = 0
        groups[-1].append(r)
        size += n
        tokens += r.tokens
    return groups


def jsonl(requests: list[BatchRequest]) -> bytes:
    return "".join(r.line() + "\n" for r in requests).encode()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def settings_json(s: StageSettings) -> str:
    fields = dict(vars(s))
    fields.pop("run_id")
    return json.dumps(fields, sort_keys=True)


class BatchJobs:
    """The store's batch jobs, and the endpoint that runs them (``teacher=None``: offline)."""

    def __init__(self, store: Store, teacher: TeacherConfig | None):
        self.store, self.teacher = store, teacher
        self.client: openai.OpenAI | None = None
        self.key = ""  # the API key (scrubbed from every stored error)
        if teacher is not None:
            self.key = api_key_from_env(teacher.api_key_env, teacher.base_url)
            self.client = openai.OpenAI(base_url=teacher.base_url, api_key=self.key, timeout=teacher.timeout_s,
                                        max_retries=teacher.max_attempts - 1)

    # ---- reads -----------------------------------------------------------------------------
    def jobs(self) -> list[Row]:
        return sorted(self.store.read_rows("batch_jobs"), key=lambda j: j["created_at"])

    def live(self) -> list[Row]:
        """Jobs whose results are not stored yet."""
        return [j for j in self.jobs() if not j["ingested"]]

    def requests_of(self, job_keys: set[str], columns: list[str] | None = None) -> list[Row]:
        """The current submission of every request of these jobs (``columns``: only these, and job_key)."""
        cols = None if columns is None else list(dict.fromkeys([*columns, "job_key"]))
        return [r for r in self.store.read_rows("batch_requests", cols) if r["job_key"] in job_keys]

    def submissions(self) -> dict[str, int]:
        """custom_id -> its latest submission number."""
        return self.store.attempts("batch_requests", fresh=True)

    # ---- writes ----------------------------------------------------------------------------
    def _save(self, job: Row, **change: Any) -> Row:
        job = {**job, **change, "attempt": (job["attempt"] or 0) + 1, "updated_at": _now()}
        self.store.append("batch_jobs", [job])
        return job

    def register(self, stage: str, requests: list[BatchRequest], settings: StageSettings, run_id: str) -> Row:
        """Store a job and its requests (step 1) before anything is sent."""
        assert self.teacher is not None
        key, now, submitted = f"subq-{uuid.uuid4().hex[:16]}", _now(), self.submissions()
        self.store.append("batch_requests", [{
            "custom_id": r.custom_id, "attempt": submitted.get(r.custom_id, -1) + 1, "job_key": key, "stage": stage,
            "sample_keys": r.sample_keys, "item": encode_item(r.item), "worst_usd": r.worst_usd, "tokens": r.tokens,
            "created_at": now,
        } for r in requests])
        job = {"job_key": key, "attempt": 0, "stage": stage, "base_url": self.teacher.base_url,
               "teacher_model": self.teacher.model, "settings": settings_json(settings), "status": PREPARING,
               "requests": len(requests), "ingested": False, "run_id": run_id, "created_at": now, "updated_at": now}
        self.store.append("batch_jobs", [job])
        return job

    def upload(self, job: Row, requests: list[BatchRequest], adopt: bool = False) -> Row:
        """Steps 2 and 3. ``adopt``: the job was registered by a run that died; a batch found on the
        endpoint by its metadata is adopted, not created again."""
        assert self.client is not None
        found = self._find(job) if adopt else None
        if found is None:
            file = self._api(self.client.files.create, file=(f"{job['job_key']}.jsonl", jsonl(requests)),
                             purpose="batch")
            found = self._api(self.client.batches.create, input_file_id=file.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"subq_job": job["job_key"], "stage": job["stage"]})
        return self._save(job, batch_id=found.id, input_file_id=found.input_file_id, status=found.status)

    def _find(self, job: Row) -> Any:
        assert self.client is not None
        since = job["created_at"].timestamp() - 300  # clock skew allowance
        for batch in self._api(self.client.batches.list, limit=100):  # newest first, auto-paginated
            if (batch.metadata or {}).get("subq_job") == job["job_key"]:
                return batch
            if batch.created_at < since:  # older than the job: it was never created
                return None
        return None

    def poll(self, job: Row) -> tuple[Row, Any]:
        """The job's current state from the endpoint (a new row only when something changed)."""
        assert self.client is not None
        b = self._api(self.client.batches.retrieve, job["batch_id"])
        counts = b.request_counts
        change = {"status": b.status, "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
                  "completed": counts.completed if counts else None, "failed": counts.failed if counts else None,
                  "error": "; ".join(_reason(e) for e in (b.errors.data or [])) if b.errors else None}
        if any(job.get(k) != v for k, v in change.items()):
            job = self._save(job, **change)
        return job, b

    def download(self, file_id: str | None) -> str:
        if not file_id:
            return ""
        assert self.client is not None
        return self._api(self.client.files.content, file_id).text

    def mark_ingested(self, job: Row) -> Row:
        return self._save(job, ingested=True)

    def abandon(self, job: Row, error: str) -> Row:
        """A job the endpoint refused before it ran: done with, so its requests are free again."""
        return self._save(job, status="failed", error=error, ingested=True)

    def _api(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """One API call; an account error stops the run (TeacherFatalError, key never shown)."""
        assert self.teacher is not None
        try:
            return fn(*args, **kw)
        except openai.APIStatusError as e:
            reason = fatal_reason(e)
            if reason is not None:
                raise TeacherFatalError(fatal_message(self.teacher, e, reason, self.key)) from None
            raise


def _reason(e: Any) -> str:
    """One validation error of a failed batch, as the API gave it: code, message, line."""
    where = f" (line {e.line})" if getattr(e, "line", None) else ""
    return ": ".join(x for x in (e.code, e.message) if x) + where or "failed"


def items_of(requests: list[Row]) -> dict[str, tuple[str, Row]]:
    """custom_id -> (stage, the stage's input) of stored requests."""
    return {r["custom_id"]: (r["stage"], decode_item(r["item"])) for r in requests}
