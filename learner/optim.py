"""The optimizer plumbing every learner algorithm shares: AdamW with linear warmup, and one update.

Kept apart so the algorithm files show only their losses; BC and ILQL must update identically.
"""

from __future__ import annotations

import torch
from torch import nn


def adamw_with_warmup(
    params: list[nn.Parameter], *, lr: float, betas: tuple[float, float], weight_decay: float, warmup_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    warmup = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
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
