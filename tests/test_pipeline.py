"""`subq pipeline` end to end on tiny models and the test teacher: every stage runs, a re-run skips
every stage, and bad inputs fail before any work starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from subq.cli import main
from subq.config import load_config
from subq.pipeline import Pipeline
from tests.teacher_server import TeacherServer

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-random:llama?layers=2&hidden=32&seed=0"


def _config(tmp_path: Path, teacher_url: str) -> Path:
    cfg = {
        "name": "tiny",
        "out": str(tmp_path / "run"),
        "teacher": {"base_url": teacher_url, "model": "test-teacher", "api_key_env": "SUBQ_TEST_KEY"},
        "collect": {"problems": "gsm8k:train[:3]", "samples_per_problem": 2, "feedback_samples": 1,
                    "max_tokens": 64, "max_actors": 1},
        "train": {"algos": ["bc", "filtered-bc", "ilql"],
                  "defaults": {"init": TINY, "batch_size": 2, "max_length": 256, "max_steps": 2,
                               "checkpoint_every": 2, "report_every": 1},
                  "filtered-bc": {"algo_config": {"correct_only": False, "fraction": 0.5}}},
        "serve": {"max_batch_size": 4, "max_new_tokens": 16, "num_cpus": 0.1},
        "eval": {"solvers": [f"test-teacher@{teacher_url}"], "baseline": True,
                 "benchmarks": ["gsm8k:test[:2]"], "solve_max_tokens": 64, "batch_size": 2, "max_actors": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_resumes_by_skipping(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("SUBQ_TEST_KEY", "sk-test-secret-123456")
    with TeacherServer(latency_s=0.0, model="test-teacher") as srv:
        path = _config(tmp_path, srv.base_url)
        cfg, raw = load_config(str(path))
        lines: list[str] = []
        result = Pipeline(cfg, raw, progress=False, echo=lines.append).run()
        status = {s.stage: s.status for s in result.stages}
        assert status == {"collect": "done", "import": "off", "train bc": "done", "train filtered-bc": "done",
                          "train ilql": "done", "serve + eval": "done", "report": "done"}, result.stages
        out = Path(cfg.out)
        for algo in ("bc", "filtered-bc", "ilql"):
            assert (out / "train" / algo / "final" / "subq_checkpoint.json").is_file()
        results = json.loads((out / "eval" / "results.json").read_text())
        text = json.dumps(results)
        for label in ("bc", "filtered-bc", "ilql", "none (CoT)"):
            assert label in text
        assert (out / "eval" / "results.md").is_file() and (out / "eval" / "accuracy_vs_cost.png").is_file()
        assert len(result.summaries) == 4 and all(s.n == 2 for s in result.summaries)
        saved = yaml.safe_load((out / "pipeline_config.yaml").read_text())
        assert saved["train"]["defaults"]["init"] == TINY
        calls = srv.stats()["requests"]

        # a second run finds every output and calls nobody
        cfg2, raw2 = load_config(str(path))
        again = Pipeline(cfg2, raw2, progress=False, echo=lines.append).run()
        status2 = {s.stage: s.status for s in again.stages}
        assert status2 == {"collect": "skipped", "import": "off", "train bc": "skipped",
                           "train filtered-bc": "skipped", "train ilql": "skipped", "serve + eval": "skipped",
                           "report": "done"}
        assert srv.stats()["requests"] == calls
        assert [s.accuracy for s in again.summaries] == [s.accuracy for s in result.summaries]
    everything = "".join(p.read_text(errors="ignore") for p in out.rglob("*")
                         if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".md"))
    assert "sk-test-secret-123456" not in everything


def test_unreachable_teacher_fails_before_any_work(tmp_path, capsys):
    path = _config(tmp_path, "http://127.0.0.1:9/v1")
    code = main(["pipeline", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the teacher at http://127.0.0.1:9/v1" in err
    assert not (tmp_path / "run").exists()  # nothing written, nothing started


def test_a_disk_too_small_for_the_checkpoints_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import shutil

    import subq.pipeline

    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(subq.pipeline.shutil, "disk_usage", lambda p: real._replace(free=1000))
    path = _config(tmp_path, "http://127.0.0.1:9/v1")
    code = main(["pipeline", "--config", str(path), "--set", "stages=[train]"])
    err = capsys.readouterr().err
    assert code == 2 and "not enough disk for the training checkpoints" in err
    assert "bc " in err and "ilql " in err and "0.0 GB free" in err
    assert not (tmp_path / "run").exists()


def test_bad_config_fails_naming_the_key(tmp_path, capsys):
    path = _config(tmp_path, "http://127.0.0.1:9/v1")
    code = main(["pipeline", "--config", str(path), "--set", "train.defaults.max_stepz=1"])
    assert code == 2 and "max_stepz" in capsys.readouterr().err
    code = main(["pipeline", "--config", str(tmp_path / "missing.yaml")])
    assert code == 2 and "missing.yaml" in capsys.readouterr().err


def test_pipeline_help_lists_the_command():
    out = subprocess.run([sys.executable, "-m", "subq.cli", "pipeline", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "--config" in out and "--set" in out
