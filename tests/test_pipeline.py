"""`subq pipeline`: bad inputs fail before any work starts. (Every stage end to end, and a re-run that
skips them all, is tests/test_shipped_configs_run.py: each shipped config on tiny models.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from subq.cli import main

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
