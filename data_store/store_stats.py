"""``subq store stats``: what a store holds, what is not ok and why, and what it cost."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from subq.data_store.schema import SCHEMAS, STAGES, STATUS_OK, STATUS_SKIPPED, VERSIONED

_ERROR_CLASS = re.compile(r"^([A-Z][A-Za-z]+(?:Error|Exception|Timeout))\b")


def failure_reason(row: dict[str, Any]) -> str:
    """``"<stage> <what>"`` for the first stage that is neither ok nor skipped, e.g.
    ``"answer RateLimitError"`` or ``"decompose no sub-questions found"``."""
    for stage in STAGES:
        status = row.get(f"{stage}_status")
        if status not in (None, STATUS_OK, STATUS_SKIPPED):
            error = str(row.get(f"{stage}_error") or status)
            m = _ERROR_CLASS.match(error)
            what = m.group(1) if m else error.split(";")[0].split(" (")[0][:60]
            return f"{stage} {what}"
    return str(row.get("status"))


def not_ok_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """status -> reason -> rows, over the rows that are not ok."""
    out: dict[str, Counter] = {}
    for r in rows:
        if r["status"] != STATUS_OK:
            out.setdefault(r["status"], Counter())[failure_reason(r)] += 1
    return {s: dict(c.most_common()) for s, c in sorted(out.items())}


def store_stats(store: Any) -> dict[str, Any]:
    """Counts per table (keys, part files, superseded attempts); samples per teacher by status,
    with the reasons of those not ok; tokens, $ and the ledger's spend; Batch API jobs and their state."""
    out: dict[str, Any] = {"root": store.root_uri, "tables": {}, "part_files": {}, "superseded_attempts": {}}
    for table in SCHEMAS:
        out["tables"][table] = store.count(table)
        out["part_files"][table] = len(store.part_files(table))
        if table in VERSIONED:
            out["superseded_attempts"][table] = store.read_table(table, ["attempt"], history=True).num_rows \
                - out["tables"][table]
    stage_cols = [f"{s}_{c}" for s in STAGES for c in ("status", "error", "tokens_in", "tokens_out")]
    samples = store.read_rows("samples", ["teacher_model", "status", "cost_usd", "correct", "fingerprint",
                                          *stage_cols])
    teachers: dict[str, dict[str, Any]] = {}
    for row in samples:
        t = teachers.setdefault(row["teacher_model"], {
            "samples": 0, "status": {}, "correct": 0, "tokens_in": 0, "tokens_out": 0,
            "cost_usd": 0.0, "cost_unknown": 0, "fingerprints": set()})
        t["samples"] += 1
        t["status"][row["status"]] = t["status"].get(row["status"], 0) + 1
        t["correct"] += bool(row["correct"])
        t["fingerprints"].add(row["fingerprint"])
        for stage in STAGES:
            t["tokens_in"] += row[f"{stage}_tokens_in"] or 0
            t["tokens_out"] += row[f"{stage}_tokens_out"] or 0
        if row["cost_usd"] is None:
            t["cost_unknown"] += 1
        else:
            t["cost_usd"] += row["cost_usd"]
    for model, t in teachers.items():
        t["fingerprints"] = len(t["fingerprints"])
        t["not_ok"] = not_ok_summary([r for r in samples if r["teacher_model"] == model])
    out["teachers"] = teachers
    jobs = store.read_rows("batch_jobs", ["job_key", "batch_id", "stage", "status", "requests", "completed",
                                          "failed", "ingested", "created_at"])
    out["batch_jobs"] = [{**j, "created_at": j["created_at"].isoformat() if j["created_at"] else None}
                         for j in sorted(jobs, key=lambda j: j["created_at"])]
    out["spent_usd"] = store.spent_usd()
    out["calls"] = out["tables"]["calls"]
    return out
