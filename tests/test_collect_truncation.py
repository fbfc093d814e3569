"""Replies cut at the token limit (issue 20 item 2): a cut reply is asked again once with a larger
limit, recorded in the row; one cut at that limit too stays ``truncated``, and a plain re-run does not
pay for it again (exit 4, DONE_TRUNCATED) unless ``--retry-truncated`` asks.

Billed calls are counted by the test teacher across every run (its counters are never reset).
"""

from __future__ import annotations

import contextlib
import io
import json

from subq.data_store.store import Store

from subq.cli import main
from subq.exit_codes import DONE, DONE_TRUNCATED
from tests.teacher_server import FaultPlan, TeacherServer
from tests.test_collect import MODEL

PROBLEMS = "gsm8k:train[:3]"


def _collect(srv: TeacherServer, store, *extra: str) -> tuple[int, dict]:
    argv = ["collect", "--problems", PROBLEMS, "--store", str(store), "--teacher-base-url", srv.base_url,
            "--teacher-model", MODEL, "--samples-per-problem", "1", "--feedback-samples", "1", "--batch-size", "2",
            "--max-actors", "1", "--no-progress", "--json", *extra]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    text = out.getvalue()
    return rc, json.loads(text[text.index("{"):])


def test_a_teacher_that_always_truncates_is_paid_once_longer_then_never_again_unless_asked(ray_session, tmp_path):
    always = FaultPlan(rate=1.0, kinds=("truncated",), persistent=("truncated",))
    with TeacherServer(model=MODEL, faults=always) as srv:
        rc, report = _collect(srv, tmp_path, "--max-tokens", "64")
        assert rc == DONE_TRUNCATED and report["truncated"] == 3 and report["retryable"] == 0
        first = srv.stats()["billed"]
        assert first == 2 * 3  # each decomposition: the cut reply, then once more at the larger limit
        rows = Store(str(tmp_path)).read_rows("samples")
        assert all(r["status"] == "truncated" and r["decompose_max_tokens"] == 256 for r in rows)
        assert all("cut at the token limit (256)" in r["decompose_error"] for r in rows)
        assert all(r["decompose_calls"] == 2 for r in rows)

        rc, report = _collect(srv, tmp_path, "--max-tokens", "64")  # a plain re-run pays nothing
        assert rc == DONE_TRUNCATED and srv.stats()["billed"] == first

        rc, report = _collect(srv, tmp_path, "--max-tokens", "64", "--retry-truncated")  # asked: paid again
        assert rc == DONE_TRUNCATED and srv.stats()["billed"] == 2 * first
        rows = Store(str(tmp_path)).read_rows("samples")
        assert len(rows) == 3 and all(r["attempt"] == 1 for r in rows)


def test_a_reply_cut_at_a_small_limit_is_completed_by_the_longer_ask_and_recorded(ray_session, tmp_path):
    with TeacherServer(model=MODEL) as srv:  # the server cuts every reply at max_tokens words
        rc, report = _collect(srv, tmp_path, "--max-tokens", "4", "--truncated-max-tokens", "400")
        assert rc == DONE and report["truncated"] == 0, report
        rows = Store(str(tmp_path)).read_rows("samples")
        assert rows and all(r["status"] == "ok" for r in rows)
        assert all(r["decompose_max_tokens"] == 400 and r["answer_max_tokens"] == 400 for r in rows)
        assert all(r["decompose_finish_reason"] == "stop" for r in rows)
        billed = srv.stats()["billed"]
        assert _collect(srv, tmp_path, "--max-tokens", "4", "--truncated-max-tokens", "400")[0] == DONE
        assert srv.stats()["billed"] == billed  # done: nothing paid again
