"""ILQL-guided decoding with a KV cache (Snell et al. 2022, Eq. 5).

At every step the next token is chosen from ``log pi_LM(a|s) + beta * (Q(s, a) - V(s))``, where Q and V
come from ``ILQLHeads`` on the LM's last hidden state at the newest position. With ``use_cache=True``
the model sees only the newest token per step and reuses the keys/values of the prefix; with
``use_cache=False`` it recomputes the whole prefix at every step, as paper 1's released decoder does.
Both give the same tokens (a test pins it); the cache makes a step O(1) in the prefix length
instead of O(length).

Batches may be left-padded (the usual layout for batched generation): position ids are counted from
each row's first real token, as ``transformers`` does, so padding does not change a row's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from learner.ilql import ILQLHeads, guided_logits


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove = cum - sorted_scores.softmax(-1) >= top_p  # mass *before* a token already reaches top_p
    remove[..., 0] = False  # always keep the best token
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


@torch.no_grad()
def generate_guided(
    model: nn.Module,
    heads: ILQLHeads | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    beta: float,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.LongTensor:
    """Decode up to ``max_new_tokens`` per row with ILQL guidance; returns prompt + new tokens.

    Like ``model.generate``: a row that emitted an eos token is continued with ``pad_token_id``
    (default: the first eos id) and decoding stops once every row has finished. ``beta == 0`` is plain
    decoding of the LM (the heads are then not evaluated and may be None). Put the model in eval mode
    first: dropout would make steps random.
    """
    if beta != 0 and heads is None:
        raise ValueError("guided decoding with beta != 0 needs ILQL heads")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids = torch.tensor(eos, device=device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    seq = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    past = None
    for _ in range(max_new_tokens):
        # Left padding: a row's first real token is position 0 (pads get position 1; they are masked anyway).
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if past is None:  # the first step, or every step without the cache: the whole prefix
            out = model(input_ids=seq, attention_mask=mask, position_ids=positions, use_cache=use_cache,
                        output_hidden_states=True)
        else:  # only the newest token; keys/values of the prefix come from the cache
            out = model(input_ids=seq[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                        past_key_values=past, use_cache=True, output_hidden_states=True)
        past = out.past_key_values if use_cache else None
        scores = out.logits[:, -1].float()
        if beta != 0:
            q, v = heads.decode_values(out.hidden_states[-1][:, -1])
            scores = guided_logits(scores, q, v, beta)

        if do_sample:
            probs = _top_p_filter(scores / temperature, top_p).softmax(-1)
            next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tok = scores.argmax(-1)
        next_tok = torch.where(finished, torch.full_like(next_tok, pad), next_tok)

        seq = torch.cat([seq, next_tok[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        finished |= torch.isin(next_tok, eos_ids)
        if bool(finished.all()):
            break
    return seq
