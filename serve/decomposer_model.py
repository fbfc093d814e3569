"""The decomposer's model side, without Ray: load, prompt, decode a batch, parse.

:meth:`Decoder.load` takes a subq checkpoint (rebuilding its ILQL heads and reading its ILQL ``beta``)
or any model spec of ``learner.models``; :meth:`Decoder.prompt_ids` builds the prompt exactly as the
learner trained it (student format) or as the teacher is asked (chat format); :meth:`Decoder.decode`
decodes a left-padded batch of :class:`Job` rows, each with its own beta, temperature, top_p, length
and stop strings, with ``learner.guided_decoding.generate_guided``. The Serve deployment
(``serve/decomposer.py``) calls ``decode`` from a worker thread; tests and benchmarks call it directly.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch
from subq.learner.checkpoint import (  # noqa: F401 (the budget rule is the learner's: re-exported)
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_CAP,
    default_max_new_tokens,
    is_checkpoint,
    load_checkpoint,
)
from subq.learner.episodes import encode_prompt
from subq.learner.guided_decoding import generate_guided
from subq.learner.ilql import ILQLConfig, ILQLHeads
from subq.learner.models import load_model_and_tokenizer
from subq.protocol.parse import cap_subquestions, parse_subquestions
from subq.protocol.prompts import PROMPT_VERSION, SUBQ_END, decompose_messages, parse_student_output
from subq.serve.generation import context_length, eos_token_ids, left_pad
from subq.serve.sampling import MIN_TEMPERATURE
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# train_loop stores the resolved ILQLConfig in meta["extra"]["algo_config"]; json.dumps(default=str)
# turns the dataclass into its repr, "ILQLConfig(gamma=0.99, ..., beta=1.0, ...)" (not "betas=").
_BETA_IN_REPR = re.compile(r"(?<![\w.])beta=([-+0-9.eE]+)")


@dataclass(frozen=True)
class Job:
    """One request's decoding: its prompt ids and effective settings."""

    prompt: list[int]
    beta: float = 0.0  # ILQL guidance; 0 = the plain LM
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 128  # new tokens at most, the end marker and eos included
    stop: tuple[str, ...] = ()  # extra stop strings (the student format always stops at SUBQ_END)


@dataclass
class Decoded:
    text: str  # the continuation, cut before the end marker / first stop string, without eos
    generated_tokens: int  # what usage bills: every decoded token, the end marker and eos included
    finish_reason: str  # "stop" (end marker, stop string or eos) or "length"


@dataclass
class BatchOutput:
    decoded: list[Decoded]  # one per job, in order
    forward_passes: int  # model calls for the whole batch (one per decoding step)


def checkpoint_beta(meta: dict[str, Any] | None) -> float:
    """The ILQL ``beta`` a checkpoint was trained for (``ILQLConfig.beta`` when it does not say)."""
    meta = meta or {}
    resolved = (meta.get("extra") or {}).get("algo_config")
    overrides = (meta.get("config") or {}).get("algo_config")
    candidates: list[Any] = []
    if isinstance(resolved, dict):
        candidates.append(resolved.get("beta"))
    elif isinstance(resolved, str) and (m := _BETA_IN_REPR.search(resolved)):
        candidates.append(m[1])
    if isinstance(overrides, dict):
        candidates.append(overrides.get("beta"))
    for value in candidates:
        try:
            beta = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(beta) and beta >= 0:
            return beta
    return ILQLConfig.beta


def heads_from_state(state: dict[str, torch.Tensor], model: PreTrainedModel) -> ILQLHeads | None:
    """Rebuild ``ILQLHeads`` from its saved state dict (``ILQLHeads.from_state_dict``: the shapes give
    two_q, hidden_mult and a low-rank Q); None when the state is not ILQL heads. On the model's device
    and dtype, in eval mode."""
    if not any(k.startswith("v_head.") for k in state) or not any(k.startswith("q1_head.") for k in state):
        return None
    heads = ILQLHeads.from_state_dict(state)  # strict: a missing or extra tensor means a broken checkpoint
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if (heads.hidden_size, heads.vocab_size) != (config.hidden_size, config.vocab_size):
        raise ValueError(f"the checkpoint's ILQL heads are for hidden size {heads.hidden_size} and vocabulary "
                         f"{heads.vocab_size}, the model has {config.hidden_size} and {config.vocab_size}")
    param = next(model.parameters())
    return heads.to(device=param.device, dtype=param.dtype).eval()


class Decoder:
    """A model, its tokenizer, optional ILQL heads and a prompt format; decodes batches of jobs."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, heads: ILQLHeads | None, *,
                 prompt_format: str, default_beta: float = 0.0, meta: dict[str, Any] | None = None) -> None:
        if prompt_format not in ("student", "chat"):
            raise ValueError(f"prompt_format must be 'student' or 'chat', got {prompt_format!r}")
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; use 'student'")
        if default_beta > 0 and heads is None:
            raise ValueError(f"beta {default_beta} needs ILQL heads, and this model has none (use beta 0)")
        self.model, self.tokenizer, self.heads = model.eval(), tokenizer, heads
        self.prompt_format, self.default_beta = prompt_format, float(default_beta)
        self.meta = meta  # the checkpoint's subq_checkpoint.json (None for a plain model)
        self.eos = sorted(eos_token_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or [0])[0]
        self.context = context_length(model) or 1 << 30
        # The event loop tokenizes prompts while the decode thread detokenizes stop windows: one at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: str, *, prompt_format: str = "auto", beta: float | None = None, device: str = "cpu",
             dtype: torch.dtype | None = None) -> Decoder:
        """A checkpoint dir (heads and beta included) or any ``learner.models`` spec.

        ``prompt_format="auto"``: student for a checkpoint, chat otherwise. ``beta=None``: the
        checkpoint's ILQL beta when it has heads, else 0.
        """
        heads, meta = None, None
        if is_checkpoint(spec):
            loaded = load_checkpoint(spec, dtype=dtype, device=device)
            model, tokenizer, meta = loaded.model, loaded.tokenizer, loaded.meta
            if loaded.heads_state is not None:
                heads = heads_from_state(loaded.heads_state, model)
                if heads is None:
                    logger.warning("%s: heads.safetensors holds no ILQL heads; decoding without guidance", spec)
            if meta.get("prompt_version") != PROMPT_VERSION:
                logger.warning("%s was trained with prompts %s; this code uses %s", spec,
                               meta.get("prompt_version"), PROMPT_VERSION)
        else:
            model, tokenizer = load_model_and_tokenizer(spec, dtype=dtype, device=device)
        fmt = prompt_format if prompt_format != "auto" else ("student" if meta is not None else "chat")
        default_beta = beta if beta is not None else (checkpoint_beta(meta) if heads is not None else 0.0)
        return cls(model, tokenizer, heads, prompt_format=fmt, default_beta=default_beta, meta=meta)

    @property
    def student(self) -> bool:
        return self.prompt_format == "student"

    def prompt_ids(self, problem: str, max_subquestions: int | None = None) -> list[int]:
        """The prompt's token ids: ``encode_prompt`` (as in training) or the chat template's rendering."""
        with self._lock:
            if self.student:
                return encode_prompt(self.tokenizer, problem)
            text = self.tokenizer.apply_chat_template(decompose_messages(problem, max_subquestions), tokenize=False,
                                                      add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def subquestions(self, text: str, max_subquestions: int | None = None) -> list[str]:
        """The sub-questions in a decoded continuation (parsers never raise)."""
        found = parse_student_output(text) if self.student else parse_subquestions(text).subquestions
        return cap_subquestions(found, max_subquestions)  # the first N - 1 and the last one

    def decode(self, jobs: list[Job], *, use_cache: bool = True) -> BatchOutput:
        """Decode all jobs together; greedy rows give what they would give alone (up to float rounding)."""
        if not jobs or any(not j.prompt or j.max_tokens < 1 for j in jobs):
            raise ValueError("need at least one job, each with a prompt and max_tokens >= 1")
        device = next(self.model.parameters()).device
        ids, mask = left_pad([j.prompt for j in jobs], self.pad_id)
        width = ids.shape[1]
        stops = [((SUBQ_END,) if self.student else ()) + tuple(job.stop) for job in jobs]
        # A stop string of L characters ends within the last 4L tokens (a character is at most 4 bytes).
        window = 4 * max((len(s) for row in stops for s in row), default=0) + 4
        stopped_at: dict[int, int] = {}

        def stop(row: int, tokens: list[int]) -> bool:
            if not stops[row]:
                return False
            with self._lock:
                tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
            if any(s in tail for s in stops[row]):
                stopped_at[row] = len(tokens)
                return True
            return False

        def per_row(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        # Below MIN_TEMPERATURE sampling is argmax anyway, and scores / 1e-40 overflow to NaN probabilities.
        temperatures = [j.temperature if j.temperature >= MIN_TEMPERATURE else 0.0 for j in jobs]

        out = generate_guided(
            self.model, self.heads, ids.to(device), mask.to(device),
            max_new_tokens=per_row([j.max_tokens for j in jobs], torch.long),
            beta=per_row([j.beta for j in jobs]), eos_token_id=self.eos, pad_token_id=self.pad_id,
            do_sample=any(t > 0 for t in temperatures), temperature=per_row(temperatures),
            top_p=per_row([j.top_p for j in jobs]), use_cache=use_cache,
            stop=stop if any(stops) else None, drop_finished=True,
        )
        new = out[:, width:].tolist()
        decoded = [self._finish(row, job, stopped_at.get(i), stops[i]) for i, (row, job) in
                   enumerate(zip(new, jobs, strict=True))]
        return BatchOutput(decoded=decoded, forward_passes=out.shape[1] - width)

    def _finish(self, row: list[int], job: Job, stopped_at: int | None, stops: tuple[str, ...]) -> Decoded:
        """A row's own tokens (finished rows are padded after their end), its text and finish reason."""
        limit = min(job.max_tokens, len(row))
        eos_at = next((k for k, t in enumerate(row[:limit]) if t in self.eos), None)
        if stopped_at is not None and (eos_at is None or stopped_at <= eos_at):  # pad may equal eos
            n, body, reason = stopped_at, row[:stopped_at], "stop"
        elif eos_at is not None:
            n, body, reason = eos_at + 1, row[:eos_at], "stop"
        else:
            n, body, reason = limit, row[:limit], "length"
        with self._lock:
            text = self.tokenizer.decode(body, skip_special_tokens=True)
        hits = [k for k in (text.find(s) for s in stops) if k >= 0]
        if hits:
            text, reason = text[:min(hits)], "stop"
        return Decoded(text=text, generated_tokens=n, finish_reason=reason)
