"""Offline DPO (learner/dpo.py): the loss against hand-computed values (DPO, cDPO, IPO), the pairs
(within one problem, by the margin), the implicit reward learning a synthetic preference, the data
step's pairs and reference log-probs, exact resume, and the Ray Train driver end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from subq.data_store.store import Store
from subq.learner.batches import EpisodeTable
from subq.learner.checkpoint import load_checkpoint
from subq.learner.data import prepare_data
from subq.learner.dpo import DPO, DPOConfig, collate_pairs, dpo_loss, make_pairs, sequence_logps
from subq.learner.episodes import Episode, build_episode, collate
from subq.learner.models import load_model_and_tokenizer
from subq.learner.train import TrainConfig, algo_config, run_train
from torch import nn

from tests.test_train_loop import _cfg, _data, _run, _weights, sample_rows

TINY = "tiny-random:llama?layers=1&hidden=32&seed=0"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


# ------------------------------------------------------------------------------------------- loss


def test_dpo_cdpo_and_ipo_losses_match_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])  # log pi - log ref
    # h = 1 and -1; DPO: -log sigmoid(beta h) = softplus(-beta h)
    got = dpo_loss(chosen, rejected, beta=0.1)
    assert got.tolist() == pytest.approx([_softplus(-0.1), _softplus(0.1)], abs=1e-7)
    assert _softplus(-0.1) == pytest.approx(0.6443966600735709)
    # cDPO: (1 - eps) softplus(-beta h) + eps softplus(beta h)
    got = dpo_loss(chosen, rejected, beta=0.1, label_smoothing=0.2)
    assert got.tolist() == pytest.approx([0.8 * _softplus(-0.1) + 0.2 * _softplus(0.1),
                                          0.8 * _softplus(0.1) + 0.2 * _softplus(-0.1)], abs=1e-7)
    # IPO: (h - 1 / (2 beta))^2 = (1 - 5)^2 and (-1 - 5)^2
    assert dpo_loss(chosen, rejected, beta=0.1, loss_type="ipo").tolist() == pytest.approx([16.0, 36.0])


class UniformLM(nn.Module):
    """Logits = a trainable bias, the same at every position: with 2 tokens at bias 0, log pi = log 1/2."""

    def __init__(self, vocab: int = 2) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def _ep(ids: list[int], n_actions: int, key: str = "k", problem: str = "p", correct: float = 1.0,
        usefulness: list[float] | None = None) -> Episode:
    n = len(ids)
    return Episode(input_ids=ids, action_mask=[0] * (n - n_actions) + [1] * n_actions, rewards=[0.0] * n,
                   dones=[0] * (n - 1) + [1], subq_end_positions=[], correct=correct,
                   usefulness=usefulness or [], sample_key=key, problem_id=problem)


def test_dpo_loss_of_a_batch_sums_action_tokens_only_and_averages_them_for_ipo():
    # chosen: 2 action tokens (log pi = 2 log 1/2), rejected: 3 (3 log 1/2); padding and context excluded
    chosen, rejected = _ep([0, 1, 1, 0], 2), _ep([1, 0, 1, 1, 0, 1], 3)
    batch = collate_pairs([chosen], [rejected], [-2.0], [-1.5], pad_id=0)
    assert batch["input_ids"].shape == (2, 6) and batch["ref_logps"].dtype == torch.float64
    half = math.log(0.5)
    h = (2 * half + 2.0) - (3 * half + 1.5)
    dpo = DPO(UniformLM(), DPOConfig(beta=0.5))
    loss, metrics = dpo.loss(batch)
    assert loss.item() == pytest.approx(_softplus(-0.5 * h), abs=1e-6)
    assert metrics["charts/reward_chosen"] == pytest.approx(0.5 * (2 * half + 2.0), abs=1e-6)
    assert metrics["charts/reward_rejected"] == pytest.approx(0.5 * (3 * half + 1.5), abs=1e-6)
    assert metrics["charts/reward_accuracy"] == 1.0 and metrics["charts/pairs"] == 1
    assert metrics["losses/bc"] == pytest.approx(-half, abs=1e-6)  # the chosen tokens' NLL, per token
    # IPO on per-token averages: (half + 1.0) - (half + 0.5) = 0.5; (0.5 - 1 / (2 * 0.5))^2 = 0.25
    ipo = DPO(UniformLM(), DPOConfig(beta=0.5, loss_type="ipo"))
    assert float(ipo.loss(batch)[0]) == pytest.approx(0.25, abs=1e-6)
    # the NLL term (nll_weight) adds the chosen tokens' NLL
    rpo = DPO(UniformLM(), DPOConfig(beta=0.5, nll_weight=2.0))
    assert float(rpo.loss(batch)[0]) == pytest.approx(_softplus(-0.5 * h) - 2.0 * half, abs=1e-6)


@pytest.mark.parametrize("bad", [{"loss_type": "hinge"}, {"beta": 0.0}, {"label_smoothing": 0.5},
                                 {"loss_type": "ipo", "label_smoothing": 0.1}, {"margin": 0.0},
                                 {"return_kind": "length"}, {"max_pairs_per_problem": -1}, {"nll_weight": -1.0}])
def test_bad_settings_are_refused(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key if key != "loss_type" or len(bad) == 1 else "label_smoothing"):
        DPO(UniformLM(), DPOConfig(**bad))


# ------------------------------------------------------------------------------------------ pairs


def test_pairs_stay_within_a_problem_and_need_returns_that_differ_by_the_margin():
    eps = [
        _ep([0, 1], 1, "a0", "A", correct=1.0, usefulness=[1.0]),  # A: returns ("both") 2.0, 1.5, 0.0
        _ep([0, 2], 1, "a1", "A", correct=1.0, usefulness=[0.5]),
        _ep([0, 3], 1, "a2", "A", correct=0.0, usefulness=[0.0]),
        _ep([0, 4], 1, "b0", "B", correct=1.0, usefulness=[1.0]),  # B: one decomposition
        _ep([0, 5], 1, "c0", "C", correct=1.0, usefulness=[0.5]),  # C: equal returns
        _ep([0, 6], 1, "c1", "C", correct=1.0, usefulness=[0.5]),
        _ep([0, 7], 1, "d0", "D", correct=1.0, usefulness=[1.0]),  # D: identical text, different returns
        _ep([0, 7], 1, "d1", "D", correct=0.0, usefulness=[1.0]),
        _ep([0, 8], 1, "e0", "E", correct=0.0, usefulness=[1.0]),  # E: 1.0 vs 1.2: within the margin
        _ep([0, 9], 1, "e1", "E", correct=1.0, usefulness=[0.2]),
    ]
    cfg = DPOConfig(return_kind="both", margin=0.5)
    pairs, identical = make_pairs(eps, cfg)
    keys = [(c.sample_key, r.sample_key) for c, r in pairs]
    assert keys == [("a0", "a1"), ("a0", "a2"), ("a1", "a2")] and identical == 1
    assert all(c.problem_id == r.problem_id for c, r in pairs)  # never across problems
    assert make_pairs(eps[::-1], cfg)[0] == pairs  # independent of the input order
    # a larger margin drops the close pair; the cap keeps the largest gaps
    assert [(c.sample_key, r.sample_key) for c, r in make_pairs(eps, DPOConfig(margin=1.0))[0]] == [
        ("a0", "a2"), ("a1", "a2")]
    assert [(c.sample_key, r.sample_key) for c, r in make_pairs(eps, DPOConfig(max_pairs_per_problem=1))[0]] == [
        ("a0", "a2")]
    # by correctness alone E pairs (e1 correct) and A's two correct ones do not
    assert sorted((c.sample_key, r.sample_key) for c, r in make_pairs(eps, DPOConfig(return_kind="correctness"))[0]
                  ) == [("a0", "a2"), ("a1", "a2"), ("e1", "e0")]


# --------------------------------------------------------------------------- learning a preference


def test_implicit_reward_learns_to_rank_chosen_above_rejected(one_torch_thread):
    """Synthetic preferences: for every problem, the decomposition that asks about the problem's numbers
    is preferred over one that asks about something else; after a few steps the implicit reward ranks
    every training pair right, starting from a loss of exactly log 2 (policy = reference)."""
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(TINY)
    chosen, rejected = [], []
    for i in range(6):
        problem = f"Tom has {i + 2} apples and buys {i + 3} more. How many apples now?"
        chosen.append(build_episode(tok, problem, [f"How many apples after buying {i + 3}?"], usefulness=[1.0],
                                    correct=1.0, sample_key=f"c{i}", problem_id=f"p{i}"))
        rejected.append(build_episode(tok, problem, ["What color is the sky?"], usefulness=[0.0], correct=0.0,
                                      sample_key=f"r{i}", problem_id=f"p{i}"))
    with torch.no_grad():
        ref, _ = sequence_logps(model.eval(), collate(chosen + rejected, tok.pad_token_id))
    batch = collate_pairs(chosen, rejected, ref[:6].tolist(), ref[6:].tolist(), tok.pad_token_id)
    dpo = DPO(model, DPOConfig(lr=3e-3, beta=0.1))
    first = dpo.train_step(batch)
    assert first["losses/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # reference log-probs = the policy's
    assert first["charts/reward_margin"] == pytest.approx(0.0, abs=1e-5)
    for _ in range(15):
        last = dpo.train_step(batch)
    assert last["losses/dpo"] < math.log(2) - 0.1
    with torch.no_grad():
        logps, _ = sequence_logps(model.eval(), collate(chosen + rejected, tok.pad_token_id))
    rewards = 0.1 * (logps - ref)
    assert bool((rewards[:6] > rewards[6:]).all())  # every pair ranked right by the implicit reward


# ------------------------------------------------------------------------------------ driver data


def _dpo_store(path: Path) -> str:
    """test_train_loop's 8 problems (one correct and one incorrect decomposition each), plus a problem
    with a single decomposition and one whose two decompositions have equal returns."""
    rows = sample_rows()
    extra = [dict(rows[0], sample_key="single", problem_id="lonely", question="One sample only?"),
             dict(rows[0], sample_key="tie0", problem_id="tied", question="Two equal returns?"),
             dict(rows[0], sample_key="tie1", problem_id="tied", question="Two equal returns?",
                  subquestions=["Another question?"], usefulness=[0.5])]
    Store(str(path)).append("samples", rows + extra)
    return str(path)


def test_data_step_pairs_within_problems_and_stores_the_reference_log_probs(ray_session, tmp_path):
    store = _dpo_store(tmp_path / "store")
    cfg = _cfg(store, tmp_path / "out", algo="dpo", val_fraction=0.25, max_length=128,
               algo_config={"lr": 1e-3, "beta": 0.1})
    data = _data(cfg)
    stats = data.manifest["stats"]
    assert data.pairs and data.train_rows.shape[1] == 2
    # 8 problems with a correct and an incorrect decomposition; "lonely" and "tied" give none
    assert stats["pairs"] + stats["val_pairs"] == 8 and stats["val_pairs"] > 0
    assert not _problems(data, data.train_rows) & _problems(data, data.val_rows)  # the split is by problem
    for rows in (data.train_rows, data.val_rows):
        for c, r in zip(data.episodes(rows[:, 0]), data.episodes(rows[:, 1]), strict=True):
            assert c.problem_id == r.problem_id and c.correct == 1.0 and r.correct == 0.0
    paired = {ep.problem_id for ep in data.episodes(np.concatenate([data.train_rows.ravel(),
                                                                    data.val_rows.ravel()]))}
    assert not paired & {"lonely", "tied"}
    assert stats["filtered_out"] == 3 and stats["pair_problems"] == stats["pairs"]
    # the reference log-probs are the init model's summed action log-probs of each paired episode
    rows = np.concatenate([data.train_rows.ravel(), data.val_rows.ravel()])
    model, tok = load_model_and_tokenizer(TINY)
    with torch.no_grad():
        expected, _ = sequence_logps(model, collate(data.episodes(rows), tok.pad_token_id))
    assert np.allclose(data.ref_logp[rows], expected.double().numpy(), atol=1e-4)
    assert np.isnan(np.delete(data.ref_logp, rows)).all()  # unpaired rows get none
    with pytest.raises(ValueError, match="no preference pairs"):
        prepare_data(dataclasses.replace(cfg, out=str(tmp_path / "o2"), algo_config={"margin": 5.0}),
                     cfg.init, tmp_path / "o2")


def _problems(data: EpisodeTable, rows: np.ndarray) -> set[str]:
    return {ep.problem_id for ep in data.episodes(rows.ravel())}


def test_resume_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_run(ray_session, tmp_path):
    store = _dpo_store(tmp_path / "store")
    cfg = _cfg(store, tmp_path / "a", algo="dpo", batch_size=3, grad_accum=1, epochs=3, max_steps=5,
               checkpoint_every=2, report_every=1, val_fraction=0.0,
               algo_config={"lr": 3e-3, "lr_decay": "cosine"})
    data = _data(cfg)
    assert len(data.train_rows) == 8
    straight, reports, saved = _run(cfg, data, keep=tmp_path / "ckpts")
    assert reports[0]["losses/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    resumed, _, _ = _run(cfg, data, resume_dir=saved[0])  # from step 2, mid-epoch (6 of 8 pairs seen)
    assert resumed.algo.step == 5
    assert max(float((a - b).abs().max()) for a, b in zip(_weights(straight), _weights(resumed), strict=True)) < 1e-6


# ----------------------------------------------------------------------------------- Ray Train


def test_ray_train_runs_dpo_end_to_end_and_resumes(ray_session, tmp_path):
    store = _dpo_store(tmp_path / "store")
    out = tmp_path / "out"
    cfg = TrainConfig(algo="dpo", init=TINY, store=store, out=str(out), batch_size=2, max_steps=2, epochs=5,
                      checkpoint_every=2, report_every=1, max_length=128, val_fraction=0.25, val_every=2,
                      early_stopping_metric="losses/val_dpo", algo_config={"lr": 1e-3}, progress=False,
                      keep_checkpoints=True)  # the run is extended below
    first = run_train(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert lines[0]["losses/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # stored reference = the init model
    assert {"losses/val_dpo", "charts/val_reward_accuracy"} <= lines[-1].keys()
    assert first["data"]["pairs"] + first["data"]["val_pairs"] == 8
    ckpt = load_checkpoint(first["final"])
    assert ckpt.meta["algo"] == "dpo" and ckpt.heads_state is None
    assert ckpt.meta["extra"]["data"]["pairs"] == first["data"]["pairs"]
    from subq.serve.decomposer_model import Decoder  # served like BC: the student format, no ILQL guidance

    decoder = Decoder.load(first["final"])
    assert decoder.student and decoder.heads is None and decoder.default_beta == 0.0  # DPO's beta is not ILQL's
    cfg.max_steps = 3  # a re-run with a longer budget continues at step 3
    second = run_train(cfg)
    assert second["step"] == 3 and [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
                                    ] == [1, 2, 3]


def test_dpo_config_errors_fail_before_work(tmp_path):
    def cfg(**kw) -> TrainConfig:
        return TrainConfig(**{"algo": "dpo", "init": TINY, "store": str(tmp_path), "out": str(tmp_path / "o"), **kw})

    with pytest.raises(ValueError, match="label_smoothing"):
        run_train(cfg(algo_config={"loss_type": "ipo", "label_smoothing": 0.1}))
    with pytest.raises(ValueError, match="margin"):
        run_train(cfg(algo_config={"margin": 0}))
    with pytest.raises(ValueError, match="source must be 'samples'"):
        run_train(cfg(source="reference"))
    assert algo_config(cfg(algo_config={"beta": 0.5})).beta == 0.5
    assert not (tmp_path / "o").exists()
