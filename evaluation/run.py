"""Decompose -> solve over benchmarks on a Ray Data actor pool, then score and report.

One pass per decomposer: every problem is decomposed once and the same sub-questions go to every
solver, so decomposers are compared on identical plans and a decomposition is never paid twice.
The worker that answered a batch appends it to ``<out>/records/<benchmark>/<decomposer>__<solver>.jsonl``
(one JSON object per problem and solver, fsynced per batch) before handing it back, so paid answers
survive a killed driver; a re-run skips what is there and reuses stored sub-questions when only some
solvers are missing. Summaries and the report are
always rebuilt from the record files, so ``--scorer`` can change without calling anything.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from actors.collect import batched_dataset
from actors.prices import PriceTable
from actors.teacher import TeacherClient, TeacherConfig
from data_store.datasets import load_problems, parse_problem_spec
from evaluation.clients import DecomposerClient, DecomposerSpec, SolverSpec, solve
from evaluation.report import RunSummary, summarize, write_report
from evaluation.scoring import score
from protocol.prompts import PROMPT_VERSION
from protocol.solve_prompts import SOLVE_PROMPT_VERSION

PROBLEM_FIELDS = ("problem_id", "dataset", "split", "index", "question", "answer_type", "answer_value", "gold",
                  "choices", "answer_text", "reference_subquestions")


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k:test[:50]"])  # dataset specs
    out_dir: str = "runs/eval"  # records/, results.json, results.md, accuracy_vs_cost.png
    scorer: str = "strict"  # strict (ours) | paper1 (paper 1's exact protocol, numbers only)
    max_subquestions: int | None = None  # passed to every decomposer (paper 2 uses 3)
    decompose_temperature: float = 0.0  # one static plan per problem: take the decomposer's best
    decompose_max_tokens: int = 256  # teacher decomposers
    solve_temperature: float = 0.0
    solve_max_tokens: int = 512
    timeout_s: float = 120.0  # per attempt, decomposer and solver
    max_attempts: int = 6
    batch_size: int = 8  # problems per Ray Data batch = per durable append
    min_actors: int = 1
    max_actors: int = 4
    actor_num_cpus: float = 0.25  # fractional: an actor pool taking every CPU deadlocks Ray Data
    actor_resources: dict[str, float] = field(default_factory=dict)  # e.g. {"collect_node": 0.01}
    progress: bool = True

    def __post_init__(self) -> None:
        if self.scorer not in ("strict", "paper1"):
            raise ValueError(f"scorer must be 'strict' or 'paper1', got {self.scorer!r}")
        for spec in self.benchmarks:
            parse_problem_spec(spec)  # a bad spec fails before any work


@dataclass
class EvalSettings:
    max_subquestions: int | None
    decompose_temperature: float
    decompose_max_tokens: int
    solve_temperature: float
    solve_max_tokens: int
    timeout_s: float
    max_attempts: int


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def records_path(out_dir: str, benchmark: str, decomposer: str, solver: str) -> Path:
    return Path(out_dir) / "records" / slug(benchmark) / f"{slug(decomposer)}__{slug(solver)}.jsonl"


def read_records(path: Path) -> list[dict]:
    """Records of one run, one per problem (the first).

    A torn line (a writer killed mid-write) is ignored, so that problem is redone; a repeated
    problem (a batch Ray retried after its actor had written it) counts once.
    """
    if not path.exists():
        return []
    out, seen = [], set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("problem_id") not in seen:
            seen.add(rec.get("problem_id"))
            out.append(rec)
    return out


class EvalWorker:
    """Ray Data callable class: decompose a batch of problems, solve each with every solver, store it.

    The worker appends its records itself (as collection's stage workers do), so answers already paid
    for are kept whatever happens to the driver; a batch Ray retries skips what its first try stored.
    Returns one row per record: ``correct``, for the driver's progress bar.
    """

    def __init__(self, decomposer: DecomposerSpec, solvers: list[SolverSpec], settings: EvalSettings,
                 prices: PriceTable, out_dir: str, scorer: str) -> None:
        self.decomposer, self.solvers, self.settings, self.prices = decomposer, solvers, settings, prices
        self.out_dir, self.scorer = out_dir, scorer
        self._seen: dict[Path, tuple[int, set[str]]] = {}  # records file -> (bytes read, problem ids)
        self._dec: DecomposerClient | None = None
        self._solvers: list[TeacherClient] = []

    def _clients(self) -> None:
        s = self.settings
        self._dec = DecomposerClient(self.decomposer, self.prices, max_subquestions=s.max_subquestions,
                                     temperature=s.decompose_temperature, max_tokens=s.decompose_max_tokens,
                                     timeout_s=s.timeout_s)
        self._solvers = [TeacherClient(TeacherConfig(base_url=sv.base_url, model=sv.model, api_key_env=sv.api_key_env,
                                                     timeout_s=s.timeout_s, max_attempts=s.max_attempts), self.prices)
                         for sv in self.solvers]

    async def _one(self, row: dict) -> list[dict]:
        problem = json.loads(row["problem"])
        stored = json.loads(row["stored_decomposition"]) if row["stored_decomposition"] else None
        if stored is not None:  # some solvers already ran: reuse the plan, pay for it once
            dec = stored
        else:
            d = await self._dec.decompose(problem["question"])
            dec = {"subquestions": d.subquestions if self.decomposer.kind != "none" else None,
                   "decompose_raw": d.raw, "decompose_error": d.error, "decompose_tokens_in": d.tokens_in,
                   "decompose_tokens_out": d.tokens_out, "decompose_latency_s": d.latency_s,
                   "decompose_cost_usd": d.cost_usd}
        todo = json.loads(row["solvers_todo"])
        calls = await asyncio.gather(*(
            solve(self._solvers[i], problem, dec["subquestions"] or [], temperature=self.settings.solve_temperature,
                  max_tokens=self.settings.solve_max_tokens) for i in todo))
        out = []
        for i, call in zip(todo, calls, strict=True):
            out.append({
                "solver_index": i, "benchmark": row["benchmark"], "problem": problem, **dec,
                "solver_text": call.texts[0] if call.ok else "", "solve_error": None if call.ok else call.error,
                "solve_tokens_in": call.tokens_in, "solve_tokens_out": call.tokens_out,
                "solve_latency_s": call.latency_s, "solve_cost_usd": call.cost_usd if call.ok else 0.0,
            })
        return out

    def _path(self, benchmark: str, solver_index: int) -> Path:
        return records_path(self.out_dir, benchmark, self.decomposer.label, self.solvers[solver_index].label)

    def _stored_ids(self, path: Path) -> set[str]:
        """Problem ids recorded in ``path``, reading only what was appended since the last look
        (the file grows by one batch at a time; re-reading it whole per batch would be quadratic)."""
        offset, ids = self._seen.get(path, (0, set()))
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            whole = data.rfind(b"\n") + 1  # a line still being written is read next time
            for line in data[:whole].splitlines():
                try:
                    ids.add(json.loads(line)["problem_id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn line: that problem is redone
            offset += whole
        self._seen[path] = (offset, ids)
        return ids

    def _not_stored(self, rows: list[dict]) -> list[dict]:
        """Drop (problem, solver) pairs already recorded: a retried batch must not pay twice."""
        todo = []
        for row in rows:
            pid = json.loads(row["problem"])["problem_id"]
            left = [i for i in json.loads(row["solvers_todo"])
                    if pid not in self._stored_ids(self._path(row["benchmark"], i))]
            if left:
                todo.append({**row, "solvers_todo": json.dumps(left)})
        return todo

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._dec is None:  # clients belong to the actor's event loop
            self._clients()
        results = await asyncio.gather(*(self._one(r) for r in self._not_stored(batch.to_pylist())))
        by_file: dict[Path, list[str]] = {}
        correct = []
        for rec in (rec for recs in results for rec in recs):
            bench, i = rec.pop("benchmark"), rec["solver_index"]
            path = self._path(bench, i)
            done = finish_record(rec, bench, self.decomposer.label, self.solvers[i].label, self.scorer)
            correct.append(done["correct"])
            by_file.setdefault(path, []).append(json.dumps(done))
        for path, lines in by_file.items():
            append_records(path, lines)
        return pa.table({"correct": pa.array(correct, pa.bool_())})


def finish_record(rec: dict, benchmark: str, decomposer: str, solver: str, scorer: str) -> dict:
    """Flatten a worker's record into the contract of ``evaluation.report.summarize`` and score it."""
    problem = rec.pop("problem")
    rec.pop("solver_index", None)
    s = score(rec["solver_text"], problem, scorer)
    return {
        "benchmark": benchmark, "decomposer": decomposer, "solver": solver,
        "problem_id": problem["problem_id"], "answer_type": problem["answer_type"], "question": problem["question"],
        "gold": problem.get("gold"), "reference_subquestions": problem.get("reference_subquestions"),
        "solve_prompt_version": SOLVE_PROMPT_VERSION, "decompose_prompt_version": PROMPT_VERSION,
        **rec, "prediction": s.prediction, "correct": bool(s.correct), "f1": s.f1, "score_error": s.error,
        "problem": problem,
    }


def _problem_row(p: dict) -> dict:
    return {k: p.get(k) for k in PROBLEM_FIELDS}


def plan_rows(benchmark: str, problems: list[dict], decomposer: str, solvers: list[str], out_dir: str) -> list[dict]:
    """Rows still to do for one decomposer on one benchmark (resume: skip stored (problem, solver)).

    Labels only: what is stored is known before any endpoint exists."""
    done = [{r["problem_id"]: r for r in read_records(records_path(out_dir, benchmark, decomposer, solver))}
            for solver in solvers]
    rows = []
    for p in problems:
        todo = [i for i, d in enumerate(done) if p["problem_id"] not in d]
        if not todo:
            continue
        have = next((d[p["problem_id"]] for d in done if p["problem_id"] in d), None)
        stored = None
        if have is not None:
            stored = {k: have.get(k) for k in ("subquestions", "decompose_raw", "decompose_error",
                                               "decompose_tokens_in", "decompose_tokens_out",
                                               "decompose_latency_s", "decompose_cost_usd")}
        rows.append({"benchmark": benchmark, "problem": json.dumps(_problem_row(p)),
                     "solvers_todo": json.dumps(todo), "stored_decomposition": json.dumps(stored) if stored else ""})
    return rows


def check_labels(decomposers: list[str], solvers: list[str]) -> None:
    """Labels name record files: two runs must never share one."""
    if not solvers:
        raise ValueError("at least one solver is needed")
    for what, labels in (("decomposer", decomposers), ("solver", solvers)):
        if len(set(map(slug, labels))) != len(labels):
            raise ValueError(f"{what} labels must be distinct (as file names): {labels}")


def pending(cfg: EvalConfig, decomposer: str, solvers: list[str]) -> int:
    """(problem, solver) answers still missing for this decomposer (labels): 0 = nothing to serve or call."""
    return sum(len(json.loads(r["solvers_todo"])) for b in cfg.benchmarks
               for r in plan_rows(b, load_problems(b), decomposer, solvers, cfg.out_dir))


def run_eval(cfg: EvalConfig, decomposers: list[DecomposerSpec], solvers: list[SolverSpec],
             prices: PriceTable | None = None) -> list[RunSummary]:
    """Evaluate every decomposer x solver on every benchmark; write records and the report.

    Ray must be initialised and every endpoint reachable. Returns one summary per combination.
    """
    check_labels([d.label for d in decomposers], [s.label for s in solvers])
    for dec in decomposers:
        evaluate(cfg, dec, solvers, prices)
    return report(cfg, [d.label for d in decomposers], [s.label for s in solvers])


def evaluate(cfg: EvalConfig, dec: DecomposerSpec, solvers: list[SolverSpec], prices: PriceTable | None = None) -> int:
    """One decomposer's pass over every benchmark and solver; returns the answers it added."""
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    prices = prices or PriceTable()
    settings = EvalSettings(cfg.max_subquestions, cfg.decompose_temperature, cfg.decompose_max_tokens,
                            cfg.solve_temperature, cfg.solve_max_tokens, cfg.timeout_s, cfg.max_attempts)
    DataContext.get_current().enable_progress_bars = False  # our bar says more (wrong answers)
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # ...so Ray's "bars disabled" warning is noise
    labels = [sv.label for sv in solvers]
    out_dir = os.path.abspath(cfg.out_dir)  # workers need not share the driver's working directory
    rows = [r for b in cfg.benchmarks for r in plan_rows(b, load_problems(b), dec.label, labels, out_dir)]
    if not rows:
        return 0
    added = 0
    total = sum(len(json.loads(r["solvers_todo"])) for r in rows)
    bar = tqdm(total=total, desc=f"eval {dec.label}", unit="answer", disable=not cfg.progress)
    n_blocks = -(-len(rows) // cfg.batch_size)
    ds = batched_dataset(rows, cfg.batch_size).map_batches(
        EvalWorker, fn_constructor_kwargs=dict(decomposer=dec, solvers=solvers, settings=settings, prices=prices,
                                               out_dir=out_dir, scorer=cfg.scorer),
        batch_size=None, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=cfg.min_actors,
                                  max_size=max(cfg.min_actors, min(cfg.max_actors, n_blocks)),
                                  max_concurrent_calls_per_actor=4),
        num_cpus=cfg.actor_num_cpus,
        **({"resources": dict(cfg.actor_resources)} if cfg.actor_resources else {}),
    )
    wrong = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            wrong += batch.num_rows - sum(batch.column("correct").to_pylist())
            bar.update(batch.num_rows)
            bar.set_postfix_str(f"wrong={wrong}")
            added += batch.num_rows
    finally:
        bar.close()
    return added


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


def report(cfg: EvalConfig, decomposers: list[str], solvers: list[str]) -> list[RunSummary]:
    """Re-score every stored record with ``cfg.scorer`` and write results.json / .md / .png."""
    summaries = []
    for bench in cfg.benchmarks:
        for dec in decomposers:
            for sv in solvers:
                recs = read_records(records_path(cfg.out_dir, bench, dec, sv))
                if not recs:
                    continue
                for rec in recs:  # the scorer may differ from the one used when the record was written
                    s = score(rec["solver_text"], rec["problem"], cfg.scorer)
                    rec.update(prediction=s.prediction, correct=bool(s.correct), f1=s.f1, score_error=s.error)
                summaries.append(summarize(recs, dec, sv, bench, cfg.scorer))
    write_report(summaries, cfg.out_dir, config={k: v for k, v in asdict(cfg).items()})
    return summaries
