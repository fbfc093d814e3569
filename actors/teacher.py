"""The teacher client: one OpenAI-compatible chat call with retries, usage, latency and $.

The ``openai`` client's own retries are off (``max_retries=0``): tenacity owns the policy so
that every attempt is counted and a 429's ``Retry-After`` is honoured exactly. Retried: 429,
5xx, timeouts, connection errors. Not retried: other 4xx (a bad request stays bad) — recorded
as an API error. The API key is read from the environment by name, and every error message is
scrubbed of it before it is returned (errors end up in the store and in logs).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from actors.prices import PriceTable

# Base URLs that never need a key (our local servers); anything else gets the env key.
NO_KEY_PLACEHOLDER = "no-key"
_KEYLIKE = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-*]{6,}")


@dataclass
class TeacherConfig:
    base_url: str  # OpenAI-compatible root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str  # model name sent to the endpoint (and looked up in the price table)
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key (never the key)
    timeout_s: float = 60.0  # per attempt
    max_attempts: int = 6  # attempts per call, first one included
    backoff_initial_s: float = 0.5  # exponential backoff with full jitter: initial * 2^k, capped
    backoff_max_s: float = 30.0
    retry_after_max_s: float = 120.0  # a server asking for longer than this is capped
    max_concurrency: int = 64  # in-flight calls per actor


@dataclass
class CallResult:
    texts: list[str] = field(default_factory=list)  # one per choice
    ok: bool = False
    error: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0  # wall time of the whole call, retries and waits included
    attempts: int = 0
    cost_usd: float | None = None
    budget_stopped: bool = False  # the $ budget was spent before this call could start


class RetryableError(Exception):
    pass


def api_key_from_env(env_name: str, base_url: str) -> str:
    """The key from ``env_name``; local endpoints work without one."""
    key = os.environ.get(env_name, "").strip()
    if key:
        return key
    if re.match(r"https?://(127\.|localhost|\[::1\])", base_url):
        return NO_KEY_PLACEHOLDER
    raise ValueError(f"no API key: set the environment variable {env_name} for {base_url}")


def redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s and s != NO_KEY_PLACEHOLDER:
            text = text.replace(s, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.RateLimitError | openai.APITimeoutError | openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in (408, 409, 429)
    return isinstance(exc, RetryableError | asyncio.TimeoutError)


def _retry_after_s(exc: BaseException | None) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: rare from LLM APIs; fall back to backoff
        return None


class TeacherClient:
    """Async chat calls against one endpoint; safe to share across concurrent coroutines."""

    def __init__(self, cfg: TeacherConfig, prices: PriceTable | None = None, limiter: Any = None):
        self.cfg = cfg
        self.prices = prices or PriceTable()
        self.limiter = limiter  # a Ray actor handle of RateLimiter, or None
        self._key = api_key_from_env(cfg.api_key_env, cfg.base_url)
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=self._key, max_retries=0, timeout=cfg.timeout_s
        )
        self._sem = asyncio.Semaphore(cfg.max_concurrency)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = _retry_after_s(exc)
        if asked is not None:
            return min(asked, self.cfg.retry_after_max_s)
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (state.attempt_number - 1))
        return random.uniform(0, cap)

    async def _reserve(self, est_tokens: int) -> bool:
        if self.limiter is None:
            return True
        res = await self.limiter.reserve.remote(est_tokens)
        if res.wait_s > 0:
            await asyncio.sleep(res.wait_s)
        return res.allowed

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        n: int = 1,
        temperature: float = 0.7,
        max_tokens: int = 256,
    ) -> CallResult:
        result = CallResult()
        est_tokens = sum(len(m["content"]) for m in messages) // 4 + n * max_tokens
        async with self._sem:
            if not await self._reserve(est_tokens):
                result.budget_stopped = True
                result.error = "budget exhausted before this call"
                return result
            start = time.monotonic()
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.cfg.max_attempts),
                    wait=self._wait,
                    retry=retry_if_exception(_retryable),
                    reraise=True,
                ):
                    with attempt:
                        result.attempts += 1
                        response = await self._client.chat.completions.create(
                            model=self.cfg.model,
                            messages=messages,
                            n=n,
                            temperature=temperature,
                            max_tokens=max_tokens,
                        )
                        if not response.choices:
                            raise RetryableError("the endpoint returned no choices")
            except Exception as e:  # noqa: BLE001 - every failure becomes a recorded api_error
                result.error = redact(f"{type(e).__name__}: {e}", [self._key])[:2000]
                result.latency_s = time.monotonic() - start
                return result
            result.latency_s = time.monotonic() - start
            result.ok = True
            result.texts = [(c.message.content or "") for c in response.choices]
            usage = response.usage
            result.tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
            result.tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
            result.cost_usd = self.prices.cost(self.cfg.model, result.tokens_in, result.tokens_out)
            if self.limiter is not None:
                self.limiter.record.remote(result.tokens_in + result.tokens_out, result.cost_usd)
            return result

    async def aclose(self) -> None:
        await self._client.close()


class TeacherUnreachable(RuntimeError):
    """The endpoint cannot be used; the message is one line a user can act on."""


def check_endpoint(cfg: TeacherConfig, timeout_s: float = 10.0) -> list[str]:
    """Fail fast, before any work: the endpoint answers and accepts the key. Returns served models.

    ``GET /models`` is part of the OpenAI API and of every compatible server we know; a server
    without it (404) is accepted, since chat may still work.
    """
    import httpx

    key = api_key_from_env(cfg.api_key_env, cfg.base_url)
    headers = {} if key == NO_KEY_PLACEHOLDER else {"Authorization": f"Bearer {key}"}
    url = cfg.base_url.rstrip("/") + "/models"
    try:
        r = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise TeacherUnreachable(f"cannot reach the teacher at {cfg.base_url}: {type(e).__name__}") from None
    if r.status_code in (401, 403):
        raise TeacherUnreachable(
            f"the teacher at {cfg.base_url} rejected the API key from ${cfg.api_key_env} (HTTP {r.status_code})"
        )
    if r.status_code == 404:
        return []
    if r.status_code >= 400:
        raise TeacherUnreachable(f"the teacher at {cfg.base_url} answered GET /models with HTTP {r.status_code}")
    try:
        models = [m["id"] for m in r.json().get("data", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise TeacherUnreachable(f"{url} did not return an OpenAI model list") from None
    if models and cfg.model not in models:
        shown = ", ".join(models[:10]) + (" ..." if len(models) > 10 else "")
        raise TeacherUnreachable(f"model {cfg.model!r} is not served at {cfg.base_url} (served: {shown})")
    return models
