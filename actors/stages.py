"""The three collection stages as plain async functions: rows in, rows out, no Ray.

decompose: one call per problem asks for ``n`` decompositions at once (the prompt is paid once,
           not n times); each choice becomes one ``samples`` row.
answer:    the teacher answers its own sub-questions, ending with "Final answer: <number>";
           ``correct`` compares that number with the gold answer.
feedback:  one call with ``n = feedback_samples`` judgements; usefulness_i = share of "Yes".

A call's tokens, latency and $ are split evenly over the rows it produced. A row whose earlier
stage failed is passed through with this stage ``skipped`` (no call). A call refused because the
$ budget is spent yields *no* row, so a later run does that work.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from actors.teacher import CallResult, TeacherClient
from data_store.schema import (
    SAMPLES_SCHEMA,
    STAGES,
    STATUS_API_ERROR,
    STATUS_OK,
    STATUS_PARSE_ERROR,
    STATUS_SKIPPED,
    empty_row,
    sample_key,
)
from protocol.answers import numbers_match
from protocol.parse import parse_answers, parse_feedback, parse_subquestions, usefulness
from protocol.prompts import PROMPT_VERSION, answer_messages, decompose_messages, feedback_messages

Row = dict[str, Any]


@dataclass
class StageSettings:
    teacher_model: str
    price_table_version: str
    samples_per_problem: int = 3
    feedback_samples: int = 3
    max_subquestions: int | None = None
    decompose_temperature: float = 0.7
    answer_temperature: float = 0.0  # one answer per decomposition: take the teacher's best
    feedback_temperature: float = 0.7  # k judgements need diversity
    max_tokens: int = 256
    prompt_version: str = PROMPT_VERSION


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _account(row: Row, stage: str, call: CallResult, share: int = 1) -> None:
    """Add this row's share of a call's usage (calls are split evenly over their rows).

    Only successful calls are billed; the stage's $ is null as soon as one billed call has an
    unknown price.
    """
    if not row.get(f"{stage}_calls"):
        row[f"{stage}_cost_usd"] = 0.0
    row[f"{stage}_tokens_in"] = (row.get(f"{stage}_tokens_in") or 0) + round(call.tokens_in / share)
    row[f"{stage}_tokens_out"] = (row.get(f"{stage}_tokens_out") or 0) + round(call.tokens_out / share)
    row[f"{stage}_latency_s"] = (row.get(f"{stage}_latency_s") or 0.0) + call.latency_s
    row[f"{stage}_calls"] = (row.get(f"{stage}_calls") or 0) + call.attempts
    if call.ok:
        cur = row[f"{stage}_cost_usd"]
        row[f"{stage}_cost_usd"] = None if cur is None or call.cost_usd is None else cur + call.cost_usd / share


def finalize(row: Row) -> Row:
    """Overall status (the first failing stage's) and total $ (null if any price is unknown)."""
    status = STATUS_OK
    cost: float | None = 0.0
    for stage in STAGES:
        s = row.get(f"{stage}_status")
        if s in (STATUS_PARSE_ERROR, STATUS_API_ERROR) and status == STATUS_OK:
            status = s
        if row.get(f"{stage}_calls"):
            c = row.get(f"{stage}_cost_usd")
            cost = None if cost is None or c is None else cost + c
    row["status"] = status
    row["cost_usd"] = cost
    row["updated_at"] = _now()
    return row


async def _chat_n(client: TeacherClient, messages: list[dict], n: int, temperature: float, max_tokens: int):
    """Up to ``n`` choices; endpoints that ignore ``n`` get asked again for the rest."""
    calls: list[CallResult] = []
    texts: list[str] = []
    while len(texts) < n:
        call = await client.chat(messages, n=n - len(texts), temperature=temperature, max_tokens=max_tokens)
        calls.append(call)
        if not call.ok or not call.texts:
            break
        texts.extend(call.texts[: n - len(texts)])
    return texts, calls


async def decompose(client: TeacherClient, item: Row, s: StageSettings) -> list[Row]:
    """``item``: problem_id, question, gold_value, sample_indices (the ones still missing)."""
    indices: list[int] = list(item["sample_indices"])
    messages = decompose_messages(item["question"], s.max_subquestions)
    texts, calls = await _chat_n(client, messages, len(indices), s.decompose_temperature, s.max_tokens)
    last = calls[-1]
    if last.budget_stopped:
        indices = indices[: len(texts)]  # the rest stays unpaid and undone
    rows = []
    for j, idx in enumerate(indices):
        row = empty_row(SAMPLES_SCHEMA)
        row.update(
            sample_key=sample_key(item["problem_id"], s.teacher_model, s.prompt_version, idx),
            problem_id=item["problem_id"],
            teacher_model=s.teacher_model,
            prompt_version=s.prompt_version,
            sample_index=idx,
            source="collect",
            question=item["question"],
            gold_value=item.get("gold_value"),
            price_table_version=s.price_table_version,
            created_at=_now(),
        )
        if j < len(texts):
            parsed = parse_subquestions(texts[j], s.max_subquestions)
            row["decompose_raw"] = texts[j]
            row["subquestions"] = parsed.subquestions or None
            row["decompose_status"] = STATUS_OK if parsed.error is None else STATUS_PARSE_ERROR
            row["decompose_error"] = parsed.error
        else:
            row["decompose_status"] = STATUS_API_ERROR
            row["decompose_error"] = last.error
        rows.append(row)
    # Usage: successful calls are shared by the rows they produced; a failed final call by the
    # rows it failed for.
    produced = 0
    for call in calls:
        got = len(call.texts) if call.ok else len(rows) - produced
        owners = rows[produced : produced + got] if got else []
        for row in owners:
            _account(row, "decompose", call, share=len(owners))
        produced += len(call.texts) if call.ok else 0
    return [finalize(r) for r in rows]


async def answer(client: TeacherClient, row: Row, s: StageSettings) -> Row | None:
    if row.get("decompose_status") != STATUS_OK:
        row["answer_status"] = STATUS_SKIPPED
        return finalize(row)
    call = await client.chat(
        answer_messages(row["question"], list(row["subquestions"])),
        temperature=s.answer_temperature,
        max_tokens=s.max_tokens,
    )
    if call.budget_stopped:
        return None
    _account(row, "answer", call)
    if not call.ok:
        row.update(answer_status=STATUS_API_ERROR, answer_error=call.error)
        return finalize(row)
    parsed = parse_answers(call.texts[0], len(row["subquestions"]))
    row.update(
        answer_raw=call.texts[0],
        subanswers=parsed.subanswers or None,
        final_answer=parsed.final_answer,
        final_value=parsed.final_value,
        answer_status=STATUS_OK if parsed.error is None else STATUS_PARSE_ERROR,
        answer_error=parsed.error,
    )
    if parsed.final_value is not None and row.get("gold_value") is not None:
        row["correct"] = numbers_match(parsed.final_value, row["gold_value"])
    return finalize(row)


async def feedback(client: TeacherClient, row: Row, s: StageSettings) -> Row | None:
    if row.get("answer_status") != STATUS_OK:
        row["feedback_status"] = STATUS_SKIPPED
        return finalize(row)
    subqs = list(row["subquestions"])
    messages = feedback_messages(row["question"], subqs, list(row["subanswers"] or []))
    # a verdict is ~4 tokens per sub-question: a tight cap keeps a rambling teacher cheap
    max_tokens = min(s.max_tokens, 24 + 8 * len(subqs))
    texts, calls = await _chat_n(client, messages, s.feedback_samples, s.feedback_temperature, max_tokens)
    if calls[-1].budget_stopped and not texts:
        return None
    for call in calls:
        _account(row, "feedback", call)
    if not texts:
        row.update(feedback_status=STATUS_API_ERROR, feedback_error=calls[-1].error)
        return finalize(row)
    parsed = [parse_feedback(t, len(subqs)) for t in texts]
    row["feedback_raw"] = texts
    row["usefulness"] = usefulness(parsed, len(subqs))
    errors = [p.error for p in parsed if p.error]
    if len(texts) < s.feedback_samples:
        errors.append(f"only {len(texts)} of {s.feedback_samples} judgements: {calls[-1].error}")
    complete = all(u is not None for u in row["usefulness"])
    row["feedback_status"] = STATUS_OK if complete else STATUS_PARSE_ERROR
    row["feedback_error"] = "; ".join(errors) if errors else None
    return finalize(row)
