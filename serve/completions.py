"""``POST /v1/completions`` on the LLM server, and the log-probs of both OpenAI routes.

Generation goes through the replica's engine and admission like a chat request: each prompt is one
engine request of ``n`` rows (several prompts decode side by side in the running batch). Log-probs
(``logprobs``, ``echo``; chat's ``logprobs: true``) need scores the decoder does not keep, so a choice
that asks for them is scored afterwards by one forward pass over prompt + completion
(:mod:`serve.logprobs`), within the request's admission, one scoring pass at a time per replica
(off the event loop, beside the decoding thread). ``echo`` with ``max_tokens: 0`` is that pass alone,
holding one admitted row: lm-evaluation-harness's log-likelihood requests.

A choice's scored tokens are its prompt's (with ``echo``) and the completion tokens its text is made
of (a token cut by a stop string is left out; the end-of-turn token is not part of the text either).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

from fastapi.responses import JSONResponse, Response
from subq.serve.chat_api import ChatRequest, usage
from subq.serve.chat_stream import first_event, sse_response
from subq.serve.completions_api import (
    Choice,
    CompletionRequest,
    chat_logprobs,
    completion_response,
    legacy_logprobs,
    parse_completion_request,
)
from subq.serve.engine import RequestError, RequestStream
from subq.serve.fields import ApiError, decode_json, error_body
from subq.serve.generation import Completion, Delta, Failed, Finished
from subq.serve.logprobs import ScoringError, TokenScores, score_tokens
from subq.serve.serving import api_error

logger = logging.getLogger(__name__)


class Replica(Protocol):
    """What the route uses of an ``LLMServer`` replica."""

    cfg: Any  # LLMServerConfig: served_model_name, max_batch_size, max_new_tokens
    model: Any
    tokenizer: Any
    engine: Any
    admission: Any  # serve.admission.Admission
    stats: Any  # serve.engine.EngineStats
    vocab: int
    context: int
    max_prompt_tokens: int
    max_prompt_chars: int
    _tokenize_lock: threading.Lock


class Completions:
    """The completions route of one replica, and log-probs for its chat route."""

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self._score_lock = threading.Lock()  # one scoring pass at a time: it competes with decoding

    # ------------------------------------------------------------------------------ the route

    async def handle(self, raw: bytes) -> Response:
        """The answer to one request body (any ApiError / RequestError propagates to the caller)."""
        req = await asyncio.to_thread(self._parse, raw)
        prompts = await asyncio.to_thread(self._prompt_ids, req)
        if req.stream:
            return await self._stream(req, *prompts[0])
        results = await _all([self._complete(req, ids, text) for ids, text in prompts])
        choices = [c for per_prompt, _ in results for c in per_prompt]
        completions = [c for _, per_prompt in results for c in per_prompt]
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        self.r.stats.request(prompt_tokens, sum(c.generated_tokens for c in completions))
        return JSONResponse(completion_response(self.r.cfg.served_model_name, choices, prompt_tokens, completions))

    async def _complete(self, req: CompletionRequest, ids: list[int], text: str
                        ) -> tuple[list[Choice], list[Completion]]:
        """The n choices of one prompt (its text is what echo repeats)."""
        if req.max_tokens == 0:
            done = [Completion(text="", token_ids=[], finish_reason="length", generated_tokens=0)] * req.n
            if req.logprobs is None:  # nothing to compute
                return [self._choice(req, text, c, None) for c in done], done
            async with self.r.admission.rows(1):  # a forward pass like a prefill: it takes a row
                scores = await self._score(ids, [], req.logprobs, echo=req.echo)
            return [self._choice(req, text, c, scores) for c in done], done
        params = req.sampling(min(req.max_tokens, max(1, self.r.context - len(ids))))
        async with self.r.admission.rows(params.n) as ticket:
            done = await RequestStream(self.r.engine, ids, params, ticket=ticket).result()
            choices = []
            for c in done:
                scores = None if req.logprobs is None else await self._score(ids, c.token_ids, req.logprobs,
                                                                            echo=req.echo, text=c.text)
                choices.append(self._choice(req, text, c, scores))
        return choices, done

    def _choice(self, req: CompletionRequest, prompt_text: str, c: Completion,
                scores: tuple[list[str], TokenScores] | None) -> Choice:
        choice = Choice(text=prompt_text + c.text if req.echo else c.text, finish_reason=c.finish_reason)
        if scores is not None:
            strings, s = scores
            top = [None if t is None else [(self._token_text(i), lp) for i, lp in t] for t in s.top]
            choice.logprobs = legacy_logprobs(strings, s.logprobs, top, 0 if req.echo else len(prompt_text))
        return choice

    # ------------------------------------------------------------------------------ log-probs

    async def chat_logprobs(self, chat: ChatRequest, prompt: list[int], completions: list[Completion]
                            ) -> list[dict[str, Any]] | None:
        """Each chat choice's ``logprobs`` object, or None when the request did not ask."""
        if chat.logprobs is None:
            return None
        out = []
        for c in completions:
            strings, s = await self._score(prompt, c.token_ids, chat.logprobs, echo=False, text=c.text)
            top = [None if t is None else [(self._token_text(i), lp) for i, lp in t] for t in s.top]
            out.append(chat_logprobs(strings, s.logprobs, top))
        return out

    async def _score(self, prompt: list[int], completion: list[int], top_k: int, *, echo: bool,
                     text: str | None = None) -> tuple[list[str], TokenScores]:
        """Scores of the completion tokens ``text`` is made of (with ``echo``, of the prompt's too),
        with each token's text."""
        return await asyncio.to_thread(self._score_sync, prompt, completion, top_k, echo, text)

    def _score_sync(self, prompt: list[int], completion: list[int], top_k: int, echo: bool, text: str | None
                    ) -> tuple[list[str], TokenScores]:
        completion = self._text_tokens(completion, text) if text is not None else completion
        with self._score_lock:
            scores = score_tokens(self.r.model, prompt + completion, 0 if echo else len(prompt), top_k)
        return [self._token_text(i) for i in scores.ids], scores

    def _text_tokens(self, ids: list[int], text: str) -> list[int]:
        """The leading tokens of ``ids`` whose text lies within ``text`` (a stop string cut the rest)."""
        with self.r._tokenize_lock:
            if self.r.tokenizer.decode(ids, skip_special_tokens=True) == text:
                return ids
            k = 0
            while k < len(ids) and len(self.r.tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) <= len(text):
                k += 1
        return ids[:k]

    def _token_text(self, token: int) -> str:
        with self.r._tokenize_lock:
            return self.r.tokenizer.decode([token])

    # ------------------------------------------------------------------------------ helpers

    def _parse(self, raw: bytes) -> CompletionRequest:
        r = self.r
        return parse_completion_request(decode_json(raw), served_model=r.cfg.served_model_name,
                                        max_n=r.cfg.max_batch_size, max_new_tokens=r.cfg.max_new_tokens,
                                        vocab_size=r.vocab, max_prompt_chars=r.max_prompt_chars,
                                        max_prompt_tokens=r.max_prompt_tokens)

    def _prompt_ids(self, req: CompletionRequest) -> list[tuple[list[int], str]]:
        """Each prompt's token ids and text (token-id prompts are decoded for echo)."""
        out = []
        for i, p in enumerate(req.prompts):
            with self.r._tokenize_lock:
                if isinstance(p, str):
                    ids, text = self.r.tokenizer(p, add_special_tokens=req.add_special_tokens)["input_ids"], p
                else:
                    ids, text = list(p), self.r.tokenizer.decode(list(p))
            if not ids or len(ids) > self.r.max_prompt_tokens:
                where = "'prompt'" if len(req.prompts) == 1 else f"'prompt[{i}]'"
                raise ApiError(400, f"{where} has {len(ids)} tokens; this server accepts 1 to "
                                    f"{self.r.max_prompt_tokens}", code="context_length_exceeded", param="prompt")
            out.append((ids, text))
        return out

    async def _stream(self, req: CompletionRequest, ids: list[int], text: str) -> Response:
        """Server-sent ``text_completion`` chunks of one prompt; a failure before the first event is a plain
        JSON error with its status."""
        if req.max_tokens == 0:
            raise ApiError(400, "'stream': true needs 'max_tokens' >= 1", param="max_tokens")
        params = req.sampling(min(req.max_tokens, max(1, self.r.context - len(ids))))
        async with self.r.admission.rows(params.n) as ticket:
            peeked = await first_event(RequestStream(self.r.engine, ids, params, stream=True, ticket=ticket))
        if isinstance(peeked, JSONResponse):
            return peeked
        first, events = peeked
        return sse_response(self._chunks(req, ids, text, first, events))

    async def _chunks(self, req: CompletionRequest, ids: list[int], text: str, first: Delta | Finished,
                      events: AsyncIterator) -> AsyncIterator[str]:
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.r.cfg.served_model_name}
        extra = {"usage": None} if req.include_usage else {}

        def chunk(index: int, piece: str, finish_reason: str | None = None) -> str:
            choice = {"index": index, "text": piece, "logprobs": None, "finish_reason": finish_reason}
            return _sse({**base, "choices": [choice], **extra})

        started: set[int] = set()
        generated = 0
        try:
            event = first
            while event is not None:
                if isinstance(event, Failed):
                    yield _sse(error_body(event.message, type="server_error" if event.status >= 500 else
                                          "invalid_request_error"))
                    return
                if req.echo and event.index not in started:
                    yield chunk(event.index, text)
                started.add(event.index)
                if isinstance(event, Delta) and event.text:
                    yield chunk(event.index, event.text)
                elif isinstance(event, Finished):
                    generated += event.completion.generated_tokens
                    yield chunk(event.index, "", event.completion.finish_reason)
                event = await anext(events, None)
            self.r.stats.request(len(ids), generated)
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": usage(len(ids), generated)})
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # the client left early (or we are done): free the rows


async def respond(call: Awaitable[Response], what: str) -> Response:
    """``call``'s response, or the error a client should see: its own mistake (4xx, 429 with Retry-After),
    the engine's refusal, or a 500 that says only that ``what`` failed (the details go to the log)."""
    try:
        return await call
    except ApiError as exc:
        return api_error(exc)
    except RequestError as exc:
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return JSONResponse(error_body(exc.message, type=kind), status_code=exc.status)
    except ScoringError as exc:
        return JSONResponse(error_body(str(exc), type="server_error"), status_code=500)
    except Exception:
        logger.exception("%s failed", what)
        return JSONResponse(error_body(f"the server failed to {what}", type="server_error"), status_code=500)


async def _all(calls: list[Awaitable]) -> list:
    """Every call's result in order; if one fails, the others are cancelled (their rows freed) and its
    error is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

