"""Where sub-questions and solutions come from during evaluation: plain async clients, no Ray.

A decomposer is one of
- ``none``: no decomposition; the solver answers alone with chain of thought (the single-stage baseline);
- ``teacher``: an OpenAI-compatible chat model prompted with the teacher's few-shot decomposition prompt
  (paper 1's "teacher decomposes" column);
- ``url``: a running subq decomposer (``serve/decomposer.py``), called at ``POST <url>/decompose``;
- ``openai``: a student checkpoint behind any OpenAI-compatible server (``vllm serve runs/x/final``),
  prompted exactly as in training: ``POST <url>/completions`` with ``protocol.prompts.student_prompt``
  as the plain-text prompt (no chat template: a student never saw one), stop at ``SUBQ_END``, and the
  continuation split into sub-questions by ``parse_student_output``, as ``serve/decomposer_model.py``
  does. ``add_special_tokens: false`` asks vLLM not to prepend a BOS the student was not trained with
  (a server that refuses the field gets the request again without it). A server without a completions
  route is refused: a chat template would change the prompt the student is measured on.
A checkpoint is served first (``subq/`` starts the Serve app) and then evaluated by its URL, so the
numbers measure exactly what a user would deploy.

Failures: a call that fails after its retries comes back as an ``api_error`` (the record is *failed*
and a re-run retries it). An endpoint that will refuse every call (401/403: bad key, 404: wrong URL,
route or model, 429 ``insufficient_quota``) raises :class:`FatalEndpointError` instead, out of the
Ray Data worker, which stops the whole run without storing anything for that call; an account error
(401/402/403, no quota; a solver's or teacher decomposer's ``TeacherFatalError``) is an
:class:`AccountRefusedError`, ``subq``'s exit code 3 (``exit_codes.ACCOUNT_REFUSED``). Calls of the same
client refused after it (its governor stops) raise it too: nothing is stored as failed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from subq.actors.breaker import BreakerConfig
from subq.actors.governor import REFUSED_FATAL, Governor, GovernorConfig
from subq.actors.prices import PriceTable
from subq.actors.teacher import (
    CallResult,
    TeacherClient,
    TeacherConfig,
    TeacherFatalError,
    api_key_from_env,
    redact,
)
from subq.protocol.parse import cap_subquestions, parse_subquestions
from subq.protocol.prompts import SUBQ_END, decompose_messages, parse_student_output, student_prompt
from subq.protocol.solve_prompts import cot_messages, solve_messages

DECOMPOSER_KINDS = ("none", "teacher", "url", "openai")
NO_SUBQUESTIONS = "parse_error: the decomposer returned no sub-questions"
T = TypeVar("T")


class FatalEndpointError(RuntimeError):
    """An endpoint that refuses every call (bad key, no quota, wrong URL, route or model): the run stops.

    It escapes the evaluation worker on purpose (nothing is stored for the call), so Ray Data aborts
    the run and the CLI prints the message; the fix is the user's, then the same command resumes.
    """


class AccountRefusedError(FatalEndpointError):
    """The endpoint refused the account (401/403, no quota, billing): ``subq`` exits with
    ``exit_codes.ACCOUNT_REFUSED``. Nothing is stored for the refused calls; after the fix the same
    command does them."""


# Exceptions from a client call that stop an evaluation run (the worker reports them to the driver,
# which raises FatalEndpointError, or AccountRefusedError for an account); any other exception
# escaping a client aborts the run with its traceback.
FATAL_ERRORS: tuple[type[BaseException], ...] = (FatalEndpointError, TeacherFatalError)
ACCOUNT_ERRORS: tuple[type[BaseException], ...] = (AccountRefusedError, TeacherFatalError)


def raise_if_stopped(client: TeacherClient, call: CallResult) -> None:
    """A call refused because its client met an account error (a concurrent call's 401/403/quota):
    raise that error, so the record is not stored as failed (a re-run after the fix does it)."""
    if call.refused == REFUSED_FATAL:
        raise TeacherFatalError(client.fatal or "the endpoint refused the account; fix it, then run the same "
                                "command again")


@dataclass
class DecomposerSpec:
    kind: str  # none | teacher | url | openai
    label: str  # the row name in the report, e.g. "ilql", "teacher (gpt-4o-mini)", "none (CoT)"
    url: str | None = None  # kind=url: the decomposer app's base URL (no /decompose); openai: the /v1 root
    token_env: str | None = None  # kind=url/openai: NAME of an env var with the endpoint's bearer token / key
    teacher: TeacherConfig | None = None  # kind=teacher: the chat endpoint that decomposes
    beta: float | None = None  # kind=url: ILQL guidance per request; None = the server's default
    model: str | None = None  # kind=openai: the model name the server serves (vLLM: the path it was given)
    identity: dict[str, Any] | None = None  # what the settings fingerprint calls it; None: from the fields above

    def __post_init__(self) -> None:
        if self.kind not in DECOMPOSER_KINDS:
            raise ValueError(f"decomposer kind must be one of {DECOMPOSER_KINDS}, got {self.kind!r}")
        if self.kind in ("url", "openai") and not self.url:
            raise ValueError(f"a {self.kind} decomposer needs a url")
        if self.kind == "openai" and not self.model:
            raise ValueError("an openai decomposer needs a model name")
        if self.kind == "teacher" and self.teacher is None:
            raise ValueError("a teacher decomposer needs a TeacherConfig")
        if self.identity is None:
            self.identity = {"none": {"kind": "none"},
                             "teacher": {"kind": "teacher", "model": self.teacher.model if self.teacher else None},
                             "url": {"kind": "url", "url": self.url, "beta": self.beta},
                             "openai": {"kind": "openai", "model": self.model}}[self.kind]


@dataclass
class Decomposition:
    subquestions: list[str] = field(default_factory=list)
    raw: str = ""
    error: str | None = None  # API failure or nothing parseable; the solver then runs without a plan
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    cost_usd: float | None = 0.0  # a self-hosted decomposer bills no tokens: $0


class _Retry(Exception):
    """A failure worth another attempt (429, 5xx, timeout, connection); ``after``: the server's Retry-After."""

    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class _Refused(Exception):
    """This request was refused or answered with junk (400, invalid JSON): recorded, not retried."""


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _check_status(status: int, text: str, code: str | None, headers: Mapping[str, str], where: str) -> None:
    """Raise for a failed HTTP status: FatalEndpointError (every call would fail), _Retry, or _Refused
    (this request is refused; recorded as an api_error)."""
    message = f"HTTP {status}: {text[:300]}"
    if status == 429 and (code == "insufficient_quota" or "insufficient_quota" in text):
        raise AccountRefusedError(f"{where} has no quota left (HTTP 429 insufficient_quota): add credit or "
                                 "raise the limit, then run the same command again")
    if status in (401, 402, 403):
        raise AccountRefusedError(f"{where} refused the credentials (HTTP {status}): check the key or token "
                                 "env var, then run the same command again")
    if status == 404:
        raise FatalEndpointError(f"{where} answered HTTP 404 (wrong URL, route or model name): {text[:200]}")
    if status >= 500 or status in (408, 409, 429):
        raise _Retry(message, _retry_after(headers))
    raise _Refused(message)


async def _with_retries(call: Callable[[], Awaitable[T]], attempts: int, secrets: list[str]) -> T | str:
    """``call()``'s result, or the last error as a string once ``attempts`` are spent (a refused
    request ends at once); anything else (FatalEndpointError, a bug) propagates and stops the run."""
    error = "no attempt made"
    for attempt in range(attempts):
        try:
            return await call()
        except _Retry as e:
            error = str(e)
            if attempt + 1 < attempts:
                await asyncio.sleep(min(60.0, e.after) if e.after is not None else min(8.0, 0.5 * 2**attempt))
        except _Refused as e:
            error = str(e)
            break
    return redact(error, secrets)


def eval_governor() -> Governor:
    """A teacher or solver client's private governor in evaluation. No lone grace (collection's
    ``BreakerConfig.lone_grace_s``): a call failing alone fails after exactly ``--max-attempts``, and
    its record is retried by the next run, which pays for nothing that succeeded."""
    return Governor(GovernorConfig(breaker=BreakerConfig(lone_grace_s=0.0)))


class DecomposerClient:
    """Sub-questions for one problem from any kind of decomposer; safe for concurrent coroutines."""

    def __init__(self, spec: DecomposerSpec, prices: PriceTable, *, max_subquestions: int | None,
                 temperature: float, max_tokens: int, timeout_s: float = 120.0, max_attempts: int = 4) -> None:
        self.spec, self.prices, self.max_subquestions = spec, prices, max_subquestions
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self._teacher = None
        if spec.kind == "teacher":  # the evaluation's patience applies to every decomposer
            self._teacher = TeacherClient(replace(spec.teacher, timeout_s=timeout_s, max_attempts=max_attempts), prices,
                                          governor=eval_governor(), role="teacher decomposer")
        self._http: Any = None
        self._openai: Any = None
        self._no_bos_field = True  # send add_special_tokens=false until a server refuses the field
        self._token = os.environ.get(spec.token_env, "") if spec.token_env and spec.kind == "url" else ""

    async def decompose(self, problem: str) -> Decomposition:
        if self.spec.kind == "none":
            return Decomposition()
        if self.spec.kind == "openai":
            return await self._decompose_openai(problem)
        if self._teacher is not None:
            call = await self._teacher.chat(decompose_messages(problem, self.max_subquestions), n=1,
                                            temperature=self.temperature, max_tokens=self.max_tokens)
            raise_if_stopped(self._teacher, call)
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

        async def call() -> dict[str, Any]:
            try:
                r = await self._http.post(url, json=body)
            except httpx.HTTPError as e:
                raise _Retry(f"{type(e).__name__}: {e}") from None
            if r.status_code != 200:
                _check_status(r.status_code, r.text, None, r.headers, f"the decomposer at {url}")
            try:
                return dict(r.json())
            except (ValueError, TypeError):
                raise _Refused(f"the decomposer answered 200 with a body that is not a JSON object: {r.text[:200]}"
                               ) from None

        start = time.monotonic()
        data = await _with_retries(call, self.max_attempts, [self._token])
        if isinstance(data, str):
            return Decomposition(error=f"api_error: {data}", latency_s=time.monotonic() - start)
        usage = data.get("usage") or {}
        subqs = [str(q) for q in data.get("subquestions") or []]
        return Decomposition(
            subquestions=subqs, raw=str(data.get("raw", "")), error=None if subqs else NO_SUBQUESTIONS,
            tokens_in=int(usage.get("prompt_tokens", 0)), tokens_out=int(usage.get("completion_tokens", 0)),
            latency_s=time.monotonic() - start)

    async def _decompose_openai(self, problem: str) -> Decomposition:
        import openai

        base = self.spec.url.rstrip("/")
        if self._openai is None:  # created inside the running event loop
            key = api_key_from_env(self.spec.token_env or "OPENAI_API_KEY", base)
            self._openai = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=self.timeout_s)
        where = f"the decomposer {self.spec.model!r} at {base}/completions"

        async def call() -> Any:
            extra = {"add_special_tokens": False} if self._no_bos_field else None
            try:
                return await self._openai.completions.create(
                    model=self.spec.model, prompt=student_prompt(problem), max_tokens=self.max_tokens,
                    temperature=self.temperature, stop=[SUBQ_END], n=1, extra_body=extra)
            except openai.APIStatusError as e:
                if e.status_code == 400 and self._no_bos_field and "add_special_tokens" in str(e):
                    self._no_bos_field = False  # not vLLM: plain OpenAI fields only, from now on
                    raise _Retry("the server refused add_special_tokens; asking again without it", 0.0) from None
                _check_status(e.status_code, str(e), e.code, e.response.headers, where)
                raise
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                raise _Retry(f"{type(e).__name__}: {e}") from None
            except openai.APIError as e:  # e.g. a body that is not a completion
                raise _Refused(f"{type(e).__name__}: {e}") from None

        start = time.monotonic()
        resp = await _with_retries(call, self.max_attempts, [self._openai.api_key])
        if isinstance(resp, str):
            return Decomposition(error=f"api_error: {resp}", latency_s=time.monotonic() - start)
        raw = resp.choices[0].text if resp.choices else ""
        found = parse_student_output(raw)
        subqs = cap_subquestions(found, self.max_subquestions)  # a student's plan keeps its last step, as served
        tokens_in = int(getattr(resp.usage, "prompt_tokens", 0) or 0)
        tokens_out = int(getattr(resp.usage, "completion_tokens", 0) or 0)
        return Decomposition(subquestions=subqs, raw=raw, error=None if subqs else NO_SUBQUESTIONS,
                             tokens_in=tokens_in, tokens_out=tokens_out, latency_s=time.monotonic() - start,
                             cost_usd=self.prices.cost(self.spec.model, tokens_in, tokens_out))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._openai is not None:
            await self._openai.close()
        if self._teacher is not None:
            await self._teacher.aclose()


@dataclass
class SolverSpec:
    base_url: str  # OpenAI-compatible root, e.g. http://127.0.0.1:8000/v1
    model: str  # the model name sent with every request
    api_key_env: str = "OPENAI_API_KEY"
    label: str | None = None  # the column name in the report; default: the model name
    served: str | None = None  # a checkpoint / model that subq serves for the run (a distilled solver); None: an API
    identity: dict[str, Any] | None = None  # what the settings fingerprint calls it; None: {"model": model}

    def __post_init__(self) -> None:
        self.label = self.label or self.model
        if self.identity is None:
            self.identity = {"model": self.model}


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
    call = await client.chat(messages, n=1, temperature=temperature, max_tokens=max_tokens)
    raise_if_stopped(client, call)
    return call
