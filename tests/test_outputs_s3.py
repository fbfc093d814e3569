"""Outputs in an S3 bucket (moto's server): URI errors, evaluation records and reports as objects, a pipeline's
plan at a URI, and a training run killed and resumed from the bucket alone.

The training commands run as separate processes from an empty working directory (each starts its own local
Ray, which inherits the fixture's ``AWS_*`` environment), as a user on a cluster without a shared disk would.
A whole pipeline (collect, train, serve + eval, report) in a bucket runs in tests/test_cluster_job.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.processes import kill_tree
from tests.s3_server import ACCESS_KEY, SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny-random:llama?layers=1&hidden=32&seed=0"


def _objects(s3, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "subq.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _registered_checkpoint(s3, bucket: str) -> bool:
    """Ray Train has recorded a checkpoint in its run snapshot (what a re-run resumes from): one that was
    uploaded but not yet recorded when the run dies is not resumed, by Ray's design."""
    key = "runs/bc/ray/run/checkpoint_manager_snapshot.json"
    if key not in _keys(s3, bucket, key):
        return False
    return "checkpoint_" in s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def _steps(s3, bucket: str, key: str) -> list[int]:
    body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line)["step"] for line in body.splitlines() if line.strip()]


def test_uri_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    from subq.learner.train import TrainConfig, check_config

    from subq.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="cannot open nosuch://bucket/run"):
        check_config(TrainConfig(out="nosuch://bucket/run", init=TINY))
    assert main(["eval", "--out", "nosuch://bucket/eval", "--decomposer", "none", "--solver",
                 "x@http://127.0.0.1:9/v1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch://bucket/eval" in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing named after the scheme, nothing at all


@pytest.mark.slow
def test_a_training_run_in_a_bucket_killed_resumes_from_it_on_another_machine(s3, tmp_path):
    """`subq train --store s3://... --out s3://...` killed with SIGKILL once a checkpoint is in the bucket, then run
    again with another local cache (another machine: only the bucket is shared): it resumes from the bucket's
    checkpoint and leaves its final model, config and data manifest there, nothing in the working directory.
    Collection into a bucket store and an evaluation serving a student from a bucket, with its records and report
    in it, run in tests/test_cluster_job.py's pipeline on two nodes (the same code as `subq collect` / `subq eval`)."""
    from subq.data_store.store import Store

    from tests.test_train_loop import sample_rows

    bucket = s3.bucket()
    store, out = f"s3://{bucket}/store", f"s3://{bucket}/runs/bc"
    Store(store).append("samples", sample_rows(problems=8, per_problem=1))  # this process has the bucket's env
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SUBQ_CACHE_DIR": str(tmp_path / "cache-a")}
    train = ["train", "--algo", "bc", "--init", TINY, "--store", store, "--out", out, "--num-workers", "2",
             "--batch-size", "1", "--max-steps", "6", "--checkpoint-every", "1", "--report-every", "1",
             "--val-fraction", "0", "--max-length", "256", "--epochs", "2", "--no-progress", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "subq.cli", *train], cwd=cwd, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 540
    while not _registered_checkpoint(s3, bucket):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.5)
    kill_tree(proc)  # kill -9 the driver, its Ray and the workers
    assert not _keys(s3, bucket, "runs/bc/final/"), "the run finished before it was killed"
    before = _steps(s3, bucket, "runs/bc/metrics.jsonl")

    env["SUBQ_CACHE_DIR"] = str(tmp_path / "cache-b")  # another machine: only the bucket is shared
    done = _run(train, cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = _steps(s3, bucket, "runs/bc/metrics.jsonl")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert steps[:len(before)] == before and steps[-1] == summary["step"] == summary["planned_steps"], (
        steps, summary, _keys(s3, bucket, "runs/bc/"))
    assert steps[len(before)] > 1, f"the second run restarted instead of resuming: {steps}"

    objects = _objects(s3, bucket)
    print("objects:", Counter("/".join(k.split("/")[:2]) for k in objects))
    for key in ("runs/bc/final/config.json", "runs/bc/final/README.md", "runs/bc/final/subq_checkpoint.json",
                "runs/bc/train_config.json", "runs/bc/data/manifest.json"):
        assert key in objects, (key, sorted(objects))
    assert not any(k.startswith("runs/bc/ray/") for k in objects)  # keep_checkpoints off: only final/ stays
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert not [k for k, v in objects.items() if secret.encode() in v], f"{secret} reached the bucket"
    assert list(cwd.iterdir()) == [], "something was written to the working directory"


def test_records_and_report_at_a_uri_are_objects_merged_on_read(s3, tmp_path, monkeypatch):
    """No appends or locks on object storage: each batch is its own object, read back as one file."""
    from subq.data_store import uri
    from subq.evaluation.records import (
        append_records,
        fingerprint_files,
        read_history,
        read_records,
        records_path,
    )
    from subq.evaluation.report import summarize, write_report

    monkeypatch.chdir(tmp_path)
    out = f"s3://{s3.bucket()}/eval"
    path = records_path(out, "gsm8k:test[:2]", "bc", "teacher", "f" * 16)
    assert isinstance(path, str) and path.startswith(out)
    rec = {"problem_id": "p1", "attempt": 1, "solver_text": "Final answer: 3", "correct": True}
    append_records(path, [json.dumps(rec)])
    append_records(path, [json.dumps({**rec, "attempt": 2}), json.dumps({**rec, "problem_id": "p2"})])
    assert [r["attempt"] for r in read_history(path)] == [1, 2, 1]
    assert {r["problem_id"]: r["attempt"] for r in read_records(path)} == {"p1": 2, "p2": 1}
    assert fingerprint_files(uri.parent(path)) == [path]
    paths = write_report([summarize(read_records(path), "bc", "teacher", "gsm8k:test[:2]", "strict")], out)
    assert json.loads(uri.read_text(paths["json"]))["runs"][0]["n"] == 2
    assert uri.read_bytes(paths["plot"]).startswith(b"\x89PNG")
    assert list(tmp_path.iterdir()) == []


def test_a_pipeline_out_at_a_uri_puts_every_output_in_the_bucket(s3, tmp_path, monkeypatch):
    """The plan of `subq pipeline --out s3://...` (no work): every run, the store, the evaluation and the
    students it serves are locations in the bucket; nothing named after the scheme appears here.
    tests/test_cluster_job.py runs such a pipeline end to end on two nodes."""
    from subq.config import load_config
    from subq.pipeline import Pipeline
    from subq.preflight import check, resolve_config

    monkeypatch.chdir(tmp_path)
    out = f"s3://{s3.bucket()}/runs/qs"
    cfg, raw = load_config(resolve_config("quickstart"), [f"out={out}/"])
    pipe = Pipeline(cfg, raw, progress=False, echo=lambda _: None)
    assert pipe.out == out and cfg.store_uri == f"{out}/store"
    assert [pipe.final_dir(a) for a in cfg.train.algos] == [f"{out}/train/{a}/final" for a in cfg.train.algos]
    assert pipe.algo_train_config("ilql").init == f"{out}/train/bc/final"  # ILQL starts from BC in the bucket
    assert pipe.eval_config().out_dir == f"{out}/eval"
    assert [s.split("=", 1)[1] for s in pipe.decomposer_specs()[:3]] == [pipe.final_dir(a) for a in cfg.train.algos]
    assert not [p for p in check(cfg, raw, resources=False).problems if "out" in p]
    assert list(tmp_path.iterdir()) == []
