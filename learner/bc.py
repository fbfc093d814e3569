"""Behaviour cloning (BC): cross-entropy on every teacher decomposition (paper 1's first student).

The student reads the context and learns to emit the teacher's sub-questions token by token; only
action tokens carry loss (the problem text is given, not predicted). Batches follow the contract in
``learner/episodes.py``: ``action_mask[t] = 1`` marks token t as an action, predicted by the logits at
position t - 1, hence the shift below.

Two entry points, so that one algorithm serves both a single process and the Ray Train driver:
- :meth:`BC.loss` computes the loss and metrics of a (micro-)batch without touching the optimizer:
  the driver calls it, backpropagates, accumulates gradients and steps through :meth:`BC.optimizer_step`
  (DDP averages gradients across workers during ``backward``);
- :meth:`BC.train_step` is the single-process convenience: loss, backward, clip, step.

The model may be a plain HF causal LM, a peft model (only its trainable LoRA parameters are
optimised) or a DDP wrapper around either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from subq.learner.optim import OptimConfig, adamw_with_schedule, clip_and_step
from torch import nn


@dataclass
class BCConfig(OptimConfig):
    """BC has no settings of its own: the optimizer's (``learner/optim.py``), lr 5e-5 by default."""


def action_token_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over action tokens; also (number of action tokens, accuracy).

    Only the positions that predict an action are sent through the softmax, in float32. ``logits``:
    the model's output on the batch, when the caller has it already.
    """
    if logits is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["action_mask"][:, 1:] > 0  # token t + 1 is an action ...
    pred = logits[:, :-1][mask].float()  # ... predicted by the logits at t
    target = batch["input_ids"][:, 1:][mask]
    n_tokens = mask.sum()
    if n_tokens == 0:  # no action in this batch: a zero loss that still has a graph
        return logits.sum() * 0.0, n_tokens, torch.zeros(())
    loss = F.cross_entropy(pred, target)
    accuracy = (pred.argmax(-1) == target).float().mean()
    return loss, n_tokens, accuracy


def subquestion_nll(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Validation fidelity: the mean NLL of the sub-questions' own text tokens (``subq_mask``: no
    separators, no end marker), what ``evaluation.fidelity`` measures on held-out references, and
    their count (the weight for averaging over batches). Empty when the batch has no sub-question tokens."""
    if "subq_mask" not in batch:
        return {}
    mask = batch["subq_mask"][:, 1:] > 0  # token t + 1 is scored, predicted by the logits at t
    n = int(mask.sum())
    if not n:  # e.g. a distilled solver's episodes: no sub-question is written
        return {}
    nll = F.cross_entropy(logits[:, :-1][mask].float(), batch["input_ids"][:, 1:][mask])
    return {"losses/val_nll_subq": float(nll), "charts/val_subq_tokens": float(n)}


class BC:
    """Behaviour cloning trainer: holds the model, its AdamW optimizer and a warmup schedule."""

    def __init__(self, model: nn.Module, cfg: BCConfig) -> None:
        self.model = model
        self.cfg = cfg
        params = [p for p in model.parameters() if p.requires_grad]  # LoRA only, for a peft model
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer, self.scheduler = adamw_with_schedule(params, cfg)
        self.step = 0  # optimizer steps taken

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The BC loss of one (micro-)batch and its metrics; no backward, no optimizer step."""
        self.model.train()
        loss, n_tokens, accuracy = action_token_loss(self.model, self._to_device(batch))
        metrics = {
            "losses/bc": loss.item(),
            "charts/action_tokens": float(n_tokens),
            "charts/token_accuracy": float(accuracy),
        }
        return loss, metrics

    @contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """The model for validation: without DDP (its forward is a collective), in eval mode, no
        gradients; train mode is restored afterwards."""
        model = getattr(self.model, "module", self.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            model.train(was_training)

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Validation metrics of a held-out batch (eval mode, no gradients); train mode is restored."""
        batch = self._to_device(batch)
        with self.evaluating() as model:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n_tokens, accuracy = action_token_loss(model, batch, logits)
            subq = subquestion_nll(logits, batch)
        return {"losses/val_bc": loss.item(), "charts/val_token_accuracy": float(accuracy),
                "charts/val_action_tokens": float(n_tokens), **subq}

    def optimizer_step(self) -> dict[str, float]:
        """Clip the accumulated gradients, step the optimizer and the schedule, zero the gradients."""
        metrics = clip_and_step(self.optimizer, self.scheduler, self.cfg.max_grad_norm)
        self.step += 1
        return metrics

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One full update on ``batch``: loss, backward, clip, step. Returns the step's metrics."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.loss(batch)
        loss.backward()
        return {**metrics, **self.optimizer_step()}
