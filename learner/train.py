"""The Ray Train driver: any learner algorithm on N workers (CPU + gloo, or GPU + nccl with bf16).

The driver reads the store through Ray Data, turns samples into episodes (filtered BC selects its
top fraction here, over the whole dataset), and hands them to a ``TorchTrainer`` whose workers read
their shard with ``ray.train.get_dataset_shard``. The per-worker loop is in ``learner/train_loop.py``;
the algorithms (``bc.py``, ``filtered_bc.py``, ``ilql.py``) know nothing of Ray.

Outputs under ``out``: ``ray/`` (Ray Train's run: checkpoints every K steps, resumable),
``final/`` (the last checkpoint in HF format + heads + config, loadable without training code; the
optimizer state stays in ``ray/`` only),
``metrics.jsonl`` and ``train_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ALGOS = ("bc", "filtered-bc", "ilql", "ilql-sparse")


@dataclass
class TrainConfig:
    algo: str = "bc"  # bc | filtered-bc | ilql | ilql-sparse (ILQL with correctness reward only)
    init: str = "embedded:smollm2-135m-instruct"  # model spec or a checkpoint dir (BC for the others)
    store: str = ".subq/store"  # the store to read samples (or reference decompositions) from
    out: str = "runs/train"  # output directory (absolute or relative to the working directory)
    source: str = "samples"  # samples: teacher decompositions | reference: GSM8K socratic (problems)
    teacher_model: str | None = None  # only samples of this teacher (None: all)
    num_workers: int = 1  # Ray Train workers (data parallel)
    use_gpu: bool = False  # one GPU per worker, nccl, bf16 autocast
    bf16: bool = True  # autocast to bfloat16 on GPU (ignored on CPU)
    batch_size: int = 8  # episodes per worker per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100  # optimizer steps (the run ends earlier if epochs run out)
    epochs: int = 1  # passes over the episodes
    max_length: int = 256  # tokens per episode
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at the end)
    report_every: int = 10  # optimizer steps between metric reports (each costs Ray Train time)
    max_failures: int = 2  # worker failures to recover from (from the last checkpoint)
    lora_r: int = 0  # > 0: train LoRA adapters of this rank instead of the full model
    wandb_project: str | None = None  # log to wandb (offline unless WANDB_MODE says otherwise)
    algo_config: dict[str, Any] = field(default_factory=dict)  # overrides of BCConfig / ILQLConfig / ...
    progress: bool = True


def algo_config(cfg: TrainConfig):
    """The algorithm's own dataclass config, with the driver-level fields and overrides applied."""
    from learner.bc import BCConfig
    from learner.filtered_bc import FilteredBCConfig
    from learner.ilql import ILQLConfig

    cls = {"bc": BCConfig, "filtered-bc": FilteredBCConfig, "ilql": ILQLConfig, "ilql-sparse": ILQLConfig}[cfg.algo]
    values = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "seed": cfg.seed, **cfg.algo_config}
    if cfg.algo.startswith("ilql"):
        values["reward_placement"] = "sparse" if cfg.algo == "ilql-sparse" else "full"
    known = set(cls.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {cfg.algo} settings: {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def build_episodes(cfg: TrainConfig, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """Episodes as plain dicts (Ray Data rows), read from the store through Ray Data."""
    from data_store.store import Store
    from learner.episodes import episodes_from_samples, reference_episodes
    from learner.filtered_bc import select

    store = Store(cfg.store)
    placement = "sparse" if cfg.algo == "ilql-sparse" else "full"
    if cfg.source == "reference":
        rows = [r for r in store.dataset("problems").take_all() if r.get("reference_subquestions") is not None]
        episodes, excluded = reference_episodes(rows, tokenizer, max_length=cfg.max_length, placement=placement), {}
    elif cfg.source == "samples":
        rows = store.dataset("samples").take_all()
        if cfg.teacher_model:
            rows = [r for r in rows if r["teacher_model"] == cfg.teacher_model]
        episodes, excluded = episodes_from_samples(rows, tokenizer, placement=placement, max_length=cfg.max_length)
    else:
        raise ValueError(f"source must be 'samples' or 'reference', not {cfg.source!r}")
    if cfg.algo == "filtered-bc":
        episodes = select(episodes, algo_config(cfg))
    if not episodes:
        raise ValueError(f"no usable episodes in {cfg.store} (excluded: {excluded})")
    return [asdict(ep) for ep in episodes], excluded


def latest_checkpoint_dir(result) -> str | None:
    ckpt = getattr(result, "checkpoint", None)
    return None if ckpt is None else ckpt.path


@contextmanager
def _progress(metrics_path: Path, total: int, enabled: bool) -> Iterator[None]:
    """A bar on the driver fed by rank 0's metrics.jsonl (workers' stdout may not reach us)."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    stop = threading.Event()
    start = metrics_path.stat().st_size if metrics_path.exists() else 0

    def follow() -> None:
        bar = tqdm(total=total, desc="train", unit="step")
        offset = start
        while True:
            if metrics_path.exists():
                with metrics_path.open() as f:
                    f.seek(offset)
                    for line in f:
                        if not line.endswith("\n"):
                            break
                        offset += len(line.encode())
                        m = json.loads(line)
                        bar.n = min(total, int(m.get("step", bar.n)))
                        loss = m.get("losses/total", m.get("losses/bc"))
                        if loss is not None:
                            bar.set_postfix_str(f"loss={loss:.4f} tok/s={m.get('charts/tokens_per_s', 0):.0f}")
                        bar.refresh()
            if stop.wait(1.0):
                break
        bar.close()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns a summary (steps, final metrics, paths). Re-running resumes the same run."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from learner.checkpoint import strip_secrets
    from learner.models import load_tokenizer
    from learner.train_loop import STATE_FILE, train_loop_per_worker

    if cfg.algo not in ALGOS:
        raise ValueError(f"unknown algorithm {cfg.algo!r}; choose one of {ALGOS}")
    algo_config(cfg)  # unknown overrides fail here, before any work
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    init = cfg.init
    if os.path.isdir(init) and os.path.isdir(os.path.join(init, "final")):
        init = os.path.join(init, "final")  # a previous `subq train --out DIR` was given as --init
    tokenizer = load_tokenizer(init)
    episodes, excluded = build_episodes(cfg, tokenizer)
    resolved = {**asdict(cfg), "init": init, "out": str(out)}
    (out / "train_config.json").write_text(json.dumps(strip_secrets(resolved), indent=2, default=str))
    dataset = ray.data.from_items(episodes)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": resolved, "n_episodes": len(episodes)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name="run",
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    with _progress(out / "metrics.jsonl", cfg.max_steps, cfg.progress):
        result = trainer.fit()
    final = latest_checkpoint_dir(result)
    if final is None:
        raise RuntimeError("training produced no checkpoint")
    target = out / "final"
    if target.exists():
        shutil.rmtree(target)
    # final/ is for loading and serving; the optimizer state stays with Ray's checkpoints (for resume)
    shutil.copytree(final, target, ignore=shutil.ignore_patterns(STATE_FILE))
    meta = json.loads((target / "subq_checkpoint.json").read_text())
    return {"out": str(out), "final": str(target), "step": meta["step"], "episodes": len(episodes),
            "excluded": excluded, "metrics": {k: v for k, v in (result.metrics or {}).items()
                                              if isinstance(v, int | float)}}
