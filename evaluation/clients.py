"""Where sub-questions and solutions come from during evaluation: plain async clients, no Ray.

A decomposer is one of
- ``none``: no decomposition; the solver answers alone with chain of thought (the single-stage baseline);
- ``teacher``: an OpenAI-compatible chat model prompted with the teacher's few-shot decomposition prompt
  (paper 1's "teacher decomposes" column);
- ``url``: a running subq decomposer (``serve/decomposer.py``), called at ``POST <url>/decompose``.
A checkpoint is served first (``subq/`` starts the Serve app) and then evaluated by its URL, so the
numbers measure exactly what a user would deploy.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from actors.prices import PriceTable
from actors.teacher import CallResult, TeacherClient, TeacherConfig, redact
from protocol.parse import parse_subquestions
from protocol.prompts import decompose_messages
from protocol.solve_prompts import cot_messages, solve_messages

DECOMPOSER_KINDS = ("none", "teacher", "url")


@dataclass
class DecomposerSpec:
    kind: str  # none | teacher | url
    label: str  # the row name in the report, e.g. "ilql", "teacher (gpt-4o-mini)", "none (CoT)"
    url: str | None = None  # kind=url: the decomposer app's base URL (no /decompose)
    token_env: str | None = None  # kind=url: NAME of an env var with the app's bearer token
    teacher: TeacherConfig | None = None  # kind=teacher: the chat endpoint that decomposes
    beta: float | None = None  # kind=url: ILQL guidance per request; None = the server's default

    def __post_init__(self) -> None:
        if self.kind not in DECOMPOSER_KINDS:
            raise ValueError(f"decomposer kind must be one of {DECOMPOSER_KINDS}, got {self.kind!r}")
        if self.kind == "url" and not self.url:
            raise ValueError("a url decomposer needs a url")
        if self.kind == "teacher" and self.teacher is None:
            raise ValueError("a teacher decomposer needs a TeacherConfig")


@dataclass
class Decomposition:
    subquestions: list[str] = field(default_factory=list)
    raw: str = ""
    error: str | None = None  # API failure or nothing parseable; the solver then runs without a plan
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    cost_usd: float | None = 0.0  # a self-hosted decomposer bills no tokens: $0


class DecomposerClient:
    """Sub-questions for one problem from any kind of decomposer; safe for concurrent coroutines."""

    def __init__(self, spec: DecomposerSpec, prices: PriceTable, *, max_subquestions: int | None,
                 temperature: float, max_tokens: int, timeout_s: float = 120.0, max_attempts: int = 4) -> None:
        self.spec, self.max_subquestions = spec, max_subquestions
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self._teacher = TeacherClient(spec.teacher, prices) if spec.kind == "teacher" else None
        self._http: Any = None
        self._token = os.environ.get(spec.token_env, "") if spec.token_env else ""

    async def decompose(self, problem: str) -> Decomposition:
        if self.spec.kind == "none":
            return Decomposition()
        if self._teacher is not None:
            call = await self._teacher.chat(decompose_messages(problem, self.max_subquestions), n=1,
                                            temperature=self.temperature, max_tokens=self.max_tokens)
            out = Decomposition(tokens_in=call.tokens_in, tokens_out=call.tokens_out, latency_s=call.latency_s,
                                cost_usd=call.cost_usd if call.ok else 0.0)
            if not call.ok:
                out.error = f"api_error: {call.error}"
                return out
            out.raw = call.texts[0]
            parsed = parse_subquestions(out.raw, self.max_subquestions)
            out.subquestions = parsed.subquestions
            out.error = f"parse_error: {parsed.error}" if parsed.error else None
            return out
        return await self._decompose_url(problem)

    async def _decompose_url(self, problem: str) -> Decomposition:
        import httpx

        if self._http is None:  # created inside the running event loop
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            self._http = httpx.AsyncClient(timeout=self.timeout_s, headers=headers, trust_env=False)
        body: dict[str, Any] = {"problem": problem, "temperature": self.temperature}
        if self.max_subquestions:
            body["max_subquestions"] = self.max_subquestions
        if self.spec.beta is not None:
            body["beta"] = self.spec.beta
        url = f"{self.spec.url.rstrip('/')}/decompose"
        start = time.monotonic()
        error = "no attempt made"
        for attempt in range(self.max_attempts):
            try:
                r = await self._http.post(url, json=body)
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    data = r.json()
                    usage = data.get("usage") or {}
                    subqs = [str(q) for q in data.get("subquestions") or []]
                    return Decomposition(
                        subquestions=subqs, raw=str(data.get("raw", "")),
                        error=None if subqs else "parse_error: the decomposer returned no sub-questions",
                        tokens_in=int(usage.get("prompt_tokens", 0)), tokens_out=int(usage.get("completion_tokens", 0)),
                        latency_s=time.monotonic() - start)
                error = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code < 500 and r.status_code != 429:
                    break  # a client error will not go away by asking again
            await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
        return Decomposition(error=f"api_error: {redact(error, [self._token] if self._token else [])}",
                             latency_s=time.monotonic() - start)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._teacher is not None:
            await self._teacher.aclose()


@dataclass
class SolverSpec:
    base_url: str  # OpenAI-compatible root, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    label: str | None = None  # the column name in the report; default: the model name

    def __post_init__(self) -> None:
        self.label = self.label or self.model


async def solve(client: TeacherClient, problem: dict, subquestions: list[str], *, temperature: float,
                max_tokens: int) -> CallResult:
    """Static plan: all sub-questions are in the prompt; the solver answers them in order, then the problem.

    Without sub-questions (the baseline, or a failed decomposition) the solver gets the
    chain-of-thought prompt instead, so a broken decomposer is scored as what it is.
    """
    choices = problem.get("choices")
    if subquestions:
        messages = solve_messages(problem["question"], subquestions, problem["answer_type"], choices)
    else:
        messages = cot_messages(problem["question"], problem["answer_type"], choices)
    return await client.chat(messages, n=1, temperature=temperature, max_tokens=max_tokens)
