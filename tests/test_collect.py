"""Collection against the fault-injecting test teacher: exact counts, no loss, no duplicates,
no teacher call paid twice, resume after a budget stop, an actor kill and a driver kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from subq.actors.collect import CollectConfig, run_collect
from subq.actors.prices import PriceTable
from subq.actors.teacher import TeacherConfig
from subq.data_store.datasets import load_problems
from subq.data_store.store import Store

from tests.processes import kill_tree
from tests.teacher_server import MALFORMED_TEXT, FaultPlan, TeacherServer

ROOT = Path(__file__).resolve().parents[1]
MODEL = "test-teacher"
PROBLEMS = "gsm8k:train[:6]"


def gold_answers(spec: str = PROBLEMS) -> dict[str, float]:
    return {p["question"]: p["answer_value"] for p in load_problems(spec)}


def half_correct(spec: str = PROBLEMS):
    """The teacher is right on every other problem, so `correct` has both values."""
    gold = gold_answers(spec)
    order = {q: i for i, q in enumerate(gold)}
    return lambda problem: gold[problem] if order[problem] % 2 == 0 else gold[problem] + 1


def config(srv: TeacherServer, store: Path, **kw) -> CollectConfig:
    teacher = TeacherConfig(base_url=srv.base_url, model=MODEL, timeout_s=1.0, max_attempts=4,
                            backoff_initial_s=0.02, backoff_max_s=0.1)
    base = dict(problems=PROBLEMS, store=str(store), teacher=teacher, samples_per_problem=2,
                feedback_samples=2, batch_size=2, max_actors=2, progress=False,
                prices=PriceTable().with_price(MODEL, 1.0, 2.0))
    return CollectConfig(**{**base, **kw})


def assert_unique_and_complete(store: Path, n: int) -> list[dict]:
    rows = Store(str(store)).read_rows("samples")
    keys = Counter(r["sample_key"] for r in rows)
    assert len(rows) == n, f"expected {n} samples, found {len(rows)}"
    assert max(keys.values()) == 1, "duplicate sample keys"
    return rows


def test_collect_stores_every_stage_and_prices_it(ray_session, tmp_path):
    with TeacherServer(answer_fn=half_correct(), model=MODEL) as srv:
        report = run_collect(config(srv, tmp_path))
        stats = srv.stats()
    rows = assert_unique_and_complete(tmp_path, 12)
    assert report.complete and report.samples_total == 12
    # 6 decompose calls (n=2 each), one answer and one feedback call (n=2) per sample
    assert stats["by_stage"] == {"decompose": 6, "answer": 12, "feedback": 12, "unknown": 0, "student": 0}
    assert stats["billed"] == 30 and max(stats["billed_by_content"].values()) == 1
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert 1 <= len(r["subquestions"]) == len(r["subanswers"]) == len(r["usefulness"])
        assert all(u in (0.0, 0.5, 1.0) for u in r["usefulness"])
        assert len(r["feedback_raw"]) == 2
    gold = gold_answers()
    order = {q: i for i, q in enumerate(gold)}
    assert all(r["correct"] == (order[r["question"]] % 2 == 0) for r in rows)
    # $ per row adds up to the server's token counts at $1 / $2 per million (calls split evenly,
    # so token shares are rounded; the $ is not)
    expected = (stats["prompt_tokens"] * 1.0 + stats["completion_tokens"] * 2.0) / 1e6
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(expected, rel=1e-9)
    assert report.cost_usd == pytest.approx(expected, rel=1e-9)


def test_rerun_sends_no_call(ray_session, tmp_path):
    with TeacherServer(model=MODEL) as srv:
        run_collect(config(srv, tmp_path))
        before = srv.stats()["requests"]
        report = run_collect(config(srv, tmp_path))
        assert srv.stats()["requests"] == before
    assert report.complete and all(s.todo == 0 for s in report.stages.values())
    assert_unique_and_complete(tmp_path, 12)


@pytest.mark.parametrize("kinds", [("429", "500", "hang", "disconnect"), ("malformed", "400")],
                         ids=["transient", "persistent"])
def test_faults_are_retried_or_recorded_never_lost(ray_session, tmp_path, kinds):
    faults = FaultPlan(rate=0.5, kinds=kinds, seed=3, retry_after_s=0.05, hang_s=3.0)
    with TeacherServer(faults=faults, model=MODEL) as srv:
        run_collect(config(srv, tmp_path))
        stats = srv.stats()
        requests = stats["requests"]
        run_collect(config(srv, tmp_path, retry_failed=False))  # everything is stored: nothing is re-sent
        assert srv.stats()["requests"] == requests
    rows = assert_unique_and_complete(tmp_path, 12)
    outcomes = stats["by_outcome"]
    assert min(outcomes[k] for k in kinds) > 0, outcomes  # every fault kind was exercised
    assert max(stats["billed_by_content"].values()) == 1  # no successful call was repeated
    status = Counter(r["status"] for r in rows)
    if "400" not in kinds:  # transient faults all recover through the retries
        assert status == {"ok": 12}
        return
    assert status["ok"] > 0 and status["parse_error"] > 0 and status["api_error"] > 0
    failed_calls = 0
    for stage in ("decompose", "answer", "feedback"):
        api = [r for r in rows if r[f"{stage}_status"] == "api_error"]
        assert all("BadRequestError" in r[f"{stage}_error"] for r in api)
        failed_calls += len({r["problem_id"] for r in api}) if stage == "decompose" else len(api)
        for r in rows:
            if r[f"{stage}_status"] == "parse_error" and stage != "feedback":
                assert r[f"{stage}_raw"] == MALFORMED_TEXT  # raw text kept for inspection
            if r[f"{stage}_status"] in ("parse_error", "api_error"):
                later = ("decompose", "answer", "feedback")[("decompose", "answer", "feedback").index(stage) + 1:]
                assert all(r[f"{s}_status"] == "skipped" for s in later)
    assert failed_calls == outcomes["400"]  # each 400 was sent once, not retried


def test_budget_stop_then_resume_pays_each_call_once(ray_session, tmp_path):
    with TeacherServer(model=MODEL, latency_s=0.05) as srv:
        expensive = PriceTable().with_price(MODEL, 2000.0, 2000.0)  # ~$0.1-0.5 per call, ~$2.5 worst case
        first = run_collect(config(srv, tmp_path, budget_usd=10.0, prices=expensive, max_actors=1))
        assert not first.complete and first.stopped == "budget"
        assert Store(str(tmp_path)).count("journal_decompose") + first.samples_total > 0
        billed = srv.stats()
        assert (billed["prompt_tokens"] + billed["completion_tokens"]) * 2000.0 / 1e6 <= 10.0
        second = run_collect(config(srv, tmp_path, prices=expensive))
        stats = srv.stats()
    assert second.complete
    assert_unique_and_complete(tmp_path, 12)
    assert stats["billed"] == 30 and max(stats["billed_by_content"].values()) == 1


def _map_worker_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "MapWorker" in cmd and "StageWorker" in cmd:
            pids.append(p.info["pid"])
    return pids


def test_killed_actor_is_restarted_and_nothing_is_lost(ray_session, tmp_path):
    killed: list[int] = []

    def kill_one_worker_when_busy() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if Store(str(tmp_path)).count("journal_decompose") >= 2 and (pids := _map_worker_pids()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.1)

    with TeacherServer(model=MODEL, latency_s=0.3) as srv:
        killer = threading.Thread(target=kill_one_worker_when_busy, daemon=True)
        killer.start()
        report = run_collect(config(srv, tmp_path, problems="gsm8k:train[:8]", max_actors=1))
        killer.join()
    assert killed, "no collection actor was found to kill"
    assert report.complete
    assert_unique_and_complete(tmp_path, 16)


def _store_keys(store: Path) -> dict[str, set[str]]:
    s = Store(str(store))
    return {t: s.keys(t) for t in ("journal_decompose", "journal_answer", "samples")}


def _collect_cmd(srv: TeacherServer, store: Path, problems: str, timeout_s: float = 5.0) -> list[str]:
    return [sys.executable, "-m", "subq.cli", "collect", "--teacher-base-url", srv.base_url,
            "--teacher-model", MODEL, "--problems", problems, "--store", str(store),
            "--samples-per-problem", "2", "--feedback-samples", "2", "--batch-size", "2",
            "--max-actors", "1", "--no-progress", "--timeout", str(timeout_s)]


def wait_for_lapse(root: Path, timeout_s: float = 120.0) -> None:
    """Until the store's lease (of a killed run) has lapsed."""
    from subq.data_store.lease import LEASE_NAME, LeaseInfo

    deadline = time.monotonic() + timeout_s
    while (root / LEASE_NAME).exists():
        info = LeaseInfo.parse((root / LEASE_NAME).read_bytes())
        if info is None or info.expires_at < time.time():
            return
        assert time.monotonic() < deadline, "the killed run's lease never lapsed"
        time.sleep(0.1)


def test_killed_driver_resumes_without_paying_twice(tmp_path):
    """SIGKILL `subq collect` and its local Ray mid-run (a crashed machine), then run it again.

    Some calls are slow (4 s on their first arrival), so they hold their batches while the other
    calls of those batches have finished and been paid. The kill comes when only slow calls are
    in flight. Every billed call is counted across both runs: only the calls in flight at the
    kill may be paid twice (their answers never reached the client).
    """
    problems, n_problems = "gsm8k:train[:8]", 8
    faults = FaultPlan(rate=0.25, kinds=("slow",), seed=1, slow_s=4.0)
    # a short store lease: the re-run takes over the killed run's lease once it lapses
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SUBQ_LEASE_TTL_S": "6", "SUBQ_LEASE_RENEW_S": "1"}
    with TeacherServer(model=MODEL, latency_s=0.1, faults=faults) as srv:
        proc = subprocess.Popen(_collect_cmd(srv, tmp_path, problems, timeout_s=8.0), cwd=ROOT, env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        quiet_since, last_requests = time.monotonic(), -1
        while True:  # wait until only slow calls are in flight, and nothing else has moved for 0.5 s
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "collection made no progress"
            st = srv.stats()
            if st["requests"] != last_requests:
                quiet_since, last_requests = time.monotonic(), st["requests"]
            flying = set(st["in_flight_keys"])
            if flying and all(faults.kind_for(k) == "slow" for k in flying) and st["billed"] > 0 \
                    and time.monotonic() - quiet_since > 0.5:
                break
            time.sleep(0.05)
        kill_tree(proc)
        in_flight_at_kill = set(srv.stats()["in_flight_keys"])
        at_kill = _store_keys(tmp_path)
        total = 2 * n_problems
        assert len(at_kill["samples"]) < total, "the run finished before it was killed"
        wait_for_lapse(tmp_path)  # liveness is the lease's heartbeat, not the dead driver's pid
        done = subprocess.run(_collect_cmd(srv, tmp_path, problems, timeout_s=8.0), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        time.sleep(faults.slow_s)  # the killed run's slow calls finish on the server (and are billed)
        stats = srv.stats()
    assert_unique_and_complete(tmp_path, total)
    paid_twice = {k for k, n in stats["billed_by_content"].items() if n > 1}
    assert paid_twice <= in_flight_at_kill, f"{len(paid_twice - in_flight_at_kill)} finished calls paid twice"
    assert max(stats["billed_by_content"].values()) <= 2


def test_api_key_never_reaches_the_store(ray_session, tmp_path, monkeypatch):
    """The key is sent to the teacher, but no stored byte (errors included) contains it."""
    key = "sk-test-DO-NOT-STORE-0123456789abcdef"
    monkeypatch.setenv("SUBQ_TEST_KEY", key)
    faults = FaultPlan(rate=0.5, kinds=("400", "malformed"), seed=3)
    with TeacherServer(faults=faults, model=MODEL) as srv:
        cfg = config(srv, tmp_path)
        cfg.teacher.api_key_env = "SUBQ_TEST_KEY"
        run_collect(cfg)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and Store(str(tmp_path)).count("samples") == 12
    assert not [p for p in files if key.encode() in p.read_bytes()]
