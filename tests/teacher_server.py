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
- Transient faults (429, 500, hang, disconnect) hit a faulted content on its first
  ``fail_attempts`` arrivals (every arrival if ``first_attempt_only=False``), then it succeeds.
  "malformed" (HTTP 200, unparseable text) and "400" hit that content on every arrival.
- 429 and 400 are answered at once; 500 and disconnect after the latency (the work was lost);
  hang sleeps ``hang_s`` and answers only if the client is still connected.
- ``billed`` counts HTTP 200 responses (malformed ones included: a teacher charges for them), also
  when the client died while the server worked (a real API bills those too). The exception is a
  hang whose client has gone: it models a stuck upstream that produced nothing, so it is not billed.
- Attempt memory lives in the server: a restart forgets attempts but faults the same contents.
- ``api_key``: requests without ``Authorization: Bearer <api_key>`` get 401 ``invalid_api_key``.
- ``quota``: once that many requests were let through, every further request gets 429
  ``insufficient_quota`` (an account that ran dry mid-run); ``set_quota`` sets a fresh allowance.
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

STAGES = ("decompose", "answer", "feedback")
FAULT_KINDS = ("429", "500", "hang", "malformed", "400", "disconnect")
OUTCOMES = ("ok", *FAULT_KINDS, "invalid")  # invalid: rejected by the server itself (bad model/JSON/stage)
MALFORMED_TEXT = "I cannot help with that."
TRANSIENT = frozenset({"429", "500", "hang", "disconnect"})

_Q_LINE = re.compile(r"^\s*Q(\d+)\s*[:.)]\s*(.*?)\s*$", re.MULTILINE)
_AT_MOST = re.compile(r"at most (\d+) sub-questions", re.IGNORECASE)
_PROBLEM = re.compile(r"Problem:\s*(.*?)\s*(?:\n\s*\n|\n\s*Q\d+\s*[:.)]|\Z)", re.DOTALL)


def _h(*parts: Any) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process)."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


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
        if kind in TRANSIENT and self.first_attempt_only and attempt >= self.fail_attempts:
            return None
        return kind


# --- stage detection and deterministic replies ---------------------------------------------


_PROMPTS: dict[str, str] = {}


def _system_prompts() -> dict[str, str]:
    """System prompt -> stage, from protocol.prompts (imported lazily, kept once found; {} if absent)."""
    if not _PROMPTS:
        try:
            from protocol import prompts
        except ImportError:
            return {}
        names = {"DECOMPOSE_SYSTEM": "decompose", "ANSWER_SYSTEM": "answer", "FEEDBACK_SYSTEM": "feedback"}
        _PROMPTS.update({getattr(prompts, n): s for n, s in names.items()
                         if isinstance(getattr(prompts, n, None), str)})
    return _PROMPTS


def detect_stage(messages: list[dict[str, Any]]) -> str | None:
    """The stage from the first (system) message: exact match with protocol's prompts, else keywords."""
    if not messages or messages[0].get("role") != "system":
        return None
    system = str(messages[0].get("content") or "")
    stage = _system_prompts().get(system)
    if stage is None:  # fallback for hand-written prompts in tests
        low = system.lower()
        for word, s in (("feedback", "feedback"), ("useful", "feedback"), ("decompos", "decompose"),
                        ("answer", "answer")):
            if word in low:
                return s
    return stage


def _user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_TEMPLATES = (
    "How many {w} are there at the start?",
    "What is the total number of {w}?",
    "How much is left after the {w} are used?",
    "What is the cost of the {w}?",
    "How many {w} are added in the second step?",
    "What is the difference in {w}?",
)


def decompose_reply(problem: str, salt: Any, limit: int | None = None) -> str:
    words = re.findall(r"\b[a-z]{4,}\b", problem) or ["items"]
    k = 2 + _h(problem, salt, "k") % 3
    k = min(k, max(limit, 1)) if limit else k
    lines = []
    for i in range(1, k + 1):
        w = words[_h(problem, salt, i, "w") % len(words)]
        lines.append(f"Q{i}: " + _TEMPLATES[_h(problem, salt, i, "t") % len(_TEMPLATES)].format(w=w))
    return "\n".join(lines)


def answer_reply(problem: str, n_sub: int, final: float) -> str:
    lines = [f"A{i}: The result of step {i} is {_h(problem, i, 'a') % 100}." for i in range(1, n_sub + 1)]
    return "\n".join([*lines, f"Final answer: {_number(final)}"])


def feedback_reply(problem: str, subqs: list[str], salt: Any) -> str:
    return "\n".join(
        f"Q{i}: {'Yes' if _h(problem, q, salt, 'fb') % 4 else 'No'}" for i, q in enumerate(subqs, 1)
    )


def default_answer(problem: str) -> float:
    return float(_h(problem, "gold") % 1000)


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
            self.prompt_tokens = self.completion_tokens = 0
            self.in_flight = self.peak_in_flight = 0
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
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
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
    api_key: str | None = None,
    quota: int | None = None,
) -> FastAPI:
    plan = faults or FaultPlan()
    st = stats or _Stats()
    slots: list[asyncio.Semaphore] = []  # created lazily inside the server's event loop
    app = FastAPI(title="subq test teacher", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stats = st
    app.state.quota = quota  # requests let through; None: unlimited (TeacherServer.set_quota changes it)
    app.state.quota_used = 0

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
                st.billed_by_content[key] += 1
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

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "subq-test"}]}

    @app.get("/stats")
    async def get_stats() -> dict[str, Any]:
        return st.snapshot()

    @app.post("/stats/reset")
    async def reset_stats(attempts: bool = False) -> dict[str, Any]:
        st.reset(attempts=attempts)
        return st.snapshot()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        with st.lock:
            st.requests += 1
            st.in_flight += 1
            st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        try:
            return await _chat(request)
        finally:
            with st.lock:
                st.in_flight -= 1

    async def _chat(request: Request) -> Response:
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

        key = content_key(body)
        with st.lock:
            attempt = st.attempts[key]
            st.attempts[key] += 1
        fault = plan.fires(key, attempt)
        if fault == "429":
            finish("429")
            return _error(429, "Rate limit reached for requests (injected).", "requests", "rate_limit_exceeded",
                          headers={"Retry-After": f"{plan.retry_after_s:.3f}".rstrip("0").rstrip(".") or "0"})
        if fault == "400":
            finish("400")
            return _error(400, "Invalid request (injected, permanent for this content).", "invalid_request_error")

        texts = [MALFORMED_TEXT if fault == "malformed" else reply(stage, body, i) for i in range(n)]
        c_tok = sum(len(t.split()) for t in texts)
        delay = latency_s + latency_per_token_s * c_tok
        if max_concurrency is not None and not slots:
            slots.append(asyncio.Semaphore(max_concurrency))
        if slots:
            await slots[0].acquire()
        try:
            if fault == "hang" and await sleep_unless_gone(request, plan.hang_s):
                finish("hang")  # the client gave up: nothing sent, nothing billed
                return Response(status_code=499)
            await asyncio.sleep(delay)
        finally:
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
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_subq_test",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}
                for i, t in enumerate(texts)
            ],
            "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok},
        })

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

    return app


async def json_body(request: Request) -> Any:
    """The request's JSON, or None when it is not JSON."""
    try:
        return await request.json()
    except ValueError:
        return None


# The student's prompt, as protocol.prompts.student_prompt writes it (one line of problem).
_STUDENT = re.compile(r"Problem: (?P<problem>[^\n]*)\nSub-questions:\n")
STUDENT_END = "<end>"  # protocol.prompts.SUBQ_END


def completion_key(body: Mapping[str, Any]) -> str:
    """The key faults and billing of a completion are tracked by: prompt + n + sampling parameters."""
    return content_key({**body, "messages": [{"role": "user", "content": body.get("prompt")}]})


def student_reply(problem: str, salt: Any) -> str:
    """What a trained student writes: sub-questions one per line, the end marker, then it rambles on."""
    lines = [line.split(": ", 1)[1] for line in decompose_reply(problem, salt).splitlines()]
    return "\n".join([*lines, STUDENT_END, "Problem: Tom has 3 apples. How many now?"])


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
    return uvicorn.Config(
        app, loop="auto", http="auto", lifespan="off", access_log=False, log_level="warning",
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
        api_key: str | None = None,
        quota: int | None = None,
    ) -> None:
        self.model = model
        self.faults = faults or FaultPlan()
        self._stats = _Stats()
        self._bind(create_app(model, latency_s, self.faults, answer_fn, latency_per_token_s,
                              max_concurrency, self._stats, api_key=api_key, quota=quota), host, port)

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot()

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
    p.add_argument("--fault-kinds", default=",".join(FAULT_KINDS))
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--fail-attempts", type=int, default=1)
    p.add_argument("--persistent-faults", action="store_true", help="transient faults hit every attempt")
    p.add_argument("--retry-after", type=float, default=0.2)
    p.add_argument("--hang", type=float, default=30.0)
    p.add_argument("--answers", help="JSON file {problem: gold number} for correct final answers")
    a = p.parse_args(argv)
    plan = FaultPlan(rate=a.fault_rate, kinds=tuple(k for k in a.fault_kinds.split(",") if k), seed=a.fault_seed,
                     first_attempt_only=not a.persistent_faults, fail_attempts=a.fail_attempts,
                     retry_after_s=a.retry_after, hang_s=a.hang)
    answers = None
    if a.answers:
        with open(a.answers) as f:
            answers = {str(k): float(v) for k, v in json.load(f).items()}
    app = create_app(a.model, a.latency, plan, answers, a.latency_per_token, a.max_concurrency)
    sock = _listen(a.host, a.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(_uvicorn_config(app))
    print(f"READY http://{host}:{port}/v1", flush=True)
    server.run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
