"""`subq collect --decomposer`: a student decomposes, the teacher answers and judges its sub-questions
and pays only for that; the student's rows carry its policy and round, never collide with the
teacher's, and resume like them."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
from subq.actors.collect import run_collect
from subq.actors.stages import StageSettings
from subq.actors.student import StudentEndpoint
from subq.data_store.schema import SAMPLES_SCHEMA
from subq.data_store.store import Store

from subq.cli import main
from tests.teacher_server import TeacherServer
from tests.test_collect import MODEL, config, half_correct

TEACHER_STAGES = ("decompose", "answer", "feedback")


def _teacher_calls(stats: dict) -> dict[str, int]:
    return {s: stats["by_stage"][s] for s in (*TEACHER_STAGES, "student")}


def test_a_student_decomposes_and_the_teacher_pays_only_for_answers_and_judgements(ray_session, tmp_path):
    with TeacherServer(answer_fn=half_correct(), model=MODEL) as srv:
        teacher_cfg = config(srv, tmp_path)
        run_collect(teacher_cfg)  # round 1: the teacher's own 12 rows
        before = _teacher_calls(srv.stats())
        spent = Store(str(tmp_path)).spent_usd()
        student = StudentEndpoint(base_url=srv.base_url, model=MODEL, api="completions", timeout_s=2.0)
        cfg = dataclasses.replace(teacher_cfg, decomposer=student, policy="sha256:student-1", round=2)
        report = run_collect(cfg)
        after = _teacher_calls(srv.stats())
        assert report.complete and report.samples_total == 12 and not report.not_ok
        # the student wrote every decomposition (2 per problem, one request each); the teacher decomposed nothing
        assert after["student"] - before["student"] == 12 and after["decompose"] == before["decompose"]
        assert after["answer"] - before["answer"] == 12 and after["feedback"] - before["feedback"] == 12
        rows = Store(str(tmp_path)).read_rows("samples")
        assert len(rows) == 24 and max(Counter(r["sample_key"] for r in rows).values()) == 1
        mine = [r for r in rows if r["policy"] == "sha256:student-1"]
        theirs = [r for r in rows if r["policy"] is None]
        assert len(mine) == 12 and len(theirs) == 12
        assert {r["round"] for r in mine} == {2} and {r["round"] for r in theirs} == {None}
        for r in mine:
            assert r["status"] == "ok" and r["decompose_raw"].startswith("Q1: ")
            assert r["decompose_cost_usd"] == 0.0 and r["answer_cost_usd"] > 0 and r["feedback_cost_usd"] > 0
            assert len(r["subquestions"]) == len(r["usefulness"]) >= 1
        # the ledger (what the budget counts) has the teacher's answers and judgements, not the student's calls
        ledger = Store(str(tmp_path)).read_rows("calls")
        assert Counter(c["stage"] for c in ledger if c["run_id"] == mine[0]["run_id"]) == {"answer": 12,
                                                                                              "feedback": 12}
        assert Store(str(tmp_path)).spent_usd() > spent
        # a re-run finds every row: nobody is asked anything
        billed = srv.stats()["billed"]
        again = run_collect(cfg)
        assert again.complete and srv.stats()["billed"] == billed


def test_the_student_keys_leave_the_teachers_unchanged():
    """Older stores' keys: the teacher's fingerprint has no policy fields; a student's has both."""
    teacher = StageSettings(teacher_model=MODEL, price_table_version="v")
    assert "policy" not in teacher.output_settings() and "round" not in teacher.output_settings()
    a = dataclasses.replace(teacher, policy="sha256:a", round=2)
    assert len({teacher.fingerprint, a.fingerprint, dataclasses.replace(a, policy="sha256:b").fingerprint,
                dataclasses.replace(a, round=3).fingerprint}) == 4
    assert "policy" in SAMPLES_SCHEMA.names and "round" in SAMPLES_SCHEMA.names


def test_cli_decomposer_openai_tags_rows_and_never_calls_the_teacher_to_decompose(ray_session, tmp_path, capsys):
    store = tmp_path / "store"
    with TeacherServer(answer_fn=half_correct(), model=MODEL) as srv:
        rc = main(["collect", "--store", str(store), "--problems", "gsm8k:train[:2]", "--samples-per-problem", "2",
                   "--feedback-samples", "1", "--teacher-base-url", srv.base_url, "--teacher-model", MODEL,
                   "--decomposer", f"openai:{MODEL}@{srv.base_url}", "--round", "3", "--no-progress", "--json",
                   "--max-actors", "1", "--batch-size", "2"])
        out = capsys.readouterr().out
        stats = srv.stats()
    assert rc == 0, out
    assert json.loads(out[out.index("{"):])["samples_total"] == 4
    assert stats["by_stage"]["decompose"] == 0 and stats["by_stage"]["student"] == 4
    rows = Store(str(store)).read_rows("samples")
    assert {r["round"] for r in rows} == {3} and len({r["policy"] for r in rows}) == 1
    assert rows[0]["policy"].startswith("openai:")


@pytest.mark.parametrize("args, message", [
    (["--decomposer", "/no/such/student"], "not a directory"),
    (["--round", "2"], "--round needs --decomposer"),
    (["--decomposer", "teacher"], "expected a checkpoint"),
])
def test_bad_decomposer_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    store = tmp_path / "store"
    rc = main(["collect", "--store", str(store), "--problems", "gsm8k:train[:2]", "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not store.exists()
