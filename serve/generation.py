"""Batched sampling with a KV cache, where every row has its own sampling parameters.

``transformers``' ``generate`` applies one temperature / top_p / stop list / length to a whole
batch. A server that batches independent requests needs them per row, so this module has its own
loop: left-pad the prompts, prefill each distinct prompt once, copy its cache for the ``n`` samples
it asked for, then decode one token per step for all live rows, dropping rows from the batch (and
from the cache) as soon as they finish so the rest run faster.

Pure torch + tokenizer, no Ray: the deployment in ``llm_server.py`` calls :func:`generate` from a
worker thread, and tests call it directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (OpenAI chat-completion semantics)."""

    max_tokens: int = 256  # new tokens per sample, the terminating eos included
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens with this much mass
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    n: int = 1  # independent samples of the same prompt
    seed: int | None = None  # makes sampling reproducible for this request (sample k uses seed + k)


@dataclass
class Completion:
    """One sample: its text (stop string trimmed), token ids and why it ended."""

    text: str
    token_ids: list[int]  # the text's tokens (no eos)
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_tokens / context full)
    generated_tokens: int  # sampled tokens, eos included: what usage.completion_tokens bills


@dataclass
class GenerationOutput:
    completions: list[list[Completion]]  # per prompt, n samples each
    forward_passes: int  # model calls (1 prefill + decode steps): the cost, independent of timing
    rows: int  # samples decoded together in this batch


@dataclass
class _Row:
    prompt: int
    params: SamplingParams
    budget: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    text: str | None = None
    finish_reason: str | None = None


def context_length(model: PreTrainedModel) -> int | None:
    """The model's maximum sequence length (prompt + completion), if its config says."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a turn: the tokenizer's eos and the generation config's (may be a list)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    *,
    eos_ids: Iterable[int] | None = None,
) -> GenerationOutput:
    """Sample completions for ``prompts`` (token ids), one :class:`SamplingParams` per prompt.

    Rows never see each other: with temperature 0 each row's output equals what the model produces
    for that prompt alone (up to float rounding in the padded matmuls).
    """
    if len(prompts) != len(params) or not prompts:
        raise ValueError("need one SamplingParams per prompt, and at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    eos = set(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    device = next(model.parameters()).device
    ctx = context_length(model)

    rows: list[_Row] = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        budget = p.max_tokens if ctx is None else min(p.max_tokens, ctx - len(prompt))
        if budget < 1:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in a context of {ctx}")
        for k in range(p.n):
            gen = torch.Generator(device="cpu").manual_seed(p.seed + k) if p.seed is not None else None
            rows.append(_Row(prompt=i, params=p, budget=budget, generator=gen))

    # Prefill each distinct prompt once, left-padded so every row's last column is its last token.
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), use_cache=True)
    passes = 1
    cache = out.past_key_values
    expand = torch.tensor([r.prompt for r in rows], dtype=torch.long)
    if len(rows) != len(prompts):  # n > 1 somewhere: the samples share their prompt's prefill
        cache.batch_select_indices(expand.to(device))
    logits = out.logits[:, -1, :].float()[expand.to(device)]
    mask = mask[expand].to(device)
    next_pos = positions[expand, -1].to(device) + 1

    live = list(range(len(rows)))  # batch position -> row index
    temperature = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=device)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=device)
    while True:
        live_idx = torch.tensor(live, dtype=torch.long, device=device)
        chosen = _sample(logits, temperature[live_idx], top_p[live_idx], [rows[r].generator for r in live])
        keep = [j for j, r in enumerate(live) if not _advance(rows[r], int(chosen[j]), eos, tokenizer)]
        if not keep:
            break
        if len(keep) < len(live):  # drop finished rows from every tensor, and from the cache
            sel = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(sel)
            mask, next_pos, chosen = mask[sel], next_pos[sel], chosen[sel]
            live = [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        passes += 1
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :].float()

    completions: list[list[Completion]] = [[] for _ in prompts]
    for r in rows:
        text = r.text if r.text is not None else tokenizer.decode(r.tokens, skip_special_tokens=True)
        completions[r.prompt].append(Completion(text=text, token_ids=r.tokens,
                                                finish_reason=r.finish_reason or "length",
                                                generated_tokens=r.generated))
    return GenerationOutput(completions=completions, forward_passes=passes, rows=len(rows))


def _advance(row: _Row, token: int, eos: set[int], tokenizer: PreTrainedTokenizerBase) -> bool:
    """Append ``token`` to ``row``; return True when the row is finished."""
    row.generated += 1
    if token in eos:
        row.finish_reason = "stop"
        return True
    row.tokens.append(token)
    if row.params.stop:
        # Decode the whole sample: a stop string may straddle tokens, and a byte-level token may
        # complete a multi-byte character only now. Samples are short, so this stays cheap.
        text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        settled = text.rstrip("\ufffd")  # a trailing U+FFFD is a character still missing its bytes
        hits = [i for i in (settled.find(s) for s in row.params.stop) if i >= 0]
        if hits:
            row.text = text[: min(hits)]
            row.finish_reason = "stop"
            return True
    if row.generated >= row.budget:
        row.finish_reason = "length"
        return True
    return False


def _sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else nucleus sampling at that temperature."""
    chosen = logits.argmax(dim=-1)
    sampled = (temperature > 0).nonzero().flatten().tolist()
    if not sampled:
        return chosen
    idx = torch.tensor(sampled, dtype=torch.long, device=logits.device)
    probs = torch.softmax(logits[idx] / temperature[idx, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep a token while the mass before it is below top_p: the top token always survives.
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[idx, None]
    outside[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(outside, 0.0).cpu()
    for j, row in enumerate(sampled):
        pick = torch.multinomial(sorted_probs[j], 1, generator=generators[row])
        chosen[row] = order[j, pick.item()]
    return chosen
