"""The teacher client: one OpenAI-compatible chat call with retries, usage, latency and $.

The ``openai`` client's own retries are off (``max_retries=0``): the loop in :meth:`TeacherClient.chat`
owns the policy, so every attempt is counted, a 429's ``Retry-After`` is honoured exactly, and
every attempt passes the run's shared :class:`~actors.governor.Governor` (rate limits, the $
budget, the circuit breaker). Outcomes of an attempt:

- success: priced from its usage (cached input included); no usage -> the price is unknown;
- 429 / 5xx / timeouts / connection errors: retried with exponential backoff and full jitter, at
  most ``max_attempts`` times -- but attempts that fail while the whole pool is in an outage (the
  breaker is open, or a call has failed alone for under ``lone_grace_s``: others may be about to)
  are not held against the call: it waits with the pool, up to the patience;
- a 400 naming a parameter the model refuses (``max_tokens``, ``temperature``): learned for the
  model (``actors.model_params``) and re-sent at once;
- exhausted quota, billing and authentication errors (401, 402, 403, 429 ``insufficient_quota``):
  :class:`TeacherFatalError`, after telling the governor to refuse every further call of the run;
- any other 4xx: not retried (a bad request stays bad), returned as the call's error.

The API key is read from the environment by name, and every error message is scrubbed of it
before it is returned (errors end up in the store and in logs).
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
from subq.actors.governor import REFUSED_BUDGET, Governor, GovernorClient
from subq.actors.model_params import learn_from, request_params, style_for
from subq.actors.prices import PriceTable

# Base URLs that never need a key (our local servers); anything else gets the env key.
NO_KEY_PLACEHOLDER = "no-key"
_KEYLIKE = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-*]{6,}")
# Error codes that mean the account, not the request, is the problem: stop the run.
_FATAL_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active",
                          "account_deactivated", "invalid_api_key"})


@dataclass
class TeacherConfig:
    base_url: str  # OpenAI-compatible root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str  # model name sent to the endpoint (and looked up in the price table)
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key (never the key)
    timeout_s: float = 60.0  # per attempt
    max_attempts: int = 6  # attempts per call, first one included (outage attempts not counted)
    backoff_initial_s: float = 0.5  # exponential backoff with full jitter: initial * 2^k, capped
    backoff_max_s: float = 30.0
    retry_after_max_s: float = 120.0  # a server asking for longer than this is capped
    max_concurrency: int = 64  # in-flight calls per actor


@dataclass
class CallResult:
    texts: list[str] = field(default_factory=list)  # one per choice
    finish_reasons: list[str | None] = field(default_factory=list)  # one per choice: "stop", "length", ...
    ok: bool = False
    error: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens: int = 0  # of tokens_in, served from the prompt cache
    usage_known: bool = True  # False: the response had no usage, so its cost is unknown
    latency_s: float = 0.0  # wall time of the whole call, retries and waits included
    attempts: int = 0
    cost_usd: float | None = None  # the successful response's cost; None = unknown
    charged_usd: float = 0.0  # what the budget counted over all attempts (worst case where unknown)
    refused: str | None = None  # governor.REFUSED_*: nothing was sent, the work is left undone
    budget_stopped: bool = False  # refused because the $ budget was spent (kept for callers)


class RetryableError(Exception):
    pass


class TeacherFatalError(RuntimeError):
    """The account cannot be used (exhausted quota, billing, authentication): stop the whole run.

    The message says what happened and what to do; it never contains the key.
    """


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


def is_transient(exc: BaseException) -> bool:
    """429 / 5xx / timeouts / connection errors: worth sending again."""
    if isinstance(exc, openai.RateLimitError | openai.APITimeoutError | openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in (408, 409, 429)
    return isinstance(exc, RetryableError | asyncio.TimeoutError)


def _unhealthy(exc: BaseException) -> bool:
    """A failure that counts towards the breaker: the endpoint is failing or overloaded. A 429 that
    says when to come back (Retry-After) is a rate limit doing its job, not an outage."""
    if isinstance(exc, openai.RateLimitError) and _retry_after_s(exc) is not None:
        return False
    return is_transient(exc)


def _maybe_billed(exc: BaseException) -> bool:
    """No response, but the API may have done (and billed) the work: a timeout, a dropped line."""
    return isinstance(exc, openai.APIConnectionError | asyncio.TimeoutError)


def fatal_reason(exc: BaseException) -> str | None:
    """Why the account (not the request) cannot be used, or None."""
    if isinstance(exc, openai.AuthenticationError):
        return "rejected the API key"
    if isinstance(exc, openai.PermissionDeniedError):
        return "refused this account access"
    if isinstance(exc, openai.APIStatusError):
        code = str(exc.code or "") or str(getattr(exc, "type", "") or "")
        if exc.status_code == 402 or code in _FATAL_CODES or getattr(exc, "type", None) in _FATAL_CODES:
            return "reports the account's quota or billing exhausted"
    return None


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


def max_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """A bound on the prompt's tokens without a tokenizer: no BPE token is shorter than half a
    UTF-8 byte pair on average text, plus the chat format's few tokens per message."""
    return sum(len(m["content"].encode()) // 2 + 8 for m in messages) + 8


def chat_params(cfg: TeacherConfig, n: int, temperature: float, max_tokens: int) -> dict:
    """The sampling parameters of a chat request, in the style the model takes (online and batch)."""
    return request_params(style_for(cfg.base_url, cfg.model), n, temperature, max_tokens)


def read_response(response: Any, result: CallResult, prices: PriceTable, model: str) -> None:
    """Fill ``result`` from a chat completion (texts, finish reasons, usage, $ from ``prices``)."""
    result.ok, result.error = True, None
    result.texts = [(c.message.content or "") for c in response.choices]
    result.finish_reasons = [c.finish_reason for c in response.choices]
    usage = response.usage
    if usage is None:  # billed all the same, but by how much is unknown
        result.usage_known, result.tokens_in, result.tokens_out = False, 0, 0
        result.cost_usd = None
        return
    result.tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
    result.tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
    details = getattr(usage, "prompt_tokens_details", None)
    result.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0) if details else 0
    result.cost_usd = prices.cost(model, result.tokens_in, result.tokens_out, result.cached_tokens)


def error_text(exc: BaseException, secrets: list[str]) -> str:
    """How a failed call's error is stored: the exception's class and message, keys scrubbed."""
    return redact(f"{type(exc).__name__}: {exc}", secrets)[:2000]


def fatal_message(cfg: TeacherConfig, exc: BaseException, reason: str, key: str, role: str = "teacher") -> str:
    """The one-line message of a :class:`TeacherFatalError` (never the key); ``role``: what the
    endpoint is to this run (the teacher, an evaluation's solver)."""
    status = getattr(exc, "status_code", "?")
    code = getattr(exc, "code", None) or getattr(exc, "type", None) or ""
    detail = redact(str(getattr(exc, "message", exc)), [key])[:300]
    if "key" in reason:
        advice = f"check the key in ${cfg.api_key_env}"
    else:
        advice = (f"add credit or raise the usage limit of the account behind ${cfg.api_key_env}, "
                  "or use another key")
    return (f"the {role} at {cfg.base_url} {reason} (HTTP {status} {code}: {detail}); the run "
            f"stopped at once and stored nothing as failed: {advice}, then run the same command again "
            "to resume")


class TeacherClient:
    """Async chat calls against one endpoint; safe to share across concurrent coroutines.

    ``governor``: the run's shared Governor (a Ray actor handle) or None for a private one
    (breaker only). ``limiter`` is the old name of the same argument. ``role`` names the endpoint in
    a fatal error's message ("teacher", "solver").
    """

    def __init__(self, cfg: TeacherConfig, prices: PriceTable | None = None, limiter: Any = None,
                 governor: Any = None, role: str = "teacher"):
        self.cfg, self.role = cfg, role
        self.fatal: str | None = None  # the message of the account error this client raised
        self.prices = prices or PriceTable()
        self.governor = GovernorClient(governor or limiter or Governor())
        self._key = api_key_from_env(cfg.api_key_env, cfg.base_url)
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=self._key, max_retries=0, timeout=cfg.timeout_s
        )
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._first_claimed = False  # a call is learning the parameters; the others wait for...
        self._params_settled = asyncio.Event()  # ...its first answer that taught nothing new

    def _backoff_s(self, exc: BaseException, failures: int) -> float:
        asked = _retry_after_s(exc)
        if asked is not None:
            return min(asked, self.cfg.retry_after_max_s)
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (failures - 1))
        return random.uniform(0, cap)

    def _error(self, exc: BaseException) -> str:
        return error_text(exc, [self._key])

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        n: int = 1,
        temperature: float = 0.7,
        max_tokens: int = 256,
    ) -> CallResult:
        """One chat completion with ``n`` choices. Ordinary failures come back as a CallResult
        with ``ok=False``; a refused call (budget, outage) with ``refused`` set and nothing sent;
        an account error raises :class:`TeacherFatalError`.

        The first call of a client goes alone: if the model refuses a parameter, that one call
        learns it, instead of every call already in flight paying a 400 to learn the same thing.
        The others go as soon as one of its attempts teaches nothing new (a success, or any other
        failure: held back through that call's retries, they would leave it failing alone, which
        the governor cannot tell from a prompt the endpoint always fails on).
        """
        if not self._params_settled.is_set():
            if not self._first_claimed:
                self._first_claimed = True
                try:
                    return await self._chat(messages, n, temperature, max_tokens, first=True)
                finally:
                    self._params_settled.set()
            await self._params_settled.wait()
        return await self._chat(messages, n, temperature, max_tokens)

    async def _chat(self, messages: list[dict[str, str]], n: int, temperature: float, max_tokens: int,
                    first: bool = False) -> CallResult:
        result = CallResult()
        est_tokens = sum(len(m["content"]) for m in messages) // 4 + n * max_tokens  # for tokens/min
        worst = self.prices.worst_case(self.cfg.model, max_prompt_tokens(messages), n * max_tokens) or 0.0
        failures = failed = 0  # failed attempts held against the call / all of them
        first_failure: int | None = None  # the first ticket admitted after its first failure was seen
        call_id: int | None = None  # the ticket of its first attempt: who the governor holds failures against
        start = time.monotonic()
        async with self._sem:
            while True:
                admission = await self.governor.admit(est_tokens, worst)
                if admission.refused:
                    result.refused = admission.refused
                    result.budget_stopped = admission.refused == REFUSED_BUDGET
                    result.error = f"not sent: refused ({admission.refused})"
                    break
                if admission.wait_s > 0:
                    await asyncio.sleep(admission.wait_s)
                if admission.again:
                    continue
                call_id = admission.ticket if call_id is None else call_id
                params = chat_params(self.cfg, n, temperature, max_tokens)
                result.attempts += 1
                try:
                    response = await self._client.chat.completions.create(
                        model=self.cfg.model, messages=messages, **params)
                    if not response.choices:
                        raise RetryableError("the endpoint returned no choices")
                except asyncio.CancelledError:  # the caller gave up: the API may still bill it
                    self.governor.settle_nowait(worst, worst, admission.ticket)
                    raise
                except Exception as e:
                    charged = worst if _maybe_billed(e) else 0.0
                    result.charged_usd += charged
                    settled = await self.governor.settle(worst, charged, not _unhealthy(e), self._error(e)[:200],
                                                         admission.ticket, call_id)
                    reason = fatal_reason(e)
                    if reason is not None:
                        message = self.fatal = self._fatal_message(e, reason)
                        await self.governor.stop(message)
                        raise TeacherFatalError(message) from None
                    if learn_from(e, self.cfg.base_url, self.cfg.model, params):
                        continue  # re-sent at once with the parameters the model takes
                    if first:
                        self._params_settled.set()
                    result.error = self._error(e)
                    if not is_transient(e):
                        break
                    if first_failure is None:
                        first_failure = settled.seen_at
                    # a pool-wide outage (or its first seconds, seen by this call alone) with no success
                    # of a call sent since this one's first failure was seen is not the call's fault; a
                    # request that fails while others succeed is
                    failures += 0 if settled.pool and settled.last_success < first_failure else 1
                    if failures >= self.cfg.max_attempts:
                        break
                    failed += 1  # the backoff grows with every failed attempt, excused ones too
                    await asyncio.sleep(self._backoff_s(e, failed))
                    continue
                read_response(response, result, self.prices, self.cfg.model)
                charged = result.cost_usd if result.cost_usd is not None else worst
                result.charged_usd += charged
                self.governor.settle_nowait(worst, charged, admission.ticket)
                break
        result.latency_s = time.monotonic() - start
        return result

    def _fatal_message(self, exc: BaseException, reason: str) -> str:
        return fatal_message(self.cfg, exc, reason, self._key, self.role)

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
    if r.status_code in (401, 403):  # the account, not the input: exit 3 as a refusal mid-run (subq.exit_codes)
        raise TeacherFatalError(
            f"the teacher at {cfg.base_url} refused the API key from ${cfg.api_key_env} (HTTP {r.status_code}): "
            "nothing was started; check the key, then run the same command again"
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
