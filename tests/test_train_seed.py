"""The two things a seed must reach and a resume must keep: the data order and the RNG that dropout draws from.

Through the real path: the driver's data step (``learner.data.prepare_data`` on Ray Data) and
``learner.train_loop.WorkerLoop`` in one process. Each test also runs its own negative control (or says
which mutation it catches), so a silently ignored seed or RNG state cannot pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import subq.learner.train_loop as train_loop
from subq.learner.models import load_model_and_tokenizer

from tests.test_train_loop import _cfg, _data, _run, _weights, store  # noqa: F401  (store: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_order(cfg, data) -> list[list[str]]:
    """The sample keys of every micro-batch the loop trained on, in order."""
    seen: list[list[str]] = []
    real = data.episodes

    def recording(rows):
        episodes = real(rows)
        seen.append([ep.sample_key for ep in episodes])
        return episodes

    data.episodes = recording  # the instance attribute shadows the method for this run only
    try:
        _run(cfg, data)
    finally:
        del data.episodes
    return seen


def test_the_seed_fixes_the_order_the_loop_trains_in(ray_session, store, tmp_path):  # noqa: F811
    """Same --seed: the same micro-batches in the same order; another seed: another order. (Fails when
    ``epoch_order`` or the loop ignores the seed.)"""
    cfg = _cfg(store, tmp_path, batch_size=8, epochs=2)
    data = _data(cfg)
    keys = sorted(ep.sample_key for ep in data.episodes(data.train_rows))
    first, again = _trained_order(cfg, data), _trained_order(cfg, data)
    other = _trained_order(dataclasses.replace(cfg, seed=1), data)
    assert first == again
    epochs = {name: [sum(run[:2], []), sum(run[2:], [])] for name, run in (("first", first), ("other", other))}
    assert epochs["first"][0] != epochs["other"][0] and epochs["first"][1] != epochs["other"][1]
    for run, (e0, e1) in zip((first, other), epochs.values(), strict=True):  # 16 episodes, 8 per micro-batch
        assert len(run) == 4 and sorted(e0) == sorted(e1) == keys  # each epoch sees every episode once
        assert e0 != e1  # reshuffled every epoch


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> str:
    """A tiny GPT-2 with dropout 0.3 everywhere, saved as a local HF model directory (tiny-random specs have
    no dropout, so without this a resume that forgot the RNG would still train identically)."""
    model, tok = load_model_and_tokenizer("tiny-random:gpt2?layers=1&hidden=32&heads=2&seed=0")
    model.config.update({"resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.3})
    path = tmp_path_factory.mktemp("dropout-gpt2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_resume_restores_the_rng_that_dropout_draws_from(ray_session, store, tmp_path, dropout_model,  # noqa: F811
                                                         monkeypatch):
    """6 steps straight vs. 3 steps, a checkpoint, a new loop resumed from it: the same losses and weights.
    The control resumes without restoring the RNG states and must differ (dropout masks change)."""
    cfg = _cfg(store, tmp_path / "a", init=dropout_model, batch_size=4, epochs=2, max_steps=6, checkpoint_every=3,
               report_every=1)
    data = _data(cfg)
    straight, straight_reports, saved = _run(cfg, data, keep=tmp_path / "ckpts")
    assert [Path(p).name for p in saved] == ["step3", "step6"]
    resumed, resumed_reports, _ = _run(cfg, data, resume_dir=saved[0])

    def losses(reports):
        return [(m["step"], m["losses/bc"]) for m in reports if m["step"] > 3]

    assert losses(resumed_reports) == losses(straight_reports) and len(losses(straight_reports)) == 3
    diff = max(float((a - b).abs().max()) for a, b in zip(_weights(straight), _weights(resumed), strict=True))
    assert diff < 1e-6

    monkeypatch.setattr(train_loop, "set_rng_state", lambda state: None)  # the fresh seed's RNG instead
    unrestored, unrestored_reports, _ = _run(cfg, data, resume_dir=saved[0])
    assert losses(unrestored_reports) != losses(straight_reports)
    assert max(float((a - b).abs().max()) for a, b in zip(_weights(straight), _weights(unrestored), strict=True)) > 1e-4
