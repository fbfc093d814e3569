"""Collection through the OpenAI Batch API (``subq collect --mode batch``): half the price, 24 h.

One run (one *round* without ``--wait``):

1. every live job of the store is polled; the ended ones (completed, expired, cancelled,
   failed) are downloaded and their rows stored exactly as online (``actors.batch_requests``):
   a result line becomes the stage's row, an error line the stage's ``api_error`` (retried as a
   new attempt by the next batch, as a re-run retries online); requests an ended job left
   unanswered store nothing and go into the next batch (a cancelled job's: see below);
2. the plan (``actors.collect_plan``) says what each sample needs next; keys that still have a
   live job are left out, so nothing is submitted twice;
3. each stage's requests become one or more jobs (split at the request and byte limits),
   registered in the store before upload (``actors.batch_jobs``), under the $ budget at
   batch prices and, where set, the model's enqueued-token limit (``max_enqueued_tokens``).

A batch the API fails as a whole (validation: a queue over its token limit, a bad line) is
reported with the API's reason and its requests go again in jobs of half its size (a job of one
request: after ``failed_retry_after_s``), never as the same upload. What a cancelled job left
unanswered is held: someone cancelled it, so only ``resubmit_cancelled`` sends it again.

Without ``wait`` the run returns after submitting; the next run with the same arguments picks
up where this one left (the next stage of the samples whose jobs ended). With ``wait`` it polls
every ``poll_interval_s`` and goes on until every sample is stored. Failed rows are retried in
the first round of a run only, so a request that always fails cannot loop.

Offline (a self-hosted server, e.g. ``vllm run-batch``): ``export_requests`` writes the pending
requests as JSONL without uploading; ``import_results`` stores a results JSONL, matching each
line's custom_id with the request the same arguments would export now.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import openai
from subq.actors.batch_jobs import TERMINAL, BatchJobs, BatchLimits, items_of, jsonl, split
from subq.actors.batch_requests import (
    BatchRequest,
    build_requests,
    line_outcome,
    never_ran,
    read_jsonl,
    read_results,
)
from subq.actors.budget import Budget
from subq.actors.collect import (
    CollectConfig,
    CollectReport,
    plan_keys,
    stage_report,
    stage_settings,
    summarise,
)
from subq.actors.collect_plan import Plan, plan_work
from subq.actors.stage_worker import STAGE_OUTPUT, ledger_rows
from subq.actors.stages import StageSettings
from subq.actors.teacher import error_text, is_transient
from subq.data_store.datasets import load_problems
from subq.data_store.schema import STAGES
from subq.data_store.store import Store

Row = dict[str, Any]


@dataclass
class BatchConfig:
    wait: bool = False  # poll until every sample is stored; False: return after submitting
    poll_interval_s: float = 30.0  # seconds between two polls of the live jobs (with wait)
    max_requests_per_batch: int = BatchLimits.max_requests  # a stage with more requests is split
    max_bytes_per_batch: int = BatchLimits.max_bytes  # JSONL bytes per batch
    # the model's batch queue limit: tokens (prompt bound + n * max_tokens) over all its live jobs; what does
    # not fit waits for a later round or run. None: not enforced (a batch over it fails as a whole, then smaller)
    max_enqueued_tokens: int | None = None
    resubmit_cancelled: bool = False  # send again what a cancelled job left unanswered (else held: someone cancelled it)
    # a batch the API failed as a whole is retried in jobs of half its size; a single request whose own
    # job failed so waits this long before it is sent again (the queue may have cleared by then)
    failed_retry_after_s: float = 600.0
    export_requests: str | None = None  # write the pending requests to this JSONL instead of uploading
    import_results: str | None = None  # store this results JSONL (vllm run-batch -o) instead of polling


@dataclass
class BatchReport(CollectReport):
    ingested_jobs: int = 0  # ended jobs whose results this run stored
    unanswered: int = 0  # requests ended jobs left unanswered (expired, cancelled): in the next batch
    submitted: list[dict[str, Any]] = field(default_factory=list)  # jobs this run submitted
    live: list[dict[str, Any]] = field(default_factory=list)  # jobs still running when the run returned
    failed_jobs: list[str] = field(default_factory=list)  # batches the API failed as a whole, and why
    held_cancelled: int = 0  # requests a cancelled job left unanswered, not resubmitted (resubmit_cancelled)
    held_failed: int = 0  # requests of a failed one-request job, waiting failed_retry_after_s
    queue_left_out: int = 0  # requests not submitted: over the model's enqueued-token limit (a later round)
    budget_left_out: int = 0  # requests not submitted: they would not fit the budget
    exported: int = 0  # request lines written by export_requests
    imported: int = 0  # result lines stored by import_results
    unmatched: int = 0  # imported lines that match no pending request (stored already, other settings)


def _job_view(job: Row) -> dict[str, Any]:
    return {k: job.get(k) for k in ("job_key", "batch_id", "stage", "status", "requests", "completed", "failed")}


class _BatchRun:
    def __init__(self, cfg: CollectConfig, batch: BatchConfig, store: Store, problems: list[Row]):
        assert cfg.teacher is not None
        self.cfg, self.batch, self.store, self.problems = cfg, batch, store, problems
        self.run_id = uuid.uuid4().hex[:12]
        self.prices = cfg.prices.for_batch()
        self.settings = stage_settings(cfg, self.run_id)
        self.settings.price_table_version = self.prices.version  # rows say they were priced as batch
        self.offline = batch.export_requests is not None or batch.import_results is not None
        self.jobs = BatchJobs(store, None if self.offline else cfg.teacher)
        self.limits = BatchLimits(batch.max_requests_per_batch, batch.max_bytes_per_batch, batch.max_enqueued_tokens)
        self.report = BatchReport(problems=len(problems))
        self.caps: dict[str, int] = {}  # custom_id -> most requests of its next job (after a failed batch)
        self.left_out: dict[str, int] = dict.fromkeys(STAGES, 0)

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> BatchReport:
        if self.batch.import_results is not None:
            self._import(self.batch.import_results)
            return self._finish()
        bar = _Bar(self.cfg.progress and self.batch.wait)
        round_ = 0
        try:
            while True:
                ingested = self._poll_and_ingest()
                if round_ == 0 or ingested:
                    plan = self._plan(retry=self.cfg.retry_failed and round_ == 0)
                    requests = self._build(plan, store_passed=True)
                    if self.batch.export_requests is not None:
                        self._export(self.batch.export_requests, requests)
                        break
                    self._submit(requests)
                live = self.jobs.live()
                if not self.batch.wait or not live:
                    break
                bar.show(live)
                time.sleep(self.batch.poll_interval_s)
                round_ += 1
        finally:
            bar.close()
        self.report.live = [_job_view(j) for j in self.jobs.live()]
        return self._finish()

    def _finish(self) -> BatchReport:
        if self.cfg.compact_after:
            for table in (*STAGE_OUTPUT.values(), "calls", "batch_jobs", "batch_requests"):
                self.store.compact(table)
        self.store.refresh()
        wanted = {k for keys in plan_keys(self.problems, self.cfg).values() for k in keys}
        for stage in STAGES:
            r = stage_report(self.store, stage, wanted, self.run_id, 0, 0.0)
            r.todo, r.budget_stopped = r.written + self.left_out[stage], self.left_out[stage]
            self.report.stages[stage] = r
        self.report.samples_expected = len(wanted)
        spent = sum(s.cost_usd for s in self.report.stages.values())
        summarise(self.report, self.store, wanted, {"spent_usd": spent, "last_failure": None, "refusals": {}})
        if self.report.budget_left_out:
            self.report.stopped = "budget"
        return self.report

    # ---- 1: poll and store what ended ------------------------------------------------------
    def _poll_and_ingest(self) -> int:
        teacher = self.cfg.teacher
        assert teacher is not None
        ingested = 0
        for job in self.jobs.live():
            if job["base_url"] != teacher.base_url:
                continue  # another endpoint's job: polled by a run against that endpoint
            if job["batch_id"] is None:  # registered by a run that died before the batch id was stored
                items = [item for _, item in items_of(self.jobs.requests_of({job["job_key"]})).values()]
                requests, _ = build_requests(job["stage"], items, self._job_settings(job), teacher, self.prices)
                self._upload(job, requests, adopt=True)
                continue
            job, api = self.jobs.poll(job)
            if job["status"] in TERMINAL:
                self._ingest(job, api)
                ingested += 1
        self.report.ingested_jobs += ingested
        return ingested

    def _job_settings(self, job: Row) -> StageSettings:
        return StageSettings(**json.loads(job["settings"]), run_id=self.run_id)

    def _ingest(self, job: Row, api: Any) -> None:
        items = items_of(self.jobs.requests_of({job["job_key"]}))
        lines = (read_jsonl(self.jobs.download(job["output_file_id"]), f"output of batch {job['batch_id']}")
                 + read_jsonl(self.jobs.download(job["error_file_id"]), f"errors of batch {job['batch_id']}"))
        ended = max((t for t in (api.completed_at, api.expired_at, api.cancelled_at, api.failed_at) if t), default=None)
        latency = float(ended - api.created_at) if ended else 0.0
        answered = self._store_results(lines, items, self._job_settings(job), latency)
        self.report.unanswered += len(set(items) - answered)
        if job["status"] == "failed":  # the API refused the batch as a whole: _hold decides when it goes again
            self.report.failed_jobs.append(f"{job['batch_id']} ({job['requests']} requests): "
                                           f"{job['error'] or 'failed, no reason given'}")
        self.jobs.mark_ingested(job)

    def _store_results(self, lines: list[Row], items: dict[str, tuple[str, Row]], settings: StageSettings,
                       latency_s: float) -> set[str]:
        """Store the rows of the result lines that answer ``items``; returns their custom_ids."""
        teacher = self.cfg.teacher
        assert teacher is not None
        work, ids, seen = [], [], set()
        secrets = [self.jobs.key, os.environ.get(teacher.api_key_env, "")]
        for line in lines:
            cid = line["custom_id"]
            if never_ran(line):  # expired before it ran: not the request's failure; the next batch sends it
                continue
            if cid not in items or cid in seen:
                self.report.unmatched += 1
                continue
            stage, item = items[cid]
            work.append((stage, item, line_outcome(line, self.prices, teacher.model, latency_s, secrets)))
            ids.append(cid)
            seen.add(cid)
        by_table: dict[str, list[Row]] = {}
        ledger: list[Row] = []
        for cid, (stage, item, _), (rows, calls) in zip(ids, work, read_results(work, settings), strict=True):
            for r in rows:
                r["run_id"] = self.run_id
            by_table.setdefault(STAGE_OUTPUT[stage], []).extend(rows)
            ledger += ledger_rows(stage, item, rows, calls, settings, call_id=f"batch:{cid}")
        if ledger:  # the money first, as online
            self.store.append("calls", ledger)
        for table, rows in by_table.items():
            self.store.append(table, rows)
        return seen

    # ---- 2: what is left to do -------------------------------------------------------------
    def _plan(self, retry: bool) -> Plan:
        plan = plan_work(self.store, self.problems, self.settings, self.cfg.samples_per_problem, retry)
        live = self.jobs.requests_of({j["job_key"] for j in self.jobs.live()}, ["sample_keys"])
        busy = {k for r in live for k in r["sample_keys"]}
        self.report.retried += plan.retried
        if not busy:
            return plan
        decompose = []
        for item in plan.decompose:
            keep = [i for i, k in enumerate(item["sample_keys"]) if k not in busy]
            if keep:
                decompose.append({**item, **{f: [item[f][i] for i in keep]
                                             for f in ("sample_indices", "sample_keys", "attempts")}})
        plan.decompose = decompose
        plan.answer = [r for r in plan.answer if r["sample_key"] not in busy]
        plan.feedback = [r for r in plan.feedback if r["sample_key"] not in busy]
        return plan

    def _build(self, plan: Plan, store_passed: bool) -> dict[str, list[BatchRequest]]:
        """Each stage's requests; rows that need no call (an earlier stage failed) pass on to the
        next stage at once, stored as online (``store_passed``)."""
        teacher = self.cfg.teacher
        assert teacher is not None
        out: dict[str, list[BatchRequest]] = {}
        passed: list[Row] = []
        for stage in STAGES:
            items = [*getattr(plan, stage), *passed]
            out[stage], passed = build_requests(stage, items, self.settings, teacher, self.prices)
            for r in passed:
                r["run_id"] = self.run_id
            if passed and store_passed:
                self.store.append(STAGE_OUTPUT[stage], passed)
        return out

    # ---- 3: submit -------------------------------------------------------------------------
    def _submit(self, requests: dict[str, list[BatchRequest]]) -> None:
        requests = self._hold(requests)
        live_jobs = self.jobs.live()
        budget = None
        if self.cfg.budget_usd is not None:
            live = self.jobs.requests_of({j["job_key"] for j in live_jobs}, ["worst_usd"])
            reserved = sum(r["worst_usd"] or 0.0 for r in live)  # live jobs may still bill their worst case
            spent = 0.0 if self.cfg.budget_per_run else self.store.spent_usd()
            budget = Budget(self.cfg.budget_usd, spent + reserved)
        room = None  # tokens the model's batch queue has left
        if self.limits.max_enqueued_tokens is not None:
            mine = {j["job_key"] for j in live_jobs if j["teacher_model"] == self.cfg.teacher.model}
            room = self.limits.max_enqueued_tokens - sum(r["tokens"] or 0 for r in self.jobs.requests_of(mine, ["tokens"]))
        queue_left_out = 0
        for stage in STAGES:
            todo = requests[stage]
            if room is not None:
                fits = []
                for r in todo:
                    if r.tokens <= room:
                        fits.append(r)
                        room -= r.tokens
                queue_left_out += len(todo) - len(fits)
                todo = fits
            if budget is not None:
                fits = [r for r in todo if budget.reserve(r.worst_usd or 0.0)]
                self.left_out[stage] += len(todo) - len(fits)
                self.report.budget_left_out += len(todo) - len(fits)
                todo = fits
            by_cap: dict[int, list[BatchRequest]] = {}
            for r in todo:
                by_cap.setdefault(self.caps.get(r.custom_id, self.limits.max_requests), []).append(r)
            for cap, group_of in sorted(by_cap.items(), reverse=True):
                limits = dataclasses.replace(self.limits, max_requests=min(cap, self.limits.max_requests))
                for group in split(group_of, limits):
                    job = self.jobs.register(stage, group, self.settings, self.run_id)
                    self.report.submitted.append(_job_view(self._upload(job, group)))
        self.report.queue_left_out = queue_left_out  # as of the last round: the rest went in later rounds

    def _hold(self, requests: dict[str, list[BatchRequest]]) -> dict[str, list[BatchRequest]]:
        """Leave out what must not go again yet, by the last ended job that held each request:
        a cancelled job's (someone cancelled it: only with resubmit_cancelled), and a one-request job
        the API failed as a whole (for failed_retry_after_s). A larger failed job's requests go in
        jobs of at most half its size (``self.caps``): never the same upload again."""
        last: dict[str, Row] = {}
        jobs = {j["job_key"]: j for j in self.jobs.jobs() if j["ingested"] and j["batch_id"]}
        for r in self.store.read_rows("batch_requests", ["custom_id", "job_key"], history=True):
            job = jobs.get(r["job_key"])
            if job is not None and (r["custom_id"] not in last or job["created_at"] > last[r["custom_id"]]["created_at"]):
                last[r["custom_id"]] = job
        self.caps = {}
        self.report.held_cancelled = self.report.held_failed = 0  # as of this round's plan
        now = datetime.now(timezone.utc).timestamp()
        out: dict[str, list[BatchRequest]] = {}
        for stage, todo in requests.items():
            out[stage] = []
            for r in todo:
                job = last.get(r.custom_id)
                if job is not None and job["status"] == "cancelled" and not self.batch.resubmit_cancelled:
                    self.report.held_cancelled += 1
                    continue
                if job is not None and job["status"] == "failed":
                    if (job["requests"] or 1) <= 1:
                        if now < job["updated_at"].timestamp() + self.batch.failed_retry_after_s:
                            self.report.held_failed += 1
                            continue
                    else:
                        self.caps[r.custom_id] = (job["requests"] or 2) // 2
                out[stage].append(r)
        return out

    def _upload(self, job: Row, requests: list[BatchRequest], adopt: bool = False) -> Row:
        try:
            return self.jobs.upload(job, requests, adopt=adopt)
        except openai.APIStatusError as e:
            if is_transient(e):  # the batch may exist after all: the next run looks for it (adopt)
                raise
            why = error_text(e, [self.jobs.key])  # refused for good: free its keys
            self.jobs.abandon(job, why)
            if e.status_code in (404, 405):  # no such route: the endpoint has no Batch API
                raise ValueError(f"the teacher at {job['base_url']} refused the batch job: {why[:300]} (an endpoint "
                                 "without the Batch API: use --export-requests / --import-results)") from None
            raise ValueError(f"the teacher at {job['base_url']} refused the upload of a batch of {len(requests)} "
                             f"requests (HTTP {e.status_code}): {why[:300]}") from None

    # ---- offline ---------------------------------------------------------------------------
    def _export(self, path: str, requests: dict[str, list[BatchRequest]]) -> None:
        lines = [r for stage in STAGES for r in requests[stage]]
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(jsonl(lines))
        os.replace(tmp, path)  # a reader never sees half a file
        self.report.exported = len(lines)

    def _import(self, path: str) -> None:
        try:
            with open(path) as f:
                lines = read_jsonl(f.read(), path)
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        plan = self._plan(retry=self.cfg.retry_failed)
        requests = self._build(plan, store_passed=False)
        items = {r.custom_id: (r.stage, r.item) for stage in STAGES for r in requests[stage]}
        self.report.imported = len(self._store_results(lines, items, self.settings, 0.0))


class _Bar:
    """With --wait: requests answered over the live jobs, refreshed at each poll."""

    def __init__(self, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=0, desc="batch", unit="request", disable=not enabled)

    def show(self, live: list[Row]) -> None:
        self.bar.reset(total=sum(j["requests"] or 0 for j in live))
        self.bar.update(sum((j["completed"] or 0) + (j["failed"] or 0) for j in live))
        states = sorted({j["status"] for j in live})
        self.bar.set_postfix_str(f"{len(live)} jobs: {', '.join(states)} ({datetime.now(timezone.utc):%H:%M:%S})")

    def close(self) -> None:
        self.bar.close()


def run_batch_collect(cfg: CollectConfig, batch: BatchConfig, problems: list[Row] | None = None) -> BatchReport:
    """One batch-mode collection run (see the module docstring). Raises ``TeacherFatalError``
    (account refused), ``StoreLocked``, and ``ValueError`` for a bad results file or setting."""
    if cfg.teacher is None:
        raise ValueError("CollectConfig.teacher is required")
    if batch.export_requests and batch.import_results:
        raise ValueError("export_requests and import_results are two different runs: give one")
    if batch.max_requests_per_batch < 1 or batch.max_bytes_per_batch < 1 or batch.poll_interval_s < 0:
        raise ValueError("batch limits must be >= 1 and the poll interval >= 0")
    if cfg.budget_usd is not None and not cfg.prices.knows(cfg.teacher.model):
        raise ValueError(
            f"--budget-usd needs a known price for {cfg.teacher.model!r}; add it with a price table file")
    problems = problems if problems is not None else load_problems(cfg.problems)
    store = Store(cfg.store)
    with store.lock("subq collect --mode batch"):
        store.append("problems", problems)
        return _BatchRun(cfg, batch, store, problems).run()
