"""A student decomposer as the collection's decompose client: the policy writes, the teacher judges.

Iterated distillation (``subq/rounds.py``, ``subq collect --decomposer``) lets the current student
decompose the training problems; the answer and feedback stages then treat its sub-questions exactly as
the teacher's. :class:`StudentClient` has the teacher client's ``chat`` shape, so ``actors.stages.decompose``
runs unchanged, and it speaks to either

- ``chat``: a subq decomposer (``serve/decomposer.py``) at ``<url>/v1/chat/completions``: it prompts the
  checkpoint in its training format itself and answers "Q1: ..." lines (one choice per request);
- ``completions``: a student behind any OpenAI-compatible server (``vllm serve runs/x/final``), prompted
  exactly as in training (``protocol.prompts.student_prompt``, stop at ``SUBQ_END``), as the evaluation's
  ``openai:`` decomposer is; its continuation is stored as the same "Q1: ..." lines.

The student is ours to run: its calls cost $0, pass no shared rate limit or budget (those are the
teacher's), and are not in the ``calls`` ledger. Transient failures (429, 5xx, timeouts, connection
errors) are retried with backoff; anything else becomes the row's ``api_error`` (a re-run retries it).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import openai
from subq.actors.teacher import CallResult, api_key_from_env, is_transient, redact
from subq.protocol.prompts import SUBQ_END, format_subquestions, parse_student_output, student_prompt

APIS = ("chat", "completions")


@dataclass
class StudentEndpoint:
    base_url: str  # OpenAI-compatible root, e.g. http://127.0.0.1:8000/decomposer-0/v1
    model: str  # the model name sent to the endpoint
    api: str = "chat"  # chat: a subq decomposer | completions: a student behind vLLM or similar (APIS)
    api_key_env: str = "OPENAI_API_KEY"  # env var with the key (none needed on loopback)
    timeout_s: float = 120.0  # per attempt
    max_attempts: int = 4  # per request, the first included
    max_tokens: int | None = None  # the server's own decoding limit (a subq decomposer's max_new_tokens): asks cap here

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"student endpoint api {self.api!r}: expected one of {APIS}")


class StudentClient:
    """``chat(messages, n, temperature, max_tokens)`` like ``TeacherClient``; the problem is the last message."""

    def __init__(self, cfg: StudentEndpoint) -> None:
        self.cfg = cfg
        self._key = api_key_from_env(cfg.api_key_env, cfg.base_url)
        self._client: Any = None

    async def chat(self, messages: list[dict[str, str]], n: int = 1, temperature: float = 0.7,
                   max_tokens: int = 256) -> CallResult:
        """``n`` decompositions, one request each (a subq decomposer answers one choice per request)."""
        if self._client is None:  # created inside the running event loop
            self._client = openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=self._key, max_retries=0,
                                              timeout=self.cfg.timeout_s)
        problem = messages[-1]["content"]
        if self.cfg.max_tokens is not None:
            max_tokens = min(max_tokens, self.cfg.max_tokens)
        result = CallResult(ok=True, cost_usd=0.0)
        start = time.monotonic()
        for _ in range(n):
            text, reason, usage, attempts, error = await self._one(problem, temperature, max_tokens)
            result.attempts += attempts
            if error is not None:
                result.ok, result.error = False, error
                result.cost_usd = None if not result.texts else 0.0
                break
            result.texts.append(text)
            result.finish_reasons.append(reason)
            result.tokens_in += usage[0]
            result.tokens_out += usage[1]
        result.ok = result.ok or bool(result.texts)
        result.latency_s = time.monotonic() - start
        return result

    async def _one(self, problem: str, temperature: float, max_tokens: int):
        """(text, finish reason, (tokens in, out), attempts, error or None)."""
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                if self.cfg.api == "chat":
                    r = await self._client.chat.completions.create(
                        model=self.cfg.model, messages=[{"role": "user", "content": problem}], n=1,
                        temperature=temperature, max_tokens=max_tokens)
                    text = r.choices[0].message.content or ""
                else:
                    r = await self._client.completions.create(
                        model=self.cfg.model, prompt=student_prompt(problem), max_tokens=max_tokens,
                        temperature=temperature, stop=[SUBQ_END], n=1)
                    found = parse_student_output(r.choices[0].text or "")
                    text = format_subquestions(found) if found else (r.choices[0].text or "")
                usage = (int(getattr(r.usage, "prompt_tokens", 0) or 0), int(getattr(r.usage, "completion_tokens", 0)
                                                                              or 0))
                reason = r.choices[0].finish_reason
                if reason == "length" and text.startswith("Q1: ") and self.cfg.max_tokens is not None:
                    reason = "stop"  # cut at the server's own limit: asking again cannot go further; keep its lines
                return text, reason, usage, attempt, None
            except Exception as e:  # noqa: BLE001 -- every failure becomes the row's error, never a crash
                error = redact(f"{type(e).__name__}: {e}", [self._key])
                if not is_transient(e) or attempt == self.cfg.max_attempts:
                    return "", None, (0, 0), attempt, f"the student decomposer at {self.cfg.base_url}: {error}"
                await asyncio.sleep(random.uniform(0, min(8.0, 0.5 * 2 ** (attempt - 1))))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
