"""Reading a request body safely: JSON decoding and typed fields, every client mistake a 4xx.

Shared by the OpenAI chat schema (``serve/chat_api.py``) and ``/decompose`` (``serve/decompose_api.py``),
so both servers refuse the same bad input the same way: invalid or deeply nested JSON, lone
surrogates (JSON can carry "\\ud800"; no tokenizer and no UTF-8 response can), wrong types,
non-finite and out-of-range numbers (compared without float conversion: ``10**400`` must not raise).
A field sent as ``null`` is treated as absent. No Ray, no torch.
"""

from __future__ import annotations

import json
import math
from typing import Any


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


def decode_json(raw: bytes) -> Any:
    """The JSON value of a request body, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise ApiError(400, f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:200]})",
                       code="invalid_json") from None
    where = _lone_surrogate(value)
    if where is not None:
        raise ApiError(400, f"{where} is not valid Unicode: it contains a lone surrogate (e.g. \"\\ud800\")",
                       code="invalid_unicode", param=where)
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The path of the first string (key or value) that cannot be UTF-8 encoded, else None (iterative:
    a nested body must not recurse)."""
    stack: list[tuple[str, Any]] = [("the request body", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _utf8(item):
                return path
        elif isinstance(item, dict):
            for k, v in item.items():
                if not _utf8(k):
                    return f"a key of {path}"
                stack.append((k if path == "the request body" else f"{path}.{k}", v))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:20] + f"...({len(text)} characters)"


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    """A JSON number in [low, high]; ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{name}' must be a number, not a JSON {json_type(value)}", code="invalid_type",
                       param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", param=name)
    if not low <= value <= high:  # ints compare as ints: float(10**400) would raise OverflowError
        raise ApiError(400, f"'{name}' must be between {low:g} and {high:g}, got {short(value)}", param=name)
    return float(value)


def integer(body: dict, name: str, low: int, high: int) -> int | None:
    """A JSON integer in [low, high]; None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, not a JSON {json_type(value)}"
                            f"{' with a fraction' if isinstance(value, float) else ''}", code="invalid_type",
                       param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high} on this server, got {short(value)}",
                       param=name)
    return value


def boolean(body: dict, name: str) -> bool:
    """A JSON boolean; False when absent or null."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, not a JSON {json_type(value)}", code="invalid_type",
                       param=name)
    return value


def check_model(model: Any, served: str) -> None:
    """An optional ``model`` must name the served model (404 otherwise, as OpenAI answers)."""
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", code="invalid_type", param="model")
    if model != served:
        raise ApiError(404, f"the model {model[:200]!r} does not exist; this server serves {served!r}",
                       code="model_not_found", param="model")


def refuse_unknown(body: dict, known: set[str] | tuple[str, ...], where: str) -> None:
    """A 400 naming the first fields ``where`` does not know: a misspelt option silently ignored
    would give the client an answer it did not ask for."""
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ApiError(400, f"unknown field(s) {shown}; {where} accepts {', '.join(sorted(known))}",
                       code="unknown_parameter", param=unknown[0][:64])
