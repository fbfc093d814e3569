"""Evaluation end to end: decompose -> solve over Ray actors, records, resume, report, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from subq.actors.prices import PriceTable
from subq.actors.teacher import TeacherConfig
from subq.data_store.datasets import load_problems
from subq.evaluation.clients import DecomposerSpec, SolverSpec
from subq.evaluation.plan import plan_rows, run_keys
from subq.evaluation.records import append_records, read_records
from subq.evaluation.run import EvalConfig, EvalSettings, EvalWorker, run_eval

from subq.cli import main
from tests.processes import kill_tree
from tests.teacher_server import TeacherServer

ROOT = Path(__file__).resolve().parents[1]


def _count_lines(root: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in root.rglob("*.jsonl"))


def _path(cfg: EvalConfig, dec: DecomposerSpec, solver: SolverSpec, bench: str) -> Path:
    """The records file of one (decomposer, solver) pair under ``cfg``'s settings."""
    [key] = run_keys(cfg, dec.label, dec.identity, [solver])
    return key.path(cfg.out_dir, bench)


def test_teacher_decomposes_once_per_problem_and_a_new_solver_reuses_the_plan(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("SUBQ_TEST_KEY", "sk-eval-secret-0123456789")
    with TeacherServer(latency_s=0.0, model="test-teacher") as srv:
        teacher = DecomposerSpec("teacher", "teacher", teacher=TeacherConfig(
            base_url=srv.base_url, model="test-teacher", api_key_env="SUBQ_TEST_KEY"))
        baseline = DecomposerSpec("none", "none (CoT)")
        a = SolverSpec(base_url=srv.base_url, model="test-teacher", api_key_env="SUBQ_TEST_KEY", label="a")
        b = SolverSpec(base_url=srv.base_url, model="test-teacher", api_key_env="SUBQ_TEST_KEY", label="b")
        cfg = EvalConfig(benchmarks=["gsm8k:test[:4]", "svamp:test[:2]"], out_dir=str(tmp_path), batch_size=2,
                         max_actors=1, progress=False)
        summaries = run_eval(cfg, [teacher, baseline], [a], None)
        stats = srv.stats()["by_stage"]
        assert stats["decompose"] == 6  # one plan per problem; the baseline asks for none
        assert len(summaries) == 4 and {s.n for s in summaries} == {4, 2}
        recs = read_records(_path(cfg, teacher, a, "gsm8k:test[:4]"))
        assert len(recs) == 4 and all(r["subquestions"] for r in recs)
        assert all(r["decompose_error"] is None and r["solve_error"] is None for r in recs)
        base = read_records(_path(cfg, baseline, a, "gsm8k:test[:4]"))
        assert all(r["subquestions"] is None and r["decompose_tokens_in"] == 0 for r in base)

        # same run again: nothing to do, nothing called
        before = srv.stats()["requests"]
        run_eval(cfg, [teacher, baseline], [a], None)
        assert srv.stats()["requests"] == before

        # a second solver: solved anew, but the stored plans are reused (no decompose call)
        summaries = run_eval(cfg, [teacher, baseline], [a, b], None)
        stats = srv.stats()["by_stage"]
        assert stats["decompose"] == 6
        assert len(summaries) == 8
        plans_a = {r["problem_id"]: r["subquestions"] for r in recs}
        plans_b = {r["problem_id"]: r["subquestions"]
                   for r in read_records(_path(cfg, teacher, b, "gsm8k:test[:4]"))}
        assert plans_a == plans_b
    report = json.loads((tmp_path / "results.json").read_text())
    assert {(r["decomposer"], r["solver"]) for r in report["runs"]} == {
        (d, s) for d in ("teacher", "none (CoT)") for s in ("a", "b")}
    assert "sk-eval-secret" not in (tmp_path / "results.json").read_text()
    assert all("sk-eval-secret" not in p.read_text() for p in tmp_path.rglob("*.jsonl"))
    md = (tmp_path / "results.md").read_text()
    assert "| decomposer \\ solver | a | b |" in md


def test_a_torn_last_line_is_redone_not_fatal(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"problem_id": "x"}) + "\n" + '{"problem_id": "y", "solv')
    assert [r["problem_id"] for r in read_records(path)] == ["x"]


def test_an_append_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"problem_id": "x"}) + "\n" + '{"problem_id": "y", "solv')
    append_records(path, [json.dumps({"problem_id": "z"})])
    assert [r["problem_id"] for r in read_records(path)] == ["x", "z"]


def test_a_problem_recorded_twice_counts_once(tmp_path):
    path = tmp_path / "r.jsonl"
    append_records(path, [json.dumps({"problem_id": "x", "n": 1}), json.dumps({"problem_id": "y"})])
    append_records(path, [json.dumps({"problem_id": "x", "n": 2})])
    assert [(r["problem_id"], r.get("n")) for r in read_records(path)] == [("x", 1), ("y", None)]


def test_a_later_attempt_supersedes_and_the_history_stays(tmp_path):
    from subq.evaluation.records import failure, read_history

    path = tmp_path / "r.jsonl"
    failed = {"problem_id": "x", "attempt": 1, "decompose_error": None, "solve_error": "RateLimitError: 429"}
    append_records(path, [json.dumps(failed), json.dumps({"problem_id": "y", "attempt": 1, "solve_error": None,
                                                          "decompose_error": "parse_error: no Q1"})])
    append_records(path, [json.dumps({**failed, "attempt": 2, "solve_error": None})])
    assert [(r["problem_id"], r["attempt"]) for r in read_records(path)] == [("x", 2), ("y", 1)]
    assert len(read_history(path)) == 3
    assert failure(failed) == "solve: RateLimitError"
    assert failure({"decompose_error": "api_error: HTTP 503: busy"}) == "decompose: HTTP 503"
    assert failure({"decompose_error": "parse_error: no Q1", "solve_error": None}) is None  # final, not failed


def test_records_from_before_fingerprints_are_named_not_used(tmp_path):
    from subq.evaluation.plan import settings_changes

    cfg = EvalConfig(benchmarks=["gsm8k:test[:2]"], out_dir=str(tmp_path))
    [key] = run_keys(cfg, "bc", {"kind": "none"}, [SolverSpec(base_url="http://127.0.0.1/v1", model="m")])
    legacy = key.path(cfg.out_dir, "gsm8k:test[:2]").parent.with_suffix(".jsonl")
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"problem_id": "x"}) + "\n")
    [line] = settings_changes(cfg, [key])
    assert str(legacy) in line and "not used" in line


def test_the_worker_stores_its_batch_and_a_retried_batch_pays_nothing(tmp_path, monkeypatch):
    """Records are written by the actor that paid for them, so a dead driver loses no paid answer."""
    monkeypatch.setenv("SUBQ_TEST_KEY", "sk-eval-secret-0123456789")
    bench = "gsm8k:test[:3]"
    with TeacherServer(latency_s=0.0, model="test-teacher") as srv:
        teacher = DecomposerSpec("teacher", "teacher", teacher=TeacherConfig(
            base_url=srv.base_url, model="test-teacher", api_key_env="SUBQ_TEST_KEY"))
        solvers = [SolverSpec(base_url=srv.base_url, model="test-teacher", api_key_env="SUBQ_TEST_KEY", label=x)
                   for x in ("a", "b")]
        cfg = EvalConfig(benchmarks=[bench], out_dir=str(tmp_path), decompose_max_tokens=128, solve_max_tokens=128)
        keys = run_keys(cfg, "teacher", teacher.identity, solvers)
        worker = EvalWorker(teacher, solvers, keys, EvalSettings(None, 0.0, 128, 0.0, 128, 10.0, 2), PriceTable(),
                            out_dir=str(tmp_path), scorer="strict")
        batch = pa.Table.from_pylist(plan_rows(bench, load_problems(bench), keys, str(tmp_path)))

        async def twice() -> tuple[pa.Table, int, pa.Table]:  # one event loop, as in the actor
            first = await worker(batch)
            return first, srv.stats()["requests"], await worker(batch)

        first, paid, retried = asyncio.run(twice())
        assert first.num_rows == 6 and paid == 3 + 6  # one plan per problem, every solver answers it
        for label in ("a", "b"):
            recs = read_records(keys["ab".index(label)].path(str(tmp_path), bench))
            assert len(recs) == 3 and all(r["subquestions"] and r["solve_error"] is None for r in recs)
        assert retried.num_rows == 0 and srv.stats()["requests"] == paid


def test_killed_eval_resumes_without_paying_twice(tmp_path):
    """SIGKILL `subq eval` and its local Ray mid-run, then run it again: every answer the first run
    recorded is kept, and the second run decomposes exactly the problems without a record."""
    n, out = 12, tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SUBQ_TEST_KEY": "sk-eval-secret-0123456789"}
    with TeacherServer(latency_s=0.4, model="test-teacher") as srv:
        cmd = [sys.executable, "-m", "subq.cli", "eval", "--decomposer", "teacher", "--solver",
               f"test-teacher@{srv.base_url}", "--api-key-env", "SUBQ_TEST_KEY", "--benchmark", f"gsm8k:test[:{n}]",
               "--out", str(out), "--batch-size", "2", "--max-actors", "1", "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not out.exists() or _count_lines(out) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "evaluation made no progress"
            time.sleep(0.1)
        kill_tree(proc)
        time.sleep(1.0)  # let the server finish requests whose clients died
        [path] = list(out.rglob("*.jsonl"))
        kept = {r["problem_id"]: r for r in read_records(path)}
        assert 2 <= len(kept) < n, "the run finished before it was killed"
        srv.reset_stats()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        decomposed = srv.stats()["by_stage"]["decompose"]
    recs = read_records(path)
    assert len(recs) == n == len(path.read_text().splitlines())  # complete, nothing written twice
    assert decomposed == n - len(kept)
    assert all(r == kept[r["problem_id"]] for r in recs if r["problem_id"] in kept)


@pytest.mark.slow
def test_embedded_model_as_decomposer_and_solver_end_to_end(ray_session, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--decomposer", "embedded:smollm2-135m-instruct", "--decomposer", "none", "--solver", "local",
            "--benchmark", "gsm8k:test[:2]", "--out", str(out), "--solve-max-tokens", "32", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "smollm2-135m-instruct" in printed and "none (CoT)" in printed
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 and all(r["n"] == 2 for r in runs)
    student = next(r for r in runs if r["decomposer"] == "smollm2-135m-instruct")
    assert student["decompose_tokens_out"] > 0 and student["solve_tokens_out"] > 0
    assert student["similarity"] is not None  # GSM8K test has socratic references
    assert (out / "accuracy_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = _count_lines(out)
    assert lines == 4
    # a re-run has nothing to do: no server started, the same report
    assert main(argv) == 0
    assert _count_lines(out) == lines
    again = json.loads((out / "results.json").read_text())["runs"]
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in runs]


def test_rescore_command_prints_both_modes(tmp_path, capsys):
    path = tmp_path / "paper1.jsonl"
    rows = [{"problem": "p", "questions": ["q"], "answers": "Final answer: 1,000", "answer": "#### 1000"},
            {"problem": "p", "questions": ["q"], "answers": "the final answer: 7", "answer": 7}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["eval", "rescore", "--mode", "paper1", str(path)]) == 0
    assert "paper1: accuracy 0.5000 (1/2)" in capsys.readouterr().out
    assert main(["eval", "rescore", "--mode", "strict", str(path)]) == 0
    assert "strict: accuracy 1.0000 (2/2)" in capsys.readouterr().out
    assert main(["eval", "rescore", str(tmp_path / "missing.jsonl")]) == 2


def test_bad_eval_inputs_fail_in_one_line(tmp_path, capsys):
    assert main(["eval", "--benchmark", "nosuch:test", "--out", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["eval", "--solver", "gpt-4o", "--out", str(tmp_path)]) == 2
    assert "MODEL@BASE_URL" in capsys.readouterr().err
    assert main(["eval", "--decomposer", "a=none", "--decomposer", "a=teacher", "--out", str(tmp_path)]) == 2
    assert "distinct" in capsys.readouterr().err
