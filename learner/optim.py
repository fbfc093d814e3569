"""The optimizer plumbing every learner algorithm shares: its config, AdamW with a warmup and decay
schedule, and one update.

Kept apart so the algorithm files show only their losses; BC and ILQL must update identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LR_DECAYS = ("none", "cosine", "linear")
DRIVER_FIELDS = ("batch_size", "max_length", "seed")  # filled from TrainConfig, never set per algorithm


@dataclass
class OptimConfig:
    """Settings every algorithm shares (BCConfig and ILQLConfig extend it)."""

    lr: float = 5e-5  # AdamW learning rate (peak, after warmup); BC's (ours: transformers' Trainer default)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (ours: none, as transformers' Trainer)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates (PyTorch's defaults)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; <= 0 disables clipping (ours, as Trainer)
    warmup_steps: int = 0  # linear warmup from 0 to lr over this many optimizer steps (ours: short runs train at lr)
    lr_decay: str = "none"  # after warmup: "none" (constant lr), "cosine" or "linear" down to min_lr_ratio * lr.
    #                         Constant by default, as Rafailov et al.'s DPO after its warmup; ours: a run continued
    #                         with more --max-steps keeps its schedule (a decay ends at the planned last step)
    decay_steps: int = 0  # optimizer step at which the decay ends; 0: the run's planned steps (driver fills it)
    min_lr_ratio: float = 0.0  # the decayed lr's floor, as a share of lr
    # Filled by the driver from TrainConfig (recorded with the checkpoint; not settable per algorithm):
    batch_size: int = 8  # episodes per worker per micro-batch; one optimizer step sees
    #                     batch_size x num_workers x grad_accum episodes
    max_length: int = 512  # tokens per episode (context + sub-questions); a longer problem is cut in its middle
    seed: int = 0  # seeds python / numpy / torch (+ rank) and the data order


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """The share of ``cfg.lr`` used by optimizer step ``step`` (0-based): warmup, then the decay."""
    warmup = max(cfg.warmup_steps, 0)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_decay == "none":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, cfg.decay_steps - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_decay == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def check_schedule(cfg: OptimConfig, *, decay_steps_known: bool = True) -> None:
    """Raise ``ValueError`` naming the setting when the schedule cannot run (the driver checks before any
    work, when the run's length, hence a default ``decay_steps``, is not known yet)."""
    if cfg.lr_decay not in LR_DECAYS:
        raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {cfg.lr_decay!r}")
    if decay_steps_known and cfg.lr_decay != "none" and cfg.decay_steps <= 0:
        raise ValueError(f"lr_decay {cfg.lr_decay!r} needs decay_steps > 0 (the driver sets the run's steps)")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")


def adamw_with_schedule(
    params: list[nn.Parameter], cfg: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` and its per-step schedule (:func:`lr_factor`); checks the schedule settings."""
    check_schedule(cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return optimizer, scheduler


def clip_and_step(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float
) -> dict[str, float]:
    """Clip the accumulated gradients (<= 0: no clipping), step optimizer and schedule, zero grads."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    lr = optimizer.param_groups[0]["lr"]  # the lr this step used
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"charts/grad_norm": float(grad_norm), "charts/lr": float(lr)}
