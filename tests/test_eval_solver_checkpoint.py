"""A distilled solver (a checkpoint) as an evaluation solver: served for the run on our LLM server,
asked the evaluation's solve prompts, fingerprinted by its content, reported as a column beside an
API solver (paper 2's table shape); and the spec mistakes a user can make fail in one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from subq.evaluation.fingerprint import content_hash
from subq.evaluation.records import read_records
from subq.learner.checkpoint import save_checkpoint
from subq.learner.models import load_model_and_tokenizer

from subq.cli import main
from tests.ports import free_port
from tests.teacher_server import TeacherServer

# ctx: the solve prompt with its few-shot example is ~1,500 byte tokens
TINY = "tiny-random:llama?layers=1&hidden=32&heads=2&ctx=2048&seed={seed}"
BENCH = "gsm8k:test[:2]"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _solver_checkpoint(path: Path, seed: int) -> Path:
    """What `subq train --algo solver-bc` leaves in OUT/final, with random weights."""
    model, tok = load_model_and_tokenizer(TINY.format(seed=seed))
    return save_checkpoint(path, model, tok, algo="solver-bc", config={"algo": "solver-bc"},
                           extra={"data": {"solver_target": "gold"}})


def _records(out: Path, decomposer: str, solver: str) -> list[dict]:
    [path] = (out / "records" / "gsm8k_test_2" / f"{decomposer}__{solver}").glob("*.jsonl")
    return read_records(path)


def _lines(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / "records").rglob("*.jsonl"))


def test_a_checkpoint_solver_is_served_for_the_run_and_its_content_is_in_the_fingerprint(
        ray_session, tmp_path, monkeypatch, capsys):
    from ray import serve
    from subq.serve import decomposer as served_decomposer
    from subq.serve import llm_server

    monkeypatch.setenv("SUBQ_TEST_KEY", "sk-eval-secret-0123456789")
    ckpt = _solver_checkpoint(tmp_path / "se" / "final", seed=0)
    out = tmp_path / "eval"
    starts: list[str] = []  # every replica started, decomposer or solver
    for module, name in ((served_decomposer, "start_decomposer"), (llm_server, "start_llm_server")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda cfg, _real=real, _name=name, **kw: starts.append(_name) or _real(cfg, **kw))
    with TeacherServer(latency_s=0.0, model="test-teacher") as srv:
        argv = ["eval", "--decomposer", "teacher", "--decomposer", "none", "--decomposer", f"student={TINY.format(seed=2)}",
                "--solver", f"test-teacher@{srv.base_url}",
                "--solver", str(ckpt), "--api-key-env", "SUBQ_TEST_KEY", "--benchmark", BENCH, "--out", str(out),
                "--solve-max-tokens", "12", "--batch-size", "2", "--max-actors", "1", "--no-progress",
                "--local-port", str(free_port())]
        assert main(argv) == 0, capsys.readouterr().err
        assert srv.stats()["by_stage"]["decompose"] == 2  # one plan per problem, reused by the served solver
        assert not [a for a in serve.status().applications if a.startswith("subq-")]  # shut down after
        # one replica per checkpoint: the student decomposes for the API solver, then its stored plans serve
        # the distilled solver's column without it; the distilled solver answers for all three decomposers
        assert sorted(starts) == ["start_decomposer", "start_llm_server"], starts
        student = {r["problem_id"]: r["subquestions"] for r in _records(out, "student", "test-teacher")}
        assert len(student) == 2 and student == {r["problem_id"]: r["subquestions"] for r in _records(out, "student", "se")}

        # paper 2's table: rows decomposers, columns the API solver and the distilled one ("se": its run dir)
        md = (out / "results.md").read_text()
        assert "| decomposer \\ solver | test-teacher | se |" in md
        runs = json.loads((out / "results.json").read_text())["runs"]
        assert {(r["decomposer"], r["solver"]) for r in runs} == {
            (d, s) for d in ("teacher (test-teacher)", "none (CoT)", "student") for s in ("test-teacher", "se")}
        first_hash = f"sha256:{content_hash(ckpt)}"
        se = _records(out, "teacher_test-teacher", "se")
        api = _records(out, "teacher_test-teacher", "test-teacher")
        assert len(se) == 2 and all(r["solve_error"] is None and r["solver_text"] for r in se)
        assert all(r["solve_tokens_out"] > 0 and r["solve_cost_usd"] == 0.0 for r in se)  # self-hosted: $0
        assert {r["problem_id"]: r["subquestions"] for r in se} == {r["problem_id"]: r["subquestions"] for r in api}
        assert all(r["settings"]["solver"]["model"] == first_hash for r in se)
        assert all(r["settings"]["solver"]["model"] == "test-teacher" for r in api)
        assert len(_records(out, "none_CoT", "se")) == 2

        # the same command again: every answer is stored, nothing is called or served
        lines, requests, started = _lines(out), srv.stats()["requests"], len(starts)
        assert main(argv) == 0
        assert (_lines(out), srv.stats()["requests"], len(starts)) == (lines, requests, started)

        # a retrained solver (other weights, same path) is not silently reused: its column is redone,
        # the API solver's is not, and the stored plans are reused (no decompose call)
        _solver_checkpoint(ckpt, seed=1)
        assert content_hash(ckpt) != first_hash.removeprefix("sha256:")
        assert main(argv) == 0
        assert "settings changed (solver.model sha256:" in capsys.readouterr().err
        assert srv.stats()["requests"] == requests
        assert _lines(out) == lines + 6  # 2 problems x 3 decomposers, for the new se only
        assert starts[started:] == ["start_llm_server"]  # the student's plans are stored: not served again
    folder = out / "records" / "gsm8k_test_2" / "teacher_test-teacher__se"
    assert len(list(folder.glob("*.jsonl"))) == 2  # the old records stay, in their own file
    se = _records_newest(folder)
    assert all(r["settings"]["solver"]["model"] == f"sha256:{content_hash(ckpt)}" for r in se)
    assert "sk-eval-secret" not in "".join(p.read_text() for p in out.rglob("*.jsonl"))


def _records_newest(folder: Path) -> list[dict]:
    return read_records(max(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime))


def test_solver_spec_mistakes_fail_in_one_clear_line(tmp_path, capsys):
    ckpt = tmp_path / "se" / "final"
    ckpt.mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    out = ["--out", str(tmp_path / "eval")]
    cases = [
        (["--solver", str(tmp_path / "missing" / "final")], ["MODEL@BASE_URL", "checkpoint", "not a directory"]),
        (["--solver", f"se={tmp_path / 'file'}"], ["not a directory"]),
        (["--solver", "gpt-4o"], ["MODEL@BASE_URL"]),
        (["--solver", "gpt-4o@api.openai.com/v1"], ["MODEL@BASE_URL"]),
        (["--solver", f"se={ckpt}", "--solver", f"se={ckpt}"], ["distinct"]),
        (["--decomposer", "teacher", "--solver", str(ckpt)], ["teacher", "API solver"]),
    ]
    for args, words in cases:
        assert main(["eval", *args, *out]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        for word in words:
            assert word in err, (args, err)
    assert not (tmp_path / "eval").exists()  # nothing was started or written


def test_the_report_of_paper_2s_table_has_every_solver_as_a_column_and_a_legend_entry():
    """3 decomposers x 3 solvers, the distilled solvers self-hosted ($0 to solve), the API one paid: one
    row per decomposer, one column per solver, and nine runs told apart on a $ axis."""
    from subq.evaluation.report import accuracy_vs_cost_figure, markdown, summarize

    def recs(correct: int, dec_cost: float, solve_cost: float) -> list[dict]:
        return [dict(problem_id=f"p{i}", answer_type="number", subquestions=["q?"] if dec_cost >= 0 else None,
                     decompose_tokens_in=10, decompose_tokens_out=5, decompose_cost_usd=max(dec_cost, 0.0),
                     solve_tokens_in=50, solve_tokens_out=20, solve_cost_usd=solve_cost, solver_text="Final answer: 1",
                     decompose_error=None, solve_error=None, correct=i < correct, score_error=None)
                for i in range(4)]

    decs = {"none (CoT)": -1.0, "teacher (gpt-3.5-turbo)": 0.001, "bc": 0.0}
    solvers = {"gpt-3.5-turbo": 0.002, "se-t": 0.0, "se-a": 0.0}
    runs = [summarize(recs(k % 4, dc, sc), d, s, "gsm8k:test[:4]", "strict")
            for k, ((d, dc), (s, sc)) in enumerate((x, y) for x in decs.items() for y in solvers.items())]
    md = markdown(runs)
    table = [line for line in md.split("## gsm8k:test[:4]\n", 1)[1].splitlines() if line.startswith("| ")]
    assert table[0] == "| decomposer \\ solver | gpt-3.5-turbo | se-t | se-a |"
    assert [row.split(" | ")[0].removeprefix("| ") for row in table[1:4]] == list(decs)
    assert all(row.count(" [") == 3 for row in table[1:4])  # a cell per solver, none missing
    ax = accuracy_vs_cost_figure(runs).axes[0]
    assert ax.get_xlabel().startswith("$ per 1k problems")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{d} / {s}" for d in decs for s in solvers]
    styles = {(line.get_marker(), line.get_color()) for line in ax.lines
              if line.get_marker() not in (None, "None", "", "_")}
    assert len(styles) == 9  # every run has its own marker and colour
