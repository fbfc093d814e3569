"""Log-probabilities of given tokens under a model: what ``logprobs`` and ``echo`` report.

One forward pass over a whole sequence (prompt and completion, no cache) scores every token from a
start position on: ``log p(token_t | tokens_<t)`` from the model's raw logits (before temperature,
penalties or logit_bias, as vLLM reports them by default), plus the ``top_k`` most likely tokens at
each position. The first token of a sequence has no context, so its log-prob is None (OpenAI's
``null``). Only the positions asked for get logits (``logits_to_keep``), so scoring a completion
after a long prompt does not build a [prompt, vocab] matrix.

Generation does not keep its scores: a request that wants log-probs is scored again after it is
decoded (one forward pass, the cost of a prefill). Pure torch, no Ray.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

IMPOSSIBLE = -9999.0  # what OpenAI reports for a token of probability 0 (JSON has no -Infinity)


@dataclass
class TokenScores:
    """Scores of ``ids`` (the tokens from the start position on), one entry per token."""

    ids: list[int]
    logprobs: list[float | None]  # None for a sequence's first token (nothing precedes it)
    top: list[list[tuple[int, float]] | None]  # the top_k (token id, log-prob) at each position, most likely first


class ScoringError(RuntimeError):
    """The model's scores are unusable (NaN): a server failure, never the client's."""


@torch.inference_mode()
def score_tokens(model: PreTrainedModel, ids: list[int], start: int, top_k: int) -> TokenScores:
    """Scores of ``ids[start:]`` given what precedes each of them (``0 <= start <= len(ids)``)."""
    if not 0 <= start <= len(ids):
        raise ValueError(f"start {start} outside 0..{len(ids)}")
    scored = ids[start:]
    out = TokenScores(ids=list(scored), logprobs=[], top=[])
    if start == 0 and scored:  # nothing predicts the first token
        out.logprobs.append(None)
        out.top.append(None)
    first = max(start, 1)  # the first position whose token a logit predicts
    if first >= len(ids):
        return out
    keep = len(ids) - first + 1  # logits of positions first-1 .. len-1; the last predicts nothing asked for
    device = next(model.parameters()).device
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False, **kwargs).logits[0, -keep:-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if torch.isnan(logprobs).any():
        raise ScoringError("the model produced NaN scores for this text")
    targets = torch.tensor(ids[first:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    if top_k > 0:
        values, indices = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(i, map(_finite, v), strict=True)) for i, v in zip(indices.tolist(), values.tolist(),
                                                                            strict=True)]
    else:
        tops = [[] for _ in chosen]
    out.logprobs.extend(_finite(v) for v in chosen)
    out.top.extend(tops)
    return out


def _finite(value: float) -> float:
    return value if math.isfinite(value) else IMPOSSIBLE
