"""The OpenAI chat-completions wire format: request validation and the response body.

Kept apart from the Serve deployments so every rule about what a client may send is in one readable
place and can be tested without a server. Every field of OpenAI's schema is either honoured or refused
with a 400 that names it; ``null`` means absent, in the body and in a message (replayed assistant
messages carry ``refusal: null``, ``tool_calls: null``); unknown fields are refused (a misspelt option would
otherwise be ignored silently). A message's ``name`` (LangChain, AutoGen) is passed on to the chat
template, which uses it if it knows the key (ChatML templates such as SmolLM2's ignore it). Client mistakes become :class:`ApiError` (a 4xx with OpenAI's error
shape), never a 500. Streaming chunks are built in ``serve/chat_stream.py``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from subq.serve.fields import (
    ApiError,
    boolean,
    check_model,
    error_body,
    integer,
    json_type,
    number,
    refuse_unknown,
)
from subq.serve.generation import Completion
from subq.serve.sampling import SamplingParams

__all__ = ["ApiError", "ChatRequest", "chat_completion", "error_body", "model_card", "parse_chat_request"]

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGIT_BIAS = 300  # entries; OpenAI's values are in [-100, 100]
HONOURED = ("model", "messages", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "seed",
            "stream", "stream_options", "logit_bias", "presence_penalty", "frequency_penalty")
METADATA = ("user", "metadata")  # describe the caller, never change the answer: accepted and not used
# OpenAI fields this server cannot honour: the values that mean "off" pass, anything else is a 400.
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logprobs": ((False,), "logprobs are not supported by this server"),  # the LLM server honours them
    "top_logprobs": ((), "logprobs are not supported by this server"),
    "response_format": (({"type": "text"},), "only response_format {\"type\": \"text\"} is supported: this "
                                             "server cannot guarantee JSON output"),
    "tools": (([],), "tool calls are not supported by this server"),
    "tool_choice": (("none",), "tool calls are not supported by this server"),
    "functions": (([],), "function calls are not supported by this server"),
    "function_call": (("none",), "function calls are not supported by this server"),
    "parallel_tool_calls": ((True, False), "tool calls are not supported by this server"),
    "modalities": ((["text"],), "only the text modality is supported"),
    "audio": ((), "audio output is not supported by this server"),
    "prediction": ((), "predicted outputs are not supported by this server"),
    "web_search_options": ((), "web search is not supported by this server"),
    "reasoning_effort": ((), "reasoning_effort is not supported: this server's models do not reason separately"),
    "verbosity": ((), "verbosity is not supported by this server"),
    "store": ((False,), "this server stores nothing; send 'store': false"),
    "service_tier": (("auto", "default"), "this server has one service tier"),
}
MESSAGE_FIELDS = ("role", "content", "name")
MAX_NAME_CHARS = 256  # a participant's name (OpenAI allows 64; be lenient, it only reaches the template)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (vLLM's default max_logprobs)
LOGPROBS = ("logprobs", "top_logprobs")


@dataclass(frozen=True)
class ChatRequest:
    """A validated request; ``max_tokens`` is None when the client left it to the server."""

    messages: list[dict[str, str]]  # role, content and, when sent, name
    temperature: float
    top_p: float
    n: int
    max_tokens: int | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool = False  # answer as server-sent events (chat.completion.chunk)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k: each token's log-prob and its k most likely alternatives

    def sampling(self, max_tokens: int, beta: float = 0.0) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=self.stop, n=self.n, seed=self.seed, beta=beta, logit_bias=self.logit_bias,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)


def parse_chat_request(body: Any, *, served_model: str, max_n: int, max_new_tokens: int,
                       vocab_size: int | None = None, max_prompt_chars: int | None = None,
                       extensions: tuple[str, ...] = (), logprobs: bool = False) -> ChatRequest:
    """Validate a decoded JSON body against the OpenAI schema and this server's limits.

    ``max_prompt_chars`` bounds the messages' total length before anything is tokenized;
    ``extensions`` are extra fields the caller validates itself (the decomposer's ``beta``);
    ``logprobs``: the server honours ``logprobs``/``top_logprobs`` (not with ``stream``), else they are refused.
    """
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not a JSON {json_type(body)}",
                       code="invalid_json")
    refuse_unknown(body, {*HONOURED, *METADATA, *REFUSED, *extensions}, "/v1/chat/completions")
    for key, (allowed, message) in REFUSED.items():
        if logprobs and key in LOGPROBS:
            continue
        if body.get(key) is not None and not any(body[key] == a and type(body[key]) is type(a) for a in allowed):
            raise ApiError(400, f"'{key}': {message}", code="unsupported_parameter", param=key)
    check_model(body.get("model"), served_model)
    stream = boolean(body, "stream")
    messages = _messages(body.get("messages"), max_prompt_chars)
    return ChatRequest(
        messages=messages,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0),
        n=integer(body, "n", 1, max_n) or 1,
        max_tokens=_max_tokens(body, max_new_tokens),
        stop=_stop(body.get("stop")),
        seed=integer(body, "seed", -(2**63), 2**63 - 1),
        stream=stream,
        include_usage=_stream_options(body.get("stream_options"), stream),
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logprobs=_logprobs(body, stream) if logprobs else None,
    )


def _logprobs(body: dict, stream: bool) -> int | None:
    """OpenAI's chat pair: ``logprobs: true`` turns them on, ``top_logprobs`` (0-20) asks for alternatives."""
    on = boolean(body, "logprobs")
    top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not on:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if on and stream:
        raise ApiError(400, "'logprobs' are not supported with 'stream': true on this server; ask without "
                            "streaming", code="unsupported_parameter", param="logprobs")
    return (top or 0) if on else None


def _max_tokens(body: dict, max_new_tokens: int) -> int | None:
    new = integer(body, "max_completion_tokens", 1, max_new_tokens)
    old = integer(body, "max_tokens", 1, max_new_tokens)
    if new is not None and old is not None and new != old:
        raise ApiError(400, f"'max_tokens' ({old}) and 'max_completion_tokens' ({new}) disagree; send one",
                       param="max_completion_tokens")
    return new if new is not None else old


def _messages(value: Any, max_chars: int | None) -> list[dict[str, str]]:
    if value is None:
        raise ApiError(400, "'messages' is required", code="missing_required_parameter", param="messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages")
    out, total = [], 0
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", code="invalid_type",
                           param=where)
        # null means absent: replayed assistant messages carry refusal/tool_calls/audio set to null
        extra = sorted(str(k) for k, v in msg.items() if k not in MESSAGE_FIELDS and v is not None)
        if extra:
            raise ApiError(400, f"'{where}.{extra[0][:64]}' is not supported: messages take only 'role', "
                                "'content' and 'name' here", code="unsupported_parameter",
                           param=f"{where}.{extra[0][:64]}")
        role, content, name = msg.get("role"), msg.get("content"), msg.get("name")
        if not isinstance(role, str) or not role:
            raise ApiError(400, f"'{where}.role' must be a non-empty string", code="invalid_type", param=where)
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS):
            raise ApiError(400, f"'{where}.name' must be a string of 1 to {MAX_NAME_CHARS} characters",
                           code="invalid_type", param=f"{where}.name")
        if content is None and role == "assistant":  # OpenAI: optional on assistant messages
            content = ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       and set(p) <= {"type", "text"} for p in content):
                raise ApiError(400, f"'{where}.content' parts must all be text parts; only text is supported",
                               code="invalid_type", param=where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string", code="invalid_type", param=where)
        total += len(role) + len(content) + len(name or "")
        if max_chars is not None and total > max_chars:
            raise ApiError(400, f"the messages are longer than {max_chars} characters, more than the model's "
                                "context can hold; shorten them", code="context_length_exceeded", param="messages")
        out.append({"role": role, "content": content} | ({"name": name} if name is not None else {}))
    return out


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                       "non-empty strings", code="invalid_type", param="stop")
    return tuple(stops)


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if not isinstance(value, dict):
        raise ApiError(400, "'stream_options' must be an object", code="invalid_type", param="stream_options")
    refuse_unknown(value, ("include_usage",), "'stream_options'")
    return boolean(value, "include_usage")


def _logit_bias(value: Any, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids (as strings) "
                            "to numbers between -100 and 100", code="invalid_type", param="logit_bias")
    out = []
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12 else -1
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise ApiError(400, f"'logit_bias' key {key[:20]!r} is not a token id of this model"
                                f"{f' (0..{vocab_size - 1})' if vocab_size else ''}", param="logit_bias")
        out.append((token, number({"logit_bias": bias}, "logit_bias", 0.0, -100.0, 100.0)))
    return tuple(out)


def chat_completion(model: str, prompt_tokens: int, completions: list[Completion],
                    logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``chat.completion`` object; usage counts the prompt once and every sampled token.
    ``logprobs``: each choice's ``{"content": [...], "refusal": None}`` when the request asked for them."""
    completion_tokens = sum(c.generated_tokens for c in completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "logprobs": logprobs[i] if logprobs is not None else None, "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model: str, created: int, fingerprint: str | None = None) -> dict[str, Any]:
    """A ``/v1/models`` entry; ``fingerprint`` (``sha256:`` content hash of the served checkpoint's files)
    lets a client tell another checkpoint served under the same name (``evaluation.served_identity``)."""
    card = {"id": model, "object": "model", "created": created, "owned_by": "subq"}
    return card if fingerprint is None else {**card, "fingerprint": fingerprint}
