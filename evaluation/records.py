"""Evaluation record files: one JSON line per (problem, decomposer, solver) attempt, append-only.

Layout: ``<out>/records/<benchmark>/<decomposer>__<solver>/<fingerprint>.jsonl``. The fingerprint
(``evaluation.fingerprint``) covers every setting that changes a record's output, so records made
with other settings live in another file and are never mixed with these.

Attempts: a record whose decomposition or solve failed at the API (an outage, a timeout; not a wrong
or unreadable answer) is *failed*. A re-run retries it by appending a new line with ``attempt`` + 1;
readers take the highest attempt per problem (:func:`read_records`), so reports see one record per
problem while every earlier attempt stays in the file (:func:`read_history`), e.g.
``jq -c 'select(.problem_id == "...")' <file>``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def records_dir(out_dir: str, benchmark: str, decomposer: str, solver: str) -> Path:
    """Where every settings fingerprint of one (benchmark, decomposer, solver) has its file."""
    return Path(out_dir) / "records" / slug(benchmark) / f"{slug(decomposer)}__{slug(solver)}"


def records_path(out_dir: str, benchmark: str, decomposer: str, solver: str, fingerprint: str) -> Path:
    return records_dir(out_dir, benchmark, decomposer, solver) / f"{fingerprint}.jsonl"


def read_history(path: Path) -> list[dict]:
    """Every readable line of a records file, in order (all attempts, duplicates included).

    A torn line (a writer killed mid-write) is skipped, so its problem is redone.
    """
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def attempt_of(rec: dict) -> int:
    return int(rec.get("attempt") or 1)


def latest(records: Iterable[dict]) -> dict[str, dict]:
    """problem_id -> its record with the highest attempt; of equal attempts the first written counts
    (a batch Ray retried after its actor had stored it writes the same attempt twice)."""
    out: dict[str, dict] = {}
    for rec in records:
        pid = rec.get("problem_id")
        if pid is not None and (pid not in out or attempt_of(rec) > attempt_of(out[pid])):
            out[pid] = rec
    return out


def read_records(path: Path) -> list[dict]:
    """The current record of every problem in a records file (its latest attempt), in first-seen order."""
    return list(latest(read_history(path)).values())


def append_records(path: Path, lines: list[str]) -> None:
    """Append whole lines durably; several actors may append to one file at once (hence the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            data = "".join(line + "\n" for line in lines).encode()
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a writer killed mid-line: start on a new line, keep this batch readable
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- failures ---------------------------------------------------------------------------------

API_ERROR = "api_error: "  # prefix of a decompose_error that is an API failure (not a parse failure)


def decomposition_failed(rec: dict) -> bool:
    """The decomposer never answered (outage, timeout): the plan must be asked for again."""
    return str(rec.get("decompose_error") or "").startswith(API_ERROR)


def _short(error: str) -> str:
    """"api_error: InternalServerError: Error code: 500 ..." -> "InternalServerError"; "HTTP 503: ..." -> "HTTP 503"."""
    text = error.removeprefix(API_ERROR)
    return text.split(":", 1)[0].strip()[:60] or "error"


def failure(rec: dict) -> str | None:
    """Why a record is failed ("decompose: HTTP 503", "solve: RateLimitError"), None when it is final.

    Failed = an API failure of the decomposer or the solver; a reply that could not be parsed or is
    wrong is a final result, not a failure.
    """
    if decomposition_failed(rec):
        return f"decompose: {_short(rec['decompose_error'])}"
    if rec.get("solve_error"):
        return f"solve: {_short(str(rec['solve_error']))}"
    return None


def failure_counts(records: Iterable[dict]) -> Counter[str]:
    """Reason -> number of failed records."""
    return Counter(r for r in map(failure, records) if r is not None)
