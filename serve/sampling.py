"""Choosing the next token for every row of a batch, each row with its own settings, each row on its own.

A server batches independent requests, so one request's settings must never break another's decoding.
:func:`choose_tokens` turns a step's logits into one token per row: ILQL guidance (``log pi + beta *
(Q - V)``), ``logit_bias``, presence/frequency penalties, then greedy or nucleus sampling at the row's
temperature. A row whose scores are unusable (NaN, +inf, or every token at -inf) is reported as failed
and its batch-mates are decoded as usual; a temperature below :data:`MIN_TEMPERATURE` decodes greedily
(``logits / 1e-40`` overflows to inf, and the softmax of inf is NaN).

Pure torch, no Ray: :mod:`serve.generation` calls it once per decoding step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-4  # below this, sampling is argmax up to rounding, and dividing by it may overflow


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (OpenAI chat-completion semantics, plus ILQL's beta)."""

    max_tokens: int = 256  # new tokens per sample, the terminating eos included
    temperature: float = 1.0  # 0 (or < MIN_TEMPERATURE) means greedy
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens with this much mass
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    n: int = 1  # independent samples of the same prompt
    seed: int | None = None  # makes sampling reproducible for this request (sample k uses seed + k)
    beta: float = 0.0  # ILQL guidance log pi + beta * (Q - V); needs value heads; 0 = the plain LM
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), as OpenAI's
    presence_penalty: float = 0.0  # subtracted once from every token already generated (OpenAI's formula)
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence of a token in this sample

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class RowState:
    """What :func:`choose_tokens` needs to know about a row beyond its settings."""

    params: SamplingParams
    generator: torch.Generator | None  # seeded per sample, or None for the global RNG
    counts: torch.Tensor | None = None  # [vocab] occurrences of each generated token (only with penalties)


def choose_tokens(
    logits: torch.Tensor, rows: Sequence[RowState], guidance: torch.Tensor | None = None
) -> tuple[list[int], list[str | None]]:
    """One token per row from ``logits`` [B, V]; returns (tokens, errors), an error string for a row
    that cannot be decoded (its token is then meaningless), None for the others.

    ``guidance`` [B, V] is ``Q - V`` from the ILQL heads (None when no row is guided).
    """
    scores = logits.float()
    device = scores.device
    if guidance is not None:
        betas = torch.tensor([r.params.beta for r in rows], dtype=torch.float32, device=device)
        guided = torch.log_softmax(scores, dim=-1) + betas[:, None] * guidance.float()
        scores = torch.where((betas != 0)[:, None], guided, scores)  # beta 0: exactly the plain LM
    for j, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=device)
            scores[j, ids] += torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32, device=device)
        if p.penalised and row.counts is not None:
            counts = row.counts.to(device)
            scores[j] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    errors: list[str | None] = [None] * len(rows)
    bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
    for j in bad.nonzero().flatten().tolist():
        errors[j] = "the model produced non-finite scores for this request (NaN, inf, or every token excluded)"
    scores = torch.where(bad[:, None], torch.zeros_like(scores), scores)  # keep the batch computable
    chosen = scores.argmax(dim=-1).tolist()

    for j, row in enumerate(rows):
        if errors[j] is not None or row.params.greedy:
            continue
        try:
            chosen[j] = _sample_row(scores[j], row.params, row.generator)
        except RuntimeError as e:  # multinomial refuses a broken distribution: this row only
            errors[j] = f"sampling failed for this request: {e}"
    return chosen, errors


def _sample_row(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Nucleus sampling at the row's temperature; falls back to argmax if scaling overflows."""
    scaled = scores / params.temperature
    if not bool(torch.isfinite(scaled.max())):  # a tiny temperature on huge scores: the limit is greedy
        return int(scores.argmax())
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p: the top token always survives.
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        outside[0] = False
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    if generator is not None:  # seeded rows draw on the CPU, so a seed gives the same text on any device
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return int(torch.multinomial(probs, 1))
