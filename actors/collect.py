"""Collection on Ray: decompose -> answer -> feedback as one streaming Ray Data pipeline.

One ``map_batches`` with a callable class (``actors.stage_worker``) over an autoscaling actor pool
runs each batch through the stages in order; every actor runs many teacher calls at once (async
UDF, several batches in flight per actor) and stores each finished call at once:
``journal_decompose`` and ``journal_answer`` for the intermediate stages, ``samples`` for the
last, and the ``calls`` ledger. Resume is therefore exact: the plan (``actors.collect_plan``)
sends each key to the stage where it stopped, so a re-run after a kill finishes the work without
duplicates and never re-sends a call whose result was stored. Rows that failed in a retryable
way get a new attempt unless ``retry_failed`` is off.

One run writes a store at a time (the store's lease, ``data_store.lease``): the actors write for the
driver's lease and stop when it lapses (a killed driver's actors). One governor actor is shared by the whole
pool: rate limits, the $ budget (cumulative over the store's ledger unless ``budget_per_run``),
the circuit breaker and the stop after a fatal account error.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
from subq.actors.breaker import BreakerConfig
from subq.actors.collect_plan import plan_keys as _plan_keys
from subq.actors.collect_plan import plan_work
from subq.actors.governor import REFUSED_BUDGET, REFUSED_OUTAGE, Governor, GovernorConfig
from subq.actors.prices import PriceTable
from subq.actors.stage_worker import STAGE_OUTPUT, START, StageWorker
from subq.actors.stages import StageSettings
from subq.actors.student import StudentEndpoint
from subq.actors.teacher import TeacherConfig, TeacherFatalError
from subq.data_store.datasets import load_problems
from subq.data_store.lease import held_holder
from subq.data_store.schema import RETRYABLE_STATUSES, STATUS_OK, STATUS_SKIPPED, STATUS_TRUNCATED
from subq.data_store.store import Store
from subq.data_store.store_stats import not_ok_summary


@dataclass
class CollectConfig:
    problems: str = "gsm8k:train[:8]"  # dataset spec: name:split[start:stop]
    store: str = ".subq/store"  # store root: a local path or any pyarrow filesystem URI
    teacher: TeacherConfig | None = None  # endpoint, model, key env var, timeouts, retries
    samples_per_problem: int = 3  # decompositions per problem (paper 1: 3)
    feedback_samples: int = 3  # usefulness judgements per decomposition (paper 1: 3)
    max_subquestions: int | None = None  # paper 2 caps at 3; None = as many as the teacher writes
    decompose_temperature: float = 0.7
    answer_temperature: float = 0.0
    feedback_temperature: float = 0.7
    max_tokens: int = 256  # per completion
    requests_per_minute: float | None = None  # shared by the whole actor pool
    tokens_per_minute: float | None = None
    budget_usd: float | None = None  # a cap on spend; calls are reserved at their worst case first
    budget_per_run: bool = False  # False: the store's recorded spend counts against the budget
    retry_failed: bool = True  # re-run rows stored as api_error / partial (new attempt)
    retry_truncated: bool = False  # re-run rows stored as truncated too (they were asked at the larger limit already)
    truncated_max_tokens: int | None = None  # a reply cut at its limit is asked again once with this one (the
    #                                          model's output limit); None: 4x; <= max_tokens: never
    patience_s: float = 600.0  # an outage longer than this stops the run (nothing stored as failed)
    prices: PriceTable = field(default_factory=PriceTable)
    min_actors: int = 1  # the actor pool autoscales between these
    max_actors: int = 4
    actor_num_cpus: float = 0.25  # fractional: an actor pool taking every CPU deadlocks Ray Data
    # Custom Ray resources each actor requests, e.g. {"collect_node": 0.01} to pin collection
    # actors to nodes that advertise that resource (cluster/ puts it on the CPU worker group).
    actor_resources: dict[str, float] = field(default_factory=dict)
    batch_size: int = 8  # rows per Ray Data batch (calls are stored one by one as they finish)
    batches_in_flight_per_actor: int = 8  # concurrent batches per actor (x batch_size calls)
    compact_after: bool = True  # merge the run's small part files when it ends
    progress: bool = True  # a tqdm bar per stage on the driver
    # A student decomposes instead of the teacher (iterated distillation, subq/rounds.py): its endpoint,
    # and its content fingerprint, which tags its rows (``policy``) and is part of their keys. None: the teacher.
    decomposer: StudentEndpoint | None = None
    policy: str | None = None
    round: int | None = None  # the round tag of the rows this collection writes (None: not a round)


@dataclass
class StageReport:
    todo: int = 0  # rows this run sent to the stage
    written: int = 0  # rows stored
    failed: int = 0  # stored with an error in this stage
    budget_stopped: int = 0  # left undone (budget spent, or the run stopped)
    cost_usd: float = 0.0
    cost_unknown: bool = False
    wall_s: float = 0.0  # wall time of the whole collection (the stages run concurrently)


@dataclass
class CollectReport:
    problems: int = 0
    stages: dict[str, StageReport] = field(default_factory=dict)
    samples_total: int = 0  # rows in `samples` for the requested problems after this run
    samples_expected: int = 0
    retried: int = 0  # failed rows this run made a new attempt for
    not_ok: dict[str, int] = field(default_factory=dict)  # status -> rows of the requested problems
    not_ok_reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # status -> reason -> rows
    stopped: str | None = None  # "budget" or "outage": the run stopped before the end
    last_failure: str | None = None  # the teacher's last failure (what an outage looked like)
    spent_usd: float = 0.0  # this run, as the budget counted it (worst case where unknown)
    store_spent_usd: float = 0.0  # the store's ledger after this run

    @property
    def cost_usd(self) -> float | None:
        if any(s.cost_unknown for s in self.stages.values()):
            return None
        return sum(s.cost_usd for s in self.stages.values())

    @property
    def complete(self) -> bool:
        return self.samples_total == self.samples_expected

    @property
    def retryable(self) -> int:
        """Rows a plain re-run would retry (api_error, partial)."""
        return sum(n for s, n in self.not_ok.items() if s in RETRYABLE_STATUSES)

    @property
    def truncated(self) -> int:
        """Rows cut at the larger limit too: final unless a re-run asks (``retry_truncated``)."""
        return self.not_ok.get(STATUS_TRUNCATED, 0)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost_usd": self.cost_usd, "complete": self.complete, "retryable": self.retryable,
                "truncated": self.truncated}


def batched_dataset(rows: list[dict] | pa.Table, batch_size: int):
    """A Ray Dataset of ``rows`` in blocks of about ``batch_size`` rows (one block = one batch).

    ``from_items`` builds the blocks in this process. ``from_arrow`` would instead launch one
    metadata task per block, each asking for a whole CPU: beside a local model server on a
    2-core machine those tasks never get scheduled and the pipeline hangs.
    """
    import ray.data

    items = rows.to_pylist() if isinstance(rows, pa.Table) else list(rows)
    if not items:
        return None
    return ray.data.from_items(items, override_num_blocks=-(-len(items) // batch_size))


def run_pipeline(entries: list[tuple[str, list[dict]]], cfg: CollectConfig, settings: StageSettings,
                 governor: Any, bar: Any) -> None:
    """One streaming Ray Data pipeline over every ``(stage, rows)`` entry: the rows enter at that stage
    (a resumed run's work is at several), and one autoscaling actor pool takes each batch through it and
    the stages after it (``actors.stage_worker``), many batches per actor at once."""
    from ray.data import ActorPoolStrategy, DataContext
    from ray.util.debug import log_once

    parts = [batched_dataset([{**row, START: stage} for row in rows], cfg.batch_size) for stage, rows in entries
             if rows]
    if not parts:
        return
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    n_blocks = sum(-(-len(rows) // cfg.batch_size) for _, rows in entries)
    DataContext.get_current().enable_progress_bars = False  # our bar says more (failed, $)
    log_once("ray_data_progress_manager_disabled")  # ...so Ray's "bars disabled" warning is noise
    ds = ds.map_batches(
        StageWorker,
        fn_constructor_kwargs=dict(teacher=cfg.teacher, settings=settings,
                                   prices=cfg.prices, governor=governor, store_root=cfg.store,
                                   lease_holder=held_holder(Store(cfg.store)), decomposer=cfg.decomposer),
        batch_size=None,  # one block = one batch
        batch_format="pyarrow",
        compute=ActorPoolStrategy(
            min_size=cfg.min_actors,
            max_size=max(cfg.min_actors, min(cfg.max_actors, n_blocks)),
            max_concurrent_calls_per_actor=cfg.batches_in_flight_per_actor,
        ),
        num_cpus=cfg.actor_num_cpus,
        **({"resources": dict(cfg.actor_resources)} if cfg.actor_resources else {}),
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        bar.add(batch)


class _Progress:
    """One bar over finished samples: done / failed / $ spent (all stages of a sample)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.failed, self.cost, self.cost_unknown = 0, 0.0, False
        self.bar = tqdm(total=total, desc="collect", unit="sample", disable=not enabled)

    def add(self, batch: pa.Table) -> None:
        statuses = batch.column("status").to_pylist()
        self.failed += sum(s != STATUS_OK for s in statuses)
        for c in batch.column("cost_usd").to_pylist():
            self.cost_unknown |= c is None
            self.cost += c or 0.0
        self.bar.update(batch.num_rows)
        self.bar.set_postfix_str(f"failed={self.failed} $={self.cost:.4f}" + ("+?" if self.cost_unknown else ""))

    def close(self) -> None:
        self.bar.close()


def stage_report(store: Store, stage: str, wanted: set[str], run_id: str, todo: int, wall_s: float) -> StageReport:
    rows = [r for r in store.filter_keys(STAGE_OUTPUT[stage], wanted).to_pylist() if r["run_id"] == run_id]
    report = StageReport(todo=todo, written=len(rows), wall_s=wall_s)
    report.failed = sum(r[f"{stage}_status"] not in (STATUS_OK, STATUS_SKIPPED) for r in rows)
    for r in rows:
        report.cost_unknown |= bool(r[f"{stage}_calls"]) and r[f"{stage}_cost_usd"] is None
        report.cost_usd += r[f"{stage}_cost_usd"] or 0.0
    report.budget_stopped = max(0, todo - report.written)
    return report


def stage_settings(cfg: CollectConfig, run_id: str = "") -> StageSettings:
    assert cfg.teacher is not None
    return StageSettings(
        teacher_model=cfg.teacher.model, price_table_version=cfg.prices.version,
        samples_per_problem=cfg.samples_per_problem, feedback_samples=cfg.feedback_samples,
        max_subquestions=cfg.max_subquestions, decompose_temperature=cfg.decompose_temperature,
        answer_temperature=cfg.answer_temperature, feedback_temperature=cfg.feedback_temperature,
        max_tokens=cfg.max_tokens, run_id=run_id, truncated_max_tokens=cfg.truncated_max_tokens,
        policy=cfg.policy, round=cfg.round if cfg.policy is not None else None,
    )


def plan_keys(problems: list[dict], cfg: CollectConfig) -> dict[str, list[str]]:
    """problem_id -> the sample keys this collection should produce for it."""
    return _plan_keys(problems, stage_settings(cfg), cfg.samples_per_problem)


def collect_todo(cfg: CollectConfig, problems: list[dict]) -> int:
    """Samples a run of ``cfg`` would work on: missing, unfinished, or to retry (no writes)."""
    plan = plan_work(Store(cfg.store), problems, stage_settings(cfg), cfg.samples_per_problem, cfg.retry_failed,
                     cfg.retry_truncated)
    return plan.todo["feedback"]


def run_collect(cfg: CollectConfig, problems: list[dict] | None = None) -> CollectReport:
    """Collect (or finish collecting) ``cfg.samples_per_problem`` samples for every problem.

    Ray must be initialised and the teacher endpoint reachable (see ``actors.teacher.check_endpoint``).
    Work left by an interrupted run enters the pipeline at the stage where it stopped. Raises
    ``TeacherFatalError`` (quota, billing, key) and ``data_store.lease.StoreLocked``.
    """
    import ray

    if cfg.teacher is None:
        raise ValueError("CollectConfig.teacher is required")
    if (cfg.decomposer is None) != (cfg.policy is None):
        raise ValueError("CollectConfig.decomposer and .policy go together (a student and its fingerprint)")
    if cfg.budget_usd is not None and not cfg.prices.knows(cfg.teacher.model):
        raise ValueError(
            f"--budget-usd needs a known price for {cfg.teacher.model!r}; add it with a price table file"
        )
    problems = problems if problems is not None else load_problems(cfg.problems)
    store = Store(cfg.store)
    with store.lock("subq collect"):
        store.append("problems", problems)
        settings = stage_settings(cfg, run_id=uuid.uuid4().hex[:12])
        plan = plan_work(store, problems, settings, cfg.samples_per_problem, cfg.retry_failed, cfg.retry_truncated)
        todo = plan.todo
        report = CollectReport(problems=len(problems), samples_expected=len(plan.wanted), retried=plan.retried)
        governor = ray.remote(num_cpus=0)(Governor).remote(GovernorConfig(
            requests_per_minute=cfg.requests_per_minute, tokens_per_minute=cfg.tokens_per_minute,
            budget_usd=cfg.budget_usd, spent_before_usd=0.0 if cfg.budget_per_run else store.spent_usd(),
            breaker=BreakerConfig(patience_s=cfg.patience_s)))
        progress = _Progress(todo["feedback"], cfg.progress)
        start = time.perf_counter()
        try:
            run_pipeline([("feedback", plan.feedback), ("answer", plan.answer), ("decompose", plan.decompose)],
                         cfg, settings, governor, progress)
        except Exception:
            fatal = ray.get(governor.snapshot.remote())["fatal"]
            if fatal:  # the actor's exception, without Ray's wrapping and traceback
                raise TeacherFatalError(fatal) from None
            raise
        finally:
            progress.close()
            snapshot = ray.get(governor.snapshot.remote())
            ray.kill(governor)
        wall = time.perf_counter() - start
        if cfg.compact_after:
            for table in (*STAGE_OUTPUT.values(), "calls"):
                store.compact(table)
        store.refresh()
        for stage in STAGE_OUTPUT:
            report.stages[stage] = stage_report(store, stage, plan.wanted, settings.run_id, todo[stage], wall)
        summarise(report, store, plan.wanted, snapshot)
    return report


def summarise(report: CollectReport, store: Store, wanted: set[str], governor: dict[str, Any]) -> None:
    rows = store.filter_keys("samples", wanted).to_pylist()
    report.samples_total = len(rows)
    report.not_ok = dict(Counter(r["status"] for r in rows if r["status"] != STATUS_OK))
    report.not_ok_reasons = not_ok_summary(rows)
    report.spent_usd = governor["spent_usd"]
    report.store_spent_usd = store.spent_usd()
    report.last_failure = governor["last_failure"]
    refusals = governor["refusals"]
    if refusals.get(REFUSED_OUTAGE):
        report.stopped = REFUSED_OUTAGE
    elif refusals.get(REFUSED_BUDGET):
        report.stopped = REFUSED_BUDGET
