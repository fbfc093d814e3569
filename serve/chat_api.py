"""The OpenAI chat-completions wire format: request validation and response bodies.

Kept apart from the Serve deployment (and free of Ray and torch) so every rule about what a client
may send is in one readable place and can be tested without starting a server. Client mistakes
become :class:`ApiError` (a 4xx with OpenAI's error shape), never a 500.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from serve.generation import Completion, SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit
# Fields that would change what the client receives if silently ignored.
UNSUPPORTED = {
    "stream": "streaming is not supported by this server; send 'stream': false",
    "logprobs": "logprobs are not supported by this server",
    "tools": "tool calls are not supported by this server",
    "functions": "function calls are not supported by this server",
}


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated request; ``max_tokens`` is None when the client left it to the server."""

    messages: list[dict[str, str]]
    temperature: float
    top_p: float
    n: int
    max_tokens: int | None
    stop: tuple[str, ...]
    seed: int | None

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=self.stop, n=self.n, seed=self.seed)


def parse_chat_request(body: Any, *, served_model: str, max_n: int, max_new_tokens: int) -> ChatRequest:
    """Validate a decoded JSON body against the OpenAI schema and this server's limits."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for key, message in UNSUPPORTED.items():
        if body.get(key) not in (None, False, []):
            raise ApiError(400, message, code="unsupported_parameter", param=key)
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", code="invalid_type", param="model")
    if model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served_model!r}",
                       code="model_not_found", param="model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return ChatRequest(
        messages=_messages(body.get("messages")),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        n=_integer(body.get("n"), "n", 1, 1, max_n),
        max_tokens=None if max_tokens is None else _integer(max_tokens, param, None, 1, max_new_tokens),
        stop=_stop(body.get("stop")),
        seed=None if body.get("seed") is None else _integer(body["seed"], "seed", None, -(2**63), 2**63 - 1),
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise ApiError(400, "'messages' is required", code="missing_required_parameter", param="messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", code="invalid_type",
                           param=where)
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise ApiError(400, f"'{where}.role' must be a non-empty string", code="invalid_type", param=where)
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"'{where}.content' parts must all be text parts; only text is supported",
                               code="invalid_type", param=where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string", code="invalid_type", param=where)
        out.append({"role": role, "content": content})
    return out


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number", code="invalid_type", param=name)
    if isinstance(value, int) and not low <= value <= high:  # a 400-digit int overflows isfinite()
        raise ApiError(400, f"'{name}' must be between {low:g} and {high:g}", param=name)
    if not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number", code="invalid_type", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low:g} and {high:g}, got {value!r}", param=name)
    return float(value)


def _integer(value: Any, name: str, default: int | None, low: int, high: int) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", code="invalid_type", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high} on this server, got {value}", param=name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                       "non-empty strings", code="invalid_type", param="stop")
    return tuple(stops)


def chat_completion(model: str, prompt_tokens: int, completions: list[Completion]) -> dict[str, Any]:
    """The ``chat.completion`` object; usage counts the prompt once and every sampled token."""
    completion_tokens = sum(c.generated_tokens for c in completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "subq"}
