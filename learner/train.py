"""The Ray Train driver: any learner algorithm on N workers (CPU + gloo, or GPU + nccl with bf16).

The driver turns the store's rows into an episode table with Ray Data (``learner/data.py``: filtered
BC's selection, DPO's pairs and reference log-probs, the validation split and the data statistics are
decided there, from a few small columns), and hands its location to a ``TorchTrainer``. Each worker
reads its rows of every micro-batch by position, in a per-epoch shuffled order fixed by the seed
(``learner/batches.py``); the per-worker loop is in ``learner/train_loop.py``; the algorithms
(``bc.py``, ``filtered_bc.py``, ``ilql.py``, ``dpo.py``, ``solver_bc.py``) know nothing of Ray.

``out`` is a local path or a URI (``s3://``, ``gs://``; ``data_store/uri.py``): with a URI the driver
builds in a local staging folder and uploads, Ray Train checkpoints into the bucket and resumes from it,
and ``final/`` is uploaded with its config.json and markers last. Outputs under ``out``: ``data/`` (the episode table, its split and manifest), ``ray/`` (Ray Train's
run: checkpoints every K steps, resumable), ``final/`` (the last checkpoint in HF format + heads +
config + data statistics, loadable without training code, and for a decomposer the training prompt as its
chat template, ``<end>`` as a stop string in ``generation_config.json`` and a model card ``README.md``
(``learner/model_card.py``): transformers or vLLM can prompt it without subq; the optimizer state stays in
``ray/``),
``metrics.jsonl`` and ``train_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subq.data_store import uri

if TYPE_CHECKING:
    import torch

ALGOS = ("bc", "filtered-bc", "ilql", "ilql-sparse", "dpo", "solver-bc")
FROM_BC = ("filtered-bc", "ilql", "ilql-sparse", "dpo")  # start from the BC checkpoint (paper 1; DPO's reference)
SOLVERS = ("solver-bc",)  # train a solver (answers sub-questions), not a decomposer: served by `subq llm-server`


@dataclass
class TrainConfig:
    algo: str = "bc"  # bc | filtered-bc | ilql | ilql-sparse (ILQL, correctness reward only) | dpo | solver-bc
    init: str = "embedded:smollm2-135m-instruct"  # model spec or a checkpoint dir (BC's for FROM_BC algorithms)
    store: str = ".subq/store"  # the store to read samples (or reference decompositions) from
    out: str = "runs/train"  # output directory (absolute or relative to the working directory)
    source: str = "samples"  # samples: teacher decompositions | reference: GSM8K socratic (problems)
    teacher_model: str | None = None  # only samples of this teacher (None: all)
    sample_rounds: list[int] | None = None  # only samples of these collection rounds (the teacher's rows are round
    #                                         1; a student's, the round that collected them: subq/rounds.py); None: all
    correct_from_round: int | None = None  # samples of this round and later train only when correct (None: all)
    num_workers: int = 1  # Ray Train workers (data parallel)
    use_gpu: bool = False  # one GPU per worker, nccl, bf16 autocast
    bf16: bool = True  # autocast to bfloat16 on GPU (on CPU: cpu_bf16)
    cpu_bf16: str | bool = "off"  # on CPU: "on" autocasts to bfloat16 (weights and optimizer stay fp32), "auto"
    #                               only where the CPU has AMX (a bare SmolLM2-135M step: 0.55-0.65x the time;
    #                               without native bf16 expect it slower than fp32), "off": fp32
    batch_size: int = 8  # episodes (DPO: pairs) per worker per micro-batch (a step: x num_workers x grad_accum)
    grad_accum: int = 1  # micro-batches per optimizer step (an epoch's last step takes those left)
    max_steps: int = 100  # optimizer steps (the run ends earlier if epochs run out)
    epochs: int = 1  # passes over the episodes, each in its own shuffled order
    max_length: int = 256  # tokens per episode; an over-long problem loses words from its middle
    seed: int = 0  # model / RNG seeding (+ rank) and the data order of every epoch
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, one more forward
    val_fraction: float = 0.01  # share of the problems held out for validation (paper 1: 1%); 0: none
    val_problems: str | None = None  # a dataset spec (e.g. "gsm8k:test[:64]"): validate on these problems'
    #                                    human sub-questions instead of a split of the training data (its
    #                                    problems never train); val_fraction is then ignored
    val_every: int = 50  # optimizer steps between validations (and at the end); 0: only at the end
    early_stopping_patience: int = 0  # > 0: stop after this many validations without a new best; 0: off
    early_stopping_metric: str = "losses/val_bc"  # the validation metric to minimise for early stopping
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at the end)
    report_every: int = 10  # optimizer steps between metric reports (each costs Ray Train time)
    max_failures: int = 2  # worker failures to recover from (from the last checkpoint)
    keep_checkpoints: bool = False  # keep Ray's resumable checkpoints (weights + optimizer state, 3x the
    #                                  weights each) once the run completes; False: only final/ stays, so a
    #                                  finished run cannot be extended in place (train on with --init OUT)
    final_dtype: str = "auto"  # final/'s weights: "auto" = the initial model's own dtype (SmolLM2: bfloat16,
    #                             half the disk), or float32 / bfloat16 / float16; training itself is fp32
    lora_r: int = 0  # > 0: train LoRA adapters of this rank instead of the full model
    wandb_project: str | None = None  # log to wandb (offline unless WANDB_MODE says otherwise)
    algo_config: dict[str, Any] = field(default_factory=dict)  # overrides of BCConfig / ILQLConfig / DPOConfig / ...
    progress: bool = True  # a progress bar on the driver (fed by rank 0's metrics.jsonl)


CPU_BF16 = ("off", "on", "auto")


def cpu_bf16_on(mode: str | bool) -> bool:
    """``TrainConfig.cpu_bf16`` on this machine (YAML reads a bare on/off as a bool)."""
    if mode == "auto":
        import torch

        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # AMX tiles: native bf16 matmuls
        return bool(amx and amx())
    return mode is True or mode == "on"


def check_cpu_bf16(name: str, mode: str | bool) -> None:
    if not isinstance(mode, bool) and mode not in CPU_BF16:
        raise ValueError(f"{name} must be one of {CPU_BF16}, not {mode!r}")


def uses_bf16(cfg: TrainConfig) -> bool:
    """Whether a worker here autocasts to bfloat16 (anything that must match its step 0 asks here)."""
    return cfg.bf16 if cfg.use_gpu else cpu_bf16_on(cfg.cpu_bf16)


def algo_config(cfg: TrainConfig, decay_steps: int | None = None):
    """The algorithm's own dataclass config, with the driver-level fields and overrides applied.

    ``decay_steps``: the run's planned optimizer steps, used when the config asks for LR decay
    without saying when it ends.
    """
    from subq.learner.bc import BCConfig
    from subq.learner.dpo import DPOConfig
    from subq.learner.filtered_bc import FilteredBCConfig
    from subq.learner.ilql import ILQLConfig
    from subq.learner.optim import DRIVER_FIELDS
    from subq.learner.solver_bc import SolverBCConfig

    cls = {"bc": BCConfig, "filtered-bc": FilteredBCConfig, "ilql": ILQLConfig, "ilql-sparse": ILQLConfig,
           "dpo": DPOConfig, "solver-bc": SolverBCConfig}[cfg.algo]
    driver = set(DRIVER_FIELDS) & set(cfg.algo_config)
    if driver:
        raise ValueError(f"{sorted(driver)} are driver settings: set TrainConfig.{'/'.join(sorted(driver))} "
                         f"(--batch-size, --max-length, --seed), not algo_config")
    known = set(cls.__dataclass_fields__)
    unknown = set(cfg.algo_config) - known
    if unknown:
        raise ValueError(f"unknown {cfg.algo} settings: {sorted(unknown)}; known: {sorted(known)}")
    values = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "seed": cfg.seed, **cfg.algo_config}
    if cfg.algo.startswith("ilql"):
        values["reward_placement"] = "sparse" if cfg.algo == "ilql-sparse" else "full"
    acfg = cls(**values)
    if decay_steps is not None and acfg.decay_steps <= 0:
        acfg.decay_steps = decay_steps
    return acfg


def check_config(cfg: TrainConfig) -> None:
    """Fail before any work, naming the setting, on a config no run could use."""
    from subq.learner.optim import check_schedule

    if cfg.algo not in ALGOS:
        raise ValueError(f"unknown algorithm {cfg.algo!r}; choose one of {ALGOS}")
    uri.check(cfg.out)  # a URI whose scheme cannot be opened: one line now, not after the data step
    if cfg.source not in ("samples", "reference"):
        raise ValueError(f"source must be 'samples' or 'reference', not {cfg.source!r}")
    check_cpu_bf16("cpu_bf16", cfg.cpu_bf16)
    acfg = algo_config(cfg)  # unknown overrides fail here
    check_schedule(acfg, decay_steps_known=False)
    if cfg.algo == "filtered-bc":
        from subq.learner.filtered_bc import check_config as check_filter

        check_filter(acfg)
    if cfg.algo == "dpo":
        from subq.learner.dpo import check_config as check_dpo

        check_dpo(acfg)
    if cfg.algo == "solver-bc":
        from subq.learner.solver_bc import check_config as check_solver

        check_solver(acfg)
    if cfg.algo in ("dpo", "solver-bc") and cfg.source != "samples":
        raise ValueError(f"{cfg.algo} trains on teacher samples (ranked decompositions, stored answers): "
                         f"source must be 'samples', not {cfg.source!r}")
    for name in ("num_workers", "batch_size", "grad_accum", "max_steps", "epochs", "checkpoint_every",
                 "report_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.final_dtype not in FINAL_DTYPES:
        raise ValueError(f"final_dtype must be one of {', '.join(FINAL_DTYPES)}, got {cfg.final_dtype!r}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.val_every < 0 or cfg.early_stopping_patience < 0:
        raise ValueError("val_every and early_stopping_patience must be >= 0")
    if cfg.early_stopping_patience and not (cfg.val_fraction or cfg.val_problems):
        raise ValueError("early stopping needs validation data: set val_fraction > 0 or val_problems")
    if cfg.val_problems:
        from subq.data_store.datasets import parse_problem_spec

        if cfg.algo in ("dpo", "solver-bc"):  # one human decomposition per problem: no pairs, no solver replies
            raise ValueError(f"val_problems validates decomposers on human sub-questions; {cfg.algo} cannot use "
                             "it: set val_fraction instead")

        parse_problem_spec(cfg.val_problems)  # a bad spec fails before any work
    if not cfg.early_stopping_metric.startswith(("losses/val_", "charts/val_")):
        raise ValueError(f"early_stopping_metric must be a validation metric (losses/val_* or charts/val_*), "
                         f"got {cfg.early_stopping_metric!r}")


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
    """Train; returns a summary (steps, final metrics, data statistics, paths). Re-running resumes the run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from subq.learner.batches import steps_per_epoch
    from subq.learner.checkpoint import strip_secrets
    from subq.learner.data import DATA_DIR, MANIFEST, prepare_data, training_units
    from subq.learner.models import resolve_model_path
    from subq.learner.train_loop import STATE_FILE, train_loop_per_worker

    check_config(cfg)
    loc = uri.check(cfg.out)  # a local path (absolute) or a URI that opens; a bad scheme fails here
    out = uri.stage_dir(loc)  # where the driver builds: ``loc`` itself, or a local folder bound for it
    out.mkdir(parents=True, exist_ok=True)
    if (done := finished_run(cfg, loc)) is not None:
        return done
    init = cfg.init
    if uri.is_uri(init):
        init = uri.resolve(init)  # workers download it themselves (learner.models); the driver too, below
    elif os.path.isdir(init) and os.path.isdir(os.path.join(init, "final")):
        init = os.path.join(init, "final")  # a previous `subq train --out DIR` was given as --init
    if os.path.isdir(init):
        init = str(Path(init).resolve())  # workers may start in another directory
    local_init = resolve_model_path(init) if uri.is_uri(init) else init
    if cfg.algo in SOLVERS:  # before the data step tokenises anything with its chat template
        from subq.learner.models import load_tokenizer
        from subq.learner.solver_bc import check_tokenizer

        check_tokenizer(load_tokenizer(local_init))
    remote = uri.is_uri(loc)
    data_loc = uri.join(loc, DATA_DIR)
    if remote and uri.is_file(uri.join(data_loc, MANIFEST)):  # resume elsewhere: the data the checkpoints saw
        shutil.rmtree(out / DATA_DIR, ignore_errors=True)
        uri.download_dir(data_loc, out / DATA_DIR)
    manifest = prepare_data(cfg, init, out, algo_config(cfg), checkpoints=loc)
    if remote and not _same_file(out / DATA_DIR / MANIFEST, uri.join(data_loc, MANIFEST)):
        uri.upload_dir(out / DATA_DIR, data_loc, last=[MANIFEST])
    stats = manifest["stats"]
    per_epoch = steps_per_epoch(training_units(stats), cfg.batch_size, cfg.num_workers, cfg.grad_accum)
    planned = min(cfg.max_steps, cfg.epochs * per_epoch)
    resolved = {**asdict(cfg), "init": init, "out": loc}
    uri.write_text(uri.join(loc, "train_config.json"), json.dumps(strip_secrets(resolved), indent=2, default=str))
    ray_loc = uri.join(loc, "ray")
    storage: dict[str, Any] = {"storage_path": ray_loc}
    if remote:  # Ray Train writes its checkpoints (and resumes) through the filesystem itself
        storage["storage_filesystem"], storage["storage_path"] = uri.open_fs(ray_loc)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": resolved, "data_dir": data_loc if remote else str(out / DATA_DIR),
                           "planned_steps": planned},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name="run",
            **storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    with _progress(out / "metrics.jsonl", planned, cfg.progress):
        result = trainer.fit()
    ckpt = getattr(result, "checkpoint", None)
    if ckpt is None:
        raise RuntimeError("training produced no checkpoint")
    # final/ is for loading and serving; the optimizer state stays with Ray's checkpoints (for resume).
    # It is built locally and moved (or uploaded, config and markers last) into place when complete.
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_checkpoint(ckpt, tmp, skip=STATE_FILE)
    cast_weights(tmp, final_dtype(cfg.final_dtype, local_init))
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    (tmp / SUMMARY_FILE).write_text(json.dumps({"planned_steps": planned, "metrics": metrics}))
    meta = json.loads((tmp / META_FILE).read_text())
    _write_card(tmp, _summary(loc, meta, stats, planned, metrics), uri.name(loc))
    target = uri.join(loc, "final")
    if remote:
        uri.upload_dir(tmp, target, last=FINAL_LAST)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    if not cfg.keep_checkpoints:  # the run is complete: its resumable state (GBs of AdamW moments) goes
        uri.remove(ray_loc)
    return _summary(loc, meta, stats, planned, metrics)


def _same_file(local: Path, location: str) -> bool:
    return uri.is_file(location) and uri.read_bytes(location) == local.read_bytes()


def _copy_checkpoint(ckpt: Any, dest: Path, skip: str) -> None:
    """A Ray checkpoint (local or in a bucket) into the local folder ``dest``, without ``skip``."""
    import pyarrow.fs as pafs

    fs = getattr(ckpt, "filesystem", None) or pafs.LocalFileSystem()
    base = ckpt.path.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = info.path[len(base):].lstrip("/")
        if info.type != pafs.FileType.File or rel == skip:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src:
            (dest / rel).write_bytes(src.read())


def _write_card(final: Path, summary: dict[str, Any], name: str) -> None:
    """final/README.md, named after the run (its folder); a card that cannot be written costs no run."""
    from subq.learner.model_card import write_model_card

    try:
        write_model_card(final, summary, name)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning("could not write the model card in %s: %s", final, exc)


SUMMARY_FILE = "train_summary.json"  # in final/: what run_train returned, for a re-run that finds it done
META_FILE = "subq_checkpoint.json"  # = learner.checkpoint.META_FILE (importing it here would load torch)
FINAL_LAST = ("config.json", META_FILE, SUMMARY_FILE)  # uploaded last, in this order: readers wait for them


def _summary(loc: str, meta: dict[str, Any], stats: dict[str, Any], planned: int,
             metrics: dict[str, float]) -> dict[str, Any]:
    return {"out": loc, "final": uri.join(loc, "final"), "step": meta["step"], "episodes": stats["episodes"],
            "val_episodes": stats["val_episodes"], "excluded": stats["excluded"], "data": stats,
            "planned_steps": planned, "early_stopping": meta["extra"].get("early_stopping"), "metrics": metrics}


def finished_run(cfg: TrainConfig, out: str | Path) -> dict[str, Any] | None:
    """The summary of a run that already completed in ``out`` (a path or URI) with these settings (None:
    train). A run whose resumable state was removed (``keep_checkpoints`` off) cannot continue: changed
    settings are an error that says how to train on, not a silent restart from the initial model."""
    from subq.learner.checkpoint import strip_secrets
    from subq.learner.data import DATA_DIR, MANIFEST, has_checkpoint

    loc = uri.resolve(out)
    target = uri.join(loc, "final")
    if has_checkpoint(loc) or not uri.is_file(uri.join(target, SUMMARY_FILE)):
        return None  # nothing finished, or Ray's checkpoints are there to resume (or extend) from
    saved = json.loads(uri.read_text(uri.join(loc, "train_config.json")))
    now = strip_secrets({**asdict(cfg), "init": saved.get("init"), "out": loc})
    changed = sorted(k for k in now if k not in ("progress", "keep_checkpoints", "final_dtype")
                     and json.dumps(now[k], default=str) != json.dumps(saved.get(k), default=str))
    if changed:
        raise ValueError(f"{uri.redact(loc)} holds a finished run whose resumable checkpoints were removed "
                         f"(keep_checkpoints is off) and these settings changed: {changed}. Train on from it with "
                         f"--init {uri.redact(target)} and a new --out, or delete {uri.redact(loc)} to start over")
    summary = json.loads(uri.read_text(uri.join(target, SUMMARY_FILE)))
    stats = json.loads(uri.read_text(uri.join(loc, DATA_DIR, MANIFEST)))["stats"]
    meta = json.loads(uri.read_text(uri.join(target, META_FILE)))
    return _summary(loc, meta, stats, summary["planned_steps"], summary["metrics"])


FINAL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def final_dtype(name: str, init: str) -> torch.dtype:
    """``final_dtype`` as a torch dtype; "auto": the initial model's published one."""
    import torch
    from subq.learner.models import native_dtype

    name = native_dtype(init) if name == "auto" else name
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def cast_weights(ckpt: Path, dtype: torch.dtype) -> None:
    """The model's floating-point weights in ``dtype`` (its config says so); ILQL heads stay float32."""
    import torch
    from safetensors.torch import load_file, save_file

    if dtype == torch.float32:
        return
    for f in ckpt.glob("model*.safetensors"):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
        save_file(state, str(f), metadata={"format": "pt"})
    config = json.loads((ckpt / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
