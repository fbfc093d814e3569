"""A fault-injecting, OpenAI-compatible *test* teacher: a test double, never product code.

Nothing outside ``tests/`` and ``benchmarks/`` may import this module.

It answers subq's three collection stages (decompose, answer, feedback) with deterministic,
content-derived text, after a fixed latency (``asyncio.sleep``, so hundreds of requests overlap),
and injects faults chosen by a seeded hash of the request content, so the same requests fault
across server restarts and tests can assert exact counts.

In-process::

    with TeacherServer(latency_s=0.2, faults=FaultPlan(rate=0.1), model="test-teacher") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test")
        ...
        srv.stats()["billed_by_content"]

Separate process (benchmarks), from the repo root; prints ``READY <base_url>`` when serving::

    python -m tests.teacher_server --port 0 --latency 0.2 --fault-rate 0.1

Semantics, in short:
- A request's *content* is (messages, n, temperature, top_p, seed); its key is a 16-hex hash.
- Transient faults hit a faulted content on its first ``fail_attempts`` arrivals (every arrival
  if ``first_attempt_only=False``), then it succeeds. The kinds in ``FaultPlan.persistent``
  (default: "malformed", "400", "no_usage") hit that content on every arrival.
- 429 and 400 are answered at once; 500 and disconnect after the latency (the work was lost);
  hang sleeps ``hang_s`` and answers only if the client is still connected.
- Reply-shaping kinds (billed, HTTP 200): "few_choices" answers 1 choice when n > 1, and any
  follow-up with the same messages and a smaller n gets a 500 (the follow-up fails);
  "no_usage" omits ``usage``; "truncated" cuts each text in half with finish_reason "length";
  "slow" answers after an extra ``slow_s`` (a call that holds its batch).
- Account-level faults (``AccountFaults``, also switchable at run time with ``POST /faults``):
  429 ``insufficient_quota`` after ``quota_after_billed`` billed calls; an outage window of N
  seconds (every request answered 503, or 429 without Retry-After); a 400 for parameters the
  "model" refuses (``max_tokens`` -> use ``max_completion_tokens``; a ``temperature`` other
  than 1), worded as OpenAI words them; a requests-per-minute limit (token bucket holding one
  second of requests; 429 with Retry-After).
- Completions are cut at ``max_completion_tokens`` / ``max_tokens`` (words), finish_reason "length".
- ``billed`` counts HTTP 200 responses (malformed ones included: a teacher charges for them), also
  when the client died while the server worked (a real API bills those too). The exception is a
  hang whose client has gone: it models a stuck upstream that produced nothing, so it is not billed.
- Attempt memory lives in the server: a restart forgets attempts but faults the same contents.
- ``api_key``: requests without ``Authorization: Bearer <api_key>`` get 401 ``invalid_api_key``.
- ``quota``: once that many requests were let through, every further request gets 429
  ``insufficient_quota`` (an account that ran dry mid-run); ``set_quota`` sets a fresh allowance.
- The Batch API (``/v1/files``, ``/v1/batches``): ``tests.batch_routes``; every line is answered by
  the chat route above, so faults and billing are the same, and ``stats()["batch_lines"]`` counts
  every line submitted, by custom_id.
- ``POST /v1/completions`` answers a student-format prompt (``protocol.prompts.student_prompt``) with
  deterministic sub-questions, ``SUBQ_END`` and an invented next problem (cut at ``stop`` strings, which
  are left out as vLLM does); faults 429/500/400/malformed as for chat, counted as stage "student".
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.batch_routes import BatchPlan, BatchStats, add_batch_routes
from tests.teacher_replies import (  # noqa: F401 - detect_stage is used by tests through this module
    _AT_MOST,
    _PROBLEM,
    _Q_LINE,
    _STUDENT,
    STUDENT_END,
    _h,
    _user_text,
    answer_reply,
    decompose_reply,
    default_answer,
    detect_stage,
    feedback_reply,
    student_reply,
)

STAGES = ("decompose", "answer", "feedback")
FAULT_KINDS = ("429", "500", "hang", "malformed", "400", "disconnect", "few_choices", "no_usage", "truncated",
               "slow")
# invalid: rejected by the server itself (bad model/JSON/stage); follow_up: the 500 after few_choices;
# quota, outage, unsupported, rate_limited: the account-level faults
OUTCOMES = ("ok", *FAULT_KINDS, "invalid", "follow_up", "quota", "outage", "unsupported", "rate_limited")
MALFORMED_TEXT = "I cannot help with that."
QUOTA_MESSAGE = ("You exceeded your current quota, please check your plan and billing details. For more "
                 "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes.")



def content_key(body: Mapping[str, Any]) -> str:
    """The key faults and billing are tracked by: messages + n + sampling parameters."""
    fields = {k: body.get(k) for k in ("messages", "n", "temperature", "top_p", "seed")}
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canon.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class FaultPlan:
    rate: float = 0.0  # share of request contents that get a fault
    kinds: tuple[str, ...] = ("429", "500", "hang", "malformed", "400", "disconnect")
    seed: int = 0  # which contents fault, and with what kind
    first_attempt_only: bool = True  # transient faults hit only the first `fail_attempts` arrivals
    fail_attempts: int = 1
    retry_after_s: float = 0.2  # Retry-After header of a 429 (fractional seconds allowed)
    hang_s: float = 30.0  # how long a hang sleeps before answering: longer than the client timeout
    slow_s: float = 3.0  # extra seconds of a "slow" reply (shorter than the client timeout)
    persistent: tuple[str, ...] = ("malformed", "400", "no_usage")  # kinds that hit every arrival

    def __post_init__(self) -> None:
        bad = set(self.kinds) - set(FAULT_KINDS)
        if bad or not self.kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {FAULT_KINDS}, got {self.kinds}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")

    def kind_for(self, key: str) -> str | None:
        """The fault this content gets (None: never faults); independent of attempts."""
        if self.rate <= 0.0 or _h(self.seed, key, "rate") / 2**64 >= self.rate:
            return None
        return self.kinds[_h(self.seed, key, "kind") % len(self.kinds)]

    def fires(self, key: str, attempt: int) -> str | None:
        """The fault for the `attempt`-th (0-based) arrival of this content, if any."""
        kind = self.kind_for(key)
        if kind not in self.persistent and self.first_attempt_only and attempt >= self.fail_attempts:
            return None
        return kind


@dataclass
class AccountFaults:
    """Faults of the endpoint or account as a whole, not of one request content (mutable)."""

    quota_after_billed: int | None = None  # once this many calls were billed: 429 insufficient_quota
    outage_after_requests: int | None = None  # the outage starts with this request (1-based) ...
    outage_s: float = 0.0  # ... and lasts this long
    outage_status: int = 503  # 503, or 429 (a rate limit without Retry-After)
    reject_params: tuple[str, ...] = ()  # "max_tokens" and/or "temperature": refused with a 400
    requests_per_minute: float | None = None  # token bucket of one second of requests
    outage_until: float = 0.0  # monotonic time the current outage ends (set at run time)
    content_faults: bool = True  # False: the FaultPlan is switched off (e.g. for a re-run)

    def __post_init__(self) -> None:
        bad = set(self.reject_params) - {"max_tokens", "temperature"}
        if bad:
            raise ValueError(f"reject_params must be max_tokens and/or temperature, got {sorted(bad)}")


AnswerFn = Callable[[str], float] | Mapping[str, float]


# --- counters ------------------------------------------------------------------------------


class _Stats:
    """Thread-safe counters (the server loop writes, any thread reads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()  # fault state, not a statistic: kept by reset()
        self.reset()

    def reset(self, attempts: bool = False) -> None:
        with self.lock:
            self.requests = 0
            self.by_stage: Counter[str] = Counter()
            self.by_outcome: Counter[str] = Counter()
            self.billed_by_content: Counter[str] = Counter()
            self.stage_of: dict[str, str] = {}  # content key -> its stage (to break down the billed calls)
            self.billed_at: dict[str, list[float]] = {}  # content key -> wall time of each billed answer
            self.prompt_tokens = self.completion_tokens = 0
            self.in_flight = self.peak_in_flight = 0
            self.in_flight_keys: Counter[str] = Counter()  # content keys being worked on now
            self.ok_times: list[float] = []  # wall time of every billed HTTP 200, in order
            if attempts:
                self.attempts.clear()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "by_stage": {s: self.by_stage[s] for s in (*STAGES, "unknown", "student")},
                "by_outcome": {o: self.by_outcome[o] for o in OUTCOMES},
                "billed": sum(self.billed_by_content.values()),
                "billed_by_content": dict(self.billed_by_content),
                "stage_of": dict(self.stage_of),
                "billed_at": {k: list(v) for k, v in self.billed_at.items()},
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
                "in_flight_keys": sorted(k for k, v in self.in_flight_keys.items() if v > 0),
                "ok_times": list(self.ok_times),
            }


# --- the app -------------------------------------------------------------------------------


def _error(status: int, message: str, type_: str, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Disconnect(Exception):
    """Raised after a partial body so uvicorn drops the connection (a mid-response disconnect)."""


class _DropConnection(Response):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        await send({"type": "http.response.body", "body": b'{"id": "chatcmpl-', "more_body": True})
        raise _Disconnect("injected disconnect")


class _QuietDisconnects(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Disconnect))


def create_app(
    model: str = "test-teacher",
    latency_s: float = 0.0,
    faults: FaultPlan | None = None,
    answer_fn: AnswerFn | None = None,
    latency_per_token_s: float = 0.0,
    max_concurrency: int | None = None,
    stats: _Stats | None = None,
    account: AccountFaults | None = None,
    api_key: str | None = None,
    quota: int | None = None,
    batch: BatchPlan | None = None,
    batch_stats: BatchStats | None = None,
) -> FastAPI:
    plan = faults or FaultPlan()
    acct = account or AccountFaults()
    st = stats or _Stats()
    slots: list[asyncio.Semaphore] = []  # created lazily inside the server's event loop
    short_replies: dict[str, int] = {}  # messages hash -> n of a few_choices reply (follow-ups fail)
    bucket = {"tokens": 0.0, "at": time.monotonic()}  # requests-per-minute token bucket
    app = FastAPI(title="subq test teacher", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stats = st
    app.state.account = acct
    app.state.quota = quota  # requests let through; None: unlimited (TeacherServer.set_quota changes it)
    app.state.quota_used = 0
    app.state.batch_stats = batch_stats or BatchStats()  # the Batch API's counters (tests.batch_routes)

    def refused(request: Request) -> Response | None:
        """401 for a wrong key, 429 insufficient_quota for an empty account; None: go on."""
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            finish("invalid")
            return _error(401, "Incorrect API key provided (injected).", "invalid_request_error", "invalid_api_key")
        with st.lock:  # counted on arrival, so concurrent requests cannot overdraw it
            empty = app.state.quota is not None and app.state.quota_used >= app.state.quota
            app.state.quota_used += not empty
        if empty:
            finish("invalid")
            return _error(429, "You exceeded your current quota, please check your plan and billing details "
                          "(injected).", "insufficient_quota", "insufficient_quota")
        return None

    def gold(problem: str) -> float:
        if answer_fn is None:
            return default_answer(problem)
        if isinstance(answer_fn, Mapping):
            return float(answer_fn[problem]) if problem in answer_fn else default_answer(problem)
        return float(answer_fn(problem))

    def reply(stage: str, body: dict[str, Any], index: int) -> str:
        user = _user_text(body["messages"])
        m = _PROBLEM.search(user)
        problem = m.group(1) if m else user.strip()
        subqs = [q for _, q in _Q_LINE.findall(user)]
        salt = (index, body.get("temperature"), body.get("seed"))
        if stage == "decompose":
            limit = _AT_MOST.search(user)  # honour "Write at most N sub-questions."
            return decompose_reply(problem, salt, int(limit.group(1)) if limit else None)
        if stage == "answer":
            return answer_reply(problem, len(subqs), gold(problem))
        return feedback_reply(problem, subqs, salt)

    def finish(outcome: str, key: str | None = None, billed: bool = False, p_tok: int = 0, c_tok: int = 0) -> None:
        with st.lock:
            st.by_outcome[outcome] += 1
            if billed and key is not None:
                st.ok_times.append(time.time())
                st.billed_by_content[key] += 1
                st.billed_at.setdefault(key, []).append(time.time())
                st.prompt_tokens += p_tok
                st.completion_tokens += c_tok

    async def sleep_unless_gone(request: Request, seconds: float) -> bool:
        """Sleep; True if the client disconnected meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))
            if await request.is_disconnected():
                return True
        return False

    def account_fault(body: dict[str, Any], request_no: int) -> JSONResponse | None:
        """The account-level answer to this request, if it gets one (checked before any work)."""
        now = time.monotonic()
        if acct.outage_after_requests is not None and request_no == acct.outage_after_requests:
            acct.outage_until = now + acct.outage_s
        if now < acct.outage_until:
            finish("outage")
            if acct.outage_status == 429:  # a rate limit with no hint of when it ends
                return _error(429, "Rate limit reached (injected outage).", "requests", "rate_limit_exceeded")
            return _error(acct.outage_status, "The server is overloaded or not ready yet (injected outage).",
                          "server_error")
        if acct.quota_after_billed is not None:
            with st.lock:
                billed = sum(st.billed_by_content.values())
            if billed >= acct.quota_after_billed:
                finish("quota")
                return _error(429, QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota")
        if "max_tokens" in acct.reject_params and body.get("max_tokens") is not None:
            finish("unsupported")
            return JSONResponse({"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                           "Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}},
                status_code=400)
        temperature = body.get("temperature")
        if "temperature" in acct.reject_params and temperature is not None and temperature != 1:
            finish("unsupported")
            return JSONResponse({"error": {
                "message": f"Unsupported value: 'temperature' does not support {temperature} with this model. "
                           "Only the default (1) value is supported.",
                "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}},
                status_code=400)
        if acct.requests_per_minute:
            rate = acct.requests_per_minute / 60.0
            bucket["tokens"] = min(rate, bucket["tokens"] + (now - bucket["at"]) * rate)
            bucket["at"] = now
            if bucket["tokens"] < 1.0:
                finish("rate_limited")
                wait = (1.0 - bucket["tokens"]) / rate
                return _error(429, "Rate limit reached for requests per minute (injected).", "requests",
                              "rate_limit_exceeded", headers={"Retry-After": f"{wait:.3f}"})
            bucket["tokens"] -= 1.0
        return None

    @app.get("/v1/models")
    async def list_models(request: Request) -> Any:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":  # as OpenAI's
            return _error(401, "Incorrect API key provided (injected).", "invalid_request_error", "invalid_api_key")
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "subq-test"}]}

    @app.get("/stats")
    async def get_stats() -> dict[str, Any]:
        return {**st.snapshot(), **app.state.batch_stats.snapshot()}

    @app.post("/stats/reset")
    async def reset_stats(attempts: bool = False) -> dict[str, Any]:
        st.reset(attempts=attempts)
        return st.snapshot()

    @app.post("/faults")
    async def set_faults(request: Request) -> dict[str, Any]:
        """Switch account faults now: {"outage_s": N, "outage_status": 503, "quota_after_billed": K|null,
        "reject_params": [...], "requests_per_minute": R|null, "content_faults": bool}."""
        change = await request.json()
        if "outage_s" in change:
            acct.outage_status = int(change.get("outage_status", acct.outage_status))
            acct.outage_until = time.monotonic() + float(change["outage_s"])
        for name in ("quota_after_billed", "requests_per_minute"):
            if name in change:
                setattr(acct, name, change[name])
        if "reject_params" in change:
            acct.reject_params = tuple(change["reject_params"])
        if "content_faults" in change:
            acct.content_faults = bool(change["content_faults"])
        return {"outage_left_s": max(0.0, acct.outage_until - time.monotonic()),
                "quota_after_billed": acct.quota_after_billed, "reject_params": list(acct.reject_params)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        with st.lock:
            st.requests += 1
            request_no = st.requests
            st.in_flight += 1
            st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        try:
            return await _chat(request, request_no)
        finally:
            with st.lock:
                st.in_flight -= 1

    async def _chat(request: Request, request_no: int) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        body = await json_body(request)
        if not (isinstance(body, dict) and isinstance(body.get("messages"), list) and body["messages"]):
            finish("invalid")
            return _error(400, "Invalid request: expected a JSON body with a non-empty 'messages' list.",
                          "invalid_request_error")
        stage = detect_stage(body["messages"])
        with st.lock:
            st.by_stage[stage or "unknown"] += 1
        if body.get("model") != model:
            finish("invalid")
            return _error(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                          "invalid_request_error", "model_not_found")
        n = body.get("n") or 1
        if stage is None or body.get("stream") or not isinstance(n, int) or n < 1:
            finish("invalid")
            return _error(400, "Unsupported request: unknown stage (system prompt), stream, or bad n.",
                          "invalid_request_error")
        account_refusal = account_fault(body, request_no)
        if account_refusal is not None:
            return account_refusal

        key = content_key(body)
        messages_key = content_key({"messages": body["messages"]})
        with st.lock:
            st.stage_of[key] = stage
            attempt = st.attempts[key]
            st.attempts[key] += 1
        if acct.content_faults and n < short_replies.get(messages_key, 0):
            finish("follow_up")
            return _error(500, "The follow-up request failed (injected after a reply with too few choices).",
                          "server_error")
        fault = plan.fires(key, attempt) if acct.content_faults else None
        if fault == "429":
            finish("429")
            return _error(429, "Rate limit reached for requests (injected).", "requests", "rate_limit_exceeded",
                          headers={"Retry-After": f"{plan.retry_after_s:.3f}".rstrip("0").rstrip(".") or "0"})
        if fault == "400":
            finish("400")
            return _error(400, "Invalid request (injected, permanent for this content).", "invalid_request_error")

        if fault == "few_choices" and n > 1:
            short_replies[messages_key] = n
            n = 1
        texts = [MALFORMED_TEXT if fault == "malformed" else reply(stage, body, i) for i in range(n)]
        reasons = ["stop"] * n
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        for i, t in enumerate(texts):
            words = list(re.finditer(r"\S+", t))
            cut = max(1, len(words) // 2) if fault == "truncated" else limit
            if cut is not None and len(words) > cut:
                texts[i], reasons[i] = t[: words[cut - 1].end()], "length"
        c_tok = sum(len(t.split()) for t in texts)
        delay = latency_s + latency_per_token_s * c_tok + (plan.slow_s if fault == "slow" else 0.0)
        if max_concurrency is not None and not slots:
            slots.append(asyncio.Semaphore(max_concurrency))
        if slots:
            await slots[0].acquire()
        with st.lock:
            st.in_flight_keys[key] += 1
        try:
            if fault == "hang" and await sleep_unless_gone(request, plan.hang_s):
                finish("hang")  # the client gave up: nothing sent, nothing billed
                return Response(status_code=499)
            await asyncio.sleep(delay)
        finally:
            with st.lock:
                st.in_flight_keys[key] -= 1
            if slots:
                slots[0].release()
        if fault == "500":
            finish("500")
            return _error(500, "The server had an error while processing your request (injected).", "server_error")
        if fault == "disconnect":
            finish("disconnect")
            return _DropConnection()

        p_tok = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
        finish(fault or "ok", key, billed=True, p_tok=p_tok, c_tok=c_tok)
        response: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_subq_test",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                 "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ],
        }
        if fault != "no_usage":
            response["usage"] = {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}
        return JSONResponse(response)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        with st.lock:
            st.requests += 1
        if (denied := refused(request)) is not None:
            return denied
        body = await json_body(request)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        match = _STUDENT.fullmatch(prompt) if isinstance(prompt, str) else None
        if body is None or body.get("model") != model or match is None or body.get("stream"):
            finish("invalid")
            return _error(400, "Unsupported completion: unknown model, not a student prompt, or stream.",
                          "invalid_request_error")
        with st.lock:
            st.by_stage["student"] += 1
        key = completion_key(body)
        with st.lock:
            attempt = st.attempts[key]
            st.attempts[key] += 1
        fault = plan.fires(key, attempt)
        if fault in ("429", "400"):
            finish(fault)
            return _error(int(fault), f"Injected {fault}.", "requests" if fault == "429" else "invalid_request_error")
        await asyncio.sleep(latency_s)
        if fault in ("500", "hang", "disconnect"):
            finish("500")
            return _error(500, "The server had an error while processing your request (injected).", "server_error")
        text = MALFORMED_TEXT if fault == "malformed" else student_reply(match["problem"], body.get("temperature"))
        stops = [body["stop"]] if isinstance(body.get("stop"), str) else list(body.get("stop") or [])
        cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=None)
        p_tok, c_tok = len(body["prompt"].split()), len(text[:cut].split())
        finish(fault or "ok", key, billed=True, p_tok=p_tok, c_tok=c_tok)
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text[:cut], "logprobs": None,
                         "finish_reason": "stop" if cut is not None else "length"}],
            "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok},
        })

    add_batch_routes(app, batch or BatchPlan(), app.state.batch_stats, content_key)  # files + batches
    return app


async def json_body(request: Request) -> Any:
    """The request's JSON, or None when it is not JSON."""
    try:
        return await request.json()
    except ValueError:
        return None


def completion_key(body: Mapping[str, Any]) -> str:
    """The key faults and billing of a completion are tracked by: prompt + n + sampling parameters."""
    return content_key({**body, "messages": [{"role": "user", "content": body.get("prompt")}]})


# --- serving -------------------------------------------------------------------------------


def _listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _uvicorn_config(app: FastAPI) -> uvicorn.Config:
    logging.getLogger("uvicorn.error").addFilter(_QuietDisconnects())
    # log_config=None: uvicorn's own dictConfig would close every logging handler of the host process,
    # absl's among them (rouge-score imports it), and with it the stream pytest captures stderr in.
    return uvicorn.Config(
        app, loop="auto", http="auto", lifespan="off", access_log=False, log_level="warning", log_config=None,
        limit_concurrency=None, backlog=4096, timeout_keep_alive=30, timeout_graceful_shutdown=1,
    )


class ThreadedServer:
    """An app served by uvicorn in a background thread; ``with`` starts and stops it."""

    name = "server"

    def _bind(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self._sock = _listen(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = uvicorn.Server(_uvicorn_config(self.app))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TeacherServer(ThreadedServer):
    """The app served by uvicorn in a background thread, on 127.0.0.1 and a free port."""

    name = "teacher-server"

    def __init__(
        self,
        latency_s: float = 0.0,
        faults: FaultPlan | None = None,
        model: str = "test-teacher",
        answer_fn: AnswerFn | None = None,
        latency_per_token_s: float = 0.0,
        max_concurrency: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        account: AccountFaults | None = None,
        api_key: str | None = None,
        quota: int | None = None,
        batch: BatchPlan | None = None,
    ) -> None:
        self.model = model
        self.faults = faults or FaultPlan()
        self.account = account or AccountFaults()
        self._stats = _Stats()
        self._bind(create_app(model, latency_s, self.faults, answer_fn, latency_per_token_s,
                              max_concurrency, self._stats, self.account, api_key=api_key, quota=quota,
                              batch=batch), host, port)

    def stats(self) -> dict[str, Any]:
        """Chat counters, and the batch ones (``batch_lines``: custom_id -> times submitted)."""
        return {**self._stats.snapshot(), **self.app.state.batch_stats.snapshot()}

    def start_outage(self, seconds: float, status: int = 503) -> None:
        """Every request gets ``status`` for the next ``seconds`` (503, or 429 without Retry-After)."""
        self.account.outage_status = status
        self.account.outage_until = time.monotonic() + seconds

    def set_quota(self, quota: int | None) -> None:
        """Requests let through from now on (None: unlimited), e.g. after a top-up."""
        self.app.state.quota, self.app.state.quota_used = quota, 0

    def reset_stats(self, attempts: bool = False) -> None:
        """Zero the counters; ``attempts=True`` also forgets which contents already failed."""
        self._stats.reset(attempts=attempts)



def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fault-injecting OpenAI-compatible test teacher (test double).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (see the READY line)")
    p.add_argument("--model", default="test-teacher")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    p.add_argument("--latency-per-token", type=float, default=0.0, help="extra seconds per completion word")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--fault-kinds", default=",".join(FaultPlan.kinds), help=f"from {','.join(FAULT_KINDS)}")
    p.add_argument("--persistent-kinds", default=",".join(FaultPlan.persistent),
                   help="fault kinds that hit every arrival of their content")
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--fail-attempts", type=int, default=1)
    p.add_argument("--persistent-faults", action="store_true", help="transient faults hit every attempt")
    p.add_argument("--retry-after", type=float, default=0.2)
    p.add_argument("--hang", type=float, default=30.0)
    p.add_argument("--slow", type=float, default=3.0, help="extra seconds of a 'slow' reply")
    p.add_argument("--quota-after", type=int, help="429 insufficient_quota after this many billed calls")
    p.add_argument("--outage-after", type=int, help="an outage starts with this request (1-based)")
    p.add_argument("--outage-s", type=float, default=0.0, help="outage length in seconds")
    p.add_argument("--outage-status", type=int, default=503, help="503, or 429 without Retry-After")
    p.add_argument("--reject-params", default="", help="max_tokens,temperature: answered with a 400")
    p.add_argument("--requests-per-minute", type=float, help="a rate limit answered with 429 + Retry-After")
    p.add_argument("--answers", help="JSON file {problem: gold number} for correct final answers")
    a = p.parse_args(argv)
    plan = FaultPlan(rate=a.fault_rate, kinds=tuple(k for k in a.fault_kinds.split(",") if k), seed=a.fault_seed,
                     first_attempt_only=not a.persistent_faults, fail_attempts=a.fail_attempts,
                     retry_after_s=a.retry_after, hang_s=a.hang, slow_s=a.slow,
                     persistent=tuple(k for k in a.persistent_kinds.split(",") if k))
    account = AccountFaults(quota_after_billed=a.quota_after, outage_after_requests=a.outage_after,
                            outage_s=a.outage_s, outage_status=a.outage_status,
                            reject_params=tuple(k for k in a.reject_params.split(",") if k),
                            requests_per_minute=a.requests_per_minute)
    answers = None
    if a.answers:
        with open(a.answers) as f:
            answers = {str(k): float(v) for k, v in json.load(f).items()}
    app = create_app(a.model, a.latency, plan, answers, a.latency_per_token, a.max_concurrency, account=account)
    sock = _listen(a.host, a.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(_uvicorn_config(app))
    print(f"READY http://{host}:{port}/v1", flush=True)
    server.run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
