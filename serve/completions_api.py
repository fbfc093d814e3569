"""OpenAI's legacy completions wire format (``POST /v1/completions``), as vLLM serves it: validation
and response bodies, no Ray, no torch.

What lm-evaluation-harness (``local-completions``), ``subq eval --decomposer NAME=openai:MODEL@URL`` and
load generators send: ``prompt`` (a string, a list of strings, a list of token ids or a list of such
lists), ``max_tokens`` (default 16, as OpenAI and vLLM; 0 with ``echo`` scores the prompt only),
``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``stream`` (+ ``stream_options``), ``echo``,
``logprobs`` (an integer k in 0..20: each token's log-prob and its k most likely alternatives, in
``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), ``logit_bias``, the penalties,
``user``, and vLLM's ``add_special_tokens`` (default true). ``best_of`` other than ``n`` and a non-empty
``suffix`` are refused by name, as is ``logprobs`` with ``stream``; ``null`` means absent; unknown
fields are refused. Choices are ordered prompt by prompt, ``n`` per prompt (OpenAI's order).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from subq.serve.chat_api import MAX_TOP_LOGPROBS, _logit_bias, _stop, _stream_options, usage
from subq.serve.fields import ApiError, boolean, check_model, integer, json_type, number, refuse_unknown
from subq.serve.generation import Completion
from subq.serve.sampling import SamplingParams

MAX_PROMPTS = 64  # prompts in one request; each is a request of n rows for the engine
DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for this route
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
          "echo", "logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "user", "best_of", "suffix",
          "add_special_tokens")

Prompt = str | tuple[int, ...]  # text, or token ids sent as they are


@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``/v1/completions`` request."""

    prompts: tuple[Prompt, ...]  # one or more; each gets n choices
    max_tokens: int  # new tokens per choice; 0: no generation (echo scores the prompt)
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool = False  # server-sent events of text_completion chunks (one prompt only)
    include_usage: bool = False  # stream_options.include_usage
    echo: bool = False  # each choice's text starts with its prompt (and its log-probs cover the prompt)
    logprobs: int | None = None  # None: off; k: log-probs with the k most likely alternatives per token
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    add_special_tokens: bool = True  # vLLM's extension: let the tokenizer add its specials (e.g. BOS) to text

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                              n=self.n, seed=self.seed, logit_bias=self.logit_bias,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)


def parse_completion_request(body: Any, *, served_model: str, max_n: int, max_new_tokens: int,
                             vocab_size: int, max_prompt_chars: int | None = None,
                             max_prompt_tokens: int | None = None) -> CompletionRequest:
    """Validate a decoded JSON body against the completions schema and this server's limits."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not a JSON {json_type(body)}",
                       code="invalid_json")
    refuse_unknown(body, FIELDS, "/v1/completions")
    check_model(body.get("model"), served_model)
    n = integer(body, "n", 1, max_n) or 1
    best_of = integer(body, "best_of", 1, max_n)
    if best_of is not None and best_of != n:
        raise ApiError(400, "'best_of' is not supported by this server (only best_of = n)",
                       code="unsupported_parameter", param="best_of")
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise ApiError(400, "'suffix' (insertion) is not supported by this server", code="unsupported_parameter",
                       param="suffix")
    stream = boolean(body, "stream")
    prompts = _prompts(body.get("prompt"), vocab_size, max_prompt_chars, max_prompt_tokens)
    if stream and len(prompts) > 1:
        raise ApiError(400, "'stream': true takes one prompt on this server; send the prompts one by one",
                       code="unsupported_parameter", param="prompt")
    logprobs = integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    if logprobs is not None and stream:
        raise ApiError(400, "'logprobs' are not supported with 'stream': true on this server; ask without "
                            "streaming", code="unsupported_parameter", param="logprobs")
    max_tokens = integer(body, "max_tokens", 0, max_new_tokens)
    return CompletionRequest(
        prompts=prompts,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0),
        n=n,
        stop=_stop(body.get("stop")),
        seed=integer(body, "seed", -(2**63), 2**63 - 1),
        stream=stream,
        include_usage=_stream_options(body.get("stream_options"), stream),
        echo=boolean(body, "echo"),
        logprobs=logprobs,
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        add_special_tokens=body.get("add_special_tokens") is None or boolean(body, "add_special_tokens"),
    )


def _prompts(value: Any, vocab: int, max_chars: int | None, max_tokens: int | None) -> tuple[Prompt, ...]:
    shape = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if value is None:
        raise ApiError(400, "'prompt' is required", code="missing_required_parameter", param="prompt")
    if isinstance(value, str) or (isinstance(value, list) and value and _is_int(value[0])):
        value = [value]  # one prompt
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'prompt' must be {shape}", code="invalid_type", param="prompt")
    if len(value) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' has {len(value)} prompts; this server takes at most {MAX_PROMPTS} a request",
                       param="prompt")
    out: list[Prompt] = []
    for i, p in enumerate(value):
        where = "'prompt'" if len(value) == 1 else f"'prompt[{i}]'"
        if isinstance(p, str):
            if not p:
                raise ApiError(400, f"{where} is empty; send some text", param="prompt")
            if max_chars is not None and len(p) > max_chars:
                raise ApiError(400, f"{where} is longer than {max_chars} characters, more than the model's context "
                                    "can hold; shorten it", code="context_length_exceeded", param="prompt")
            out.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"{where} holds {str(bad)[:30]}, not a token id of this model (0..{vocab - 1})",
                               param="prompt")
            if max_tokens is not None and len(p) > max_tokens:
                raise ApiError(400, f"{where} has {len(p)} tokens; this server accepts at most {max_tokens}",
                               code="context_length_exceeded", param="prompt")
            out.append(tuple(p))
        else:
            raise ApiError(400, f"{where} must be a non-empty string or a non-empty list of token ids "
                                f"('prompt' is {shape})", code="invalid_type", param="prompt")
    return tuple(out)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ responses


@dataclass
class Choice:
    """One choice of the answer: its text (the prompt first with echo), why it ended, its log-probs."""

    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None


def completion_response(model: str, choices: list[Choice], prompt_tokens: int, completions: list[Completion]
                        ) -> dict[str, Any]:
    """The ``text_completion`` object; usage counts every prompt once and every sampled token."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c.generated_tokens for c in completions)),
    }


def legacy_logprobs(tokens: list[str], logprobs: list[float | None], top: list[list[tuple[str, float]] | None],
                    offset: int) -> dict[str, Any]:
    """The completions API's log-probs: parallel lists; ``text_offset`` counts characters from the start
    of prompt + completion (``offset`` is where the first token starts). Each ``top_logprobs`` entry maps
    token text to log-prob and includes the chosen token (as vLLM's), so a greedy token is its maximum;
    tokens that read alike (e.g. lone bytes of a character, all "\ufffd") share one key, the likelier's."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops: list[dict[str, float] | None] = []
    for token, lp, alternatives in zip(tokens, logprobs, top, strict=True):
        if lp is None or alternatives is None:
            tops.append(None)
            continue
        entry: dict[str, float] = {}
        for text, value in alternatives:  # most likely first: where two tokens read alike, the likelier stays
            entry.setdefault(text, value)
        entry.setdefault(token, lp)
        tops.append(entry)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float | None], top: list[list[tuple[str, float]] | None]
                  ) -> dict[str, Any]:
    """The chat API's log-probs of a choice's content: ``{"content": [{token, logprob, bytes, top_logprobs}],
    "refusal": None}``."""
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [item(t, lp if lp is not None else 0.0) | {"top_logprobs": [item(a, b) for a, b in alt or []]}
                        for t, lp, alt in zip(tokens, logprobs, top, strict=True)],
            "refusal": None}
