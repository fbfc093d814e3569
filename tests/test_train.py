"""The Ray Train driver end to end (CPU, gloo, a tiny model): the same seed and data give the same run
on 1 and on 2 workers; a worker killed with SIGKILL resumes from its checkpoint to the very weights of
an uninterrupted run; re-running the command resumes a finished run with a longer budget."""

from __future__ import annotations

import glob
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from subq.data_store.store import Store
from subq.learner.batches import EpisodeTable
from subq.learner.checkpoint import load_checkpoint
from subq.learner.train import TrainConfig, run_train

from tests.test_train_loop import sample_rows

TINY = "tiny-random:llama?layers=1&hidden=32&seed=0"


def _store(path) -> str:
    """16 samples of 8 problems and a parse error, in 9 Parquet part files (Ray Data reads several blocks)."""
    rows = sample_rows()
    rows.append({**rows[0], "sample_key": "broken", "status": "parse_error", "subquestions": None})
    for i in range(0, len(rows), 2):
        Store(str(path)).append("samples", rows[i: i + 2])
    return str(path)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(final: str) -> list[torch.Tensor]:
    ckpt = load_checkpoint(final)
    return list(ckpt.model.state_dict().values()) + list((ckpt.heads_state or {}).values())


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_same_seed_and_data_give_the_same_subset_and_first_step_on_one_worker(ray_session, tmp_path):
    store = _store(tmp_path / "store")
    # a top-half ranking full of ties (every 0/1 correctness): the kept subset must not depend on luck
    runs = []
    for name in ("a", "b"):
        cfg = TrainConfig(algo="filtered-bc", init=TINY, store=store, out=str(tmp_path / name), batch_size=2,
                          max_steps=2, report_every=1, checkpoint_every=2, val_fraction=0.0, progress=False,
                          algo_config={"correct_only": False, "fraction": 0.5, "return_kind": "correctness",
                                       "rank_within": "global", "lr": 1e-3})
        runs.append(run_train(cfg))
    a, b = (Path(r["out"]) for r in runs)
    kept = [[ep.sample_key for ep in t.episodes(t.train_rows)] for t in (EpisodeTable(a / "data"),
                                                                         EpisodeTable(b / "data"))]
    assert kept[0] == kept[1] and len(kept[0]) == 8  # the same episodes in the same canonical order
    ma, mb = (json.loads((p / "data" / "manifest.json").read_text()) for p in (a, b))
    assert ma["fingerprint"] == mb["fingerprint"] and ma["stats"]["filtered_out"] == 8
    assert _lines(a)[0]["losses/bc"] == _lines(b)[0]["losses/bc"]
    assert _max_diff(_weights(runs[0]["final"]), _weights(runs[1]["final"])) == 0.0


def _train_workers() -> list[psutil.Process]:
    """This test process's own Ray Train worker processes (never another session's)."""
    return [p for p in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline() if p.is_running() else [])]


def test_a_killed_worker_resumes_to_the_weights_of_an_uninterrupted_run(ray_session, tmp_path):
    """2 workers, accumulation and validation on: 8 steps straight vs. SIGKILL after a checkpoint."""
    store = _store(tmp_path / "store")

    def cfg(name: str) -> TrainConfig:
        return TrainConfig(algo="bc", init=TINY, store=store, out=str(tmp_path / name), num_workers=2,
                           batch_size=2, grad_accum=2, epochs=5, max_steps=8, report_every=1, checkpoint_every=2,
                           val_fraction=0.25, val_every=4, progress=False, algo_config={"lr": 1e-3})

    straight = run_train(cfg("straight"))
    assert straight["step"] == 8 and straight["episodes"] == 12 and straight["val_episodes"] == 4

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run=run_train(cfg("killed"))), daemon=True)
    thread.start()
    out = tmp_path / "killed"
    deadline = time.time() + 300
    snapshot = out / "ray" / "run" / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:  # Ray Train has registered a checkpoint (it does so asynchronously; a kill
        try:  # before that restarts from the one before, here from scratch), and the run is not over
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    workers = _train_workers()
    assert workers, "no RayTrainWorker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    killed_at = max(m["step"] for m in _lines(out))
    thread.join(timeout=600)
    assert "run" in result, "the run did not finish after the kill"
    lines = _lines(out)
    steps = [m["step"] for m in lines]
    assert killed_at < 8 and result["run"]["step"] == 8
    assert steps.count(1) == 1 and set(steps) == set(range(1, 9))  # resumed from a checkpoint, not from scratch
    # same seed, same data, 2 workers: the same first step; and the same weights at the end
    assert lines[0]["losses/bc"] == _lines(tmp_path / "straight")[0]["losses/bc"]
    assert _max_diff(_weights(straight["final"]), _weights(result["run"]["final"])) < 1e-6
    assert [m["losses/val_bc"] for m in lines if "losses/val_bc" in m][-1] == pytest.approx(
        straight["metrics"]["losses/val_bc"], rel=1e-5)


def test_rerun_resumes_a_finished_ilql_run_with_a_longer_budget(ray_session, tmp_path):
    store = _store(tmp_path / "store")
    out = tmp_path / "out"
    cfg = TrainConfig(algo="ilql", init=TINY, store=store, out=str(out), num_workers=2, batch_size=2,
                      max_steps=3, epochs=10, checkpoint_every=2, report_every=1, max_length=128,
                      val_fraction=0.0, algo_config={"lr": 1e-3}, progress=False, keep_checkpoints=True)
    staging = os.path.join(tempfile.gettempdir(), "subq-ckpt-*")
    before = set(glob.glob(staging))
    first = run_train(cfg)
    assert set(glob.glob(staging)) <= before  # the workers' checkpoint staging dirs are removed
    assert not (out / "final" / "training_state.pt").exists()  # optimizer state only in ray/ (resume)
    assert first["step"] == 3 and first["episodes"] == 16 and first["excluded"] == {"parse_error": 1}
    assert [m["step"] for m in _lines(out)] == [1, 2, 3]
    ckpt = load_checkpoint(first["final"])  # loads without the training code
    assert ckpt.meta["algo"] == "ilql" and ckpt.meta["step"] == 3 and ckpt.heads_state is not None
    assert ckpt.meta["extra"]["data"]["max_target_tokens"] == 83  # 3 sub-questions of 25 bytes + 2 "\n" + "<end>"
    assert ckpt.meta["extra"]["heads"]["q_rank"] == 0
    after_3 = _weights(first["final"])
    # resume the same run with a longer budget: it continues at step 4, not from scratch
    cfg.max_steps = 5
    second = run_train(cfg)
    assert second["step"] == 5 and [m["step"] for m in _lines(out)] == [1, 2, 3, 4, 5]
    assert _max_diff(after_3, _weights(second["final"])) > 0
    # other data settings with a checkpoint in OUT: an error before any work, not a silent mix
    cfg.max_length = 96
    with pytest.raises(ValueError, match="max_length"):
        run_train(cfg)


def test_a_finished_run_keeps_only_final_in_the_asked_dtype_and_a_rerun_does_not_train(ray_session, tmp_path):
    """keep_checkpoints off (the default): Ray's resumable state (optimizer moments) is removed once final/
    is written; final/ holds the weights in final_dtype; the same command again returns the run without
    training, and changed settings are an error that names them, never a silent restart."""
    store = _store(tmp_path / "store")
    out = tmp_path / "out"
    cfg = TrainConfig(algo="bc", init=TINY, store=store, out=str(out), batch_size=4, max_steps=2, epochs=3,
                      checkpoint_every=1, report_every=1, val_fraction=0.0, progress=False,
                      final_dtype="bfloat16", algo_config={"lr": 1e-2})
    first = run_train(cfg)
    assert first["step"] == 2 and not (out / "ray").exists()
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(out / "final" / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    trained = _weights(first["final"])  # loads as float32: the bf16 values, upcast
    assert all(w.dtype == torch.float32 and torch.equal(w, w.to(torch.bfloat16).float()) for w in trained)
    lines = len(_lines(out))
    again = run_train(cfg)
    assert len(_lines(out)) == lines and again["step"] == 2 and again["metrics"] == first["metrics"]
    with pytest.raises(ValueError, match=r"\['max_steps'\].*--init"):
        run_train(TrainConfig(**{**cfg.__dict__, "max_steps": 4}))
    with pytest.raises(ValueError, match="final_dtype"):
        run_train(TrainConfig(**{**cfg.__dict__, "final_dtype": "int8"}))


def test_config_errors_fail_before_work(tmp_path):
    def cfg(**kw) -> TrainConfig:
        return TrainConfig(**{"algo": "bc", "init": TINY, "store": str(tmp_path), "out": str(tmp_path / "o"), **kw})

    with pytest.raises(ValueError, match="not_a_setting"):
        run_train(cfg(algo_config={"not_a_setting": 1}))
    with pytest.raises(ValueError, match="driver settings"):
        run_train(cfg(algo_config={"batch_size": 4}))
    with pytest.raises(ValueError, match="rank_within"):
        run_train(cfg(algo="filtered-bc", algo_config={"rank_within": "batch"}))
    with pytest.raises(ValueError, match="val_fraction"):
        run_train(cfg(early_stopping_patience=2, val_fraction=0.0))
    with pytest.raises(ValueError, match="early_stopping_metric"):
        run_train(cfg(early_stopping_metric="losses/bc"))
    with pytest.raises(ValueError, match="lr_decay"):
        run_train(cfg(algo_config={"lr_decay": "step"}))
    assert not (tmp_path / "o").exists()
