"""`subq pipeline` with paper 2's comparison on tiny models and the test teacher: two named solver-bc
runs (SE-T, SE-A) trained beside BC, then every decomposer evaluated with the API solver and both
distilled solvers (served from their checkpoints), and a re-run that serves and calls nothing."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from subq.learner.checkpoint import load_checkpoint

from subq.config import load_config
from subq.pipeline import Pipeline
from tests.teacher_server import TeacherServer

# ctx / max_length: with a byte tokenizer the solve prompt and its few-shot example are ~1,500 tokens
TINY = "tiny-random:llama?layers=1&hidden=32&heads=2&ctx=2048&seed=0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, teacher_url: str) -> Path:
    solver = {"algo": "solver-bc", "max_length": 2048}
    cfg = {
        "name": "tiny-divide-or-conquer",
        "out": str(tmp_path / "run"),
        "teacher": {"base_url": teacher_url, "model": "test-teacher", "api_key_env": "SUBQ_TEST_KEY"},
        "collect": {"problems": "gsm8k:train[:2]", "samples_per_problem": 1, "feedback_samples": 1,
                    "max_subquestions": 3, "max_tokens": 64, "max_actors": 1},
        "train": {"algos": ["bc", "se-t", "se-a"],
                  "defaults": {"init": TINY, "batch_size": 2, "max_length": 256, "max_steps": 1,
                               "checkpoint_every": 1, "report_every": 1, "val_fraction": 0.0},
                  "se-t": {**solver, "algo_config": {"target": "teacher"}},
                  "se-a": {**solver, "algo_config": {"target": "gold"}}},
        # a port of its own: another Serve on this machine (8011 is the default) must not answer for ours
        "serve": {"port": _free_port(), "max_batch_size": 4, "max_new_tokens": 16, "num_cpus": 0.1},
        "eval": {"solvers": [f"test-teacher@{teacher_url}"], "baseline": True, "teacher_decomposes": True,
                 "benchmarks": ["gsm8k:test[:2]"], "solve_max_tokens": 8, "batch_size": 2, "max_actors": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_paper_2s_comparison_trains_two_solvers_and_evaluates_them_as_columns(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("SUBQ_TEST_KEY", "sk-test-secret-123456")
    with TeacherServer(latency_s=0.0, model="test-teacher") as srv:
        path = _config(tmp_path, srv.base_url)
        cfg, raw = load_config(str(path))
        result = Pipeline(cfg, raw, progress=False, echo=lambda _: None).run()
        status = {s.stage: s.status for s in result.stages}
        assert status == {"collect": "done", "import": "off", "train bc": "done", "train se-t": "done",
                          "train se-a": "done", "serve + eval": "done", "report": "done"}, result.stages
        out = Path(cfg.out)
        targets = {name: load_checkpoint(out / "train" / name / "final").meta for name in ("se-t", "se-a")}
        assert {n: (m["algo"], m["extra"]["data"]["solver_target"]) for n, m in targets.items()} == {
            "se-t": ("solver-bc", "teacher"), "se-a": ("solver-bc", "gold")}
        decs, solvers = ("bc", "teacher (test-teacher)", "none (CoT)"), ("test-teacher", "se-t", "se-a")
        assert {(s.decomposer, s.solver) for s in result.summaries} == {(d, v) for d in decs for v in solvers}
        assert all(s.n == 2 and s.api_failures == 0 for s in result.summaries)
        distilled = [s for s in result.summaries if s.solver != "test-teacher"]
        assert all(s.solve_tokens_out > 0 and s.solve_cost_usd == 0.0 for s in distilled)
        assert all(s.settings["solver"]["model"].startswith("sha256:") for s in distilled)
        md = (out / "eval" / "results.md").read_text()
        assert "| decomposer \\ solver | test-teacher | se-t | se-a |" in md
        calls = srv.stats()["requests"]

        # a second run finds every output: no training, no serving, no call
        cfg2, raw2 = load_config(str(path))
        again = Pipeline(cfg2, raw2, progress=False, echo=lambda _: None).run()
        assert {s.stage: s.status for s in again.stages}["serve + eval"] == "skipped"
        assert srv.stats()["requests"] == calls
    runs = json.loads((out / "eval" / "results.json").read_text())["runs"]
    assert len(runs) == 9
