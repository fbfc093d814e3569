"""Every shipped config runs end to end on this machine: its own stage graph (collect / import, its
training runs, serve + eval, report) through `subq pipeline --config NAME`, with the teacher and API
solvers pointed at the local test server, the students at a tiny random model and every size at its
smallest (`--set` overrides only; a section the config lacks is never added)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from subq.cli import main
from tests.teacher_server import TeacherServer

ROOT = Path(__file__).resolve().parents[1]
# divide-or-conquer's graph (bc + two served solver-bc runs as eval columns) took over 600 s here on a
# loaded 2-core machine; tests/test_pipeline_solvers.py runs that same graph on a smaller config.
CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.stem != "divide-or-conquer"]
# ctx 2048: a solver-bc run's solve prompt with its few-shot example is ~1,500 byte tokens
TINY = "tiny-random:llama?layers=1&hidden=32&heads=2&ctx=2048&seed=0"
SMALL_TRAIN = {"init": TINY, "use_gpu": "false", "num_workers": 1, "batch_size": 2, "grad_accum": 1,
               "max_length": 256, "max_steps": 1, "epochs": 1, "checkpoint_every": 1, "report_every": 1,
               "val_fraction": 0.0, "cpu_bf16": "off"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(path: Path, url: str, out: Path) -> list[str]:
    raw = yaml.safe_load(path.read_text())
    sets = [f"out={out}", f"teacher.base_url={url}", "teacher.model=test-teacher", "teacher.api_key_env=SUBQ_TEST_KEY"]
    if "store" in raw:
        sets.append(f"store={out / 'store'}")
    if raw.get("collect"):
        sets += ["collect.problems=gsm8k:train[:1]", "collect.samples_per_problem=1", "collect.feedback_samples=1",
                 "collect.max_tokens=64", "collect.min_actors=1", "collect.max_actors=1", "collect.batch_size=1",
                 "collect.budget_usd=null", "collect.actor_resources={}"]
    if (raw.get("import") or {}).get("reference"):
        sets.append("import.reference=gsm8k:train[:2]")
    train = raw.get("train") or {}
    sets += [f"train.defaults.{k}={v}" for k, v in SMALL_TRAIN.items()]
    for name, section in train.items():
        if name in ("algos", "defaults"):
            continue
        sets += [f"train.{name}.{k}={SMALL_TRAIN[k]}" for k in section if k in SMALL_TRAIN]
        if section.get("algo") == "solver-bc":
            sets.append(f"train.{name}.max_length=2048")
    if "filtered-bc" in train.get("algos", []):  # one sample the test teacher may get wrong: keep it anyway
        sets.append("train.filtered-bc.algo_config={correct_only: false, fraction: 1.0}")
    sets += [f"serve.port={_free_port()}", "serve.num_gpus=0", "serve.num_cpus=0.1", "serve.max_batch_size=4",
             "serve.max_new_tokens=16"]
    ev = raw.get("eval") or {}
    sets += [f"eval.solvers=[\"test-teacher@{url}\"]", "eval.benchmarks=[\"gsm8k:test[:1]\"]", "eval.solve_max_tokens=16",
             "eval.batch_size=1", "eval.max_actors=1"]
    if "fidelity_problems" in ev:
        sets.append("eval.fidelity_problems=gsm8k:test[:1]")
    if "decompose_max_tokens" in ev:
        sets.append("eval.decompose_max_tokens=16")
    return sets


@pytest.fixture(scope="module")
def teacher():
    with TeacherServer(latency_s=0.0, model="test-teacher") as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_runs_end_to_end(ray_session, teacher, path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SUBQ_TEST_KEY", "sk-test-secret-123456")
    out = tmp_path / "run"
    sets = [a for s in overrides(path, teacher.base_url, out) for a in ("--set", s)]
    code = main(["pipeline", "--config", path.stem, "--no-progress", *sets])
    stdout, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    raw = yaml.safe_load(path.read_text())
    for name in raw["train"]["algos"]:
        assert (out / "train" / name / "final" / "subq_checkpoint.json").is_file(), name
    summary = {s["stage"]: s["status"] for s in json.loads((out / "pipeline_summary.json").read_text())}
    assert summary.get("collect") == ("done" if raw.get("collect") else "off"), summary
    assert summary.get("import") == ("done" if raw.get("import") else "off"), summary
    assert summary["serve + eval"] == "done" and summary["report"] == "done", summary
    runs = json.loads((out / "eval" / "results.json").read_text())["runs"]
    assert runs and all(r["n"] == 1 for r in runs), runs
    assert "sk-test-secret-123456" not in stdout + err
