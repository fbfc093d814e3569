"""Evaluation record files: one JSON line per (problem, decomposer, solver) attempt, append-only.

Layout: ``<out>/records/<benchmark>/<decomposer>__<solver>/<fingerprint>.jsonl``. ``out`` may be a URI
(``s3://...``, ``data_store/uri.py``): objects cannot be appended to or locked, so there
``<fingerprint>.jsonl`` is a folder of objects, one per appended batch (``<time_ns>-<random>.jsonl``),
read back in name order and merged as one file would be. The fingerprint
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
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from subq.data_store import uri

Location = Path | str  # a local Path, or a URI string (never wrapped in Path: "s3://" would become "s3:/")


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def records_dir(out_dir: str, benchmark: str, decomposer: str, solver: str) -> Location:
    """Where every settings fingerprint of one (benchmark, decomposer, solver) has its file."""
    if uri.is_uri(out_dir):
        return uri.join(out_dir, "records", slug(benchmark), f"{slug(decomposer)}__{slug(solver)}")
    return Path(out_dir) / "records" / slug(benchmark) / f"{slug(decomposer)}__{slug(solver)}"


def records_path(out_dir: str, benchmark: str, decomposer: str, solver: str, fingerprint: str) -> Location:
    folder = records_dir(out_dir, benchmark, decomposer, solver)
    return uri.join(folder, f"{fingerprint}.jsonl") if isinstance(folder, str) else folder / f"{fingerprint}.jsonl"


def exists(path: Location) -> bool:
    return path.exists() if isinstance(path, Path) else uri.exists(path)


def location_name(path: Location) -> str:
    return path.name if isinstance(path, Path) else uri.name(path)


def _parts(path: str) -> dict[str, tuple[int, float]]:
    return {k: v for k, v in uri.list_files(path).items() if "/" not in k and k.endswith(".jsonl")}


def fingerprint_files(folder: Location) -> list[Location]:
    """The records files (one per settings fingerprint) of one (benchmark, decomposer, solver), oldest first."""
    if isinstance(folder, Path):
        return sorted(folder.glob("*.jsonl"), key=lambda f: f.stat().st_mtime)
    found = []
    for name in uri.listdir(folder):
        if name.endswith(".jsonl"):
            parts = _parts(uri.join(folder, name))
            found.append((max((m for _, m in parts.values()), default=0.0), uri.join(folder, name)))
    return [loc for _, loc in sorted(found)]


def decomposer_files(benchmark_dir: Location, decomposer: str) -> list[Location]:
    """Every records file of one decomposer (any solver, any settings) on one benchmark, in name order."""
    if isinstance(benchmark_dir, Path):
        return sorted(benchmark_dir.glob(f"{slug(decomposer)}__*/*.jsonl"))
    return [uri.join(benchmark_dir, d, f) for d in uri.listdir(benchmark_dir) if d.startswith(f"{slug(decomposer)}__")
            for f in uri.listdir(uri.join(benchmark_dir, d)) if f.endswith(".jsonl")]


def _text(path: Location) -> str:
    if isinstance(path, Path):
        return path.read_text() if path.exists() else ""
    return "".join(uri.read_text(uri.join(path, name)) for name in sorted(_parts(path)))


def read_new(path: str, seen: set[str]) -> list[dict]:
    """At a URI: the records of the batch objects not in ``seen`` (whose names are added to it)."""
    out = []
    for part in sorted(set(_parts(path)) - seen):
        seen.add(part)
        out += _parse(uri.read_text(uri.join(path, part)))
    return out


def _parse(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_history(path: Location) -> list[dict]:
    """Every readable line of a records file, in order (all attempts, duplicates included).

    A torn line (a writer killed mid-write) is skipped, so its problem is redone.
    """
    return _parse(_text(path))


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


def read_records(path: Location) -> list[dict]:
    """The current record of every problem in a records file (its latest attempt), in first-seen order."""
    return list(latest(read_history(path)).values())


def append_records(path: Location, lines: list[str]) -> None:
    """Append whole lines durably; several actors may append to one file at once (hence the lock). At a
    URI the batch is one new object: no lock, no lost update, merged by :func:`read_history`."""
    if isinstance(path, str):
        part = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        uri.write_text(uri.join(path, part), "".join(line + "\n" for line in lines))
        return
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
