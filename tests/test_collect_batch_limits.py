"""The Batch API at an account's real limits, against the test teacher's batch endpoints
(``tests.batch_routes``): batches the API fails as a whole, the model's enqueued-token limit,
uploads refused for other reasons, cancelled jobs, and the API's own validation of a batch file.

Counters of the server are never reset within a test: they count the whole scenario.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter

import openai
import pytest
from subq.actors.batch_collect import BatchConfig, run_batch_collect
from subq.actors.batch_jobs import BatchLimits
from subq.actors.batch_requests import build_requests
from subq.actors.collect import stage_settings
from subq.actors.collect_plan import plan_work
from subq.actors.prices import PriceTable
from subq.data_store.datasets import load_problems
from subq.data_store.store import Store

from tests.batch_routes import BatchPlan
from tests.teacher_server import TeacherServer
from tests.test_collect import MODEL, PROBLEMS, assert_unique_and_complete, config

N = 12  # 6 problems x 2 samples
FAST = BatchConfig(wait=True, poll_interval_s=0.05)


def _decompose_sizes(stats: dict) -> list[tuple[str, int]]:
    """(status, lines) of every decompose batch, in creation order."""
    return [(b["status"], b["request_counts"]["total"]) for b in stats["batches"]
            if (b["metadata"] or {}).get("stage") == "decompose"]


def test_a_batch_the_api_fails_as_a_whole_goes_again_smaller_with_the_apis_reason(tmp_path):
    """The first job fails at validation: the next run reports why and submits its requests in jobs
    of half its size, not the same upload again; nothing is billed twice and every row is stored."""
    plan = BatchPlan(fail=(0,), fail_message="Enqueued token limit reached for test-teacher (injected).")
    with TeacherServer(model=MODEL, batch=plan) as srv:
        first = run_batch_collect(config(srv, tmp_path), BatchConfig())  # submit only
        time.sleep(0.2)  # the job fails at validation right away
        second = run_batch_collect(config(srv, tmp_path), BatchConfig())
        done = run_batch_collect(config(srv, tmp_path), FAST)
        stats = srv.stats()
    assert [j["requests"] for j in first.submitted] == [6]
    assert _decompose_sizes(stats) == [("failed", 6), ("completed", 3), ("completed", 3)]  # not the same upload
    assert sorted(j["requests"] for j in second.submitted) == [3, 3]
    assert len(second.failed_jobs) == 1 and "Enqueued token limit reached" in second.failed_jobs[0]
    assert "(6 requests)" in second.failed_jobs[0]
    assert done.complete and all(r["status"] == "ok" for r in assert_unique_and_complete(tmp_path, N))
    sent = Counter(stats["batch_lines"].values())
    assert sent == {2: 6, 1: 24}  # the failed job's 6 lines twice, every other line once
    assert max(stats["billed_by_content"].values()) == 1  # a failed batch bills nothing


def test_a_one_request_job_that_failed_waits_before_it_goes_again(tmp_path):
    plan = BatchPlan(fail=(0,))
    one = BatchConfig(wait=True, poll_interval_s=0.05, max_requests_per_batch=1)
    with TeacherServer(model=MODEL, batch=plan) as srv:
        first = run_batch_collect(config(srv, tmp_path, samples_per_problem=1), one)
        held = run_batch_collect(config(srv, tmp_path, samples_per_problem=1), one)
        later = run_batch_collect(config(srv, tmp_path, samples_per_problem=1),
                                  BatchConfig(wait=True, poll_interval_s=0.05, max_requests_per_batch=1,
                                              failed_retry_after_s=0.0))
        stats = srv.stats()
    assert len(first.failed_jobs) == 1 and not first.complete and first.held_failed == 1
    assert held.held_failed == 1 and not held.submitted  # within failed_retry_after_s: not sent again
    assert later.complete and later.held_failed == 0
    assert Counter(stats["batch_lines"].values()) == {2: 1, 1: 6 + 6 + 6 - 1}
    assert max(stats["billed_by_content"].values()) == 1


def _decompose_tokens(tmp_path, cfg) -> list[int]:
    settings = stage_settings(cfg, "r")
    plan = plan_work(Store(str(tmp_path / "probe")), load_problems(PROBLEMS), settings, 2)
    return [r.tokens for r in build_requests("decompose", plan.decompose, settings, cfg.teacher,
                                             PriceTable().for_batch())[0]]


def test_jobs_are_sized_and_submitted_within_the_enqueued_token_limit(tmp_path):
    """With the account's queue limit given, subq never submits more than the model's queue holds:
    no batch fails and every line goes once. Without it, the API fails the batch that overflows
    the queue, with its reason, and the requests go again in smaller jobs until they fit."""
    with TeacherServer(model=MODEL, batch=BatchPlan(delay_s=0.2)) as probe:
        tokens = _decompose_tokens(tmp_path, config(probe, tmp_path / "x"))
    assert len(tokens) == 6 and all(t > 512 for t in tokens)  # n=2 x max_tokens=256 + the prompt
    limit = sum(sorted(tokens)[-3:])  # room for 3 decompose requests at a time
    plan = BatchPlan(delay_s=0.2, enqueued_token_limit=limit)
    with TeacherServer(model=MODEL, batch=plan) as srv:
        report = run_batch_collect(config(srv, tmp_path / "a"),
                                   BatchConfig(wait=True, poll_interval_s=0.05, max_enqueued_tokens=limit))
        stats = srv.stats()
    assert report.complete and not report.failed_jobs
    assert all(status == "completed" for status, _ in _decompose_sizes(stats))
    assert max(n for _, n in _decompose_sizes(stats)) <= 3 and sum(n for _, n in _decompose_sizes(stats)) == 6
    assert max(stats["batch_lines"].values()) == 1 and max(stats["billed_by_content"].values()) == 1

    with TeacherServer(model=MODEL, batch=plan) as srv:
        blind = run_batch_collect(config(srv, tmp_path / "b"), BatchConfig(wait=True, poll_interval_s=0.05,
                                                                           failed_retry_after_s=0.0))
        stats = srv.stats()
    assert blind.failed_jobs and all("token_limit_exceeded" in f for f in blind.failed_jobs)
    assert "Limit: " in blind.failed_jobs[0]
    sizes = _decompose_sizes(stats)
    assert sizes[0] == ("failed", 6) and all(n <= 3 for _, n in sizes[1:])
    assert blind.complete and max(stats["billed_by_content"].values()) == 1


def test_an_upload_refused_for_another_reason_is_reported_as_what_it_is(tmp_path):
    plan = BatchPlan(upload_error=(400, "File is too large: the maximum is 200 MB."))
    with TeacherServer(model=MODEL, batch=plan) as srv, pytest.raises(ValueError) as e:
        run_batch_collect(config(srv, tmp_path), BatchConfig())
    text = str(e.value)
    assert "refused the upload of a batch of 6 requests (HTTP 400)" in text and "File is too large" in text
    assert "without the Batch API" not in text


def test_the_byte_limit_is_the_apis_200_mb_decimal():
    assert BatchLimits().max_bytes == 200_000_000 == BatchConfig().max_bytes_per_batch


def test_what_a_cancelled_job_left_unanswered_is_held_until_asked(tmp_path):
    """Nobody but a person (or the API) cancels a batch: its unanswered requests are not sent again
    unless asked (--resubmit-cancelled); an expired job's are, as before."""
    with TeacherServer(model=MODEL, batch=BatchPlan(cancel=(0,))) as srv:
        first = run_batch_collect(config(srv, tmp_path), FAST)
        again = run_batch_collect(config(srv, tmp_path), FAST)
        asked = run_batch_collect(config(srv, tmp_path), BatchConfig(wait=True, poll_interval_s=0.05,
                                                                     resubmit_cancelled=True))
        stats = srv.stats()
    assert first.held_cancelled == 3 and not first.complete
    assert again.held_cancelled == 3 and not again.submitted
    assert asked.complete and asked.held_cancelled == 0
    resent = {c for c, n in stats["batch_lines"].items() if n > 1}
    assert len(resent) == 3 and all(":decompose:" in c for c in resent)
    assert max(stats["billed_by_content"].values()) == 1


@pytest.mark.parametrize(("change", "code"), [
    (lambda lines: lines.append(dict(lines[0])), "duplicate_custom_id"),
    (lambda lines: lines[1].update(url="/v1/completions"), "invalid_url"),
    (lambda lines: lines[1].update(method="GET"), "invalid_method"),
])
def test_the_test_api_validates_a_batch_file_as_openai_does(tmp_path, change, code):
    """The stand-in fails a bad batch file as a whole (so subq's own files are checked by every
    batch test): repeated custom_id, another url, a method other than POST."""
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}
             for i in range(3)]
    change(lines)
    with TeacherServer(model=MODEL, batch=BatchPlan()) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test")
        f = client.files.create(file=("in.jsonl", io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())),
                                purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        for _ in range(100):
            b = client.batches.retrieve(b.id)
            if b.status in ("failed", "completed"):
                break
            time.sleep(0.05)
        stats = srv.stats()
    assert b.status == "failed" and b.errors is not None and b.errors.data[0].code == code
    assert stats["billed"] == 0
