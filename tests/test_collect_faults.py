"""Collection under the faults of a real API (issue 9), end to end against the test teacher.

Every test counts what the server saw (requests, billed calls, tokens) across the whole scenario,
re-runs included: the counters are never reset between runs.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from subq.actors.collect import run_collect
from subq.actors.prices import PriceTable
from subq.data_store.store import Store

from tests.teacher_server import AccountFaults, FaultPlan, TeacherServer
from tests.test_collect import MODEL, ROOT, _collect_cmd, assert_unique_and_complete, config

N_SAMPLES = 12  # 6 problems x 2 samples (tests.test_collect.config)
RETRYABLE = {"api_error", "partial", "truncated"}


def statuses(store: Path) -> Counter:
    return Counter(r["status"] for r in Store(str(store)).read_rows("samples"))


def billed_usd(stats: dict, usd_in: float, usd_out: float) -> float:
    """What the server billed, at the client's price per million tokens."""
    return (stats["prompt_tokens"] * usd_in + stats["completion_tokens"] * usd_out) / 1e6


def test_failed_rows_are_retried_by_the_next_run(ray_session, tmp_path):
    """400s on the first arrival of some contents: rows fail, the re-run retries only those."""
    faults = FaultPlan(rate=0.3, kinds=("400",), seed=5, persistent=())
    with TeacherServer(faults=faults, model=MODEL) as srv:
        run_collect(config(srv, tmp_path))
        first = statuses(tmp_path)
        assert first["api_error"] > 0, first
        requests = srv.stats()["requests"]
        srv.account.content_faults = False  # the retries' new calls (answers of new decompositions) succeed
        report = run_collect(config(srv, tmp_path))
        stats = srv.stats()
    assert statuses(tmp_path) == {"ok": N_SAMPLES}  # one row per key, the new attempts
    assert stats["requests"] > requests
    assert max(stats["billed_by_content"].values()) == 1  # a retry re-sends only what failed
    assert report.complete and report.not_ok == {}
    history = Store(str(tmp_path)).read_rows("samples", history=True)
    assert len(history) == N_SAMPLES + first["api_error"]  # the failed attempts stay inspectable
    old = [r for r in history if r["status"] == "api_error"]
    assert old and all(r["attempt"] == 0 for r in old)
    assert {r["attempt"] for r in Store(str(tmp_path)).read_rows("samples") if r["sample_key"] in
            {o["sample_key"] for o in old}} == {1}


def test_cli_reports_failed_rows_exits_nonzero_and_no_retry_failed_sends_nothing(ray_session, tmp_path, capsys):
    from subq.cli import main

    faults = FaultPlan(rate=0.3, kinds=("400",), seed=5)  # persistent: every re-run fails again
    store = tmp_path / "store"
    with TeacherServer(faults=faults, model=MODEL) as srv:
        args = _collect_cmd(srv, store, "gsm8k:train[:6]")[3:]
        assert main(args) == 1  # rows remain failed
        last = capsys.readouterr().out.strip().splitlines()[-1]
        failed = statuses(store)["api_error"]
        assert f"{failed} not ok" in last and "api_error" in last, last
        requests = srv.stats()["requests"]
        assert main([*args, "--no-retry-failed"]) == 1
        assert srv.stats()["requests"] == requests  # nothing retried, nothing sent
        assert main(args) == 1  # retried (the 400s are persistent, so they fail again)
        assert srv.stats()["requests"] > requests
    capsys.readouterr()
    assert main(["store", "stats", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"api_error={failed}" in out and "BadRequestError" in out, out


def test_insufficient_quota_stops_the_run_at_once(ray_session, tmp_path):
    from subq.actors.teacher import TeacherFatalError

    with TeacherServer(model=MODEL, latency_s=0.05, account=AccountFaults(quota_after_billed=6)) as srv:
        with pytest.raises(TeacherFatalError, match="insufficient_quota"):
            run_collect(config(srv, tmp_path))
        stats = srv.stats()
        # only the calls already in flight when the quota ran out (<= 16 here) met the 429:
        # no call was retried, no new call started
        assert 1 <= stats["by_outcome"]["quota"] <= 16, stats["by_outcome"]
        assert not {"api_error"} & set(statuses(tmp_path))  # nothing stored as a final failure
        srv.account.quota_after_billed = None  # the user adds credit and runs the same command
        report = run_collect(config(srv, tmp_path))
        stats = srv.stats()
    assert report.complete and statuses(tmp_path) == {"ok": N_SAMPLES}
    assert max(stats["billed_by_content"].values()) == 1


def test_a_sustained_outage_is_waited_out_by_the_whole_pool(ray_session, tmp_path):
    """A 4 s outage (503) with per-call retries of at most 0.1 s: the breaker waits it out."""
    with TeacherServer(model=MODEL, latency_s=0.05,
                       account=AccountFaults(outage_after_requests=8, outage_s=4.0)) as srv:
        report = run_collect(config(srv, tmp_path))
        stats = srv.stats()
    assert report.complete and statuses(tmp_path) == {"ok": N_SAMPLES}
    # the pool backed off as a whole: a few probes, not every call retrying on its own
    assert stats["by_outcome"]["outage"] <= 40, stats["by_outcome"]


def test_a_429_outage_without_retry_after_is_waited_out_too(ray_session, tmp_path):
    with TeacherServer(model=MODEL, account=AccountFaults(outage_after_requests=4, outage_s=3.0,
                                                          outage_status=429)) as srv:
        report = run_collect(config(srv, tmp_path))
    assert report.complete and statuses(tmp_path) == {"ok": N_SAMPLES}


def test_outage_longer_than_the_patience_stops_without_burning_rows(ray_session, tmp_path):
    with TeacherServer(model=MODEL, account=AccountFaults(outage_after_requests=4, outage_s=60.0)) as srv:
        start = time.monotonic()
        report = run_collect(config(srv, tmp_path, patience_s=3.0))
        assert time.monotonic() - start < 40
    assert not report.complete and report.stopped == "outage"
    assert not {"api_error"} & set(statuses(tmp_path))


def test_unsupported_parameters_are_learned_once_per_model(ray_session, tmp_path):
    with TeacherServer(model=MODEL, account=AccountFaults(reject_params=("max_tokens", "temperature"))) as srv:
        report = run_collect(config(srv, tmp_path, max_actors=1))
        stats = srv.stats()
    assert report.complete and statuses(tmp_path) == {"ok": N_SAMPLES}
    # each of the 3 stage actors learns both parameters once
    assert stats["by_outcome"]["unsupported"] <= 6, stats["by_outcome"]


def test_reasoning_models_get_max_completion_tokens_and_no_temperature(ray_session, tmp_path):
    model = "o4-mini-2025-04-16"
    with TeacherServer(model=model, account=AccountFaults(reject_params=("max_tokens", "temperature"))) as srv:
        cfg = config(srv, tmp_path, prices=PriceTable())
        cfg.teacher.model = model
        report = run_collect(cfg)
        stats = srv.stats()
    assert report.complete and stats["by_outcome"]["unsupported"] == 0  # known from the table
    rows = Store(str(tmp_path)).read_rows("samples")
    assert all(r["cost_usd"] is not None and r["cost_usd"] > 0 for r in rows)  # the dated snapshot is priced


def test_output_cut_at_the_token_limit_is_asked_again_longer_in_the_same_run(ray_session, tmp_path):
    """Each faulted content is cut on its first arrival only: the same run asks again with 4x the
    limit (recorded in the row), so nothing stays truncated and a re-run has nothing to do."""
    faults = FaultPlan(rate=0.4, kinds=("truncated",), seed=2)
    with TeacherServer(faults=faults, model=MODEL) as srv:
        report = run_collect(config(srv, tmp_path))
        assert srv.stats()["by_outcome"]["truncated"] > 0
        rows = Store(str(tmp_path)).read_rows("samples")
        longer = [r for r in rows if 4 * 256 in {r["decompose_max_tokens"], r["answer_max_tokens"]}]
        assert longer and all(r["decompose_finish_reason"] == r["answer_finish_reason"] == "stop" for r in rows)
        assert statuses(tmp_path) == {"ok": N_SAMPLES} and report.truncated == 0
        billed = srv.stats()["billed"]
        run_collect(config(srv, tmp_path))
        assert srv.stats()["billed"] == billed


def test_a_response_without_usage_is_priced_unknown(ray_session, tmp_path):
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=("no_usage",)), model=MODEL) as srv:
        report = run_collect(config(srv, tmp_path))
    rows = Store(str(tmp_path)).read_rows("samples")
    assert rows and all(r["cost_usd"] is None for r in rows)
    assert report.cost_usd is None


def test_incomplete_feedback_is_not_stored_as_ok_and_its_paid_judgements_are_kept(ray_session, tmp_path):
    """Fewer judgements than asked and every follow-up fails: partial, not ok. The next run asks
    only for the missing judgements: the paid one is kept, never bought again.

    Every follow-up failing with nothing else left to succeed looks like an outage from the
    client (one call failing alone does not: tests/test_teacher_client.py): a short patience."""
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=("few_choices",)), model=MODEL) as srv:
        run_collect(config(srv, tmp_path, samples_per_problem=1, patience_s=3.0))
        rows = Store(str(tmp_path)).read_rows("samples")
        assert rows and all(r["status"] != "ok" for r in rows)
        partial = [r for r in rows if r["answer_status"] == "ok"]
        assert partial and {r["feedback_status"] for r in partial} == {"partial"}
        assert all(len(r["feedback_raw"]) == 1 for r in partial)
        srv.account.content_faults = False  # the endpoint behaves again
        run_collect(config(srv, tmp_path, samples_per_problem=1))
        stats = srv.stats()
    rows = Store(str(tmp_path)).read_rows("samples")
    assert {r["status"] for r in rows} == {"ok"} and all(len(r["feedback_raw"]) == 2 for r in rows)
    kept = {r["sample_key"]: r["feedback_raw"][0] for r in partial}
    assert all(r["feedback_raw"][0] == kept[r["sample_key"]] for r in rows if r["sample_key"] in kept)
    assert max(stats["billed_by_content"].values()) == 1  # no content was paid twice


def test_the_budget_is_a_cap_with_many_calls_in_flight_and_counts_stored_spend(ray_session, tmp_path):
    usd_in = usd_out = 2000.0  # ~$0.2-0.5 per call: the budget covers about 10 calls
    prices = PriceTable().with_price(MODEL, usd_in, usd_out)
    budget = 4.0
    with TeacherServer(model=MODEL, latency_s=0.3) as srv:
        first = run_collect(config(srv, tmp_path, prices=prices, budget_usd=budget, batch_size=4))
        spent = billed_usd(srv.stats(), usd_in, usd_out)
        assert 0 < spent <= budget + 1e-9, f"spent ${spent:.2f} of a ${budget} budget"
        assert not first.complete and first.stopped == "budget"
        requests = srv.stats()["requests"]
        second = run_collect(config(srv, tmp_path, prices=prices, budget_usd=budget, batch_size=4))
        assert billed_usd(srv.stats(), usd_in, usd_out) <= budget + 1e-9  # the stored spend counts
        assert srv.stats()["requests"] - requests <= 2  # at most what the budget's remainder allows
        assert not second.complete
        per_run = run_collect(config(srv, tmp_path, prices=prices, budget_usd=budget, batch_size=4,
                                     budget_per_run=True))
        total = billed_usd(srv.stats(), usd_in, usd_out)
    assert billed_usd_stored(tmp_path) == pytest.approx(total, rel=1e-6)
    assert per_run.cost_usd is not None and 0 < per_run.cost_usd <= budget + 1e-9


def billed_usd_stored(store: Path) -> float:
    return Store(str(store)).spent_usd()


def test_a_second_writer_is_refused_and_no_key_is_duplicated(ray_session, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with TeacherServer(model=MODEL, latency_s=0.3) as srv:
        first = subprocess.Popen(_collect_cmd(srv, tmp_path, "gsm8k:train[:6]"), cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while Store(str(tmp_path)).count("journal_decompose") < 1:
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.1)
        with pytest.raises(Exception, match=r"(?i)being written by pid \d+"):
            run_collect(config(srv, tmp_path))
        assert first.wait(timeout=180) == 0, first.stderr.read()[-2000:]
    assert_unique_and_complete(tmp_path, N_SAMPLES)


def test_changed_settings_start_new_keys_and_never_mix(ray_session, tmp_path):
    with TeacherServer(model=MODEL) as srv:
        run_collect(config(srv, tmp_path))
        before = {r["sample_key"]: r for r in Store(str(tmp_path)).read_rows("samples")}
        requests = srv.stats()["requests"]
        report = run_collect(config(srv, tmp_path, decompose_temperature=0.3, max_subquestions=2))
        assert srv.stats()["requests"] > requests
    rows = Store(str(tmp_path)).read_rows("samples")
    assert report.complete and len(rows) == 2 * N_SAMPLES
    new = [r for r in rows if r["sample_key"] not in before]
    assert len(new) == N_SAMPLES and all(len(r["subquestions"]) <= 2 for r in new)
    assert len({r["fingerprint"] for r in rows}) == 2
    for r in rows:
        if r["sample_key"] in before:
            assert r["subquestions"] == before[r["sample_key"]]["subquestions"]


def test_part_files_are_compacted_at_the_end_and_on_demand(ray_session, tmp_path, capsys):
    from subq.cli import main

    with TeacherServer(model=MODEL) as srv:
        run_collect(config(srv, tmp_path, problems="gsm8k:train[:8]", batch_size=1))
    store = Store(str(tmp_path))
    rows = sorted(store.read_rows("samples"), key=lambda r: r["sample_key"])
    assert len(rows) == 16 and len(store.part_files("samples")) <= 2
    assert main(["store", "compact", "--store", str(tmp_path)]) == 0
    assert "samples" in capsys.readouterr().out
    assert len(store.part_files("samples")) == 1
    assert sorted(Store(str(tmp_path)).read_rows("samples"), key=lambda r: r["sample_key"]) == rows
