"""The Ray Train driver: a 2-worker CPU run completes, checkpoints, and resumes from its checkpoint."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from datetime import datetime, timezone

import pytest
import torch

from data_store.schema import sample_key
from data_store.store import Store
from learner.checkpoint import load_checkpoint
from learner.train import TrainConfig, run_train

TINY = "tiny-random:llama?layers=1&hidden=32&seed=0"


def _store(path) -> str:
    now = datetime.now(timezone.utc)
    rows = []
    for i in range(12):
        subqs = [f"How many apples in box {j}?" for j in range(1 + i % 3)]
        rows.append(dict(
            sample_key=sample_key(f"p{i}", "t", "v", 0), problem_id=f"p{i}", teacher_model="t",
            prompt_version="v", sample_index=0, source="collect", question=f"Box {i} has {i} apples. Total?",
            subquestions=subqs, usefulness=[0.5] * len(subqs), correct=bool(i % 2), status="ok",
            created_at=now, updated_at=now,
        ))
    rows.append({**rows[0], "sample_key": "broken", "status": "parse_error", "subquestions": None})
    Store(str(path)).append("samples", rows)
    return str(path)


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["bc", "ilql"])
def test_two_workers_train_checkpoint_and_resume(ray_session, tmp_path, algo):
    store = _store(tmp_path / "store")
    out = tmp_path / "out"
    cfg = TrainConfig(algo=algo, init=TINY, store=store, out=str(out), num_workers=2, batch_size=2,
                      max_steps=3, epochs=10, checkpoint_every=2, report_every=1, max_length=128,
                      algo_config={"lr": 1e-3}, progress=False)
    staging = os.path.join(tempfile.gettempdir(), "subq-ckpt-*")
    before = set(glob.glob(staging))
    first = run_train(cfg)
    assert set(glob.glob(staging)) <= before  # the workers' checkpoint staging dirs are removed
    assert not (out / "final" / "training_state.pt").exists()  # optimizer state only in ray/ (resume)
    assert first["step"] == 3 and first["episodes"] == 12 and first["excluded"] == {"parse_error": 1}
    assert _steps(out) == [1, 2, 3]
    ckpt = load_checkpoint(first["final"])  # loads without the training code
    assert ckpt.meta["algo"] == algo and ckpt.meta["step"] == 3
    assert (ckpt.heads_state is not None) == (algo == "ilql")
    # resume the same run with a longer budget: it continues at step 4, not from scratch
    cfg.max_steps = 5
    second = run_train(cfg)
    assert second["step"] == 5
    assert _steps(out) == [1, 2, 3, 4, 5]
    resumed = load_checkpoint(second["final"])
    assert any(not torch.equal(a, b) for a, b in zip(ckpt.model.state_dict().values(),
                                                      resumed.model.state_dict().values(), strict=True))


def test_unknown_algorithm_setting_fails_before_work(tmp_path):
    cfg = TrainConfig(algo="bc", init=TINY, store=str(tmp_path), out=str(tmp_path / "o"),
                      algo_config={"not_a_setting": 1})
    with pytest.raises(ValueError, match="not_a_setting"):
        run_train(cfg)
