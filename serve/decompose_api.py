"""The decomposer's wire format: request validation and response bodies (no Ray, no torch).

Two ways in, one validated :class:`DecomposeRequest` out:

- ``POST /decompose`` takes ``{"problem": str, "max_subquestions"?, "beta"?, "temperature"?, "top_p"?,
  "max_tokens"?, "model"?}``. Unknown keys are *rejected* (400 naming them): a misspelt ``"temprature"``
  silently ignored would give a client greedy output it did not ask for.
- ``POST /v1/chat/completions`` is OpenAI's schema, validated by ``serve.chat_api`` (so the rules are
  the LLM server's). The last ``user`` message is the problem. Extra OpenAI fields are accepted as
  OpenAI accepts them (``user``, ``presence_penalty``, ...) and ignored, ``seed`` included (best effort,
  as OpenAI documents it); ``stream``, ``logprobs``, tools and ``n > 1`` are refused. Two extensions,
  sent with the openai client's ``extra_body``: ``beta`` and ``max_subquestions``. An absent
  ``temperature`` means the server's default (greedy unless configured), not OpenAI's 1.0.

Every client mistake is an :class:`~serve.chat_api.ApiError` (4xx, OpenAI's error shape), never a 500.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from protocol.prompts import format_subquestions
from serve.chat_api import ApiError, chat_completion, parse_chat_request
from serve.generation import Completion

MAX_BODY_BYTES = 1 << 20  # a problem is at most max_problem_chars; 1 MiB leaves room for a chat history
MAX_BETA = 100.0  # guidance far beyond any useful strength; bounds the scores' magnitude
MAX_SUBQUESTIONS = 64
DECOMPOSE_FIELDS = ("problem", "max_subquestions", "beta", "temperature", "top_p", "max_tokens", "model")


@dataclass(frozen=True)
class Limits:
    """What one server accepts and assumes when a client leaves a field out."""

    served_model: str  # the name a request's optional "model" must match
    max_problem_chars: int  # longer problems are refused (400)
    max_new_tokens: int  # the cap on "max_tokens"
    default_temperature: float = 0.0  # used when a request does not say
    default_max_subquestions: int | None = None  # used when a request does not say


@dataclass(frozen=True)
class DecomposeRequest:
    """A validated request from either route."""

    problem: str
    max_subquestions: int | None  # cut the parsed list to this many; None: keep all
    beta: float | None  # ILQL guidance; None: the server's default
    temperature: float  # 0: greedy
    top_p: float
    max_tokens: int | None  # None: the server's default
    stop: tuple[str, ...] = ()  # extra stop strings (chat route only)


def decode_json(raw: bytes, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The JSON value of a request body, or a 413 / 400 that says what is wrong with it."""
    if len(raw) > max_bytes:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes", code="body_too_large")
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise ApiError(400, f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:200]})",
                       code="invalid_json") from None


def parse_decompose_request(body: Any, limits: Limits) -> DecomposeRequest:
    """Validate a ``/decompose`` body (already decoded from JSON)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object like {{\"problem\": \"...\"}}, "
                            f"not a JSON {_json_type(body)}", code="invalid_json")
    unknown = sorted(k for k in body if k not in DECOMPOSE_FIELDS)
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ApiError(400, f"unknown field(s) {shown}; /decompose accepts {', '.join(DECOMPOSE_FIELDS)}",
                       code="unknown_parameter", param=str(unknown[0])[:64])
    _check_model(body.get("model"), limits.served_model)
    return DecomposeRequest(
        problem=_problem(body.get("problem"), "problem", limits.max_problem_chars),
        **_options(body, limits),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        temperature=_number(body, "temperature", limits.default_temperature, 0.0, 2.0),
        max_tokens=_integer(body, "max_tokens", 1, limits.max_new_tokens),
    )


def parse_decompose_chat(body: Any, limits: Limits) -> DecomposeRequest:
    """Validate an OpenAI chat-completions body; the last user message is the problem."""
    try:
        chat = parse_chat_request(body, served_model=limits.served_model, max_n=1,
                                  max_new_tokens=limits.max_new_tokens)
    except OverflowError:  # an integer too large for a float, e.g. "temperature": 1e400 written as digits
        raise ApiError(400, "a number in the request is out of range", code="invalid_value") from None
    users = [m for m in chat.messages if m["role"] == "user"]
    if not users:
        raise ApiError(400, "'messages' needs a user message: its content is the problem to decompose",
                       param="messages")
    assert isinstance(body, dict)  # parse_chat_request checked it
    return DecomposeRequest(
        problem=_problem(users[-1]["content"], "messages", limits.max_problem_chars),
        **_options(body, limits),
        top_p=chat.top_p,
        # OpenAI's default is 1.0; a decomposer's is its configured one (greedy by default).
        temperature=limits.default_temperature if body.get("temperature") is None else chat.temperature,
        max_tokens=chat.max_tokens,
        stop=chat.stop,
    )


# ------------------------------------------------------------------------------------------ responses


def decompose_response(*, model: str, subquestions: list[str], raw: str, prompt_tokens: int,
                       completion_tokens: int, beta: float, finish_reason: str) -> dict[str, Any]:
    """The ``/decompose`` answer: sub-questions, the raw continuation they were parsed from, usage."""
    return {
        "subquestions": subquestions,
        "raw": raw,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "beta": beta,
        "finish_reason": finish_reason,  # "stop" (end marker, stop string or eos) or "length"
    }


def chat_response(*, model: str, subquestions: list[str], prompt_tokens: int, completion_tokens: int,
                  finish_reason: str) -> dict[str, Any]:
    """A ``chat.completion`` whose content is "Q1: ..." lines, which ``parse_subquestions`` reads back."""
    text = format_subquestions(subquestions)
    return chat_completion(model, prompt_tokens, [Completion(text=text, token_ids=[], finish_reason=finish_reason,
                                                             generated_tokens=completion_tokens)])


# -------------------------------------------------------------------------------------------- fields


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_model(model: Any, served: str) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", code="invalid_type", param="model")
    if model != served:
        raise ApiError(404, f"the model {model[:200]!r} does not exist; this server serves {served!r}",
                       code="model_not_found", param="model")


def _problem(value: Any, param: str, max_chars: int) -> str:
    where = "'problem'" if param == "problem" else "the last user message"
    if value is None:
        raise ApiError(400, f"{where} is required: the problem to decompose", code="missing_required_parameter",
                       param=param)
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string, not a JSON {_json_type(value)}", code="invalid_type",
                       param=param)
    if not value.strip():
        raise ApiError(400, f"{where} is empty; send the problem to decompose", param=param)
    if len(value) > max_chars:
        raise ApiError(400, f"{where} has {len(value)} characters; this server accepts at most {max_chars}",
                       code="problem_too_long", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry lone surrogates ("\ud800"); no tokenizer can
        raise ApiError(400, f"{where} is not valid Unicode (it contains a lone surrogate)", param=param) from None
    return value


def _options(body: dict, limits: Limits) -> dict[str, Any]:
    """The two decomposer settings both routes accept."""
    beta = None if body.get("beta") is None else _number(body, "beta", 0.0, 0.0, MAX_BETA)
    max_subq = _integer(body, "max_subquestions", 1, MAX_SUBQUESTIONS)
    return {"beta": beta, "max_subquestions": limits.default_max_subquestions if max_subq is None else max_subq}


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{name}' must be a number, not a JSON {_json_type(value)}", code="invalid_type",
                       param=name)
    # ints are compared as ints: float(10**400) would raise OverflowError
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low:g} and {high:g}, got {_short(value)}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, not a JSON {_json_type(value)}"
                            f"{' with a fraction' if isinstance(value, float) else ''}", code="invalid_type",
                       param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high} on this server, got {_short(value)}",
                       param=name)
    return value


def _short(value: int | float) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:20] + f"...({len(text)} digits)"
