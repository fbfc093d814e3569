"""What each Ray Train worker runs: load, (resume,) train with accumulation, report, checkpoint.

Resume is exact in step count and data position: a checkpoint carries the optimizer and
scheduler state, the step, the epoch and how many micro-batches of that epoch were consumed;
a restarted worker skips those micro-batches of its (order-preserving) shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "training_state.pt"


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _episodes(batch: dict[str, Any]):
    from learner.episodes import Episode

    n = len(batch["input_ids"])
    fields = Episode.__dataclass_fields__
    return [Episode(**{k: _plain(batch[k][i]) for k in fields if k in batch}) for i in range(n)]


def _plain(x: Any) -> Any:
    return x.tolist() if isinstance(x, np.ndarray) else x


def _load(spec: str, cfg: dict, algo_cfg, device: torch.device):
    """Model, tokenizer and (for ILQL) heads, from a checkpoint dir or any model spec."""
    from learner.checkpoint import is_checkpoint, load_checkpoint
    from learner.ilql import ILQLHeads
    from learner.models import load_model_and_tokenizer

    heads_state = None
    if is_checkpoint(spec):
        loaded = load_checkpoint(spec, device=str(device))
        model, tokenizer, heads_state = loaded.model, loaded.tokenizer, loaded.heads_state
    else:
        model, tokenizer = load_model_and_tokenizer(spec, device=str(device))
    if cfg["lora_r"] > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"],
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    heads = None
    if cfg["algo"].startswith("ilql"):
        heads = ILQLHeads.for_model(model, two_q=algo_cfg.two_q, hidden_mult=algo_cfg.head_hidden_mult).to(device)
        if heads_state is not None:
            heads.load_state_dict(heads_state)
    return model, tokenizer, heads


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from learner.bc import BC
    from learner.checkpoint import save_checkpoint
    from learner.episodes import collate
    from learner.ilql import ILQL
    from learner.train import TrainConfig, algo_config

    cfg_dict = config["train"]
    cfg = TrainConfig(**cfg_dict)
    acfg = algo_config(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))

    resume = ray.train.get_checkpoint()
    state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    if resume is not None:
        with resume.as_directory() as d:
            model, tokenizer, heads = _load(d, cfg_dict, acfg, device)
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    else:
        model, tokenizer, heads = _load(cfg.init, cfg_dict, acfg, device)
    model = ray.train.torch.prepare_model(model)
    if heads is not None:
        heads = ray.train.torch.prepare_model(heads)
    algo = ILQL(model, heads, acfg) if heads is not None else BC(model, acfg)
    if resume is not None:
        algo.optimizer.load_state_dict(state["optimizer"])
        algo.scheduler.load_state_dict(state["scheduler"])
        algo.step = state["step"]
        torch.set_rng_state(state["torch_rng"][rank] if rank < len(state["torch_rng"]) else torch.get_rng_state())

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16
                else nullcontext())
    shard = ray.train.get_dataset_shard("train")
    metrics_path = Path(cfg.out) / "metrics.jsonl"
    wandb_run = None
    if rank == 0 and cfg.wandb_project:
        import wandb

        from learner.checkpoint import strip_secrets

        wandb_run = wandb.init(project=cfg.wandb_project, config=strip_secrets(cfg_dict), dir=cfg.out,
                               mode=os.environ.get("WANDB_MODE", "offline"))

    step, epoch, skip = state["step"], state["epoch"], state["micro_in_epoch"]
    window: dict[str, list[float]] = {}
    tokens, t0 = 0, time.perf_counter()
    last_saved = step

    def report(final: bool = False) -> None:
        nonlocal window, tokens, t0, last_saved
        metrics = {k: float(np.mean(v)) for k, v in window.items()}
        metrics.update({"step": step, "epoch": epoch,
                        "charts/tokens_per_s": tokens * world / max(1e-9, time.perf_counter() - t0)})
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if wandb_run is not None:
                wandb_run.log(metrics, step=step)
        # report() uploads the checkpoint to the run's storage before it returns (SYNC mode), so the
        # staging copy is removed right after: a checkpoint of the embedded model is 1.6 GB.
        with tempfile.TemporaryDirectory(prefix="subq-ckpt-") as tmp:
            checkpoint = None
            if final or step % cfg.checkpoint_every == 0:
                if rank == 0:
                    save_checkpoint(Path(tmp) / "ckpt", model, tokenizer, algo=cfg.algo, config=cfg_dict,
                                    heads=heads.module if hasattr(heads, "module") else heads, step=step,
                                    extra={"algo_config": dataclasses.asdict(acfg)})
                    torch.save({"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                                "optimizer": algo.optimizer.state_dict(),
                                "scheduler": algo.scheduler.state_dict(),
                                "torch_rng": [torch.get_rng_state()]}, Path(tmp) / "ckpt" / STATE_FILE)
                    checkpoint = Checkpoint.from_directory(str(Path(tmp) / "ckpt"))
                last_saved = step
            ray.train.report(metrics, checkpoint=checkpoint)
        window, tokens, t0 = {}, 0, time.perf_counter()

    micro_in_epoch = 0
    done = step >= cfg.max_steps
    while not done and epoch < cfg.epochs:
        micro_in_epoch = 0
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=False):
            micro_in_epoch += 1
            if micro_in_epoch <= skip:  # resumed: this micro-batch was trained on before the checkpoint
                continue
            tensors = collate(_episodes(batch), tokenizer.pad_token_id)
            with autocast:
                loss, metrics = algo.loss(tensors)
            (loss / cfg.grad_accum).backward()
            tokens += int(tensors["attention_mask"].sum())
            for k, v in metrics.items():
                window.setdefault(k, []).append(v)
            if micro_in_epoch % cfg.grad_accum:
                continue
            for k, v in algo.optimizer_step().items():
                window.setdefault(k, []).append(v)
            step += 1
            if step >= cfg.max_steps:
                report(final=True)
                done = True
                break
            if step % cfg.report_every == 0 or step % cfg.checkpoint_every == 0:
                report()
        skip = 0
        if not done:
            epoch += 1
            micro_in_epoch = 0
    if not done and (last_saved != step or step == 0):  # epochs ran out before max_steps
        report(final=True)
    if wandb_run is not None:
        wandb_run.finish()
