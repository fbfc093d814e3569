"""ILQL-guided decoding with a KV cache (Snell et al. 2022, Eq. 5).

At every step the next token is chosen from ``log pi_LM(a|s) + beta * (Q(s, a) - V(s))``, where Q and V
come from ``ILQLHeads`` on the LM's last hidden state at the newest position. With ``use_cache=True``
the model sees only the newest token per step and reuses the keys/values of the prefix; with
``use_cache=False`` it recomputes the whole prefix at every step, as paper 1's released decoder does.
Both give the same tokens (a test pins it); the cache makes a step O(1) in the prefix length
instead of O(length).

Batches may be left-padded (the usual layout for batched generation): position ids are counted from
each row's first real token, as ``transformers`` does, so padding does not change a row's tokens.

A server batches independent requests, so ``beta``, ``temperature``, ``top_p`` and ``max_new_tokens`` may
also be given per row (1-D tensors), a ``stop`` callback can end a row early (e.g. at a stop string), and
``drop_finished=True`` removes finished rows from the forward pass and the cache so the others run faster.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from subq.learner.ilql import ILQLHeads, guided_logits
from torch import nn


def _top_p_filter(scores: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches ``top_p``
    (a float, or one value per row as a [B, 1] tensor)."""
    if (top_p >= 1.0) if isinstance(top_p, float | int) else bool((top_p >= 1.0).all()):
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove = cum - sorted_scores.softmax(-1) >= top_p  # mass *before* a token already reaches top_p
    remove[..., 0] = False  # always keep the best token
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _per_row(value: float | torch.Tensor, rows: int, device: torch.device, dtype: torch.dtype,
             name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(rows)
    if t.shape != (rows,):
        raise ValueError(f"{name} must be a number or a tensor of shape ({rows},), got {tuple(t.shape)}")
    return t


def _logits_to_keep(model: nn.Module) -> dict[str, int]:
    """Ask for the last position's logits only, where the model supports it (as ``generate`` does): the
    prefill would otherwise build a [B, T, vocab] tensor, e.g. 1.2 GB for 32 x 200 tokens x 49k vocab."""
    try:
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"logits_to_keep": 1} if accepts else {}


@torch.no_grad()
def generate_guided(
    model: nn.Module,
    heads: ILQLHeads | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | torch.Tensor,
    beta: float | torch.Tensor,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float | torch.Tensor = 1.0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop: Callable[[int, list[int]], bool] | None = None,
    drop_finished: bool = False,
) -> torch.LongTensor:
    """Decode up to ``max_new_tokens`` per row with ILQL guidance; returns prompt + new tokens.

    Like ``model.generate``: a row that emitted an eos token is continued with ``pad_token_id``
    (default: the first eos id) and decoding stops once every row has finished. ``beta == 0`` is plain
    decoding of the LM (the heads are then not evaluated and may be None). Put the model in eval mode
    first: dropout would make steps random. Each step is one forward pass, so the number of new
    columns is the number of forward passes.

    Per-row settings (1-D tensors of length B, where a float is given to all rows):
    ``beta`` (rows with 0 decode the plain LM), ``max_new_tokens`` (a row ends after that many tokens;
    the loop runs to the largest), ``top_p``, and ``temperature``: with a tensor and ``do_sample``, rows
    with temperature 0 are greedy and the others sample. ``stop(row, tokens)`` is called after each
    step for every row still running (``row`` is its index in the batch, ``tokens`` its new tokens so
    far; do not modify the list): True ends the row there, like an eos (its last token is kept).
    ``drop_finished`` takes finished rows out of the batch (and the KV cache) instead of feeding them
    pad tokens; the returned tokens are the same, only sampling draws from ``generator`` differ.
    """
    rows_n = input_ids.shape[0]
    device = input_ids.device
    betas = _per_row(beta, rows_n, device, torch.float32, "beta")
    limits = _per_row(max_new_tokens, rows_n, device, torch.long, "max_new_tokens")
    per_row_temperature = isinstance(temperature, torch.Tensor)
    temps = _per_row(temperature, rows_n, device, torch.float32, "temperature")
    top_ps = top_p if isinstance(top_p, float | int) else _per_row(top_p, rows_n, device, torch.float32, "top_p")
    guided = bool((betas != 0).any())
    if guided and heads is None:
        raise ValueError("guided decoding with beta != 0 needs ILQL heads")
    if do_sample and (bool((temps < 0).any()) if per_row_temperature else temperature <= 0):
        raise ValueError(f"temperature must be > 0 when sampling (or 0 per row for greedy rows), got {temperature}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids = torch.tensor(eos, device=device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    keep_logits = _logits_to_keep(model)

    steps = int(limits.max()) if rows_n else 0
    new = torch.full((rows_n, steps), pad, dtype=torch.long, device=device)
    finished = torch.zeros(rows_n, dtype=torch.bool, device=device)
    produced = torch.zeros(rows_n, dtype=torch.long, device=device)
    rows = torch.arange(rows_n, device=device)  # batch position -> row of the input (changes when dropping)
    so_far: list[list[int]] = [[] for _ in range(rows_n)]  # per row, for ``stop``
    seq, past, width = input_ids, None, 0
    for step in range(steps):
        # Left padding: a row's first real token is position 0 (pads get position 1; they are masked anyway).
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if past is None:  # the first step, or every step without the cache: the whole prefix
            out = model(input_ids=seq, attention_mask=mask, position_ids=positions, use_cache=use_cache,
                        output_hidden_states=guided, **keep_logits)
        else:  # only the newest token; keys/values of the prefix come from the cache
            out = model(input_ids=seq[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                        past_key_values=past, use_cache=True, output_hidden_states=guided, **keep_logits)
        past = out.past_key_values if use_cache else None
        scores = out.logits[:, -1].float()
        row_beta = betas[rows]
        if guided and bool((row_beta != 0).any()):
            q, v = heads.decode_values(out.hidden_states[-1][:, -1])
            # rows with beta 0 keep the raw logits, so they decode exactly as the plain LM
            scores = torch.where((row_beta != 0)[:, None], guided_logits(scores, q, v, row_beta[:, None]), scores)

        if do_sample:
            row_top_p = top_ps if isinstance(top_ps, float | int) else top_ps[rows][:, None]
            if per_row_temperature:
                row_t = temps[rows]
                safe_t = torch.where(row_t > 0, row_t, torch.ones_like(row_t))  # greedy rows: any finite value
                probs = _top_p_filter(scores / safe_t[:, None], row_top_p).softmax(-1)
                sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                next_tok = torch.where(row_t > 0, sampled, scores.argmax(-1))
            else:
                probs = _top_p_filter(scores / temperature, row_top_p).softmax(-1)
                next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tok = scores.argmax(-1)
        running = ~finished[rows]
        next_tok = torch.where(running, next_tok, torch.full_like(next_tok, pad))

        new[rows, step] = next_tok
        produced[rows] += running.long()
        done = running & (torch.isin(next_tok, eos_ids) | (produced[rows] >= limits[rows]))
        if stop is not None:
            flags = done.tolist()
            for j, (r, tok, run) in enumerate(zip(rows.tolist(), next_tok.tolist(), running.tolist(), strict=True)):
                if run:
                    so_far[r].append(tok)
                    if not flags[j] and stop(r, so_far[r]):
                        flags[j] = True
            done = torch.tensor(flags, dtype=torch.bool, device=device)
        finished[rows] |= done
        width = step + 1
        if bool(finished.all()):
            break
        seq = torch.cat([seq, next_tok[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if drop_finished and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            rows, seq, mask = rows[keep], seq[keep], mask[keep]
            if past is not None:
                past.batch_select_indices(keep)
    return torch.cat([input_ids, new[:, :width]], dim=1)
