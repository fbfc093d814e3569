"""What a collection run has to do, read from the store: new samples, unfinished ones, retries.

Every sample key lives in up to three tables (``journal_decompose``, ``journal_answer``,
``samples``), each holding attempts. The key's latest attempt decides where it re-enters the
pipeline: nothing stored -> decompose; the latest attempt only decomposed -> answer; only
answered -> feedback; in ``samples`` -> done, unless it failed in a retryable way
(``RETRYABLE_STATUSES``; ``truncated`` only with ``retry_truncated``) and retries are on: then a new attempt (number + 1) re-runs the failed
stage and the ones after it, keeping the paid results of the stages before (and of partial
feedback, the judgements it got).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from subq.actors.stages import StageSettings
from subq.data_store.schema import RETRYABLE_STATUSES, STAGES, STATUS_PARTIAL, STATUS_TRUNCATED, sample_key
from subq.data_store.store import Store

Row = dict[str, Any]
# columns a stage fills, cleared when a retry re-runs that stage
_STAGE_COLUMNS = ("status", "error", "raw", "tokens_in", "tokens_out", "latency_s", "cost_usd", "calls",
                  "finish_reason", "max_tokens")
_KEPT_BY_PARTIAL = tuple(c for c in _STAGE_COLUMNS if c not in ("status", "error"))  # its judgements, their usage
_DERIVED = {"answer": ("subanswers", "final_answer", "final_value", "correct"), "feedback": ("usefulness",)}


@dataclass
class Plan:
    decompose: list[Row] = field(default_factory=list)  # per problem: the sample indices to decompose
    answer: list[Row] = field(default_factory=list)  # rows that enter at the answer stage
    feedback: list[Row] = field(default_factory=list)  # rows that enter at the feedback stage
    wanted: set[str] = field(default_factory=set)  # every sample key of the requested problems
    retried: int = 0  # failed rows this run makes a new attempt for

    @property
    def todo(self) -> dict[str, int]:
        """Rows each stage will see."""
        n_new = sum(len(w["sample_indices"]) for w in self.decompose)
        return {"decompose": n_new, "answer": n_new + len(self.answer),
                "feedback": n_new + len(self.answer) + len(self.feedback)}


def plan_keys(problems: list[Row], settings: StageSettings, samples_per_problem: int) -> dict[str, list[str]]:
    """problem_id -> the sample keys this collection should produce for it."""
    fp = settings.fingerprint
    return {p["problem_id"]: [sample_key(p["problem_id"], settings.teacher_model, settings.prompt_version, i, fp)
                              for i in range(samples_per_problem)] for p in problems}


def retry_stage(row: Row, retry_failed: bool = True, retry_truncated: bool = False) -> str | None:
    """The first stage of a stored row that failed in a way to retry (None: nothing to retry):
    api_error / partial with ``retry_failed``, truncated with ``retry_truncated``."""
    statuses = (RETRYABLE_STATUSES if retry_failed else ()) + ((STATUS_TRUNCATED,) if retry_truncated else ())
    for stage in STAGES:
        status = row.get(f"{stage}_status")
        if status in statuses:
            return stage
        if status not in ("ok", None):  # a parse error before it: the row's failure is final
            return None
    return None


def reset_from(row: Row, stage: str, attempt: int, run_id: str) -> Row:
    """A new attempt of ``row`` that re-runs ``stage`` and the stages after it.

    Partial feedback keeps the judgements it paid for (and their usage): the retry asks only for
    the missing ones."""
    row = dict(row)
    keep = _KEPT_BY_PARTIAL if stage == "feedback" and row.get("feedback_status") == STATUS_PARTIAL else ()
    for s in STAGES[STAGES.index(stage):]:
        for col in _STAGE_COLUMNS:
            if not (s == "feedback" and col in keep):
                row[f"{s}_{col}"] = None
        for col in _DERIVED.get(s, ()):
            row[col] = None
    row.update(attempt=attempt, run_id=run_id, status="ok", cost_usd=None)
    return row


def plan_work(store: Store, problems: list[Row], settings: StageSettings, samples_per_problem: int,
              retry_failed: bool = True, retry_truncated: bool = False) -> Plan:
    keys = plan_keys(problems, settings, samples_per_problem)
    plan = Plan(wanted={k for ks in keys.values() for k in ks})
    latest = {t: store.attempts(t, fresh=True) for t in ("journal_decompose", "journal_answer", "samples")}
    where: dict[str, tuple[str, int]] = {}  # key -> (table holding its latest attempt, attempt)
    for k in plan.wanted:
        for table in ("samples", "journal_answer", "journal_decompose"):  # the most advanced wins a tie
            a = latest[table].get(k, -1)
            if a >= 0 and a > where.get(k, ("", -1))[1]:
                where[k] = (table, a)
    by_table: dict[str, list[str]] = {}
    for k, (table, _) in where.items():
        by_table.setdefault(table, []).append(k)
    rows = {t: {r["sample_key"]: r for r in store.filter_keys(t, ks).to_pylist()} for t, ks in by_table.items()}
    for p in problems:
        redo: list[tuple[int, str, int]] = []  # (sample index, key, attempt) to decompose
        for i, k in enumerate(keys[p["problem_id"]]):
            if k not in where:
                redo.append((i, k, 0))
                continue
            table, attempt = where[k]
            row = rows[table][k]
            if table == "journal_decompose":
                plan.answer.append(row)
            elif table == "journal_answer":
                plan.feedback.append(row)
            elif (stage := retry_stage(row, retry_failed, retry_truncated)) is not None:
                plan.retried += 1
                if stage == "decompose":
                    redo.append((i, k, attempt + 1))
                else:
                    getattr(plan, stage).append(reset_from(row, stage, attempt + 1, settings.run_id))
        if redo:
            plan.decompose.append({
                "problem_id": p["problem_id"], "question": p["question"], "gold_value": p["answer_value"],
                "sample_indices": [i for i, _, _ in redo], "sample_keys": [k for _, k, _ in redo],
                "attempts": [a for _, _, a in redo]})
    return plan
