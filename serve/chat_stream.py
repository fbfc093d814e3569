"""Streaming chat completions as the OpenAI API does it: server-sent events of ``chat.completion.chunk``.

Each choice first gets a chunk with ``delta: {"role": "assistant", "content": ""}``, then content deltas
as the text settles, then an empty delta with its ``finish_reason``; with ``stream_options:
{"include_usage": true}`` every chunk carries ``"usage": null`` and a last chunk with no choices carries
the usage; ``data: [DONE]`` ends the stream. A failure after the stream started is sent as a
``data: {"error": ...}`` event (the official client raises it). A client that disconnects cancels the
request, which frees its rows at the engine's next step.

What a chunk says is the caller's choice (:class:`ContentStream`): the LLM server streams the raw text,
the decomposer its "Q1: ..." lines.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi.responses import JSONResponse, StreamingResponse
from subq.serve.chat_api import usage
from subq.serve.engine import RequestStream
from subq.serve.fields import error_body
from subq.serve.generation import Completion, Delta, Failed, Finished


class ContentStream(Protocol):
    """Turns one choice's raw text deltas into the content the client sees."""

    def feed(self, delta: str) -> str: ...

    def finish(self, completion: Completion) -> str: ...


class RawText:
    """The LLM server's content: the settled text itself (the decoder sends all of it before finishing)."""

    def feed(self, delta: str) -> str:
        return delta

    def finish(self, completion: Completion) -> str:
        return ""


def failure(event: Failed) -> JSONResponse:
    kind = "invalid_request_error" if event.status < 500 else "server_error"
    return JSONResponse(error_body(event.message, type=kind), status_code=event.status)


async def stream_chat(stream: RequestStream, *, model: str, prompt_tokens: int, include_usage: bool,
                      content: Callable[[], ContentStream],
                      on_complete: Callable[[int], None]) -> StreamingResponse | JSONResponse:
    """The SSE response for ``stream``; a request that fails before its first event gets a plain JSON
    error with its status instead (headers are not sent yet, so the status can still say what happened).

    ``on_complete(completion_tokens)`` runs once every choice finished.
    """
    peeked = await first_event(stream)
    if isinstance(peeked, JSONResponse):
        return peeked
    first, events = peeked
    return sse_response(_chunks(first, events, model, prompt_tokens, include_usage, content, on_complete))


async def first_event(stream: RequestStream) -> tuple[Delta | Finished, AsyncIterator] | JSONResponse:
    """The stream's first event and the rest, or the JSON error of a request that failed before it (no
    header is sent yet, so the status can still say what happened)."""
    events = stream.events()
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    if isinstance(first, Failed):
        await events.aclose()
        return failure(first)
    return first, events


def sse_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chunks(first: Delta | Finished, events: AsyncIterator, model: str, prompt_tokens: int,
                  include_usage: bool, content: Callable[[], ContentStream],
                  on_complete: Callable[[int], None]) -> AsyncIterator[str]:
    base: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model, "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice], **extra})

    streams: dict[int, ContentStream] = {}
    completion_tokens = 0
    try:
        event: Delta | Finished | Failed | None = first
        while event is not None:
            if isinstance(event, Failed):
                yield _sse(error_body(event.message, type="server_error" if event.status >= 500 else
                                      "invalid_request_error"))
                return
            if event.index not in streams:
                streams[event.index] = content()
                yield chunk(event.index, {"role": "assistant", "content": ""})
            text = streams[event.index].feed(event.text) if isinstance(event, Delta) else \
                streams[event.index].finish(event.completion)
            if text:
                yield chunk(event.index, {"content": text})
            if isinstance(event, Finished):
                completion_tokens += event.completion.generated_tokens
                yield chunk(event.index, {}, event.completion.finish_reason)
            event = await anext(events, None)
        on_complete(completion_tokens)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # the client left early (or we are done): free the rows


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
