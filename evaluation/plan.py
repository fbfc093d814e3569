"""What an evaluation run still has to do, decided from the record files alone (no endpoint needed).

A :class:`RunKey` is one (decomposer, solver) pair under one set of settings: its labels name the
records folder, its settings fingerprint the file (``evaluation.records``). ``plan_rows`` turns the
stored records into the rows a run must do (missing, or failed at the API and to be retried);
``failures`` says what is left failed after a run.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subq.data_store import uri
from subq.data_store.datasets import load_problems
from subq.evaluation.clients import SolverSpec
from subq.evaluation.fingerprint import (
    decomposer_settings,
    describe_change,
    fingerprint,
    run_settings,
    solver_settings,
)
from subq.evaluation.records import (
    Location,
    attempt_of,
    decomposer_files,
    decomposition_failed,
    failure,
    failure_counts,
    fingerprint_files,
    latest,
    location_name,
    read_history,
    read_records,
    records_dir,
    records_path,
    slug,
)
from subq.evaluation.records import exists as records_exist

if TYPE_CHECKING:
    from subq.evaluation.run import EvalConfig

PROBLEM_FIELDS = ("problem_id", "dataset", "split", "index", "question", "answer_type", "answer_value", "gold",
                  "choices", "answer_text", "reference_subquestions")
DECOMPOSITION_FIELDS = ("subquestions", "decompose_raw", "decompose_error", "decompose_tokens_in",
                        "decompose_tokens_out", "decompose_latency_s", "decompose_cost_usd")


@dataclass(frozen=True)
class RunKey:
    """One (decomposer, solver) pair as stored: labels, and the settings whose fingerprint names its files."""

    decomposer: str  # row label
    solver: str  # column label
    settings: dict[str, Any]  # evaluation.fingerprint.run_settings
    fingerprint: str

    def path(self, out_dir: str, benchmark: str) -> Location:
        return records_path(out_dir, benchmark, self.decomposer, self.solver, self.fingerprint)


def run_keys(cfg: EvalConfig, decomposer: str, identity: dict[str, Any], solvers: list[SolverSpec]) -> list[RunKey]:
    """The keys of one decomposer (label, fingerprint identity) with every solver, under ``cfg``'s settings."""
    dec = decomposer_settings(identity, temperature=cfg.decompose_temperature, max_tokens=cfg.decompose_max_tokens,
                              max_subquestions=cfg.max_subquestions, version=cfg.decomposer_version)
    keys = []
    for sv in solvers:
        settings = run_settings(dec, solver_settings(sv.identity, temperature=cfg.solve_temperature,
                                                     max_tokens=cfg.solve_max_tokens))
        keys.append(RunKey(decomposer, sv.label, settings, fingerprint(settings)))
    return keys


def _problem_row(p: dict) -> dict:
    return {k: p.get(k) for k in PROBLEM_FIELDS}


def _plans_elsewhere(out_dir: str, benchmark: str, keys: list[RunKey]) -> dict[str, dict]:
    """problem_id -> a record with a good plan from any records file of this decomposer whose decomposer
    settings are these (e.g. made for another solver, or with other solver settings)."""
    own = {k.path(out_dir, benchmark) for k in keys}
    wanted = keys[0].settings["decomposer"]
    folder = records_dir(out_dir, benchmark, keys[0].decomposer, "x")
    folder = folder.parent if isinstance(folder, Path) else uri.parent(folder)
    plans: dict[str, dict] = {}
    for path in decomposer_files(folder, keys[0].decomposer):
        history = read_history(path) if path not in own else []
        if history and (history[0].get("settings") or {}).get("decomposer") == wanted:
            for pid, rec in latest(history).items():
                if not decomposition_failed(rec):
                    plans.setdefault(pid, rec)
    return plans


def plan_rows(benchmark: str, problems: list[dict], keys: list[RunKey], out_dir: str,
              retry_failed: bool = True) -> list[dict]:
    """Rows still to do for one decomposer (its keys, one per solver) on one benchmark.

    Resume: a (problem, solver) with a record is skipped, unless the record failed at the API and
    ``retry_failed``: then it is redone as attempt + 1. A stored decomposition that did not fail at the
    API is reused (never paid twice), also from records of other solvers or solver settings as long as
    the decomposer settings are the same; without one the problem is decomposed anew, and every solver
    whose record used the failed plan is redone with the new one. Labels and settings only: what is
    stored is known before any endpoint exists.
    """
    done = [latest(read_history(k.path(out_dir, benchmark))) for k in keys]
    elsewhere: dict[str, dict] | None = None  # read once, when first needed
    rows = []
    for p in problems:
        pid = p["problem_id"]
        have = [d.get(pid) for d in done]
        todo = [i for i, r in enumerate(have) if r is None or (retry_failed and failure(r) is not None)]
        if not todo:
            continue
        usable = [r for r in have if r is not None and (not decomposition_failed(r) or not retry_failed)]
        if not usable:
            elsewhere = _plans_elsewhere(out_dir, benchmark, keys) if elsewhere is None else elsewhere
            usable = [elsewhere[pid]] if pid in elsewhere else []
        stored = {k: usable[0].get(k) for k in DECOMPOSITION_FIELDS} if usable else None
        rows.append({"benchmark": benchmark, "problem": json.dumps(_problem_row(p)), "solvers_todo": json.dumps(todo),
                     "attempts": json.dumps([attempt_of(have[i]) + 1 if have[i] else 1 for i in todo]),
                     "stored_decomposition": json.dumps(stored) if stored else ""})
    return rows


def check_labels(decomposers: list[str], solvers: list[str]) -> None:
    """Labels name record files: two runs must never share one."""
    if not solvers:
        raise ValueError("at least one solver is needed")
    for what, labels in (("decomposer", decomposers), ("solver", solvers)):
        if len(set(map(slug, labels))) != len(labels):
            raise ValueError(f"{what} labels must be distinct (as file names): {labels}")


def _todo(cfg: EvalConfig, keys: list[RunKey]) -> list[dict]:
    return [r for b in cfg.benchmarks for r in plan_rows(b, load_problems(b), keys, cfg.out_dir, cfg.retry_failed)]


def pending(cfg: EvalConfig, keys: list[RunKey]) -> int:
    """(problem, solver) answers still to do for one decomposer's keys: 0 = nothing to serve or call."""
    return sum(len(json.loads(r["solvers_todo"])) for r in _todo(cfg, keys))


def unplanned(cfg: EvalConfig, keys: list[RunKey]) -> int:
    """Answers still to do that have no stored plan to reuse: 0 = the pass needs no call to the decomposer."""
    return sum(1 for r in _todo(cfg, keys) if not r["stored_decomposition"])


def settings_changes(cfg: EvalConfig, keys: list[RunKey]) -> list[str]:
    """One line per (benchmark, key) that has records under *other* settings only: what changed.

    Those records stay where they are (another fingerprint's file) and are neither resumed nor reported.
    """
    lines = []
    for bench in cfg.benchmarks:
        for key in keys:
            path = key.path(cfg.out_dir, bench)
            folder = records_dir(cfg.out_dir, bench, key.decomposer, key.solver)
            legacy = folder.with_suffix(".jsonl") if isinstance(folder, Path) else None  # before fingerprints
            if legacy is not None and not path.exists() and legacy.exists():
                lines.append(f"{key.decomposer} / {key.solver} on {bench}: {legacy} has records without a "
                             "settings fingerprint (an older subq); they are not used: their settings are unknown")
            others = [f for f in fingerprint_files(folder) if f != path]  # oldest first
            if records_exist(path) or not others:
                continue
            old = next(iter(read_history(others[-1])), {}).get("settings") or {}
            lines.append(f"{key.decomposer} / {key.solver} on {bench}: settings changed "
                         f"({describe_change(old, key.settings)}); new records go to {location_name(path)}, the "
                         f"{len(others)} earlier file(s) in {folder} are kept but not used")
    return lines


def failures(cfg: EvalConfig, keys: list[RunKey]) -> Counter[str]:
    """Reason -> number of records that failed at the API and are not final (over every benchmark)."""
    total: Counter[str] = Counter()
    for bench in cfg.benchmarks:
        for key in keys:
            total.update(failure_counts(read_records(key.path(cfg.out_dir, bench))))
    return total


def format_failures(counts: Counter[str], retry_failed: bool) -> str:
    """The run's last word on failures: how many records are not final, why, and what to do."""
    n = sum(counts.values())
    if not n:
        return "every record is final (no API failures left)"
    why = ", ".join(f"{reason} x{k}" for reason, k in counts.most_common())
    then = ("run the same command again to retry them" if retry_failed
            else "kept as they are (--no-retry-failed); run without it to retry them")
    return f"{n} record(s) failed at the API and are not final ({why}); {then}"
