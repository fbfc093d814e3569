"""Iteration-level (continuous) batched decoding with a KV cache, each row with its own settings.

``transformers``' ``generate`` applies one temperature / top_p / stop list / length to a whole batch,
and a batch runs until its longest row is done. A server batches independent requests, so here each
row has its own :class:`~serve.sampling.SamplingParams`, and requests join and leave the running
batch between decoding steps:

- :meth:`BatchDecoder.admit` prefills new prompts (left-padded, the last position's logits only),
  copies a prompt's cache for the ``n`` samples it asked for, chooses their first tokens and merges
  their keys/values into the running cache (left-padding the shorter one; padding is masked);
- :meth:`BatchDecoder.step` feeds every live row its newest token, one forward pass for all, and
  drops finished and cancelled rows from the batch and the cache (and the columns no row needs).

Rows never see each other: with temperature 0 each row's output equals what the model produces for
that prompt alone (up to float rounding in the padded matmuls), and a row whose scores break (see
:mod:`serve.sampling`) fails alone. Results and, for streaming requests, text as it settles are
reported through each :class:`Request`'s ``on_event`` callback.

Pure torch + tokenizer, no Ray: :mod:`serve.engine` runs a BatchDecoder in a thread for the Serve
deployments; :func:`generate` runs one batch to completion for tests and scripts.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from subq.serve.sampling import RowState, SamplingParams, choose_tokens
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["BatchDecoder", "Completion", "Request", "SamplingParams", "generate"]
logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """One sample: its text (stop string trimmed), token ids and why it ended."""

    text: str
    token_ids: list[int]  # the text's tokens (no eos)
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_tokens / context full)
    generated_tokens: int  # sampled tokens, eos included: what usage.completion_tokens bills


@dataclass
class Delta:
    """Streaming: text of sample ``index`` that is settled (no partial character, no partial stop string)."""

    index: int
    text: str


@dataclass
class Finished:
    index: int
    completion: Completion


@dataclass
class Failed:
    """The request is over: ``status`` 4xx for a request the model cannot take, 5xx for a failure."""

    message: str
    status: int = 500


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Request:
    """A prompt (token ids) to decode ``params.n`` times; events go to ``on_event`` (called from the
    decoding thread). Set ``cancelled`` from any thread to free its rows at the next step."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    stream: bool = False  # report Delta events as text settles
    cancelled: bool = False
    done: bool = False  # set once its last event is sent
    failed: bool = False  # it ended with a Failed event
    open_rows: int = 0
    arrival: float = field(default_factory=time.monotonic)  # when the server got it (TTFT, latency)

    def send(self, event: Event) -> None:
        """Deliver ``event``; a receiver that is gone (closed event loop) cancels the request."""
        try:
            self.on_event(event)
        except Exception:
            logger.warning("a request's receiver failed; cancelling it", exc_info=True)
            self.cancelled = True


@dataclass(eq=False)
class _Row:
    request: Request
    index: int  # which of the request's n samples
    state: RowState
    budget: int  # new tokens allowed (max_tokens, bounded by the context)
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    emitted: int = 0  # characters already sent as Delta events
    text: str | None = None  # set when a stop string cut the text


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


class BatchDecoder:
    """The running batch: its rows, their KV cache, attention mask and next positions."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, heads: torch.nn.Module | None = None,
                 eos_ids: Iterable[int] | None = None) -> None:
        self.model, self.tokenizer, self.heads = model, tokenizer, heads
        self.eos = set(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.device = next(model.parameters()).device
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.context = context_length(model)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        # Only the last position's logits: a prefill would otherwise build [B, T, vocab] floats.
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.rows: list[_Row] = []
        self._cache = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self._next_tok = torch.zeros(0, dtype=torch.long, device=self.device)
        self.forward_passes = 0

    # ------------------------------------------------------------------------------ public

    @property
    def live_requests(self) -> int:
        return len({id(r.request) for r in self.rows})

    @torch.inference_mode()
    def admit(self, requests: Sequence[Request]) -> None:
        """Prefill ``requests`` and add their rows to the running batch; a request that cannot be
        prefilled fails alone (the group is retried one request at a time)."""
        requests = [r for r in requests if self._admissible(r)]
        if not requests:
            return
        try:
            self._admit(requests)
        except Exception as e:
            if len(requests) == 1:
                logger.exception("prefill failed")
                self._fail(requests[0], f"the server failed to process the prompt ({type(e).__name__})")
                return
            for r in requests:
                self.admit([r])

    @torch.inference_mode()
    def step(self) -> None:
        """One decoding step for every live row; finished and cancelled rows leave the batch."""
        self._drop([row for row in self.rows if row.request.cancelled or row.request.done])
        if not self.rows:
            return
        mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        try:
            out = self._forward(self._next_tok[:, None], mask, self._next_pos[:, None], self._cache,
                                guided=self._guided(r.request for r in self.rows))
        except Exception as e:  # the batch's forward pass itself broke: no row can continue
            logger.exception("decoding step failed")
            for request in {id(r.request): r.request for r in self.rows}.values():
                self._fail(request, f"the server failed while decoding ({type(e).__name__})")
            self._reset()
            return
        self._cache, self._mask, self._next_pos = out[0], mask, self._next_pos + 1
        self._choose(self.rows, out[1], out[2])

    def cancel_all(self, message: str) -> None:
        for request in {id(r.request): r.request for r in self.rows}.values():
            self._fail(request, message, status=503)
        self._reset()

    # ------------------------------------------------------------------------------ internals

    def _admissible(self, request: Request) -> bool:
        if request.cancelled or request.done:
            return False
        if not request.prompt or request.params.n < 1 or request.params.max_tokens < 1:
            self._fail(request, "empty prompt, n < 1 or max_tokens < 1", status=400)
            return False
        if self.context is not None and len(request.prompt) >= self.context:
            self._fail(request, f"the prompt has {len(request.prompt)} tokens; the model's context holds "
                                f"{self.context}: no room to generate", status=400)
            return False
        return True

    def _guided(self, requests: Iterable[Request]) -> bool:
        return self.heads is not None and any(r.params.beta != 0 for r in requests)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, *, guided: bool):
        """(cache, logits [B, V] of the last position, its last hidden state [B, H] when ``guided``)."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         output_hidden_states=guided, **self._keep, **kwargs)
        self.forward_passes += 1
        new_cache = out["cache"] if "cache" in out else out["past_key_values"]
        hidden = out.hidden_states[-1][:, -1] if guided else None
        return new_cache, out.logits[:, -1], hidden

    def _admit(self, requests: list[Request]) -> None:
        ids, mask = left_pad([r.prompt for r in requests], self.pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, logits, hidden = self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device),
                                              None, guided=self._guided(requests))
        rows, expand = [], []
        for i, r in enumerate(requests):
            room = r.params.max_tokens if self.context is None else min(r.params.max_tokens,
                                                                         self.context - len(r.prompt))
            for k in range(r.params.n):
                gen = None
                if r.params.seed is not None and not r.params.greedy:
                    gen = torch.Generator(device="cpu").manual_seed((r.params.seed + k) % 2**64)
                counts = torch.zeros(self.vocab, device=self.device) if r.params.penalised else None
                rows.append(_Row(request=r, index=k, state=RowState(r.params, gen, counts), budget=room))
                expand.append(i)
            r.open_rows = r.params.n
        sel = torch.tensor(expand, dtype=torch.long, device=self.device)
        if len(expand) != len(requests):  # n > 1 somewhere: the samples share their prompt's prefill
            cache.batch_select_indices(sel)
        mask, next_pos = mask.to(self.device)[sel], positions[:, -1].to(self.device)[sel] + 1
        self._merge(cache, mask, next_pos, rows)
        start = len(self.rows) - len(rows)
        self._choose(rows, logits[sel], None if hidden is None else hidden[sel], offset=start)

    def _merge(self, cache, mask: torch.Tensor, next_pos: torch.Tensor, rows: list[_Row]) -> None:
        """Append new rows (their cache, mask, positions) to the running batch, aligned on the right."""
        if self._cache is None or not self.rows:
            self._cache, self._mask, self._next_pos = cache, mask, next_pos
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(_layers(self._cache), _layers(cache), strict=True):
                old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)], dim=0)
                old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)], dim=0)
            self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], dim=0)
            self._next_pos = torch.cat([self._next_pos, next_pos])
        self._next_tok = torch.cat([self._next_tok, torch.full((len(rows),), self.pad_id, dtype=torch.long,
                                                               device=self.device)])
        self.rows.extend(rows)

    def _choose(self, rows: list[_Row], logits: torch.Tensor, hidden: torch.Tensor | None, offset: int = 0) -> None:
        """Pick each row's next token, advance it, and drop the rows that finished."""
        guidance = None
        if hidden is not None and self.heads is not None:
            q, v = self.heads.decode_values(hidden)
            guidance = q.float() - v.float()[:, None]
        tokens, errors = choose_tokens(logits, [r.state for r in rows], guidance)
        self._next_tok[offset:offset + len(rows)] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        finished = []
        for row, token, error in zip(rows, tokens, errors, strict=True):
            if error is not None:
                self._fail(row.request, error)
            elif not row.request.done:
                try:
                    if self._advance(row, token):
                        finished.append(row)
                except Exception as e:  # e.g. detokenizing: that request only
                    logger.exception("row failed")
                    self._fail(row.request, f"the server failed on this request ({type(e).__name__})")
        self._drop([r for r in rows if r.request.done] + finished)

    def _advance(self, row: _Row, token: int) -> bool:
        """Append ``token`` to ``row``; report progress; return True when the row is finished."""
        row.generated += 1
        if row.state.counts is not None:
            row.state.counts[token] += 1
        reason = None
        if token in self.eos:
            reason = "stop"
        else:
            row.tokens.append(token)
            stops = row.request.params.stop
            if stops or row.request.stream:
                # Decode the whole sample: a stop string may straddle tokens, and a byte-level token may
                # complete a multi-byte character only now. Samples are short, so this stays cheap.
                text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                settled = text.rstrip("\ufffd")  # a trailing U+FFFD is a character still missing its bytes
                hits = [i for i in (settled.find(s) for s in stops) if i >= 0]
                if hits:
                    row.text, reason = text[: min(hits)], "stop"
                elif row.request.stream:
                    # Hold back a tail that may still become a stop string.
                    self._emit(row, settled[: len(settled) - _stop_prefix(settled, stops)])
            if reason is None and row.generated >= row.budget:
                reason = "length"
        if reason is None:
            return False
        text = row.text if row.text is not None else self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if row.request.stream:
            self._emit(row, text)
        row.request.open_rows -= 1
        row.request.done = row.request.open_rows == 0  # before the event: its receiver may look at it at once
        row.request.send(Finished(row.index, Completion(text=text, token_ids=row.tokens, finish_reason=reason,
                                                        generated_tokens=row.generated)))
        return True

    def _emit(self, row: _Row, text: str) -> None:
        if len(text) > row.emitted:
            row.request.send(Delta(row.index, text[row.emitted:]))
            row.emitted = len(text)

    def _fail(self, request: Request, message: str, status: int = 500) -> None:
        if not request.done:
            request.done = request.failed = True
            request.send(Failed(message, status))

    def _drop(self, rows: list[_Row]) -> None:
        """Remove ``rows`` from the batch and the cache, then the leading columns no row attends to."""
        gone = {id(r) for r in rows}
        if not gone:
            return
        keep = [j for j, r in enumerate(self.rows) if id(r) not in gone]
        if not keep:
            self._reset()
            return
        sel = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(sel)
        self.rows = [self.rows[j] for j in keep]
        self._mask, self._next_pos, self._next_tok = self._mask[sel], self._next_pos[sel], self._next_tok[sel]
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:  # the longest prompt left: nobody needs those padded columns any more
            self._mask = self._mask[:, first:]
            for layer in _layers(self._cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _reset(self) -> None:
        self.rows, self._cache = [], None
        self._mask = self._mask[:0, :0]
        self._next_pos, self._next_tok = self._next_pos[:0], self._next_tok[:0]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, T] with every prompt aligned on the right: each row's last column is
    its last prompt token, so one step's new tokens line up."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids, mask


def _layers(cache) -> list:
    """The cache's per-layer key/value holders (transformers' DynamicCache)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise NotImplementedError(f"continuous batching needs a DynamicCache with per-layer keys/values, "
                                  f"got {type(cache).__name__}")
    return layers


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest tail of ``text`` that begins some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


@dataclass
class GenerationOutput:
    completions: list[list[Completion]]  # per prompt, n samples each
    forward_passes: int  # model calls (1 prefill + decode steps): the cost, independent of timing
    rows: int  # samples decoded together in this batch


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    *,
    eos_ids: Iterable[int] | None = None,
    heads: torch.nn.Module | None = None,
) -> GenerationOutput:
    """Sample completions for ``prompts`` (token ids), one :class:`SamplingParams` per prompt, all
    admitted at once and decoded to the end. Raises ValueError for a request that fails."""
    if len(prompts) != len(params) or not prompts:
        raise ValueError("need one SamplingParams per prompt, and at least one prompt")
    results: list[dict[int, Completion]] = [{} for _ in prompts]
    errors: list[str] = []

    def sink(i: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            if isinstance(event, Finished):
                results[i][event.index] = event.completion
            elif isinstance(event, Failed):
                errors.append(event.message)
        return on_event

    decoder = BatchDecoder(model, tokenizer, heads=heads, eos_ids=eos_ids)
    decoder.admit([Request(list(p), sp, sink(i)) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))])
    while decoder.rows:
        decoder.step()
    if errors:
        raise ValueError(errors[0])
    return GenerationOutput(completions=[[r[k] for k in sorted(r)] for r in results],
                            forward_passes=decoder.forward_passes, rows=sum(p.n for p in params))
