"""What a checkpoint holds beyond the weights so that a resumed run continues exactly, and the few
collectives the worker loop needs (a no-op on one process).

``training_state.pt`` (written by rank 0 into Ray's checkpoint; ``final/`` leaves it out):
step, epoch and position in the epoch's order (``learner/batches.py``), the optimizer and schedule,
every rank's RNG states (python, numpy, torch CPU and CUDA), the data fingerprint, the early-stopping
record and, for a LoRA run, the adapter weights (the checkpoint's model files hold the *merged*
weights, for serving; resuming needs the base weights plus the adapters that the optimizer state
belongs to).
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from torch import nn


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order."""
    if not distributed():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (one small all-reduce)."""
    if not distributed() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def no_sync(*modules: nn.Module) -> ExitStack:
    """Skip DDP's gradient all-reduce in this backward (the gradients accumulate locally)."""
    stack = ExitStack()
    for m in modules:
        if hasattr(m, "no_sync"):
            stack.enter_context(m.no_sync())
    return stack


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_optimizer_fits(optimizer: torch.optim.Optimizer) -> None:
    """Raise when a loaded optimizer state does not belong to these parameters (AdamW itself would
    take moments of another shape, or of a freshly initialised adapter, without a word)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise RuntimeError(f"the checkpoint's optimizer state does not fit the model being resumed: "
                                   f"parameter {i} has shape {tuple(p.shape)}, its {name} {tuple(value.shape)}")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A peft model's adapter weights (None for a plain model)."""
    model = getattr(model, "module", model)
    if not hasattr(model, "peft_config"):
        return None
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "unexpected_keys", [])]
    if missing:
        raise RuntimeError(f"the checkpoint's LoRA adapters do not fit this model: {missing[:3]} ...")
