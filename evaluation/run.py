"""Decompose -> solve over benchmarks on a Ray Data actor pool, then score and report.

One pass per decomposer: every problem is decomposed once and the same sub-questions go to every
solver, so decomposers are compared on identical plans and a decomposition is never paid twice.
The worker that answered a batch appends it to its records file (``evaluation.records``: one JSON
line per problem and solver, fsynced per batch, one file per settings fingerprint) before handing it
back, so paid answers survive a killed driver; a re-run skips what is there and reuses stored
sub-questions when only some solvers are missing.

Failures: a record whose decomposition or solve failed at the API is retried by the next run
(``retry_failed``, default on) as a new attempt; a decomposition that succeeded is reused, never paid
again, and when the decomposition itself failed no solver is asked (its answer would be thrown away).
An exception a client lets escape is never recorded: the worker stores the rest of its batch, then a
fatal endpoint error (``evaluation.clients.FATAL_ERRORS``: bad key, no quota) goes back to the driver
as a "stop" row and the driver raises it as itself (Ray Data would only pass on a wrapped traceback);
any other exception is re-raised in the worker, which aborts the Ray Data run.

Summaries and the report are always rebuilt from the record files, so ``--scorer`` can change without
calling anything.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict, dataclass, field

import pyarrow as pa
from subq.actors.collect import batched_dataset
from subq.actors.prices import PriceTable
from subq.actors.teacher import TeacherClient, TeacherConfig
from subq.data_store import uri
from subq.data_store.datasets import load_problems, parse_problem_spec
from subq.evaluation.clients import (
    ACCOUNT_ERRORS,
    FATAL_ERRORS,
    AccountRefusedError,
    DecomposerClient,
    DecomposerSpec,
    FatalEndpointError,
    SolverSpec,
    eval_governor,
    solve,
)
from subq.evaluation.plan import RunKey, check_labels, plan_rows, run_keys, settings_changes
from subq.evaluation.records import (
    Location,
    append_records,
    attempt_of,
    decomposition_failed,
    failure,
    read_new,
    read_records,
)
from subq.evaluation.report import RunSummary, summarize, write_report
from subq.evaluation.scoring import score
from subq.learner.train import check_cpu_bf16
from subq.protocol.prompts import PROMPT_VERSION
from subq.protocol.solve_prompts import SOLVE_PROMPT_VERSION

SKIPPED_SOLVE = "skipped: no plan to solve (the decomposition failed at the API; a re-run retries both)"


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k:test[:50]"])  # dataset specs
    out_dir: str = "runs/eval"  # records/, results.json, results.md, accuracy_vs_cost.png
    scorer: str = "strict"  # strict (ours) | paper1 (paper 1's exact protocol, numbers only)
    max_subquestions: int | None = None  # passed to every decomposer (paper 2 uses 3)
    decompose_temperature: float = 0.0  # one static plan per problem: take the decomposer's best
    decompose_max_tokens: int = 256  # teacher and openai (student endpoint) decomposers
    solve_temperature: float = 0.0
    solve_max_tokens: int = 512
    timeout_s: float = 120.0  # per attempt, decomposer and solver
    max_attempts: int = 6  # per call, decomposer and solver; then the record is stored as failed
    retry_failed: bool = True  # a re-run retries records that failed at the API (False: keep them as they are)
    batch_size: int = 8  # problems per Ray Data batch = per durable append
    min_actors: int = 1
    max_actors: int = 4
    actor_num_cpus: float = 0.25  # fractional: an actor pool taking every CPU deadlocks Ray Data
    actor_resources: dict[str, float] = field(default_factory=dict)  # e.g. {"collect_node": 0.01}
    fidelity_problems: str | None = None  # held-out problems with human sub-questions ("gsm8k:test[:32]"): a
    #                                        held-out NLL column for decomposers with weights (evaluation.fidelity)
    fidelity_cpu_bf16: str | bool = "off"  # that NLL under bf16 autocast on CPU: on | auto (where the CPU has
    #                                        AMX: 2-2.5x faster, SmolLM2-135M's NLL within 0.001) | off (fp32)
    # The user's name for the weights of every decomposer that has some (URL, openai:, served checkpoint;
    # not none or teacher): part of their settings fingerprint, so a new value starts new records. Needed
    # where nothing visible changes, e.g. vLLM serving a checkpoint retrained in place at the same path.
    decomposer_version: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.decomposer_version is not None and not str(self.decomposer_version).strip():
            raise ValueError("decomposer_version must not be empty (leave it unset instead)")
        if self.scorer not in ("strict", "paper1"):
            raise ValueError(f"scorer must be 'strict' or 'paper1', got {self.scorer!r}")
        if self.max_attempts < 1 or self.batch_size < 1:
            raise ValueError("max_attempts and batch_size must be >= 1")
        for spec in [*self.benchmarks, *([self.fidelity_problems] if self.fidelity_problems else [])]:
            parse_problem_spec(spec)  # a bad spec fails before any work
        check_cpu_bf16("fidelity_cpu_bf16", self.fidelity_cpu_bf16)


@dataclass
class EvalSettings:
    max_subquestions: int | None
    decompose_temperature: float
    decompose_max_tokens: int
    solve_temperature: float
    solve_max_tokens: int
    timeout_s: float
    max_attempts: int


class EvalWorker:
    """Ray Data callable class: decompose a batch of problems, solve each with every solver, store it.

    The worker appends its records itself (as collection's stage workers do), so answers already paid
    for are kept whatever happens to the driver; a batch Ray retries skips what its first try stored.
    Returns one row per record: ``correct`` and ``failed``, for the driver's progress bar; plus, when a
    client raised a fatal endpoint error, one row whose ``stop`` holds its message.
    """

    def __init__(self, decomposer: DecomposerSpec, solvers: list[SolverSpec], keys: list[RunKey],
                 settings: EvalSettings, prices: PriceTable, out_dir: str, scorer: str) -> None:
        self.decomposer, self.solvers, self.keys = decomposer, solvers, keys
        self.settings, self.prices = settings, prices
        self.out_dir, self.scorer = out_dir, scorer
        # records file -> (bytes read; at a URI: the objects read, problem -> highest attempt)
        self._seen: dict[Location, tuple[int | set[str], dict[str, int]]] = {}
        self._dec: DecomposerClient | None = None
        self._solvers: list[TeacherClient] = []

    def _clients(self) -> None:
        s = self.settings
        self._dec = DecomposerClient(self.decomposer, self.prices, max_subquestions=s.max_subquestions,
                                     temperature=s.decompose_temperature, max_tokens=s.decompose_max_tokens,
                                     timeout_s=s.timeout_s, max_attempts=s.max_attempts)
        self._solvers = [TeacherClient(TeacherConfig(base_url=sv.base_url, model=sv.model, api_key_env=sv.api_key_env,
                                                     timeout_s=s.timeout_s, max_attempts=s.max_attempts), self.prices,
                                       governor=eval_governor(), role="solver")
                         for sv in self.solvers]

    async def _one(self, row: dict) -> list[dict]:
        problem = json.loads(row["problem"])
        stored = json.loads(row["stored_decomposition"]) if row["stored_decomposition"] else None
        if stored is not None:  # a plan that did not fail at the API: reuse it, pay for it once
            dec = stored
        else:
            d = await self._dec.decompose(problem["question"])
            dec = {"subquestions": d.subquestions if self.decomposer.kind != "none" else None,
                   "decompose_raw": d.raw, "decompose_error": d.error, "decompose_tokens_in": d.tokens_in,
                   "decompose_tokens_out": d.tokens_out, "decompose_latency_s": d.latency_s,
                   "decompose_cost_usd": d.cost_usd}
        todo, attempts = json.loads(row["solvers_todo"]), json.loads(row["attempts"])
        if decomposition_failed(dec):  # a re-run asks for a plan again, so a solve now would be wasted
            calls = [None] * len(todo)
        else:
            calls = await asyncio.gather(*(
                solve(self._solvers[i], problem, dec["subquestions"] or [], temperature=self.settings.solve_temperature,
                      max_tokens=self.settings.solve_max_tokens) for i in todo))
        out = []
        for i, attempt, call in zip(todo, attempts, calls, strict=True):
            solved = {"solver_text": "", "solve_error": SKIPPED_SOLVE, "solve_tokens_in": 0, "solve_tokens_out": 0,
                      "solve_latency_s": None, "solve_cost_usd": 0.0} if call is None else {
                "solver_text": call.texts[0] if call.ok else "", "solve_error": None if call.ok else call.error,
                "solve_tokens_in": call.tokens_in, "solve_tokens_out": call.tokens_out,
                "solve_latency_s": call.latency_s, "solve_cost_usd": call.cost_usd if call.ok else 0.0}
            out.append({"solver_index": i, "attempt": attempt, "benchmark": row["benchmark"], "problem": problem,
                        **dec, **solved})
        return out

    def _path(self, benchmark: str, solver_index: int) -> Location:
        return self.keys[solver_index].path(self.out_dir, benchmark)

    def _stored_attempts(self, path: Location) -> dict[str, int]:
        """Problem id -> highest attempt recorded in ``path``, reading only what was appended since the
        last look (the file grows by one batch at a time; re-reading it whole per batch would be quadratic)."""
        if isinstance(path, str):  # a URI: a folder of batch objects, each read once
            names, attempts = self._seen.setdefault(path, (set(), {}))
            for rec in read_new(path, names):
                if rec.get("problem_id") is not None:
                    attempts[rec["problem_id"]] = max(attempts.get(rec["problem_id"], 0), attempt_of(rec))
            return attempts
        offset, attempts = self._seen.get(path, (0, {}))
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            whole = data.rfind(b"\n") + 1  # a line still being written is read next time
            for line in data[:whole].splitlines():
                try:
                    rec = json.loads(line)
                    pid = rec["problem_id"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn line: that problem is redone
                attempts[pid] = max(attempts.get(pid, 0), attempt_of(rec))
            offset += whole
        self._seen[path] = (offset, attempts)
        return attempts

    def _not_stored(self, rows: list[dict]) -> list[dict]:
        """Drop (problem, solver) attempts already recorded: a retried batch must not pay twice."""
        todo = []
        for row in rows:
            pid = json.loads(row["problem"])["problem_id"]
            pairs = [(i, a) for i, a in zip(json.loads(row["solvers_todo"]), json.loads(row["attempts"]), strict=True)
                     if self._stored_attempts(self._path(row["benchmark"], i)).get(pid, 0) < a]
            if pairs:
                todo.append({**row, "solvers_todo": json.dumps([i for i, _ in pairs]),
                             "attempts": json.dumps([a for _, a in pairs])})
        return todo

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._dec is None:  # clients belong to the actor's event loop
            self._clients()
        results = await asyncio.gather(*(self._one(r) for r in self._not_stored(batch.to_pylist())),
                                       return_exceptions=True)
        by_file: dict[Location, list[str]] = {}
        correct, failed = [], []
        for rec in (rec for recs in results if isinstance(recs, list) for rec in recs):
            bench, i = rec.pop("benchmark"), rec["solver_index"]
            done = finish_record(rec, bench, self.keys[i], self.scorer)
            correct.append(done["correct"])
            failed.append(failure(done) is not None)
            by_file.setdefault(self._path(bench, i), []).append(json.dumps(done))
        for path, lines in by_file.items():
            append_records(path, lines)
        errors = [r for r in results if isinstance(r, BaseException)]
        unknown = [e for e in errors if not isinstance(e, FATAL_ERRORS)]
        if unknown:  # a bug or an unexpected failure: abort the run, loudly
            raise unknown[0]
        # the fatal error's message on one extra row; an account error first (it decides the exit code)
        errors.sort(key=lambda e: not isinstance(e, ACCOUNT_ERRORS))
        stop = [str(e) for e in errors[:1]]
        account = [isinstance(e, ACCOUNT_ERRORS) for e in errors[:1]]
        return pa.table({"correct": pa.array(correct + [False] * len(stop), pa.bool_()),
                         "failed": pa.array(failed + [False] * len(stop), pa.bool_()),
                         "stop": pa.array([None] * len(correct) + stop, pa.string()),
                         "stop_account": pa.array([False] * len(correct) + account, pa.bool_())})


def finish_record(rec: dict, benchmark: str, key: RunKey, scorer: str) -> dict:
    """Flatten a worker's record into the contract of ``evaluation.report.summarize`` and score it."""
    problem = rec.pop("problem")
    rec.pop("solver_index", None)
    s = score(rec["solver_text"], problem, scorer)
    return {
        "benchmark": benchmark, "decomposer": key.decomposer, "solver": key.solver,
        "problem_id": problem["problem_id"], "answer_type": problem["answer_type"], "question": problem["question"],
        "gold": problem.get("gold"), "reference_subquestions": problem.get("reference_subquestions"),
        "solve_prompt_version": SOLVE_PROMPT_VERSION, "decompose_prompt_version": PROMPT_VERSION,
        **rec, "prediction": s.prediction, "correct": bool(s.correct), "f1": s.f1, "score_error": s.error,
        "fingerprint": key.fingerprint, "settings": key.settings, "problem": problem,
    }


def run_eval(cfg: EvalConfig, decomposers: list[DecomposerSpec], solvers: list[SolverSpec],
             prices: PriceTable | None = None) -> list[RunSummary]:
    """Evaluate every decomposer x solver on every benchmark; write records and the report.

    Ray must be initialised and every endpoint reachable. Returns one summary per combination.
    """
    check_labels([d.label for d in decomposers], [s.label for s in solvers])
    for dec in decomposers:
        evaluate(cfg, dec, solvers, prices)
    return report(cfg, [k for d in decomposers for k in run_keys(cfg, d.label, d.identity, solvers)])


def evaluate(cfg: EvalConfig, dec: DecomposerSpec, solvers: list[SolverSpec], prices: PriceTable | None = None) -> int:
    """One decomposer's pass over every benchmark and solver; returns the records it added.

    Raises a FatalEndpointError (AccountRefusedError: bad key, no quota, billing) once the other
    batches in flight are stored; nothing is recorded for the calls it stopped.
    """
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    prices = prices or PriceTable()
    settings = EvalSettings(cfg.max_subquestions, cfg.decompose_temperature, cfg.decompose_max_tokens,
                            cfg.solve_temperature, cfg.solve_max_tokens, cfg.timeout_s, cfg.max_attempts)
    DataContext.get_current().enable_progress_bars = False  # our bar says more (wrong answers)
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # ...so Ray's "bars disabled" warning is noise
    out_dir = uri.check(cfg.out_dir)  # absolute (workers need not share our working directory), or a URI
    keys = run_keys(cfg, dec.label, dec.identity, solvers)
    for line in settings_changes(cfg, keys):
        print(line, file=sys.stderr)
    rows = [r for b in cfg.benchmarks for r in plan_rows(b, load_problems(b), keys, out_dir, cfg.retry_failed)]
    if not rows:
        return 0
    added = 0
    total = sum(len(json.loads(r["solvers_todo"])) for r in rows)
    bar = tqdm(total=total, desc=f"eval {dec.label}", unit="answer", disable=not cfg.progress)
    n_blocks = -(-len(rows) // cfg.batch_size)
    ds = batched_dataset(rows, cfg.batch_size).map_batches(
        EvalWorker, fn_constructor_kwargs=dict(decomposer=dec, solvers=solvers, keys=keys, settings=settings,
                                               prices=prices, out_dir=out_dir, scorer=cfg.scorer),
        batch_size=None, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=cfg.min_actors,
                                  max_size=max(cfg.min_actors, min(cfg.max_actors, n_blocks)),
                                  max_concurrent_calls_per_actor=4),
        num_cpus=cfg.actor_num_cpus,
        **({"resources": dict(cfg.actor_resources)} if cfg.actor_resources else {}),
    )
    wrong = failed = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            stops = [(s, a) for s, a in zip(batch.column("stop").to_pylist(), batch.column("stop_account").to_pylist(),
                                            strict=True) if s is not None]
            n = batch.num_rows - len(stops)
            wrong += n - sum(batch.column("correct").to_pylist())
            failed += sum(batch.column("failed").to_pylist())
            bar.update(n)
            bar.set_postfix_str(f"wrong={wrong} failed={failed}")
            added += n
            if stops:  # leaving the loop shuts the pool down; batches that finished are stored
                message, account = max(stops, key=lambda s: s[1])
                raise (AccountRefusedError if account else FatalEndpointError)(message)
    finally:
        bar.close()
    return added


def report(cfg: EvalConfig, keys: list[RunKey]) -> list[RunSummary]:
    """Re-score every stored record with ``cfg.scorer`` and write results.json / .md / .png."""
    from subq.evaluation.fidelity_report import read_fidelity

    nll = read_fidelity(cfg.out_dir) if cfg.fidelity_problems else {}
    summaries = []
    for bench in cfg.benchmarks:
        for key in keys:
            recs = read_records(key.path(cfg.out_dir, bench))
            if not recs:
                continue
            for rec in recs:  # the scorer may differ from the one used when the record was written
                s = score(rec["solver_text"], rec["problem"], cfg.scorer)
                rec.update(prediction=s.prediction, correct=bool(s.correct), f1=s.f1, score_error=s.error)
            summaries.append(summarize(recs, key.decomposer, key.solver, bench, cfg.scorer,
                                       fingerprint=key.fingerprint, settings=key.settings,
                                       nll_human=nll.get(key.decomposer), nll_problems=cfg.fidelity_problems))
    write_report(summaries, cfg.out_dir, config={k: v for k, v in asdict(cfg).items()})
    return summaries
