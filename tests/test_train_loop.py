"""The driver's data step and the worker loop in one process (no Ray Train): data order, accumulation,
exact resume (full model, LoRA, ILQL), validation and early stopping, gradient checkpointing.

The data is built by the real driver step (``learner.data.prepare_data``, on Ray Data); the loop is
``learner.train_loop.WorkerLoop`` at world size 1, its checkpoints caught by a report callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from subq.data_store.schema import sample_key
from subq.data_store.store import Store
from subq.learner.batches import EpisodeTable, epoch_order, micro_batches, steps_per_epoch
from subq.learner.bc import BC
from subq.learner.data import DATA_DIR, prepare_data
from subq.learner.episodes import collate, episodes_from_samples
from subq.learner.models import load_model_and_tokenizer, load_tokenizer
from subq.learner.train import TrainConfig, algo_config, check_config, cpu_bf16_on, uses_bf16
from subq.learner.train_loop import STATE_FILE, WorkerLoop

TINY = "tiny-random:llama?layers=1&hidden=32&seed=0"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sample_rows(problems: int = 8, per_problem: int = 2) -> list[dict]:
    now = datetime.now(timezone.utc)
    rows = []
    for i in range(problems):
        for s in range(per_problem):
            subqs = [f"How many apples in box {j}?" for j in range(1 + (i + s) % 3)]
            rows.append(dict(
                sample_key=sample_key(f"p{i}", "t", "v", s), problem_id=f"p{i}", teacher_model="t",
                prompt_version="v", sample_index=s, source="collect", question=f"Box {i} has {i} apples. Total?",
                subquestions=subqs, usefulness=[0.5] * len(subqs), correct=bool((i + s) % 2), status="ok",
                created_at=now, updated_at=now))
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("store")
    rows = sample_rows()
    rows.append({**rows[0], "sample_key": "broken", "status": "parse_error", "subquestions": None})
    Store(str(path)).append("samples", rows)
    return str(path)


def _cfg(store: str, out: Path, **kw) -> TrainConfig:
    base = dict(algo="bc", init=TINY, store=store, out=str(out), batch_size=2, epochs=3, max_steps=100,
                report_every=100, checkpoint_every=100, val_fraction=0.0, progress=False,
                algo_config={"lr": 3e-3})
    return TrainConfig(**{**base, **kw})


def _data(cfg: TrainConfig) -> EpisodeTable:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(cfg, cfg.init, out, algo_config(cfg) if cfg.algo == "filtered-bc" else None)
    return EpisodeTable(out / DATA_DIR)


def _planned(cfg: TrainConfig, data: EpisodeTable) -> int:
    return min(cfg.max_steps, cfg.epochs * steps_per_epoch(len(data.train_rows), cfg.batch_size, 1, cfg.grad_accum))


class Killed(Exception):
    """Raised from the report callback: the process dies right after a checkpoint was stored."""


def _run(cfg: TrainConfig, data: EpisodeTable, resume_dir: Path | None = None, keep: Path | None = None,
         kill_at: int | None = None):
    """Run a WorkerLoop to its end (or to its checkpoint at step ``kill_at``); returns it, its metric
    reports, and copies of its checkpoints."""
    reports, saved = [], []

    def report(metrics, checkpoint):
        reports.append(metrics)
        if checkpoint is not None and keep is not None:
            target = keep / f"step{metrics['step']}"
            shutil.copytree(checkpoint, target)
            saved.append(target)
        if metrics["step"] == kill_at:
            raise Killed

    loop = WorkerLoop(cfg, data, planned_steps=_planned(cfg, data), resume_dir=resume_dir, report=report)
    with contextlib.suppress(Killed):
        loop.run()
    return loop, reports, saved


def _weights(loop: WorkerLoop) -> list[torch.Tensor]:
    mods = [loop.model] + ([loop.heads] if loop.heads is not None else [])
    return [v.detach().clone() for m in mods for v in m.state_dict().values()]


# -------------------------------------------------------------------------------------------- order


def test_every_epoch_is_a_new_order_and_every_episode_is_seen_once(ray_session):
    assert np.array_equal(epoch_order(10, 0, 1), epoch_order(10, 0, 1))
    assert not np.array_equal(epoch_order(10, 0, 0), epoch_order(10, 0, 1))  # reshuffled every epoch
    assert not np.array_equal(epoch_order(10, 0, 0), epoch_order(10, 1, 0))  # the seed matters
    order = epoch_order(11, 0, 0)
    for world in (1, 2, 3):
        per_rank = [list(micro_batches(order, 0, 2, r, world)) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # every rank takes part in every all-reduce
        for step in zip(*per_rank, strict=True):
            assert all(len(idx) > 0 for idx, _ in step) and len({c for _, c in step}) == 1
        seen = [int(i) for step in zip(*per_rank, strict=True) for idx, _ in step for i in idx]
        assert sorted(seen[:11]) == list(range(11))  # each once (the last chunk may be topped up)
        assert sum(c for _, c in per_rank[0]) == 11
    # resuming at a position continues the same order, on any number of workers
    assert [i for idx, _ in micro_batches(order, 6, 2, 0, 1) for i in idx] == list(order[6:])
    two = [list(micro_batches(order, 6, 2, r, 2)) for r in range(2)]
    assert [i for a, b in zip(*two, strict=True) for i in [*a[0], *b[0]]][:5] == list(order[6:])  # + 1 pad


def test_data_step_split_selection_stats_and_determinism(ray_session, store, tmp_path):
    cfg = _cfg(store, tmp_path / "a", algo="filtered-bc", val_fraction=0.25, max_length=115)
    first = _data(cfg)
    tok = load_tokenizer(TINY)
    rows = Store(store).read_rows("samples")
    episodes, excluded = episodes_from_samples(rows, tok, max_length=115)
    by_key = {ep.sample_key: ep for ep in episodes}
    stats = first.manifest["stats"]
    assert stats["excluded"] == excluded == {"parse_error": 1}
    train_keys = [ep.sample_key for ep in first.episodes(first.train_rows)]
    val_keys = [ep.sample_key for ep in first.episodes(first.val_rows)]
    # filtered BC's default rule: every correct decomposition, nothing else
    assert all(by_key[k].correct == 1.0 for k in train_keys + val_keys)
    assert len(train_keys) + len(val_keys) == sum(ep.correct == 1.0 for ep in episodes)
    assert stats["filtered_out"] == sum(ep.correct == 0.0 for ep in episodes)
    # 2 of 8 problems validate, with all their decompositions, never on both sides
    val_problems = {by_key[k].problem_id for k in val_keys}
    assert len(val_problems) == 2 and not val_problems & {by_key[k].problem_id for k in train_keys}
    assert train_keys == sorted(train_keys)  # canonical order: by sample key
    assert stats["max_target_tokens"] == max(sum(by_key[k].action_mask) for k in train_keys)
    assert stats["truncated_contexts"] == sum(by_key[k].cut_words > 0 for k in train_keys + val_keys) > 0
    # the same data written in another order gives the same kept subset and split
    other = tmp_path / "store2"
    shuffled = sample_rows()[::-1]
    Store(str(other)).append("samples", shuffled[:7])
    Store(str(other)).append("samples", shuffled[7:])
    second = _data(dataclasses.replace(cfg, store=str(other), out=str(tmp_path / "b")))
    assert [ep.sample_key for ep in second.episodes(second.train_rows)] == train_keys
    assert [ep.sample_key for ep in second.episodes(second.val_rows)] == val_keys


# ------------------------------------------------------------------------------------- accumulation


def test_gradient_accumulation_never_carries_gradients_across_epochs(ray_session, store, tmp_path):
    """4 micro-batches per epoch, 3 per step: the steps take 3 + 1 micro-batches, 2 steps per epoch."""
    cfg = _cfg(store, tmp_path, batch_size=4, grad_accum=3, epochs=2, report_every=1)
    data = _data(cfg)
    n = len(data.train_rows)
    assert n == 16 and steps_per_epoch(n, 4, 1, 3) == 2
    loop, reports, _ = _run(cfg, data)
    assert [m["step"] for m in reports] == [1, 2, 3, 4] and [m["epoch"] for m in reports] == [0, 0, 1, 1]
    # the same updates by hand: each epoch's order, groups of <= 2 micro-batches, losses / group size
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(TINY)
    bc = BC(model.train(), algo_config(cfg))
    for epoch in range(2):
        order = epoch_order(n, cfg.seed, epoch)
        chunks = [order[i: i + 4] for i in range(0, n, 4)]
        for group in (chunks[0:3], chunks[3:4]):
            for chunk in group:
                loss, _ = bc.loss(collate(data.episodes(data.train_rows[chunk]), tok.pad_token_id))
                (loss / len(group)).backward()
            bc.optimizer_step()
    for a, b in zip(_weights(loop), model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(("algo", "lora"), [("bc", 0), ("bc", 4), ("ilql", 0)])
def test_resume_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_run(ray_session, store, tmp_path, algo, lora):
    """7 steps straight vs. 3 steps, a checkpoint mid-epoch, a new loop resumed from it, 4 more."""
    cfg = _cfg(store, tmp_path / "a", algo=algo, lora_r=lora, batch_size=3, grad_accum=2, epochs=3, max_steps=7,
               checkpoint_every=3, algo_config={"lr": 3e-2 if lora else 3e-3, "lr_decay": "cosine",
                                                "warmup_steps": 2})
    data = _data(cfg)
    straight, _, saved = _run(cfg, data, keep=tmp_path / "ckpts")
    state = torch.load(saved[0] / STATE_FILE, weights_only=False)
    assert (state["step"], state["epoch"], state["position"]) == (3, 0, 16)  # the end of epoch 0
    mid = torch.load(saved[1] / STATE_FILE, weights_only=False)
    assert (mid["step"], mid["epoch"], mid["position"]) == (6, 1, 16)
    if lora:
        assert state["adapter"] and all(k.startswith("base_model") for k in state["adapter"])
    # "kill" after step 3: a new loop resumes from that checkpoint and runs to step 7
    resumed, reports, _ = _run(cfg, data, resume_dir=saved[0])
    assert reports[-1]["step"] == 7 and resumed.algo.step == 7
    diffs = [float((a - b).abs().max()) for a, b in zip(_weights(straight), _weights(resumed), strict=True)]
    assert max(diffs) < 1e-6
    assert resumed.algo.scheduler.get_last_lr() == straight.algo.scheduler.get_last_lr()
    # a kill right after the checkpoint at step 4, one step (2 micro-batches of 3) into epoch 1
    cfg4 = dataclasses.replace(cfg, checkpoint_every=4)
    killed, _, saved4 = _run(cfg4, data, keep=tmp_path / "ckpts4", kill_at=4)
    assert killed.step == 4 and torch.load(saved4[0] / STATE_FILE, weights_only=False)["position"] == 6
    again, _, _ = _run(cfg4, data, resume_dir=saved4[0])
    assert max(float((a - b).abs().max()) for a, b in zip(_weights(straight), _weights(again), strict=True)) < 1e-6


def test_resume_refuses_an_optimizer_state_that_does_not_fit(ray_session, store, tmp_path):
    cfg = _cfg(store, tmp_path, max_steps=1, checkpoint_every=1)
    data = _data(cfg)
    _, _, saved = _run(cfg, data, keep=tmp_path / "ckpts")
    state = torch.load(saved[0] / STATE_FILE, weights_only=False)
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = first["exp_avg"].flatten()[:3].clone()  # moments of another parameter shape
    torch.save(state, saved[0] / STATE_FILE)
    with pytest.raises(RuntimeError, match="optimizer state does not fit"):
        WorkerLoop(dataclasses.replace(cfg, max_steps=2), data, planned_steps=2, resume_dir=saved[0])
    state.pop("adapter")
    torch.save({**state, "adapter": None}, saved[0] / STATE_FILE)
    with pytest.raises(RuntimeError, match="LoRA checkpoint without its adapters"):
        WorkerLoop(dataclasses.replace(cfg, lora_r=4), data, planned_steps=2, resume_dir=saved[0])
    state.pop("position")  # what the driver before this one saved: no data position
    torch.save(state, saved[0] / STATE_FILE)
    with pytest.raises(RuntimeError, match="older subq"):
        WorkerLoop(cfg, data, planned_steps=2, resume_dir=saved[0])


def test_a_checkpoint_is_never_resumed_on_other_data(ray_session, store, tmp_path):
    cfg = _cfg(store, tmp_path / "out")
    manifest = prepare_data(cfg, cfg.init, Path(cfg.out))
    fake = Path(cfg.out) / "ray" / "run" / "checkpoint_1"  # what Ray Train would resume from
    fake.mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    meta = {"extra": {"data_fingerprint": manifest["fingerprint"]}}
    (fake / "subq_checkpoint.json").write_text(json.dumps(meta))
    assert prepare_data(cfg, cfg.init, Path(cfg.out)) == manifest  # a resume reuses the data as built
    shutil.rmtree(Path(cfg.out) / DATA_DIR)
    assert prepare_data(cfg, cfg.init, Path(cfg.out))["fingerprint"] == manifest["fingerprint"]  # rebuilt, same
    with pytest.raises(ValueError, match="other settings"):
        prepare_data(dataclasses.replace(cfg, max_length=100), cfg.init, Path(cfg.out))
    shutil.rmtree(Path(cfg.out) / DATA_DIR)
    (fake / "subq_checkpoint.json").write_text(json.dumps({"extra": {"data_fingerprint": "another"}}))
    with pytest.raises(ValueError, match="differs from what the checkpoints"):
        prepare_data(cfg, cfg.init, Path(cfg.out))


# --------------------------------------------------------------------- validation, early stopping


def test_validation_metrics_and_early_stopping(ray_session, store, tmp_path):
    # lr 0: the validation loss never improves after the first validation, so patience 2 stops at step 3
    cfg = _cfg(store, tmp_path, val_fraction=0.25, val_every=1, early_stopping_patience=2, max_steps=50,
               algo_config={"lr": 0.0})
    data = _data(cfg)
    loop, reports, _ = _run(cfg, data, keep=tmp_path / "ckpts")
    assert [m["step"] for m in reports] == [1, 2, 3]
    assert all({"losses/val_bc", "charts/val_token_accuracy"} <= m.keys() for m in reports)
    assert loop.early == {"best": reports[0]["losses/val_bc"], "best_step": 1, "bad": 2, "stopped": True}
    meta = json.loads((tmp_path / "ckpts" / "step3" / "subq_checkpoint.json").read_text())
    assert meta["extra"]["early_stopping"]["stopped"] and meta["extra"]["data"]["val_episodes"] == 4
    # the validation loss is the token-weighted loss over every validation episode
    model = loop.model.eval()
    batch = collate(data.episodes(data.val_rows), loop.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["action_mask"][:, 1:] > 0
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][mask], batch["input_ids"][:, 1:][mask])
    assert reports[0]["losses/val_bc"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="is not a validation metric"):
        _run(dataclasses.replace(cfg, early_stopping_metric="losses/val_nope"), data)


def test_gradient_checkpointing_changes_memory_not_results(ray_session, store, tmp_path):
    cfg = _cfg(store, tmp_path, max_steps=3)
    data = _data(cfg)
    plain, _, _ = _run(cfg, data)
    checkpointed, _, _ = _run(dataclasses.replace(cfg, gradient_checkpointing=True), data)
    assert checkpointed.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_weights(plain), _weights(checkpointed),
                                                               strict=True))


@pytest.mark.parametrize("algo", ["bc", "ilql"])
def test_cpu_bf16_autocasts_the_forward_and_keeps_fp32_weights(ray_session, store, tmp_path, algo):
    """``cpu_bf16``: the model computes in bfloat16 on CPU (the speed-up on a CPU with AMX) while the
    weights and their updates stay fp32; off, everything is fp32."""
    seen = {}
    for bf16 in (False, True):
        cfg = _cfg(store, tmp_path / str(bf16), algo=algo, max_steps=3, cpu_bf16="on" if bf16 else "off")
        loop = WorkerLoop(cfg, _data(cfg), planned_steps=3)
        dtypes: set[torch.dtype] = set()
        loop.model.get_output_embeddings().register_forward_hook(lambda m, i, out, d=dtypes: d.add(out.dtype))
        loop.run()
        seen[bf16] = dtypes, _weights(loop)
    assert seen[False][0] == {torch.float32} and seen[True][0] == {torch.bfloat16}
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in seen[True][1])
    # the same run but for rounding: close to the fp32 one, not equal to it
    pairs = list(zip(seen[False][1], seen[True][1], strict=True))
    assert any(not torch.equal(a, b) for a, b in pairs)
    assert max((a - b).abs().max().item() for a, b in pairs) < 0.05


def test_cpu_bf16_settings_and_their_errors():
    assert cpu_bf16_on("on") and cpu_bf16_on(True) and not cpu_bf16_on("off") and not cpu_bf16_on(False)
    assert isinstance(cpu_bf16_on("auto"), bool)
    assert uses_bf16(TrainConfig(use_gpu=True, bf16=True, cpu_bf16="off"))  # cpu_bf16 is the CPU's setting
    assert not uses_bf16(TrainConfig(use_gpu=True, bf16=False, cpu_bf16="on"))
    with pytest.raises(ValueError, match="cpu_bf16 must be one of"):
        check_config(TrainConfig(cpu_bf16="yes"))


@pytest.mark.parametrize("algo", ["bc", "ilql"])
def test_validation_on_given_problems_measures_what_the_quality_benchmark_measures(ray_session, store, tmp_path,
                                                                                    algo):
    """``val_problems``: the human sub-questions of held-out benchmark problems validate, and (uncut:
    max_length fits them; the byte tokenizer makes long episodes) their
    ``losses/val_nll_subq`` is exactly ``evaluation.fidelity.reference_nll`` of the same model."""
    from subq.data_store.datasets import load_problems
    from subq.evaluation.fidelity import reference_nll

    cfg = _cfg(store, tmp_path, algo=algo, val_problems="gsm8k:test[:5]", val_every=2, max_steps=2, max_length=1000,
               algo_config={"lr": 1e-3})
    data = _data(cfg)
    assert len(data.val_rows) == 5 and len(data.train_rows) == 16  # the store's 16 episodes all train
    loop, reports, _ = _run(cfg, data)
    (last,) = [m for m in reports if "losses/val_nll_subq" in m]
    held_out = [(p["question"], p["reference_subquestions"]) for p in load_problems("gsm8k:test[:5]")]
    expected = reference_nll(loop.model, loop.tokenizer, held_out, "student")
    assert last["losses/val_nll_subq"] == pytest.approx(expected["nll_per_token"], rel=1e-4)
    assert last["losses/val_bc"] != pytest.approx(last["losses/val_nll_subq"])  # separators, end marker


def test_validation_problems_never_train(ray_session, tmp_path):
    """A training sample of a validation problem is dropped (and counted), not trained on."""
    from subq.data_store.datasets import load_problems

    (p,) = load_problems("gsm8k:test[:1]")
    rows = sample_rows(problems=2)
    rows[0] = {**rows[0], "problem_id": p["problem_id"], "question": p["question"]}
    Store(str(tmp_path / "s")).append("samples", rows)
    cfg = _cfg(str(tmp_path / "s"), tmp_path / "out", val_problems="gsm8k:test[:1]")
    manifest = prepare_data(cfg, cfg.init, tmp_path / "out")
    assert manifest["stats"]["excluded"] == {"validation_problem": 1}
    assert manifest["stats"]["episodes"] == 3 and manifest["stats"]["val_episodes"] == 1


def test_samples_without_usefulness_train_bc_and_filtered_bc_but_not_full_ilql(ray_session, tmp_path):
    """Paper 1's published test split (and a run without feedback) has correctness but no usefulness:
    BC and filtered BC read no per-sub-question reward, so they keep those samples."""
    rows = [{**r, "usefulness": None} for r in sample_rows(problems=4)]
    Store(str(tmp_path / "s")).append("samples", rows)
    kept = {}
    for algo in ("bc", "filtered-bc", "ilql-sparse", "ilql"):
        cfg = _cfg(str(tmp_path / "s"), tmp_path / algo, algo=algo)
        try:
            kept[algo] = prepare_data(cfg, cfg.init, tmp_path / algo,
                                      algo_config(cfg) if algo == "filtered-bc" else None)["stats"]["episodes"]
        except ValueError as e:
            assert "no_usefulness" in str(e)
            kept[algo] = 0
    assert kept == {"bc": 8, "filtered-bc": 4, "ilql-sparse": 8, "ilql": 0}  # filtered BC: the correct half
