"""Collection on Ray: decompose -> answer -> feedback as one streaming Ray Data pipeline.

Each stage is ``map_batches`` with a callable class over its own autoscaling actor pool, and
the three run concurrently; every actor runs many teacher calls at once (async UDF, several
batches in flight per actor). Each stage's actors append every finished batch to the store as
one durable part file: ``journal_decompose`` and ``journal_answer`` for the intermediate stages,
``samples`` for the last. Resume is therefore exact: a stage only gets the keys that its output table does
not hold yet, so a re-run after a kill finishes the work without duplicates and never re-sends
a call whose result was stored.
"""

from __future__ import annotations

import asyncio
import time
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
    # Custom Ray resources each actor requests, e.g. {"collect_node": 0.01} to pin collection
    # actors to nodes that advertise that resource (cluster/ puts it on the CPU worker group).
    actor_resources: dict[str, float] = field(default_factory=dict)
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
    wall_s: float = 0.0  # wall time of the whole collection (the stages run concurrently)


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
    """Ray Data callable class: one stage over a batch of rows, all its calls concurrent.

    The worker stores its own output (one durable part file per batch) before handing the rows
    to the next stage, so a stage's paid work survives a crash of anything downstream. A batch
    Ray retries (its actor died after storing) is answered from the store, not re-paid.
    """

    def __init__(self, stage: str, teacher: TeacherConfig, settings: StageSettings, prices: PriceTable,
                 limiter: Any, store_root: str):
        self.stage, self.teacher_cfg, self.settings = stage, teacher, settings
        self.prices, self.limiter = prices, limiter
        self.store = Store(store_root)
        self.table = STAGE_OUTPUT[stage]
        self._client: TeacherClient | None = None

    def _stored(self, rows: list[dict]) -> tuple[list[dict], pa.Table | None]:
        """Split a batch into rows still to do and the stored results of the others."""
        done = self.store.keys(self.table, fresh=True)
        if self.stage == "decompose":
            todo, have = [], []
            for item in rows:
                keys = dict(zip(item["sample_indices"], item["sample_keys"], strict=True))
                have += [k for k in keys.values() if k in done]
                missing = [i for i, k in keys.items() if k not in done]
                if missing:
                    todo.append({**item, "sample_indices": missing})
        else:
            todo = [r for r in rows if r["sample_key"] not in done]
            have = [r["sample_key"] for r in rows if r["sample_key"] in done]
        return todo, (self.store.filter_keys(self.table, have) if have else None)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._client is None:  # created inside the actor's event loop
            self._client = TeacherClient(self.teacher_cfg, self.prices, self.limiter)
        todo, stored = self._stored(batch.to_pylist())
        fn = {"decompose": decompose, "answer": answer, "feedback": feedback}[self.stage]
        outs = await asyncio.gather(*(fn(self._client, row, self.settings) for row in todo))
        rows: list[dict] = []
        for out in outs:
            if isinstance(out, list):
                rows.extend(out)
            elif out is not None:  # None: the budget stopped this row; a later run does it
                rows.append(out)
        table = to_table(rows, SAMPLES_SCHEMA)
        if rows:
            self.store.append(self.table, table)
        return table if stored is None else pa.concat_tables([stored.cast(SAMPLES_SCHEMA), table])


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


def run_pipeline(stages: list[str], inputs: list[dict] | pa.Table, cfg: CollectConfig,
                 settings: StageSettings, limiter: Any, expected: int, bar: Any) -> None:
    """One streaming Ray Data pipeline over ``stages``: every stage has its own actor pool and
    all stages run at once (a batch is answered while the next one is still being decomposed)."""
    from ray.data import ActorPoolStrategy, DataContext
    from ray.util.debug import log_once

    ds = batched_dataset(inputs, cfg.batch_size)
    if ds is None:
        return
    n_blocks = -(-(inputs.num_rows if isinstance(inputs, pa.Table) else len(inputs)) // cfg.batch_size)
    DataContext.get_current().enable_progress_bars = False  # our bar says more (failed, $)
    log_once("ray_data_progress_manager_disabled")  # ...so Ray's "bars disabled" warning is noise
    for stage in stages:
        ds = ds.map_batches(
            StageWorker,
            fn_constructor_kwargs=dict(stage=stage, teacher=cfg.teacher, settings=settings,
                                       prices=cfg.prices, limiter=limiter, store_root=cfg.store),
            batch_size=None,  # one block = one batch = one part file
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


def _stage_report(store: Store, stage: str, new_keys: set[str], todo: int, wall_s: float) -> StageReport:
    rows = store.filter_keys(STAGE_OUTPUT[stage], new_keys)
    report = StageReport(todo=todo, written=rows.num_rows, wall_s=wall_s)
    statuses = rows.column(f"{stage}_status").to_pylist()
    report.failed = sum(s not in (STATUS_OK, "skipped") for s in statuses)
    for c, n in zip(rows.column(f"{stage}_cost_usd").to_pylist(), rows.column(f"{stage}_calls").to_pylist(),
                    strict=True):
        report.cost_unknown |= bool(n) and c is None
        report.cost_usd += c or 0.0
    report.budget_stopped = max(0, todo - report.written)
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
    Work left by an interrupted run enters the pipeline at the stage where it stopped.
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
    keys = plan_keys(problems, cfg)
    wanted = {k for ks in keys.values() for k in ks}
    before = {t: store.keys(t) & wanted for t in STAGE_OUTPUT.values()}
    in_samples, in_answer, in_decompose = before["samples"], before["journal_answer"], before["journal_decompose"]
    # entry points: answered rows need feedback only; decomposed rows need answer + feedback;
    # sample indices with nothing stored start at decompose (one call per problem, n = missing)
    feedback_only = store.filter_keys("journal_answer", in_answer - in_samples)
    from_answer = store.filter_keys("journal_decompose", in_decompose - in_answer - in_samples)
    work = []
    for p in problems:
        missing = [(i, k) for i, k in enumerate(keys[p["problem_id"]]) if k not in in_samples | in_answer | in_decompose]
        if missing:
            work.append({"problem_id": p["problem_id"], "question": p["question"], "gold_value": p["answer_value"],
                         "sample_indices": [i for i, _ in missing], "sample_keys": [k for _, k in missing]})
    n_new = sum(len(w["sample_indices"]) for w in work)
    todo = {"decompose": n_new, "answer": n_new + from_answer.num_rows,
            "feedback": n_new + from_answer.num_rows + feedback_only.num_rows}
    report = CollectReport(problems=len(problems), samples_expected=len(wanted))
    limiter = None  # without limits every call would pay two actor round trips for nothing
    if cfg.requests_per_minute or cfg.tokens_per_minute or cfg.budget_usd is not None:
        limiter = ray.remote(num_cpus=0)(RateLimiter).remote(
            cfg.requests_per_minute, cfg.tokens_per_minute, cfg.budget_usd
        )
    progress = _Progress(todo["feedback"], cfg.progress)
    start = time.perf_counter()
    try:
        for stages, inputs in ((["feedback"], feedback_only), (["answer", "feedback"], from_answer),
                               (["decompose", "answer", "feedback"], work)):
            run_pipeline(stages, inputs, cfg, settings, limiter, todo["feedback"], progress)
    finally:
        progress.close()
        if limiter is not None:
            ray.kill(limiter)
    wall = time.perf_counter() - start
    store.refresh()
    for stage, table in STAGE_OUTPUT.items():
        new = (store.keys(table) & wanted) - before[table]
        report.stages[stage] = _stage_report(store, stage, new, todo[stage], wall)
    report.samples_total = len(wanted & store.keys("samples"))
    return report
