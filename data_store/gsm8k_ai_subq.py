"""Importer and exporter for GSM8K-AI-SubQ, the published format of paper 1 (Tarasov & Shridhar 2024).

Two record layouts (see ``data/gsm8k-ai-subq/README.md``):

- **raw** (``qg_test_data_raw.jsonl``, JSON Lines; ``test_chat.jsonl``, one JSON array):
  ``{problem, questions: ["Q1: ...\\nQ2: ..."], answers: ["A1: ...\\n\\nFinal answer: x"], answer}``
  with ``answer`` either ``"#### x"`` or a float;
- **converted** (``qg_test_dataset.jsonl``, one JSON array): ``{question, answers: [sub-questions],
  rewards: {answer_correctness: 1.0|0.0, usefulness: [...]}, true_answer}``.

Each record becomes one ``samples`` row (``prompt_version="gsm8k-ai-subq"``) and, when new, one
``problems`` row. A record whose question is a GSM8K question of the same split shares that
problem's id, so imported and freshly collected decompositions line up; other questions go to
dataset ``gsm8k-ai-subq``. Malformed records are stored with a ``parse_error`` status, never dropped.

The raw and converted files describe the *same* teacher decompositions (the converted file is
derived from the raw one upstream), so they map to the same sample keys: importing both into one
store keeps whichever was imported first. Import the raw file first: it carries the teacher's texts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
from subq.data_store.datasets import (
    KNOWN_DATASETS,
    format_number,
    load_problems,
    normalize_question,
    question_index,
)
from subq.data_store.schema import (
    SAMPLES_SCHEMA,
    STATUS_OK,
    STATUS_PARSE_ERROR,
    STATUS_SKIPPED,
    empty_row,
    problem_id,
    sample_key,
)
from subq.data_store.store import Store
from subq.protocol.answers import gsm8k_gold, numbers_match, parse_number
from subq.protocol.parse import parse_answers, parse_subquestions

PROMPT_VERSION = "gsm8k-ai-subq"
DATASET = "gsm8k-ai-subq"  # problems that match no GSM8K question
FORMATS = ("raw", "converted")
_RAW_KEYS = {"problem", "questions"}
_CONVERTED_KEYS = {"rewards", "true_answer"}

Row = dict[str, Any]


@dataclass
class ImportReport:
    problems_added: int
    samples_added: int
    samples_skipped_existing: int
    parse_errors: int  # records stored with a parse_error status
    records: int = 0  # records read from the file
    fmt: str = ""  # the format used ("raw" or "converted")
    matched_gsm8k: int = 0  # records whose question is a GSM8K question of the split
    gold_mismatches: int = 0  # matched records whose published gold differs from GSM8K's


# ---- reading --------------------------------------------------------------------------------
def _read_records(path: str) -> list[Any]:
    """One JSON array, one JSON object, or JSON Lines; a bad line becomes a string record."""
    text = _read_text(path)
    stripped = text.strip()
    if not stripped:
        return []
    try:
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return whole
    if isinstance(whole, dict):
        return [whole]
    records: list[Any] = []
    for line in stripped.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append(line)  # kept, and stored as a parse error
    return records


def _read_text(path: str) -> str:
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(p) as f:
            return f.read().decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


def detect_format(records: Iterable[Any]) -> str:
    """The records' format, "raw" or "converted", from the first record with either's keys."""
    for rec in records:
        if isinstance(rec, dict):
            keys = set(rec)
            if keys & _RAW_KEYS:
                return "raw"
            if keys & _CONVERTED_KEYS:
                return "converted"
    raise ValueError(
        "cannot tell the GSM8K-AI-SubQ format: no record has the raw keys (problem, questions) "
        "or the converted keys (rewards, true_answer)"
    )


# ---- record -> sample fields ----------------------------------------------------------------
def _text_of(value: Any) -> str | None:
    """The published texts are one-element lists of strings; accept a bare string too."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return None


def _gold_of(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return gsm8k_gold(value) if "####" in value else parse_number(value)
    return None


def _not_an_object(rec: Any) -> Row:
    """A record that is not a JSON object: stored as a parse error with its text, never dropped."""
    return {
        "question": None,
        "decompose_raw": str(rec),
        "decompose_status": STATUS_PARSE_ERROR,
        "decompose_error": "record is not a JSON object",
        "answer_status": STATUS_SKIPPED,
    }


def _raw_fields(rec: Any) -> Row:
    if not isinstance(rec, dict):
        return _not_an_object(rec)
    out: Row = {
        "question": rec.get("problem") if isinstance(rec.get("problem"), str) else None,
        "gold_value": _gold_of(rec.get("answer")),
    }
    questions, answers = _text_of(rec.get("questions")), _text_of(rec.get("answers"))
    out["decompose_raw"], out["answer_raw"] = questions, answers
    if questions is None:
        out.update(
            decompose_status=STATUS_PARSE_ERROR, decompose_error="'questions' is not a list of strings"
        )
        subqs: list[str] = []
    else:
        parsed = parse_subquestions(questions)
        subqs = list(parsed.subquestions)
        out.update(
            subquestions=subqs or None,
            decompose_error=parsed.error,
            decompose_status=STATUS_OK if parsed.error is None else STATUS_PARSE_ERROR,
        )
    if out["question"] is None:
        out.update(decompose_status=STATUS_PARSE_ERROR, decompose_error="'problem' is not a string")
    if answers is None:
        out.update(answer_status=STATUS_PARSE_ERROR, answer_error="'answers' is not a list of strings")
    else:
        # The teacher's answers exist even when its sub-questions did not parse: keep them.
        pa_ = parse_answers(answers, len(subqs))
        out.update(
            subanswers=list(pa_.subanswers) or None,
            final_answer=pa_.final_answer,
            final_value=pa_.final_value,
            answer_error=pa_.error,
            answer_status=STATUS_OK if pa_.error is None else STATUS_PARSE_ERROR,
        )
    return out  # ``correct`` is judged by the caller, once it knows the authoritative gold


def _converted_fields(rec: Any) -> Row:
    if not isinstance(rec, dict):
        return _not_an_object(rec)
    out: Row = {
        "question": rec.get("question") if isinstance(rec.get("question"), str) else None,
        "gold_value": _gold_of(rec.get("true_answer")),
    }
    subqs = rec.get("answers")
    if isinstance(subqs, list) and subqs and all(isinstance(q, str) for q in subqs):
        out.update(subquestions=list(subqs), decompose_status=STATUS_OK)  # stored as published
    else:
        out.update(
            decompose_status=STATUS_PARSE_ERROR,
            decompose_error="'answers' (the sub-questions) is not a non-empty list of strings",
        )
    if out["question"] is None:
        out.update(decompose_status=STATUS_PARSE_ERROR, decompose_error="'question' is not a string")
    rewards = rec.get("rewards") if isinstance(rec.get("rewards"), dict) else {}
    ac = rewards.get("answer_correctness")
    if isinstance(ac, (int, float)) and not isinstance(ac, bool):
        # Only the verdict was published, not the answer text: the stage is "ok" with no raw text.
        out.update(correct=float(ac) == 1.0, answer_status=STATUS_OK)
    else:
        out.update(answer_status=STATUS_PARSE_ERROR, answer_error="'rewards.answer_correctness' is missing")
    use = rewards.get("usefulness")
    if isinstance(use, list) and use and all(isinstance(u, (int, float)) for u in use):
        out.update(usefulness=[float(u) for u in use], feedback_status=STATUS_OK)
    elif use:
        out.update(
            feedback_status=STATUS_PARSE_ERROR, feedback_error="'rewards.usefulness' is not a list of numbers"
        )
    return out


# ---- import ---------------------------------------------------------------------------------
def import_gsm8k_ai_subq(
    path: str,
    store: Store,
    *,
    fmt: str = "auto",
    teacher_model: str = "gpt-3.5-turbo",
    split: str = "test",
) -> ImportReport:
    """Import a GSM8K-AI-SubQ file into ``store``; re-importing the same file adds nothing."""
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"unknown format {fmt!r}; formats: auto, {', '.join(FORMATS)}")
    records = _read_records(path)
    if fmt == "auto":
        fmt = detect_format(records)
    to_fields = _raw_fields if fmt == "raw" else _converted_fields
    gsm8k_split = split in KNOWN_DATASETS["gsm8k"].splits
    index_of = question_index("gsm8k", split) if gsm8k_split else {}
    gsm8k_rows = {r["index"]: r for r in load_problems(f"gsm8k:{split}")} if gsm8k_split else {}

    now = datetime.now(timezone.utc)
    problems: dict[str, Row] = {}
    per_problem: dict[str, int] = {}
    samples: list[Row] = []
    matched = gold_mismatches = 0
    for rec in records:
        fields = to_fields(rec)
        question = fields.pop("question") or ""
        norm = normalize_question(question)
        if norm in index_of:
            matched += 1
            prob = gsm8k_rows[index_of[norm]]
        else:
            prob = _unmatched_problem(question, split, fields.get("gold_value"), rec)
        pid = prob["problem_id"]
        problems.setdefault(pid, prob)
        published, dataset_gold = fields.get("gold_value"), prob.get("answer_value")
        if published is not None and dataset_gold is not None and not numbers_match(published, dataset_gold):
            gold_mismatches += 1
        if fmt == "raw":
            # We judge correctness ourselves, so against the dataset's gold when the record matched
            # a GSM8K problem: test_chat.jsonl's float golds lose commas and minus signs upstream.
            fields["gold_value"] = dataset_gold if dataset_gold is not None else published
            if fields.get("final_value") is not None and fields["gold_value"] is not None:
                fields["correct"] = numbers_match(fields["final_value"], fields["gold_value"])
        elif published is None:
            fields["gold_value"] = dataset_gold
        sample_index = per_problem.get(pid, 0)
        per_problem[pid] = sample_index + 1
        row = empty_row(SAMPLES_SCHEMA)
        row.update(fields)
        row.update(
            sample_key=sample_key(pid, teacher_model, PROMPT_VERSION, sample_index),
            problem_id=pid,
            teacher_model=teacher_model,
            prompt_version=PROMPT_VERSION,
            sample_index=sample_index,
            source=f"import:{DATASET}-{fmt}",
            question=question,
            created_at=now,
            updated_at=now,
        )
        if row["feedback_status"] is None:
            row["feedback_status"] = STATUS_SKIPPED  # no feedback published for this record
        row["status"] = _overall_status(row)
        samples.append(row)

    prob_result = store.append("problems", list(problems.values()))
    sample_result = store.append("samples", samples)
    return ImportReport(
        problems_added=prob_result.written,
        samples_added=sample_result.written,
        samples_skipped_existing=sample_result.skipped_existing,
        parse_errors=sum(r["status"] == STATUS_PARSE_ERROR for r in samples),
        records=len(records),
        fmt=fmt,
        matched_gsm8k=matched,
        gold_mismatches=gold_mismatches,
    )


def _unmatched_problem(question: str, split: str, gold: float | None, rec: Any) -> Row:
    """A problem outside GSM8K: it has no position, so its index is a 48-bit hash of its text
    (the same question gets the same id whichever file, or part of a file, brings it)."""
    index = int(hashlib.sha1(normalize_question(question).encode()).hexdigest()[:12], 16)
    answer = rec.get("answer") if isinstance(rec, dict) else None
    return {
        "problem_id": problem_id(DATASET, split, index),
        "dataset": DATASET,
        "split": split,
        "index": index,
        "question": question,
        "answer_text": answer if isinstance(answer, str) else None,
        "answer_value": gold,
        "answer_type": "number",
        "gold": None if gold is None else format_number(gold),
    }


def _overall_status(row: Row) -> str:
    """The first failing stage's status, as in collection (``skipped`` is not a failure)."""
    for stage in ("decompose", "answer", "feedback"):
        status = row.get(f"{stage}_status")
        if status not in (None, STATUS_OK, STATUS_SKIPPED):
            return status
    return STATUS_OK


# ---- export ---------------------------------------------------------------------------------
def export_gsm8k_ai_subq(
    store: Store,
    path: str,
    *,
    teacher_model: str | None = None,
    only_ok: bool = True,
) -> int:
    """Write the store's samples in the converted format (one JSON array); returns rows written.

    Rows are ordered by problem (dataset, split, index) then sample index. ``only_ok`` keeps
    samples whose status is ok and whose correctness is known; otherwise an unknown correctness
    is written as 0.0. Samples without sub-questions are never written.
    """
    order = {
        r["problem_id"]: (r["dataset"], r["split"], r["index"])
        for r in store.read_rows("problems", ["problem_id", "dataset", "split", "index"])
    }
    columns = [
        "problem_id",
        "teacher_model",
        "sample_index",
        "question",
        "gold_value",
        "subquestions",
        "correct",
        "usefulness",
        "status",
    ]
    rows = [
        r
        for r in store.read_rows("samples", columns)
        if (teacher_model is None or r["teacher_model"] == teacher_model)
        and r["subquestions"]
        and (not only_ok or (r["status"] == STATUS_OK and r["correct"] is not None))
    ]
    # Problems missing from the problems table sort last, by id (still deterministic).
    rows.sort(
        key=lambda r: (
            r["problem_id"] not in order,
            order.get(r["problem_id"], ("", "", 0)),
            r["problem_id"],
            r["sample_index"],
            r["teacher_model"],
        )
    )
    out = [
        {
            "question": r["question"],
            "answers": list(r["subquestions"]),
            "rewards": {
                "answer_correctness": 1.0 if r["correct"] else 0.0,
                "usefulness": list(r["usefulness"] or []),
            },
            "true_answer": r["gold_value"],
        }
        for r in rows
    ]
    text = json.dumps(out)  # default separators and ASCII escapes, like the published file
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_output_stream(p) as f:
            f.write(text.encode("utf-8"))
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return len(out)
