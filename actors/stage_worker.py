"""The Ray Data callable class that runs a batch of rows through collection's remaining stages.

One actor pool runs every stage (decompose -> answer -> feedback, or the part a resumed row still
needs): a batch goes through them in order inside one actor, and each actor holds many batches at
once, so a batch is answered while others are still being decomposed. One pool rather than one per
stage starts a third as many actors (each ~2 CPU-seconds of start-up and imports) and needs no
hand-off of rows between pools.

All calls of a batch's stage run concurrently. Every finished call is stored at once, not when its
batch is done: its rows go to the stage's output table and the call to the ``calls`` ledger in
one flush. Flushes never wait for company -- calls that finish while a flush is being written
go together in the next one -- so a kill -9 at any moment loses only the calls still in flight
(and those finishing during the last few milliseconds' write), never a slow batch's finished
calls. A batch Ray retries (its actor died) is answered from the store stage by stage, not re-paid.
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
from subq.data_store.schema import SAMPLES_SCHEMA, STAGES, to_table
from subq.data_store.store import Store

STAGE_OUTPUT = {"decompose": "journal_decompose", "answer": "journal_answer", "feedback": "samples"}
START = "start_stage"  # the input column naming the stage a batch enters at (the rest follow in order)
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


def stages_from(start: str) -> tuple[str, ...]:
    """``start`` and the stages after it."""
    if start not in STAGES:
        raise ValueError(f"a collection stage is one of {STAGES}, got {start!r}")
    return STAGES[STAGES.index(start):]


class StageWorker:
    def __init__(self, teacher: TeacherConfig, settings: StageSettings, prices: PriceTable,
                 governor: Any, store_root: str, lease_holder: str | None = None,
                 decomposer: StudentEndpoint | None = None):
        self.teacher_cfg, self.settings = teacher, settings
        # a student decomposes (free, outside the teacher's governor); the teacher still answers and judges
        self.student = decomposer if settings.policy is not None else None
        self.prices, self.governor = prices, governor
        self.store = Store(store_root, holder=lease_holder)  # each commit checks the driver's lease
        self._teacher: TeacherClient | None = None
        self._student: StudentClient | None = None
        self._pending: tuple[dict[str, list[Row]], list[Row]] = ({}, [])  # rows by table, ledger rows not written
        self._flush_lock: asyncio.Lock | None = None

    def _stored(self, stage: str, rows: list[Row]) -> tuple[list[Row], pa.Table | None]:
        """Split a stage's input rows into those still to do and the stored results of the others."""
        table = STAGE_OUTPUT[stage]
        done = self.store.attempts(table, fresh=True)
        have: list[str] = []
        todo: list[Row] = []
        if stage == "decompose":
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
        return todo, (self.store.filter_keys(table, have) if have else None)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._flush_lock is None:  # clients are created inside the actor's event loop
            self._teacher = TeacherClient(self.teacher_cfg, self.prices, governor=self.governor)
            self._student = StudentClient(self.student) if self.student is not None else None
            self._flush_lock = asyncio.Lock()
        # every row of a batch enters at the same stage (its column); each stage's rows reach the next one as
        # they would be read back from the store: through the schema
        stages = stages_from(batch.column(START)[0].as_py())
        table = batch.drop_columns([START])
        for stage in stages:
            todo, stored = self._stored(stage, table.to_pylist())
            results = await asyncio.gather(*(self._run(stage, row) for row in todo), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:  # a fatal account error (or a bug): every finished call is stored; stop
                raise errors[0]
            table = to_table([row for out in results for row in out], SAMPLES_SCHEMA)
            if stored is not None:
                table = pa.concat_tables([stored.cast(SAMPLES_SCHEMA), table])
        return table

    async def _run(self, stage: str, item: Row) -> list[Row]:
        by_student = stage == "decompose" and self._student is not None
        client = self._student if by_student else self._teacher
        rows, calls = await STAGE_FNS[stage](client, item, self.settings)
        for r in rows:  # the run that wrote this row (earlier stages may have been another run's)
            r["run_id"] = self.settings.run_id
        ledger = [] if by_student else ledger_rows(stage, item, rows, calls, self.settings)
        await self._store(STAGE_OUTPUT[stage], rows, ledger)  # the student's calls bill nobody: not in the ledger
        return rows

    async def _store(self, table: str, rows: list[Row], ledger: list[Row]) -> None:
        """Durable before it returns: written by this flush, or by the one that was running."""
        self._pending[0].setdefault(table, []).extend(rows)
        self._pending[1].extend(ledger)
        assert self._flush_lock is not None
        async with self._flush_lock:
            if not (any(self._pending[0].values()) or self._pending[1]):
                return  # the previous flush took ours along
            pending, self._pending = self._pending, ({}, [])
            await asyncio.to_thread(self._write, *pending)

    def _write(self, rows: dict[str, list[Row]], ledger: list[Row]) -> None:
        if ledger:  # the money first: a kill between the two never hides a paid call
            self.store.append("calls", ledger, fresh=False)
        for table, table_rows in rows.items():
            if table_rows:
                self.store.append(table, to_table(table_rows, SAMPLES_SCHEMA), fresh=False)
