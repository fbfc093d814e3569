"""The three collection stages as plain async functions: rows in, rows out, no Ray.

decompose: one call per problem asks for ``n`` decompositions at once (the prompt is paid once,
           not n times); each choice becomes one ``samples`` row. With a student decomposer
           (``StageSettings.policy``, client ``actors.student.StudentClient``) the student writes
           them, for free, and the teacher answers and judges them exactly as its own.
answer:    the teacher answers its own sub-questions, ending with "Final answer: <number>";
           ``correct`` compares that number with the gold answer.
feedback:  one call with ``n = feedback_samples`` judgements; usefulness_i = share of "Yes".
           Fewer judgements than asked (and asking for the rest failed) is ``partial``, not ok;
           its retry keeps the judgements it got and asks only for the missing ones.

Each function returns the rows it produced and the calls it made (for the store's ledger). A
call's tokens, latency and $ are split evenly over the rows it produced. A row whose earlier
stage failed is passed through with this stage ``skipped`` (no call). A call the governor
refused (budget spent, outage past the patience, a fatal account error) yields *no* row, so a
later run does that work. Output cut at the token limit (finish_reason "length") is
``truncated``: for feedback only when the cut judgement lacks a verdict (its cap is tight on
purpose, and verdicts written before the cut are complete).

Truncation is deterministic at a given limit, so asking again with the same ``max_tokens`` would
pay for the same cut. A cut reply is asked again once, at once, with a larger limit
(``StageSettings.truncated_max_tokens``; the limit each stage used is stored in ``<stage>_max_tokens``).
If that reply is cut too (or the ask fails), the row stays ``truncated``: final for a plain re-run,
which does not pay for it again (``subq collect --retry-truncated`` asks again, at the larger limit).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from subq.actors.teacher import CallResult, TeacherClient
from subq.data_store.schema import (
    SAMPLES_SCHEMA,
    STAGES,
    STATUS_API_ERROR,
    STATUS_OK,
    STATUS_PARSE_ERROR,
    STATUS_PARTIAL,
    STATUS_SKIPPED,
    STATUS_TRUNCATED,
    empty_row,
    sample_key,
    settings_fingerprint,
)
from subq.protocol.answers import numbers_match
from subq.protocol.parse import parse_answers, parse_feedback, parse_subquestions, usefulness
from subq.protocol.prompts import PROMPT_VERSION, answer_messages, decompose_messages, feedback_messages

Row = dict[str, Any]
Output = tuple[list[Row], list[CallResult]]  # rows produced, calls made
LENGTH = "length"  # the finish_reason of output cut at the token limit


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
    run_id: str = ""  # the collection run (stored with every attempt it writes)
    # A reply cut at its limit is asked again once with this limit: set it to the model's output limit.
    # None: 4x the limit that cut it; <= that limit: never asked again (the row stays truncated).
    truncated_max_tokens: int | None = None
    # The decomposer, when not the teacher: a student's content fingerprint (``actors.student``). Its rows
    # are tagged with it and the round; both are in their key, so they never collide with the teacher's.
    policy: str | None = None
    round: int | None = None  # the distillation round collecting (subq/rounds.py); None: not a round

    def output_settings(self) -> dict[str, Any]:
        """Everything that changes a sample's content: its fingerprint is part of the key, so
        other settings make other samples. Not in it: samples_per_problem (more samples of the
        same settings extend a collection), prices, run ids, concurrency, and the limit a cut reply
        is asked again with (a row records the limit it used in ``<stage>_max_tokens``)."""
        fields = asdict(self)
        for name in ("price_table_version", "samples_per_problem", "run_id", "truncated_max_tokens"):
            fields.pop(name)
        if self.policy is None:  # the teacher's keys stay what they were before policies existed
            fields.pop("policy")
            fields.pop("round")
        return fields

    def longer(self, used: int) -> int | None:
        """The limit a reply cut at ``used`` tokens is asked again with, or None (no larger one)."""
        limit = 4 * used if self.truncated_max_tokens is None else self.truncated_max_tokens
        return limit if limit > used else None

    @property
    def fingerprint(self) -> str:
        return settings_fingerprint(self.output_settings())


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _account(row: Row, stage: str, call: CallResult, share: int = 1) -> None:
    """Add this row's share of a call's usage (calls are split evenly over their rows).

    Only successful calls are billed here (the ledger also counts failed calls that may have
    been); the stage's $ is null as soon as one billed call has an unknown price or no usage.
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
        if s not in (None, STATUS_OK, STATUS_SKIPPED) and status == STATUS_OK:
            status = s
        if row.get(f"{stage}_calls"):
            c = row.get(f"{stage}_cost_usd")
            cost = None if cost is None or c is None else cost + c
    row["status"] = status
    row["cost_usd"] = cost
    row["updated_at"] = _now()
    return row


async def _chat_n(client: TeacherClient, messages: list[dict], n: int, temperature: float, max_tokens: int):
    """Up to ``n`` choices; endpoints that return fewer get asked again for the rest."""
    calls: list[CallResult] = []
    texts: list[str] = []
    reasons: list[str | None] = []
    while len(texts) < n:
        call = await client.chat(messages, n=n - len(texts), temperature=temperature, max_tokens=max_tokens)
        calls.append(call)
        if not call.ok or not call.texts:
            break
        take = n - len(texts)
        texts.extend(call.texts[:take])
        reasons.extend((call.finish_reasons or [None] * len(call.texts))[:take])
    return texts, reasons, calls


async def _ask_longer(client: TeacherClient, messages: list[dict], cut: list[int], texts: list[str],
                      reasons: list[str | None], limits: list[int], temperature: float,
                      longer: int | None) -> CallResult | None:
    """Ask once more, with the larger limit ``longer``, for the replies at ``cut`` (indices into
    ``texts``): each answer that comes back replaces one of them in place, with its finish reason and
    limit. Returns the call (None: nothing cut, or no larger limit). A failed ask replaces nothing:
    the cut replies stay, paid for already."""
    if not cut or longer is None:
        return None
    call = await client.chat(messages, n=len(cut), temperature=temperature, max_tokens=longer)
    if call.ok:
        got = call.finish_reasons or [None] * len(call.texts)
        for j, text, reason in zip(cut, call.texts, got, strict=False):  # fewer choices: the rest stay cut
            texts[j], reasons[j], limits[j] = text, reason, longer
    return call


async def decompose(client: TeacherClient, item: Row, s: StageSettings) -> Output:
    """``item``: problem_id, question, gold_value, sample_indices (the ones still missing), and
    per index its sample key and attempt (``sample_keys``, ``attempts``)."""
    indices: list[int] = list(item["sample_indices"])
    attempts: list[int] = list(item.get("attempts") or [0] * len(indices))
    # a student is asked with the bare problem (its endpoint applies its own training prompt)
    messages = ([{"role": "user", "content": item["question"]}] if s.policy is not None
                else decompose_messages(item["question"], s.max_subquestions))
    texts, reasons, calls = await _chat_n(client, messages, len(indices), s.decompose_temperature, s.max_tokens)
    last = calls[-1]
    if last.refused:
        indices = indices[: len(texts)]  # the rest stays unpaid and undone
    limits = [s.max_tokens] * len(texts)
    cut = [j for j, r in enumerate(reasons) if r == LENGTH]
    retry = await _ask_longer(client, messages, cut, texts, reasons, limits, s.decompose_temperature,
                              s.longer(s.max_tokens))
    fingerprint, settings = s.fingerprint, json.dumps(s.output_settings(), sort_keys=True)
    rows = []
    for j, idx in enumerate(indices):
        row = empty_row(SAMPLES_SCHEMA)
        row.update(
            sample_key=sample_key(item["problem_id"], s.teacher_model, s.prompt_version, idx, fingerprint),
            problem_id=item["problem_id"],
            teacher_model=s.teacher_model,
            prompt_version=s.prompt_version,
            sample_index=idx,
            attempt=attempts[j],
            fingerprint=fingerprint,
            settings=settings,
            run_id=s.run_id,
            policy=s.policy,
            round=s.round,
            source="collect",
            question=item["question"],
            gold_value=item.get("gold_value"),
            price_table_version=s.price_table_version,
            created_at=_now(),
        )
        if j < len(texts):
            parsed = parse_subquestions(texts[j], s.max_subquestions)
            row["decompose_raw"] = texts[j]
            row["decompose_finish_reason"] = reasons[j]
            row["decompose_max_tokens"] = limits[j]
            row["subquestions"] = parsed.subquestions or None
            if reasons[j] == LENGTH:
                row["decompose_status"] = STATUS_TRUNCATED
                row["decompose_error"] = f"cut at the token limit ({limits[j]})"
            else:
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
    if retry is not None:  # the longer ask is paid by the rows it was made for
        calls.append(retry)
        for j in cut:
            _account(rows[j], "decompose", retry, share=len(cut))
    return [finalize(r) for r in rows], calls


async def answer(client: TeacherClient, row: Row, s: StageSettings) -> Output:
    if row.get("decompose_status") != STATUS_OK:
        row["answer_status"] = STATUS_SKIPPED
        return [finalize(row)], []
    messages = answer_messages(row["question"], list(row["subquestions"]))
    call = await client.chat(messages, temperature=s.answer_temperature, max_tokens=s.max_tokens)
    if call.refused:
        return [], [call]
    _account(row, "answer", call)
    if not call.ok:
        row.update(answer_status=STATUS_API_ERROR, answer_error=call.error)
        return [finalize(row)], [call]
    texts, reasons, limits = call.texts[:1], (call.finish_reasons or [None])[:1], [s.max_tokens]
    retry = await _ask_longer(client, messages, [0] if reasons[0] == LENGTH else [], texts, reasons, limits,
                              s.answer_temperature, s.longer(s.max_tokens))
    calls = [call]
    if retry is not None:
        calls.append(retry)
        _account(row, "answer", retry)
    parsed = parse_answers(texts[0], len(row["subquestions"]))
    reason = reasons[0]
    row.update(
        answer_raw=texts[0],
        answer_finish_reason=reason,
        answer_max_tokens=limits[0],
        subanswers=parsed.subanswers or None,
        final_answer=parsed.final_answer,
        final_value=parsed.final_value,
        answer_status=STATUS_OK if parsed.error is None else STATUS_PARSE_ERROR,
        answer_error=parsed.error,
    )
    if reason == LENGTH:
        row.update(answer_status=STATUS_TRUNCATED, answer_error=f"cut at the token limit ({limits[0]})")
    if parsed.final_value is not None and row.get("gold_value") is not None:
        row["correct"] = numbers_match(parsed.final_value, row["gold_value"])
    return [finalize(row)], calls


async def feedback(client: TeacherClient, row: Row, s: StageSettings) -> Output:
    if row.get("answer_status") != STATUS_OK:
        row["feedback_status"] = STATUS_SKIPPED
        return [finalize(row)], []
    subqs = list(row["subquestions"])
    messages = feedback_messages(row["question"], subqs, list(row["subanswers"] or []))
    # a verdict is ~4 tokens per sub-question: a tight cap keeps a rambling teacher cheap
    max_tokens = min(s.max_tokens, 24 + 8 * len(subqs))
    have = list(row.get("feedback_raw") or [])[: s.feedback_samples]  # paid by a partial attempt: kept
    texts, reasons, calls = await _chat_n(client, messages, s.feedback_samples - len(have), s.feedback_temperature,
                                          max_tokens)
    texts, reasons = have + texts, [row.get("feedback_finish_reason")] * len(have) + reasons
    if calls and calls[-1].refused and not texts:
        return [], calls
    limits = [max_tokens] * len(texts)
    cut = [j for j, (t, r) in enumerate(zip(texts, reasons, strict=True))
           if r == LENGTH and parse_feedback(t, len(subqs)).error]  # cut before its verdicts
    retry = await _ask_longer(client, messages, cut, texts, reasons, limits, s.feedback_temperature,
                              s.longer(max_tokens))
    error = calls[-1].error if calls else None
    calls += [retry] if retry is not None else []
    for call in calls:
        _account(row, "feedback", call)
    if not texts:
        row.update(feedback_status=STATUS_API_ERROR, feedback_error=error)
        return [finalize(row)], calls
    parsed = [parse_feedback(t, len(subqs)) for t in texts]
    row["feedback_max_tokens"] = max(limits)
    row["feedback_raw"] = texts
    row["feedback_finish_reason"] = LENGTH if LENGTH in reasons else reasons[0]
    row["usefulness"] = usefulness(parsed, len(subqs))
    errors = [p.error for p in parsed if p.error]
    if len(texts) < s.feedback_samples:
        status = STATUS_PARTIAL
        errors.insert(0, f"only {len(texts)} of {s.feedback_samples} judgements: {error}")
    elif any(p.error and r == LENGTH for p, r in zip(parsed, reasons, strict=True)):
        status = STATUS_TRUNCATED
        errors.insert(0, f"a judgement was cut at the token limit ({max(limits)})")
    else:
        status = STATUS_OK if all(u is not None for u in row["usefulness"]) else STATUS_PARSE_ERROR
    row["feedback_status"] = status
    row["feedback_error"] = "; ".join(errors) if errors else None
    return [finalize(row)], calls
