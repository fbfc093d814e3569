"""Re-score solver replies stored in paper 1's released evaluation format, in either scoring mode.

Paper 1 (DT6A/GSM8K-AI-SubQ) stores one JSON object per problem:
``{"problem": str, "questions": str | [str], "answers": str | [str] | null, "answer": float | "#### n"}``.
``eval_responses/*/eval_*.jsonl`` hold one solver reply per problem (``answers`` a string, ``answer`` a
float); ``dataset/qg_*_data_raw.jsonl`` hold a list of replies, one per teacher decomposition
(``questions[i]`` goes with ``answers[i]``), and ``answer`` as ``"#### n"``. Paper 1 scores every
element of such a list as its own attempt (``process_data`` counts ``n_all`` per reply), so we do too:
a list is parallel samples, not the turns of one conversation, and ``n`` counts replies. A reply of
``null`` (upstream stored None for a refused request) is wrong and counted in ``unparsed``.
``answer`` may also be a full GSM8K answer text ending in "#### n" (its value is read after "####").

Files: ``.jsonl`` (one object per line; a line holding a JSON array, as in upstream's ``test_chat.jsonl``,
contributes its elements) or ``.json`` (one array). A malformed line raises :class:`RescoreError` naming
the file and line, never a bare traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subq.evaluation.scoring import MODES, paper1_gold, score, wilson_interval
from subq.protocol.answers import gsm8k_gold, parse_number


class RescoreError(ValueError):
    """A record or file that is not in paper 1's format; the message names the file and line."""


@dataclass
class RescoreResult:
    n: int  # replies scored (a list of replies counts each one)
    correct: int
    accuracy: float
    ci_low: float  # 95% Wilson interval of the accuracy
    ci_high: float
    unparsed: int  # replies from which no prediction could be read (None replies included)
    problems: int = 0  # records (problems) read


def _gold(answer: Any, mode: str, where: str) -> float:
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise RescoreError(f"{where}: 'answer' must be a number or a string, got {type(answer).__name__}")
    if mode == "paper1":
        value = paper1_gold(answer)
    elif isinstance(answer, str):
        value = gsm8k_gold(answer) if "####" in answer else parse_number(answer)
    else:
        value = float(answer)
    if value is None:
        raise RescoreError(f"{where}: no gold number in 'answer' {str(answer)[:80]!r}")
    return value


def _replies(record: Any, where: str) -> list[str | None]:
    if not isinstance(record, dict):
        raise RescoreError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("answers", "answer"):
        if key not in record:
            raise RescoreError(f"{where}: missing key {key!r} (expected 'problem', 'questions', 'answers', 'answer')")
    answers = record["answers"]
    replies = answers if isinstance(answers, list) else [answers]
    if not replies:
        raise RescoreError(f"{where}: 'answers' is an empty list")
    bad = [r for r in replies if r is not None and not isinstance(r, str)]
    if bad:
        raise RescoreError(f"{where}: 'answers' must hold strings (or null), got {type(bad[0]).__name__}")
    return replies


def _rescore(items: Iterable[tuple[str, Any]], mode: str) -> RescoreResult:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n = correct = unparsed = problems = 0
    for where, record in items:
        replies = _replies(record, where)
        problem = {"answer_type": "number", "answer_value": _gold(record["answer"], mode, where)}
        problems += 1
        for reply in replies:
            s = score(reply, problem, mode)
            n += 1
            correct += s.correct
            unparsed += s.prediction is None
    lo, hi = wilson_interval(correct, n)
    return RescoreResult(n, correct, correct / n if n else 0.0, lo, hi, unparsed, problems)


def rescore_records(records: Iterable[dict[str, Any]], mode: str = "strict") -> RescoreResult:
    """Score paper-1-format records (dicts) with ``mode`` ("strict" or "paper1")."""
    return _rescore(((f"record {i}", r) for i, r in enumerate(records, 1)), mode)


def _read(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RescoreError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RescoreError(f"{path}: cannot read: {e}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RescoreError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
        if not isinstance(data, list):
            raise RescoreError(f"{path}: a .json file must hold a list of records, got {type(data).__name__}")
        yield from ((f"{path}: record {i}", r) for i, r in enumerate(data, 1))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise RescoreError(f"{path}:{lineno}: not valid JSON (column {e.colno}): {e.msg}") from None
        if isinstance(data, list):  # upstream's "jsonl" files that hold one JSON array
            yield from ((f"{path}:{lineno}: item {i}", r) for i, r in enumerate(data, 1))
        else:
            yield f"{path}:{lineno}", data


def rescore_file(path: str | Path, mode: str = "strict") -> RescoreResult:
    """Score a paper-1-format ``.jsonl`` or ``.json`` file with ``mode``; raises :class:`RescoreError`."""
    return _rescore(_read(Path(path)), mode)
