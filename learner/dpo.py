"""Direct Preference Optimization (DPO; Rafailov et al. 2023), offline, over ranked teacher decompositions.

Each problem has several teacher decompositions, each with a return (``learner.episodes.episode_return``:
correctness, usefulness or both). :func:`make_pairs` turns them into preferences: within one problem,
every two decompositions whose returns differ by at least ``margin`` give a pair (chosen y_w = the
higher return, rejected y_l). Pairs never cross problems; a problem with one decomposition, or whose
returns are all within the margin, gives none.

With log-probabilities summed over the *action* tokens (the sub-questions and the end marker; the
problem text is context) and a frozen reference model (the BC checkpoint DPO starts from):

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    "sigmoid" (DPO):  L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                      eps = label_smoothing: the chance a preference is flipped (cDPO, Mitchell 2023)
    "ipo" (Azar et al. 2023):  L = (h - 1 / (2 beta))^2, on log-probs *averaged* over each sequence's
                      action tokens (as TRL does), so that the target gap 1 / (2 beta) does not depend on
                      how long the decompositions are
    total = L + nll_weight * NLL(y_w)   (nll_weight > 0: the NLL term on the chosen decomposition of
                      Pang et al. 2024, "Iterative Reasoning Preference Optimization"; 0 = plain DPO)

The implicit reward of a decomposition is ``beta * (log pi(y|x) - log ref(y|x))``; the metrics
``charts/reward_*`` report it, and ``charts/reward_accuracy`` is the share of pairs it ranks right.

Reference model: its log-probabilities do not change during training, so the driver's data step
computes them once, for every episode in a pair, and stores them with the pairs
(``learner/preference_data.py``); a batch carries them as ``ref_logps``. That keeps one model in
memory during training instead of two, and costs one forward pass per episode once instead of one
per episode per epoch. Dropout is switched off (``disable_dropout``) so that at step 0 the policy's
log-probabilities equal the stored reference ones and the loss starts at log 2.

Batch contract: :func:`collate_pairs`. The update (AdamW, schedule, clipping) is BC's; as there, the
Ray Train driver calls :meth:`DPO.loss` per micro-batch and :meth:`DPO.optimizer_step` per step.
A micro-batch of ``batch_size`` holds that many *pairs* (2 x batch_size sequences), each pair whole.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TypeVar

import torch
import torch.nn.functional as F
from subq.learner.bc import BC
from subq.learner.episodes import RETURN_KINDS, Episode, collate, episode_return
from subq.learner.filtered_bc import Rankable
from subq.learner.optim import OptimConfig
from torch import nn

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(OptimConfig):
    """DPO's settings; the optimizer's fields are ``OptimConfig``'s (``learner/optim.py``)."""

    lr: float = 1e-6  # AdamW learning rate (Rafailov et al. and TRL's DPOTrainer default)
    beta: float = 0.1  # strength of the KL anchor to the reference (DPO's beta, Rafailov et al.: 0.1; IPO's tau)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO, Rafailov et al.; cDPO with label_smoothing) or "ipo"
    label_smoothing: float = 0.0  # cDPO's eps in [0, 0.5): the assumed chance a preference label is wrong
    #                              (0: plain DPO, Rafailov et al.)
    nll_weight: float = 0.0  # weight of the chosen decomposition's token NLL added to the loss (0: plain DPO)
    return_kind: str = "both"  # what ranks decompositions: "correctness", "usefulness", "both" (episodes.py);
    #                           ours: both kinds of teacher feedback, as filtered BC's ranking
    margin: float = 0.5  # a pair needs returns that differ by at least this (> 0: equal returns never pair);
    #                     ours: small usefulness differences are noise from a few feedback samples
    max_pairs_per_problem: int = 0  # > 0: keep a problem's pairs with the largest return gaps; 0: all (ours)
    disable_dropout: bool = True  # no dropout in the policy, so it matches the reference at step 0 (as TRL)


def check_config(cfg: DPOConfig) -> None:
    """Raise ``ValueError`` naming the setting when the config is invalid."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if not cfg.beta > 0:
        raise ValueError(f"beta must be > 0, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.label_smoothing and cfg.loss_type == "ipo":
        raise ValueError("label_smoothing is cDPO's: it applies to loss_type 'sigmoid', not 'ipo'")
    if cfg.nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0, got {cfg.nll_weight}")
    if cfg.return_kind not in RETURN_KINDS:
        raise ValueError(f"return_kind must be one of {RETURN_KINDS}, got {cfg.return_kind!r}")
    if not cfg.margin > 0:
        raise ValueError(f"margin must be > 0 (equal returns state no preference), got {cfg.margin}")
    if cfg.max_pairs_per_problem < 0:
        raise ValueError(f"max_pairs_per_problem must be >= 0, got {cfg.max_pairs_per_problem}")


# ----------------------------------------------------------------------------------------- pairs

E = TypeVar("E", bound=Rankable)


def _tokens(ep: Rankable) -> object:
    """What makes two decompositions the same text: the data step's token hash, or the tokens."""
    return getattr(ep, "token_hash", None) or tuple(getattr(ep, "input_ids", ()))


def make_pairs(episodes: Sequence[E], cfg: DPOConfig) -> tuple[list[tuple[E, E]], int]:
    """(chosen, rejected) pairs within each problem, and how many identical-text pairs were skipped.

    Two episodes of the same problem pair when their returns differ by at least ``cfg.margin``; the
    higher return is chosen. Identical token sequences never pair (their log-ratio difference is 0
    whatever the model: no gradient). Episodes without a problem id never pair. With
    ``max_pairs_per_problem`` a problem keeps its pairs with the largest return gaps (ties: smaller
    sample keys). The result is sorted by (chosen key, rejected key): a function of the episodes
    alone, whatever their order.
    """
    check_config(cfg)
    groups: dict[str, list[E]] = defaultdict(list)
    for ep in episodes:
        if ep.problem_id is not None:
            groups[ep.problem_id].append(ep)
    pairs: list[tuple[float, E, E]] = []
    identical = 0
    for group in groups.values():
        found = []
        for a, b in combinations(group, 2):
            ra, rb = episode_return(a, cfg.return_kind), episode_return(b, cfg.return_kind)
            if abs(ra - rb) < cfg.margin:
                continue
            if _tokens(a) == _tokens(b):
                identical += 1
                continue
            chosen, rejected = (a, b) if ra > rb else (b, a)
            found.append((abs(ra - rb), chosen, rejected))
        found.sort(key=lambda p: (-p[0], str(p[1].sample_key), str(p[2].sample_key)))
        pairs += found[: cfg.max_pairs_per_problem] if cfg.max_pairs_per_problem else found
    pairs.sort(key=lambda p: (str(p[1].sample_key), str(p[2].sample_key)))
    return [(c, r) for _, c, r in pairs], identical


# ------------------------------------------------------------------------------------------ batch


def collate_pairs(chosen: list[Episode], rejected: list[Episode], ref_chosen: Sequence[float],
                  ref_rejected: Sequence[float], pad_id: int) -> dict[str, torch.Tensor]:
    """A DPO batch: ``learner.episodes.collate`` of the 2k sequences, chosen first (rows 0..k-1), then
    rejected (rows k..2k-1, row k + i is the rejected of pair i), plus ``ref_logps`` [2k] (float64):
    the reference model's summed action log-probs of each row."""
    if len(chosen) != len(rejected) or len(chosen) != len(ref_chosen) or len(chosen) != len(ref_rejected):
        raise ValueError("chosen, rejected and their reference log-probs must have one entry per pair")
    batch = collate(list(chosen) + list(rejected), pad_id)
    batch["ref_logps"] = torch.tensor([*ref_chosen, *ref_rejected], dtype=torch.float64)
    return batch


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log pi(a_t | s_t) over its action tokens [B] (float32), and their count [B].

    Only the positions that predict an action go through the softmax (memory as BC's loss).
    """
    input_ids = batch["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
    mask = batch["action_mask"][:, 1:] > 0  # token t + 1 is an action, predicted by the logits at t
    token_logps = F.log_softmax(logits[:, :-1][mask].float(), dim=-1).gather(
        1, input_ids[:, 1:][mask][:, None]).squeeze(1)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device)
    return sums.index_add(0, rows, token_logps), mask.sum(1)


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair losses from log pi(y|x) - log ref(y|x) of the chosen and the rejected (module docstring)."""
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)).pow(2)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _disable_dropout(model: nn.Module) -> None:
    """Dropout layers at p = 0, and the attention dropout that HF attention modules apply functionally."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class DPO(BC):
    """DPO trainer: BC's model, optimizer and update, with the preference loss of a pair batch."""

    cfg: DPOConfig

    def __init__(self, model: nn.Module, cfg: DPOConfig) -> None:
        check_config(cfg)
        super().__init__(model, cfg)
        if cfg.disable_dropout:
            _disable_dropout(model)

    def _loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        logps, n_tokens = sequence_logps(model, batch)
        ref = batch["ref_logps"]
        k = logps.shape[0] // 2
        if cfg.loss_type == "ipo":  # per-token averages (module docstring)
            n = n_tokens.clamp(min=1).to(ref.dtype)
            policy, ref = logps.to(ref.dtype) / n, ref / n
        else:
            policy = logps.to(ref.dtype)
        logratios = policy - ref  # float64: two sums of hundreds of log-probs, subtracted
        losses = dpo_loss(logratios[:k], logratios[k:], beta=cfg.beta, loss_type=cfg.loss_type,
                          label_smoothing=cfg.label_smoothing).float()
        nll = -logps[:k].sum() / n_tokens[:k].sum().clamp(min=1)  # the chosen decompositions' token NLL
        loss = losses.mean() + (cfg.nll_weight * nll if cfg.nll_weight else 0.0)
        with torch.no_grad():
            rewards = (cfg.beta * logratios).float()
            chosen, rejected = rewards[:k], rewards[k:]
            metrics = {
                "losses/dpo": float(losses.mean()), "losses/bc": float(nll), "losses/total": float(loss),
                "charts/reward_chosen": float(chosen.mean()), "charts/reward_rejected": float(rejected.mean()),
                "charts/reward_margin": float((chosen - rejected).mean()),
                "charts/reward_accuracy": float((chosen > rejected).float().mean()),
                "charts/logp_chosen": float(logps[:k].mean()), "charts/logp_rejected": float(logps[k:].mean()),
                "charts/pairs": float(k), "charts/action_tokens": float(n_tokens.sum()),
            }
        return loss, metrics

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The DPO loss of one (micro-)batch of pairs (:func:`collate_pairs`) and its metrics."""
        self.model.train()
        return self._loss(self.model, self._to_device(batch))

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Validation metrics of held-out pairs (``*/val_*``), weighted by ``charts/val_pairs``."""
        with self.evaluating() as model:
            _, metrics = self._loss(model, self._to_device(batch))
        return {k.replace("/", "/val_", 1): v for k, v in metrics.items() if k != "charts/action_tokens"}
