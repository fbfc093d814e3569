"""`subq pipeline`'s exit codes and its trained stages: a budget-stopped collection exits 1 and trains
nothing; trained on partial data (train_on_incomplete), a raised budget collects the rest and the
student is trained again, never kept from the partial data; a teacher account error is one line and 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from subq import exit_codes
from subq.config import load_config
from subq.pipeline import TRAINED_ON, Pipeline, PipelineResult
from tests.teacher_server import AccountFaults, TeacherServer

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-random:llama?layers=2&hidden=32&seed=0"
USD_PER_1M = 1000.0  # the whole collection below costs about $3.7 at this price


def _config(tmp_path: Path, teacher_url: str, budget: float | None = None) -> Path:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"version": "test", "prices": {"test-teacher": [USD_PER_1M, USD_PER_1M]}}))
    cfg = {
        "name": "tiny", "out": str(tmp_path / "run"), "stages": ["collect", "train"],
        "teacher": {"base_url": teacher_url, "model": "test-teacher", "api_key_env": "SUBQ_TEST_KEY",
                    "price_table": str(prices)},
        "collect": {"problems": "gsm8k:train[:3]", "samples_per_problem": 2, "feedback_samples": 1,
                    "max_tokens": 64, "max_actors": 1, "budget_usd": budget},
        "train": {"algos": ["bc"], "defaults": {"init": TINY, "batch_size": 2, "max_length": 256, "max_steps": 1,
                                                "checkpoint_every": 1, "report_every": 1}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "train" / "bc" / "final" / TRAINED_ON).read_text())


def _stages(tmp_path: Path) -> dict[str, dict]:
    return {s["stage"]: s for s in json.loads((tmp_path / "run" / "pipeline_summary.json").read_text())}


def _cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    """The real command, as a user runs it (its own Ray, real stderr: what a user sees, tracebacks too)."""
    env = {**os.environ, "SUBQ_TEST_KEY": "sk-test-secret-123456"}
    return subprocess.run([sys.executable, "-m", "subq.cli", "pipeline", "--config", str(path), "--no-progress",
                           *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _run(path: Path, *overrides: str) -> PipelineResult:
    cfg, raw = load_config(str(path), list(overrides))
    return Pipeline(cfg, raw, progress=False, echo=lambda line: None).run()


@pytest.mark.slow
def test_budget_stop_then_raise_retrains_the_student(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("SUBQ_TEST_KEY", "sk-test-secret-123456")
    with TeacherServer(model="test-teacher") as srv:
        path = _config(tmp_path, srv.base_url, budget=2.5)
        # 1. the budget stops collection: exit 1, and nothing is trained on the partial data
        done = _cli(path)
        assert done.returncode == exit_codes.INCOMPLETE, done.stderr[-2000:]
        assert "budget" in done.stderr and "stopped before training" in done.stderr
        assert "Traceback" not in done.stderr
        assert _stages(tmp_path)["collect"]["status"] == "incomplete"
        assert "train bc" not in _stages(tmp_path)
        assert not (tmp_path / "run" / "train").exists()

        # 2. the config allows it: the student is trained on what is stored (the run still counts as incomplete)
        result = _run(path, "train_on_incomplete=true")
        assert result.incomplete and _stages(tmp_path)["train bc"]["status"] == "done"
        partial = _record(tmp_path)

        # 3. the budget is raised: the rest is collected and the student trained again on all of it
        result = _run(path, "collect.budget_usd=100")
        stages = _stages(tmp_path)
        assert not result.incomplete and stages["collect"]["status"] == "done"
        assert stages["train bc"]["status"] == "done" and "retrained: the store's data changed" in \
            stages["train bc"]["note"], stages["train bc"]
        full = _record(tmp_path)
        assert full["data"] != partial["data"] and full["config"] == partial["config"]
        assert full["id"] != partial["id"]

        # 4. nothing changed: the student is kept
        _run(path, "collect.budget_usd=100")
        assert _stages(tmp_path)["train bc"]["status"] == "skipped"
        assert _record(tmp_path) == full

        # 5. a changed train setting retrains it too
        _run(path, "collect.budget_usd=100", "train.defaults.seed=1")
        assert "the train settings changed" in _stages(tmp_path)["train bc"]["note"]


def test_teacher_account_error_is_one_line_and_exit_3(tmp_path):
    with TeacherServer(model="test-teacher", account=AccountFaults(quota_after_billed=0)) as srv:
        done = _cli(_config(tmp_path, srv.base_url))
    err = done.stderr
    assert done.returncode == exit_codes.ACCOUNT_REFUSED, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("subq:")]
    assert len(lines) == 1 and lines[0].startswith("subq: error:") and "quota" in lines[0], err[-2000:]
    assert "Traceback" not in err and "sk-test-secret" not in err + done.stdout
    assert not (tmp_path / "run" / "train").exists()
