"""Collection through the Batch API (``subq collect --mode batch``) against the test teacher's
batch endpoints (``tests.batch_routes``): the same rows as online at half the price, and no
request line submitted twice across kills, exceptions, expired and cancelled jobs.

Counters of the server are never reset within a test: they count the whole scenario.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from subq.actors.batch_collect import BatchConfig, run_batch_collect
from subq.actors.batch_jobs import BatchJobs, BatchLimits, split
from subq.actors.batch_requests import CHAT_URL, build_requests
from subq.actors.collect import CollectConfig, run_collect, stage_settings
from subq.actors.collect_plan import plan_work
from subq.actors.prices import BATCH_PRICE_FACTOR, PriceTable
from subq.actors.teacher import TeacherConfig
from subq.data_store.datasets import load_problems
from subq.data_store.store import Store

from tests.batch_routes import BatchPlan
from tests.processes import kill_tree
from tests.teacher_server import FaultPlan, TeacherServer
from tests.test_collect import (
    MODEL,
    PROBLEMS,
    ROOT,
    assert_unique_and_complete,
    config,
    half_correct,
    wait_for_lapse,
)

N = 12  # 6 problems x 2 samples (tests.test_collect.config)
FAST = BatchConfig(wait=True, poll_interval_s=0.05)
# the columns a batch row must share with the online row of the same key
SAME = ("sample_key", "problem_id", "attempt", "fingerprint", "settings", "status", "subquestions", "subanswers",
        "final_answer", "final_value", "correct", "usefulness", *[f"{s}_{c}" for s in ("decompose", "answer", "feedback")
                                                                  for c in ("status", "error", "raw", "tokens_in",
                                                                            "tokens_out", "calls", "finish_reason")])


def by_key(store: Path) -> dict[str, dict]:
    return {r["sample_key"]: r for r in Store(str(store)).read_rows("samples")}


def test_price_table_batch_tier_is_half_price():
    online, batch = PriceTable(), PriceTable().for_batch()
    assert BATCH_PRICE_FACTOR == 0.5 and batch.version.endswith("+batch")
    assert batch.cost("gpt-4o", 1000, 500, 200) == pytest.approx(0.5 * online.cost("gpt-4o", 1000, 500, 200))


def test_jsonl_lines_and_splitting(tmp_path):
    """Request lines are the OpenAI batch format; splitting respects both limits, keeps order."""
    teacher = TeacherConfig(base_url="http://127.0.0.1:9/v1", model=MODEL)  # nothing is sent
    problems = load_problems(PROBLEMS)
    ccfg = CollectConfig(problems=PROBLEMS, store=str(tmp_path), teacher=teacher, samples_per_problem=2,
                         feedback_samples=2)
    settings = stage_settings(ccfg, "r")
    plan = plan_work(Store(str(tmp_path)), problems, settings, 2)
    requests, passed = build_requests("decompose", plan.decompose, settings, teacher, PriceTable().for_batch())
    assert not passed and len(requests) == 6
    for r, item in zip(requests, plan.decompose, strict=True):
        line = json.loads(r.line())
        assert set(line) == {"custom_id", "method", "url", "body"}
        assert line["method"] == "POST" and line["url"] == CHAT_URL == "/v1/chat/completions"
        assert line["custom_id"] == f"{item['sample_keys'][0]}:decompose:0"
        assert line["body"]["model"] == MODEL and line["body"]["n"] == 2 and line["body"]["max_tokens"] == 256
        assert line["body"]["temperature"] == 0.7 and line["body"]["messages"][0]["role"] == "system"
    sizes = [len(r.line()) + 1 for r in requests]
    groups = split(requests, BatchLimits(max_requests=4, max_bytes=10**9))
    assert [len(g) for g in groups] == [4, 2] and [r for g in groups for r in g] == requests
    groups = split(requests, BatchLimits(max_requests=100, max_bytes=sizes[0] + sizes[1] + 1))
    assert all(sum(len(r.line()) + 1 for r in g) <= sizes[0] + sizes[1] + 1 for g in groups) and len(groups) >= 3
    with pytest.raises(ValueError, match="over the batch limit"):
        split(requests, BatchLimits(max_bytes=10))


def test_batch_rows_equal_online_rows_at_half_price(ray_session, tmp_path):
    """Same problems, same (deterministic) teacher and faults: every row is the online row,
    parse errors, api errors and truncations included; its $ is half; the same bodies were sent."""
    faults = FaultPlan(rate=0.3, kinds=("malformed", "400", "truncated"), seed=3,
                       persistent=("malformed", "400", "truncated"))
    with TeacherServer(answer_fn=half_correct(), model=MODEL, faults=faults) as srv:
        # a batch cannot ask again within its job: online rows without the longer ask (actors/stages.py)
        run_collect(config(srv, tmp_path / "online", truncated_max_tokens=0))
        online_stats = srv.stats()
    with TeacherServer(answer_fn=half_correct(), model=MODEL, faults=faults, batch=BatchPlan(delay_s=0.05)) as srv:
        report = run_batch_collect(config(srv, tmp_path / "batch"), FAST)
        stats = srv.stats()
    online, batch = by_key(tmp_path / "online"), by_key(tmp_path / "batch")
    assert set(online) == set(batch) and len(batch) == N
    statuses = Counter(r["status"] for r in batch.values())
    assert {"ok", "parse_error", "api_error", "truncated"} <= set(statuses), statuses
    for k, row in online.items():
        assert {c: batch[k][c] for c in SAME} == {c: row[c] for c in SAME}, k
        if row["cost_usd"] is not None:
            assert batch[k]["cost_usd"] == pytest.approx(BATCH_PRICE_FACTOR * row["cost_usd"], rel=1e-9)
    assert Store(str(tmp_path / "batch")).spent_usd() == pytest.approx(
        BATCH_PRICE_FACTOR * Store(str(tmp_path / "online")).spent_usd(), rel=1e-9)
    assert batch[next(iter(batch))]["price_table_version"].endswith("+batch")
    # the batch lines carried exactly the online request bodies, each once
    sent_online = set(online_stats["billed_by_content"])  # billed contents; 400s are not billed
    assert sent_online <= set(stats["batch_lines_by_content"])
    assert len(stats["batch_lines_by_content"]) == online_stats["requests"]  # the 400s too, once each
    assert max(stats["batch_lines"].values()) == 1 and stats["billed"] == online_stats["billed"]
    assert stats["requests"] == sum(stats["batch_lines_by_content"].values())  # no chat call outside batches
    assert report.complete and report.ingested_jobs == 3 and [j["stage"] for j in report.submitted] == [
        "decompose", "answer", "feedback"]


def _lines_submitted_once(stats: dict) -> None:
    assert max(stats["batch_lines"].values()) == 1, [k for k, n in stats["batch_lines"].items() if n > 1]
    assert max(stats["billed_by_content"].values()) == 1


def test_an_exception_after_create_adopts_the_batch_instead_of_submitting_again(tmp_path, monkeypatch):
    """The run dies between creating a batch and storing its id: the next run finds the batch by
    its metadata, so no request line is submitted twice."""
    save = BatchJobs._save
    died: list[str] = []

    def dies_once(self, job, **change):
        if "batch_id" in change and not died:
            died.append(change["batch_id"])
            raise RuntimeError("killed after batches.create")
        return save(self, job, **change)

    with TeacherServer(model=MODEL, batch=BatchPlan(delay_s=0.05)) as srv:
        monkeypatch.setattr(BatchJobs, "_save", dies_once)
        with pytest.raises(RuntimeError, match="killed after"):
            run_batch_collect(config(srv, tmp_path), FAST)
        jobs = Store(str(tmp_path)).read_rows("batch_jobs")
        assert len(jobs) == 1 and jobs[0]["batch_id"] is None and jobs[0]["status"] == "preparing"
        report = run_batch_collect(config(srv, tmp_path), FAST)
        stats = srv.stats()
    assert report.complete
    assert_unique_and_complete(tmp_path, N)
    assert [b["id"] for b in stats["batches"]][0] == died[0]  # adopted, not created again
    assert len(stats["batches"]) == 3
    _lines_submitted_once(stats)


def _batch_cmd(srv: TeacherServer, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "subq.cli", "collect", "--mode", "batch", "--teacher-base-url", srv.base_url,
            "--teacher-model", MODEL, "--problems", PROBLEMS, "--store", str(store), "--samples-per-problem", "2",
            "--feedback-samples", "2", "--no-progress", "--timeout", "5", *extra]


def test_kill_9_while_jobs_run_then_resume_submits_no_line_twice(tmp_path):
    """`subq collect --mode batch --wait` is killed (SIGKILL) while its job runs; the same command
    polls that job, stores its rows and finishes: no request line was submitted twice, no call
    billed twice, no row lost or duplicated. Without --wait a run returns after submitting and
    says what to run next; `subq store stats` lists the jobs."""
    # a short store lease: the re-run takes over the killed run's lease once it lapses
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SUBQ_LEASE_TTL_S": "6", "SUBQ_LEASE_RENEW_S": "1"}
    store = tmp_path / "store"
    with TeacherServer(model=MODEL, batch=BatchPlan(delay_s=0.1, slow_jobs=(0,), slow_s=12.0)) as srv:
        proc = subprocess.Popen(_batch_cmd(srv, store, "--wait", "--poll-interval", "0.1"), cwd=ROOT, env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not (store.exists() and any(j["batch_id"] for j in Store(str(store)).read_rows("batch_jobs"))):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no job was submitted"
            time.sleep(0.05)
        kill_tree(proc)  # SIGKILL
        assert len(srv.stats()["batches"]) == 1 and srv.stats()["batches"][0]["status"] != "completed"
        wait_for_lapse(store)  # liveness is the lease's heartbeat, not the dead driver's pid
        first = subprocess.run(_batch_cmd(srv, store), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr[-3000:]
        if "stored the results of" not in first.stdout:  # the job was still running: nothing submitted again
            assert "submitted" not in first.stdout and len(srv.stats()["batches"]) == 1, first.stdout
        assert "next: run the same command again later" in first.stdout, first.stdout
        stats_out = subprocess.run([sys.executable, "-m", "subq.cli", "store", "stats", "--store", str(store)],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout
        assert "batch jobs: " in stats_out and srv.stats()["batches"][0]["id"] in stats_out, stats_out
        done = subprocess.run(_batch_cmd(srv, store, "--wait", "--poll-interval", "0.1"), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        stats = srv.stats()
    assert_unique_and_complete(store, N)
    _lines_submitted_once(stats)
    assert stats["billed"] == 30  # 6 decompose + 12 answer + 12 feedback calls, each once
    assert all(b["status"] == "completed" for b in stats["batches"]) and len(stats["batches"]) == 3


def test_a_rerun_while_jobs_run_polls_them_and_submits_nothing(tmp_path):
    with TeacherServer(model=MODEL, batch=BatchPlan(delay_s=30.0)) as srv:
        first = run_batch_collect(config(srv, tmp_path), BatchConfig())
        again = run_batch_collect(config(srv, tmp_path), BatchConfig())
        stats = srv.stats()
    assert [j["requests"] for j in first.submitted] == [6] and not again.submitted
    assert [j["batch_id"] for j in again.live] == [first.submitted[0]["batch_id"]]
    assert len(stats["batches"]) == 1 and max(stats["batch_lines"].values()) == 1


def test_error_file_lines_are_retried_by_the_next_run(tmp_path):
    """A job's error file (500s on some lines' first arrival): those rows are stored as api_error
    exactly as online, and the next run retries them as new attempts, re-sending only them."""
    faults = FaultPlan(rate=0.3, kinds=("500",), seed=5)
    with TeacherServer(model=MODEL, faults=faults, batch=BatchPlan()) as srv:
        first = run_batch_collect(config(srv, tmp_path), FAST)
        failed = Counter(r["status"] for r in Store(str(tmp_path)).read_rows("samples"))["api_error"]
        assert failed > 0 and first.retryable == failed
        errors = [r for r in Store(str(tmp_path)).read_rows("samples") if r["status"] == "api_error"]
        assert all("InternalServerError: Error code: 500" in (r["decompose_error"] or r["answer_error"]
                                                               or r["feedback_error"]) for r in errors)
        srv.account.content_faults = False  # the retries' first calls (answers of new decompositions) succeed
        second = run_batch_collect(config(srv, tmp_path), FAST)
        stats = srv.stats()
    assert second.complete and second.retried == failed and not second.not_ok
    rows = assert_unique_and_complete(tmp_path, N)
    assert all(r["status"] == "ok" for r in rows)
    history = Store(str(tmp_path)).read_rows("samples", history=True)
    assert len(history) == N + failed
    twice = {k for k, n in stats["batch_lines_by_content"].items() if n > 1}
    assert twice and all(faults.kind_for(k) == "500" for k in twice)  # only failed lines were sent again
    assert max(stats["billed_by_content"].values()) == 1


def test_cancelled_and_expired_jobs_have_their_unanswered_requests_resubmitted(tmp_path):
    """The first job is cancelled and the second expires, each after answering half its lines:
    the answered half is stored, the rest goes into the next batch (the cancelled job's because
    resubmit_cancelled says so: tests.test_collect_batch_limits), and nothing is paid twice."""
    with TeacherServer(model=MODEL, batch=BatchPlan(cancel=(0,), expire=(1,))) as srv:
        report = run_batch_collect(config(srv, tmp_path), BatchConfig(wait=True, poll_interval_s=0.05,
                                                                      resubmit_cancelled=True))
        stats = srv.stats()
    statuses = [b["status"] for b in stats["batches"]]
    assert statuses[:2] == ["cancelled", "expired"] and set(statuses[2:]) == {"completed"}
    assert report.complete and report.unanswered == 3 + 2  # 6 -> 3 left; 3 -> 2 left (1 answered)
    rows = assert_unique_and_complete(tmp_path, N)
    assert all(r["status"] == "ok" and r["attempt"] == 0 for r in rows)  # not a failure: no new attempt
    resent = {c for c, n in stats["batch_lines"].items() if n > 1}
    assert len(resent) == 3 and all(":decompose:" in c for c in resent)
    assert max(stats["billed_by_content"].values()) == 1


def test_stages_are_split_at_the_request_limit(tmp_path):
    with TeacherServer(model=MODEL, batch=BatchPlan()) as srv:
        report = run_batch_collect(config(srv, tmp_path), BatchConfig(wait=True, poll_interval_s=0.05,
                                                                      max_requests_per_batch=4))
        stats = srv.stats()
    assert report.complete
    sizes = [b["request_counts"]["total"] for b in stats["batches"]]
    assert sizes == [4, 2, 4, 4, 4, 4, 4, 4] and sum(sizes) == 6 + 12 + 12
    _lines_submitted_once(stats)


def _run_batch_offline(srv: TeacherServer, requests: Path, results: Path) -> None:
    """What `vllm run-batch -i requests -o results` does: every line through the chat endpoint."""
    out = []
    with httpx.Client(base_url=srv.base_url.removesuffix("/v1")) as client:
        for raw in requests.read_text().splitlines():
            line = json.loads(raw)
            r = client.post(line["url"], json=line["body"])
            out.append({"id": "vllm-x", "custom_id": line["custom_id"],
                        "response": {"status_code": r.status_code, "request_id": "r", "body": r.json()}, "error": None})
    results.write_text("".join(json.dumps(o) + "\n" for o in out))


def test_export_requests_then_import_results(tmp_path):
    store, requests, results = tmp_path / "store", tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    with TeacherServer(model=MODEL, answer_fn=half_correct()) as srv:
        cfg = config(srv, store)
        cfg.teacher.base_url = "offline"  # nothing is uploaded: the endpoint is never called by subq
        exported = []
        for _ in range(3):  # decompose, answer, feedback
            exp = run_batch_collect(cfg, BatchConfig(export_requests=str(requests)))
            exported.append(exp.exported)
            assert len(requests.read_text().splitlines()) == exp.exported
            _run_batch_offline(srv, requests, results)
            imp = run_batch_collect(cfg, BatchConfig(import_results=str(results)))
            assert imp.imported == exp.exported and imp.unmatched == 0
        again = run_batch_collect(cfg, BatchConfig(import_results=str(results)))
        stats = srv.stats()
    assert exported == [6, 12, 12] and again.imported == 0 and again.unmatched == 12
    assert again.complete and all(r["status"] == "ok" for r in assert_unique_and_complete(store, N))
    assert stats["billed"] == 30 and not stats["batches"]  # no batch was created on the server
    assert Store(str(store)).spent_usd() == pytest.approx(
        (stats["prompt_tokens"] * 1.0 + stats["completion_tokens"] * 2.0) / 1e6 * BATCH_PRICE_FACTOR, rel=1e-9)


def test_bad_results_file_is_a_clear_error_and_stores_nothing(tmp_path):
    bad = tmp_path / "results.jsonl"
    bad.write_text('{"custom_id": "x", "response": null}\nnot json\n')
    with TeacherServer(model=MODEL) as srv:
        cfg = config(srv, tmp_path / "store")
        with pytest.raises(ValueError, match="line 2 is not JSON"):
            run_batch_collect(cfg, BatchConfig(import_results=str(bad)))
    assert Store(str(tmp_path / "store")).count("samples") == 0


def test_budget_reserves_worst_cases_at_batch_prices(tmp_path):
    """A budget that holds 4 decompose requests' worst cases at batch prices (2 at online prices):
    4 are submitted, 2 wait; a larger budget later submits the rest; spend never passes it."""
    expensive = PriceTable().with_price(MODEL, 2000.0, 2000.0)
    with TeacherServer(model=MODEL, batch=BatchPlan()) as srv:
        cfg = config(srv, tmp_path, prices=expensive)
        settings = stage_settings(cfg, "r")
        plan = plan_work(Store(str(tmp_path)), load_problems(PROBLEMS), settings, 2)
        worst = [r.worst_usd for r in build_requests("decompose", plan.decompose, settings, cfg.teacher,
                                                     expensive.for_batch())[0]]
        online_worst = [r.worst_usd for r in build_requests("decompose", plan.decompose, settings, cfg.teacher,
                                                            expensive)[0]]
        assert online_worst[0] == pytest.approx(2 * worst[0])
        budget = sum(worst[:4]) * 1.001
        assert sum(online_worst[:3]) > budget  # at online prices at most 2 would fit
        first = run_batch_collect(config(srv, tmp_path, prices=expensive, budget_usd=budget),
                                  BatchConfig())  # submit only
        assert [j["requests"] for j in first.submitted] == [4] and first.budget_left_out == 2
        assert first.stopped == "budget"
        done = run_batch_collect(config(srv, tmp_path, prices=expensive, budget_usd=1000.0), FAST)
        stats = srv.stats()
    assert done.complete and Store(str(tmp_path)).spent_usd() <= 1000.0
    _lines_submitted_once(stats)


def test_an_endpoint_without_the_batch_api_is_a_clear_error_and_frees_the_requests(tmp_path):
    from fastapi import FastAPI

    from tests.teacher_server import ThreadedServer

    class NoBatchApi(ThreadedServer):
        def __init__(self) -> None:
            self._bind(FastAPI())

    with NoBatchApi() as srv:
        cfg = config(srv, tmp_path)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="refused the batch job.*NotFoundError.*--export-requests"):
            run_batch_collect(cfg, BatchConfig())
    jobs = Store(str(tmp_path)).read_rows("batch_jobs")
    assert len(jobs) == 1 and jobs[0]["status"] == "failed" and jobs[0]["ingested"]
    cfg.teacher.base_url = "offline"
    exported = run_batch_collect(cfg, BatchConfig(export_requests=str(tmp_path / "r.jsonl")))
    assert exported.exported == 6  # the refused job holds no keys


def test_cli_batch_mode_errors_and_export(tmp_path, capsys):
    from subq.cli import main

    store, out = tmp_path / "store", tmp_path / "requests.jsonl"
    base = ["collect", "--problems", PROBLEMS, "--store", str(store), "--samples-per-problem", "2", "--no-progress"]
    assert main([*base, "--mode", "batch", "--teacher-model", MODEL]) == 2
    assert "needs --teacher-base-url" in capsys.readouterr().err
    assert main([*base, "--wait"]) == 2
    assert "need --mode batch" in capsys.readouterr().err
    assert main([*base, "--mode", "batch", "--teacher-model", MODEL, "--export-requests", str(out),
                 "--import-results", str(out)]) == 2
    assert "one per run" in capsys.readouterr().err
    assert main([*base, "--mode", "batch", "--teacher-model", MODEL, "--export-requests", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 6 requests" in printed and f"vllm run-batch -i {out} -o results.jsonl" in printed, printed
    assert len(out.read_text().splitlines()) == 6 and not Store(str(store)).read_rows("batch_jobs")
