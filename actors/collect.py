"""Collection on Ray: decompose -> answer -> feedback, one Ray Data pass per stage.

Each pass is ``map_batches`` with a callable class over an autoscaling actor pool; every actor
runs many teacher calls concurrently (async UDF, several batches in flight per actor). The
driver streams finished batches out of the pass and appends each to the store as one durable
part file: ``journal_decompose`` and ``journal_answer`` for the intermediate stages, ``samples``
for the last. Resume is therefore exact: a stage only gets the keys that its output table does
not hold yet, so a re-run after a kill finishes the work without duplicates and never re-sends
a call whose result was stored.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from actors.prices import PriceTable
from actors.rate_limit import RateLimiter
from actors.stages import StageSettings, answer, decompose, feedback
from actors.teacher import TeacherClient, TeacherConfig
from data_store.datasets import load_problems
from data_store.schema import SAMPLES_SCHEMA, STATUS_OK, sample_key, to_table
from data_store.store import Store
from protocol.prompts import PROMPT_VERSION

STAGE_OUTPUT = {"decompose": "journal_decompose", "answer": "journal_answer", "feedback": "samples"}


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
    budget_usd: float | None = None  # stop starting new calls once this much is spent
    prices: PriceTable = field(default_factory=PriceTable)
    min_actors: int = 1  # the actor pool autoscales between these
    max_actors: int = 4
    actor_num_cpus: float = 0.25  # fractional: an actor pool taking every CPU deadlocks Ray Data
    batch_size: int = 8  # rows per batch = rows per durable part file
    batches_in_flight_per_actor: int = 8  # concurrent batches per actor (x batch_size calls)
    progress: bool = True  # a tqdm bar per stage on the driver


@dataclass
class StageReport:
    todo: int = 0  # rows this run sent to the stage
    written: int = 0  # rows stored
    failed: int = 0  # stored with a parse or API error in this stage
    budget_stopped: int = 0  # left undone because the budget ran out
    cost_usd: float = 0.0
    cost_unknown: bool = False


@dataclass
class CollectReport:
    problems: int = 0
    stages: dict[str, StageReport] = field(default_factory=dict)
    samples_total: int = 0  # rows in `samples` for the requested problems after this run
    samples_expected: int = 0

    @property
    def cost_usd(self) -> float | None:
        if any(s.cost_unknown for s in self.stages.values()):
            return None
        return sum(s.cost_usd for s in self.stages.values())

    @property
    def complete(self) -> bool:
        return self.samples_total == self.samples_expected

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost_usd": self.cost_usd, "complete": self.complete}


class StageWorker:
    """Ray Data callable class: one stage over a batch of rows, all its calls concurrent."""

    def __init__(self, stage: str, teacher: TeacherConfig, settings: StageSettings, prices: PriceTable,
                 limiter: Any):
        self.stage, self.teacher_cfg, self.settings = stage, teacher, settings
        self.prices, self.limiter = prices, limiter
        self._client: TeacherClient | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._client is None:  # created inside the actor's event loop
            self._client = TeacherClient(self.teacher_cfg, self.prices, self.limiter)
        fn = {"decompose": decompose, "answer": answer, "feedback": feedback}[self.stage]
        outs = await asyncio.gather(*(fn(self._client, row, self.settings) for row in batch.to_pylist()))
        rows: list[dict] = []
        for out in outs:
            if isinstance(out, list):
                rows.extend(out)
            elif out is not None:
                rows.append(out)
        return to_table(rows, SAMPLES_SCHEMA)


def _blocks(rows: list[dict] | pa.Table, batch_size: int) -> list[pa.Table]:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    return [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]


def run_stage(stage: str, inputs: list[dict] | pa.Table, cfg: CollectConfig, store: Store,
              settings: StageSettings, limiter: Any, expected_rows: int) -> StageReport:
    """One Ray Data pass; finished batches are appended to the stage's table as they arrive."""
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    report = StageReport(todo=expected_rows)
    blocks = _blocks(inputs, cfg.batch_size)
    if not blocks:
        return report
    from ray.util.debug import log_once

    DataContext.get_current().enable_progress_bars = False  # our bar says more (failed, $)
    log_once("ray_data_progress_manager_disabled")  # ...so Ray's "bars disabled" warning is noise
    ds = ray.data.from_arrow(blocks).map_batches(
        StageWorker,
        fn_constructor_kwargs=dict(stage=stage, teacher=cfg.teacher, settings=settings,
                                   prices=cfg.prices, limiter=limiter),
        batch_size=None,  # one block = one batch = one part file
        batch_format="pyarrow",
        compute=ActorPoolStrategy(
            min_size=cfg.min_actors,
            max_size=max(cfg.min_actors, min(cfg.max_actors, len(blocks))),
            max_concurrent_calls_per_actor=cfg.batches_in_flight_per_actor,
        ),
        num_cpus=cfg.actor_num_cpus,
    )
    bar = tqdm(total=expected_rows, desc=f"{stage:>9}", unit="row", disable=not cfg.progress, leave=True)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            if batch.num_rows == 0:
                continue
            result = store.append(STAGE_OUTPUT[stage], batch)
            stored = batch if result.skipped_existing == 0 else store.filter_keys(
                STAGE_OUTPUT[stage], set(batch.column("sample_key").to_pylist()))
            statuses = stored.column(f"{stage}_status").to_pylist()
            costs = stored.column(f"{stage}_cost_usd").to_pylist()
            calls = stored.column(f"{stage}_calls").to_pylist()
            report.written += result.written
            report.failed += sum(s not in (STATUS_OK, "skipped") for s in statuses)
            for c, n in zip(costs, calls, strict=True):
                if n and c is None:
                    report.cost_unknown = True
                report.cost_usd += c or 0.0
            bar.update(result.written)
            bar.set_postfix_str(f"failed={report.failed} $={report.cost_usd:.4f}" +
                                ("+?" if report.cost_unknown else ""))
    finally:
        bar.close()
    report.budget_stopped = max(0, expected_rows - report.written)
    return report


def plan_keys(problems: list[dict], cfg: CollectConfig) -> dict[str, list[str]]:
    """problem_id -> the sample keys this collection should produce for it."""
    model, version = cfg.teacher.model, PROMPT_VERSION
    return {
        p["problem_id"]: [sample_key(p["problem_id"], model, version, i) for i in range(cfg.samples_per_problem)]
        for p in problems
    }


def run_collect(cfg: CollectConfig, problems: list[dict] | None = None) -> CollectReport:
    """Collect (or finish collecting) ``cfg.samples_per_problem`` samples for every problem.

    Ray must be initialised and the teacher endpoint reachable (see ``actors.teacher.check_endpoint``).
    """
    import ray

    if cfg.teacher is None:
        raise ValueError("CollectConfig.teacher is required")
    if cfg.budget_usd is not None and not cfg.prices.knows(cfg.teacher.model):
        raise ValueError(
            f"--budget-usd needs a known price for {cfg.teacher.model!r}; add it with a price table file"
        )
    problems = problems if problems is not None else load_problems(cfg.problems)
    store = Store(cfg.store)
    store.append("problems", problems)
    settings = StageSettings(
        teacher_model=cfg.teacher.model, price_table_version=cfg.prices.version,
        samples_per_problem=cfg.samples_per_problem, feedback_samples=cfg.feedback_samples,
        max_subquestions=cfg.max_subquestions, decompose_temperature=cfg.decompose_temperature,
        answer_temperature=cfg.answer_temperature, feedback_temperature=cfg.feedback_temperature,
        max_tokens=cfg.max_tokens,
    )
    limiter = ray.remote(num_cpus=0)(RateLimiter).remote(
        cfg.requests_per_minute, cfg.tokens_per_minute, cfg.budget_usd
    )
    keys = plan_keys(problems, cfg)
    wanted = {k for ks in keys.values() for k in ks}
    report = CollectReport(problems=len(problems), samples_expected=len(wanted))

    # decompose: per problem, the sample indices with no stored result in any stage
    have = store.keys("samples") | store.keys("journal_answer") | store.keys("journal_decompose")
    work = []
    for p in problems:
        missing = [i for i, k in enumerate(keys[p["problem_id"]]) if k not in have]
        if missing:
            work.append({"problem_id": p["problem_id"], "question": p["question"],
                         "gold_value": p["answer_value"], "sample_indices": missing})
    n = sum(len(w["sample_indices"]) for w in work)
    report.stages["decompose"] = run_stage("decompose", work, cfg, store, settings, limiter, n)

    # answer: decomposed rows not yet answered; feedback: answered rows not yet in samples
    for stage, source, done in (("answer", "journal_decompose", ("journal_answer", "samples")),
                                ("feedback", "journal_answer", ("samples",))):
        todo = wanted - set().union(*(store.keys(t) for t in done))
        rows = store.filter_keys(source, todo)
        report.stages[stage] = run_stage(stage, rows, cfg, store, settings, limiter, rows.num_rows)
    report.samples_total = len(wanted & store.keys("samples"))
    ray.kill(limiter)
    return report

