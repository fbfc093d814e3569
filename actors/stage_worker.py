"""The Ray Data callable class that runs one collection stage over a batch of rows.

All calls of a batch run concurrently. Every finished call is stored at once, not when its
batch is done: its rows go to the stage's output table and the call to the ``calls`` ledger in
one flush. Flushes never wait for company -- calls that finish while a flush is being written
go together in the next one -- so a kill -9 at any moment loses only the calls still in flight
(and those finishing during the last few milliseconds' write), never a slow batch's finished
calls. A batch Ray retries (its actor died) is answered from the store, not re-paid.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from subq.actors.prices import PriceTable
from subq.actors.stages import StageSettings, answer, decompose, feedback
from subq.actors.student import StudentClient, StudentEndpoint
from subq.actors.teacher import CallResult, TeacherClient, TeacherConfig
from subq.data_store.schema import SAMPLES_SCHEMA, to_table
from subq.data_store.store import Store

STAGE_OUTPUT = {"decompose": "journal_decompose", "answer": "journal_answer", "feedback": "samples"}
STAGE_FNS = {"decompose": decompose, "answer": answer, "feedback": feedback}
Row = dict[str, Any]


def ledger_rows(stage: str, item: Row, rows: list[Row], calls: list[CallResult], settings: StageSettings,
                call_id: str | None = None) -> list[Row]:
    """One ``calls`` row per call that was billed or may have been (refused calls cost nothing).

    ``call_id``: a stable id for the calls (a batch result stored twice is one ledger row); by
    default each call gets a random one."""
    keys = [r["sample_key"] for r in rows] or list(item.get("sample_keys") or [item.get("sample_key")])
    attempt = rows[0]["attempt"] if rows else (item.get("attempts") or [item.get("attempt") or 0])[0]
    now = datetime.now(timezone.utc)
    return [{
        "call_id": f"{call_id}#{i}" if call_id else uuid.uuid4().hex, "run_id": settings.run_id, "stage": stage, "problem_id": item["problem_id"],
        "sample_keys": keys, "attempt": attempt, "teacher_model": settings.teacher_model,
        "http_attempts": c.attempts, "ok": c.ok, "tokens_in": c.tokens_in if c.usage_known else None,
        "tokens_out": c.tokens_out if c.usage_known else None, "cached_tokens": c.cached_tokens,
        "cost_usd": c.cost_usd, "charged_usd": c.charged_usd, "created_at": now,
    } for i, c in enumerate(calls) if c.ok or c.charged_usd > 0]


class StageWorker:
    def __init__(self, stage: str, teacher: TeacherConfig, settings: StageSettings, prices: PriceTable,
                 governor: Any, store_root: str, lease_holder: str | None = None,
                 decomposer: StudentEndpoint | None = None):
        self.stage, self.teacher_cfg, self.settings = stage, teacher, settings
        # a student decomposes (free, outside the teacher's governor); the teacher still answers and judges
        self.student = decomposer if stage == "decompose" and settings.policy is not None else None
        self.prices, self.governor = prices, governor
        self.store = Store(store_root, holder=lease_holder)  # each commit checks the driver's lease
        self.table = STAGE_OUTPUT[stage]
        self._client: TeacherClient | StudentClient | None = None
        self._pending: tuple[list[Row], list[Row]] = ([], [])  # rows, ledger rows not yet written
        self._flush_lock: asyncio.Lock | None = None

    def _stored(self, rows: list[Row]) -> tuple[list[Row], pa.Table | None]:
        """Split a batch into rows still to do and the stored results of the others."""
        done = self.store.attempts(self.table, fresh=True)
        have: list[str] = []
        todo: list[Row] = []
        if self.stage == "decompose":
            for item in rows:
                attempts = item.get("attempts") or [0] * len(item["sample_indices"])
                missing = [(i, k, a) for i, k, a in zip(item["sample_indices"], item["sample_keys"], attempts,
                                                        strict=True) if done.get(k, -1) < a]
                have += [k for k, a in zip(item["sample_keys"], attempts, strict=True) if done.get(k, -1) >= a]
                if missing:
                    todo.append({**item, "sample_indices": [i for i, _, _ in missing],
                                 "sample_keys": [k for _, k, _ in missing], "attempts": [a for _, _, a in missing]})
        else:
            for r in rows:
                (have.append(r["sample_key"]) if done.get(r["sample_key"], -1) >= (r.get("attempt") or 0)
                 else todo.append(r))
        return todo, (self.store.filter_keys(self.table, have) if have else None)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._client is None:  # created inside the actor's event loop
            self._client = (StudentClient(self.student) if self.student is not None
                            else TeacherClient(self.teacher_cfg, self.prices, governor=self.governor))
            self._flush_lock = asyncio.Lock()
        todo, stored = self._stored(batch.to_pylist())
        results = await asyncio.gather(*(self._run(row) for row in todo), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:  # a fatal account error (or a bug): every finished call is stored; stop
            raise errors[0]
        rows = [row for out in results for row in out]
        table = to_table(rows, SAMPLES_SCHEMA)
        return table if stored is None else pa.concat_tables([stored.cast(SAMPLES_SCHEMA), table])

    async def _run(self, item: Row) -> list[Row]:
        rows, calls = await STAGE_FNS[self.stage](self._client, item, self.settings)
        for r in rows:  # the run that wrote this row (earlier stages may have been another run's)
            r["run_id"] = self.settings.run_id
        ledger = [] if self.student is not None else ledger_rows(self.stage, item, rows, calls, self.settings)
        await self._store(rows, ledger)  # the student's calls bill nobody: not in the ledger
        return rows

    async def _store(self, rows: list[Row], ledger: list[Row]) -> None:
        """Durable before it returns: written by this flush, or by the one that was running."""
        self._pending[0].extend(rows)
        self._pending[1].extend(ledger)
        assert self._flush_lock is not None
        async with self._flush_lock:
            if not (self._pending[0] or self._pending[1]):
                return  # the previous flush took ours along
            pending, self._pending = self._pending, ([], [])
            await asyncio.to_thread(self._write, *pending)

    def _write(self, rows: list[Row], ledger: list[Row]) -> None:
        if ledger:  # the money first: a kill between the two never hides a paid call
            self.store.append("calls", ledger, fresh=False)
        if rows:
            self.store.append(self.table, to_table(rows, SAMPLES_SCHEMA), fresh=False)
