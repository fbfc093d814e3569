"""Batch API request lines and result lines, built and read by the online stage functions.

A batch row must be stored exactly as the online path stores it, so nothing here re-implements a
stage: :func:`build_requests` runs the stage function (``actors.stages``) against a client that
records the chat call instead of sending it, and :func:`read_result` runs it again against a
client that answers that call with the batch's result line. The request body is the online
request (``actors.teacher.chat_params``), a 200 line is read by ``actors.teacher.read_response``
(priced at batch prices) and an error line becomes the exception the ``openai`` client would
have raised for it, so statuses, parse failures, usage, $ and error texts are the online ones.

Formats (OpenAI Batch API, also ``vllm run-batch``)::

    request: {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    result:  {"id": "...", "custom_id": "...", "response": {"status_code": 200, "body": {...}},
              "error": null}
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletion
from pydantic import ValidationError
from subq.actors.prices import PriceTable
from subq.actors.stage_worker import STAGE_FNS
from subq.actors.stages import StageSettings
from subq.actors.teacher import (
    CallResult,
    TeacherConfig,
    chat_params,
    error_text,
    max_prompt_tokens,
    read_response,
)

Row = dict[str, Any]
CHAT_URL = "/v1/chat/completions"
NOT_SENT = "batch"  # the recorder's CallResult.refused: the call went into a batch instead
_TIMESTAMPS = ("created_at", "updated_at")


@dataclass
class BatchRequest:
    custom_id: str  # "<sample key>:<stage>:<sample attempt>" (decompose: the first missing sample's key)
    stage: str
    item: Row  # the stage function's input: a problem's missing samples, or a sample row
    body: dict[str, Any]  # the chat request, exactly as the online path sends it
    worst_usd: float | None  # the most it can cost at batch prices (None: price unknown)
    tokens: int = 0  # what it can enqueue: a bound on its prompt tokens + n * max_tokens (the queue limit's unit)

    @property
    def sample_keys(self) -> list[str]:
        return list(self.item["sample_keys"]) if self.stage == "decompose" else [self.item["sample_key"]]

    def line(self) -> str:
        return json.dumps({"custom_id": self.custom_id, "method": "POST", "url": CHAT_URL, "body": self.body},
                          separators=(",", ":"))


def custom_id(stage: str, item: Row) -> str:
    if stage == "decompose":
        return f"{item['sample_keys'][0]}:{stage}:{(item.get('attempts') or [0])[0]}"
    return f"{item['sample_key']}:{stage}:{item.get('attempt') or 0}"


def encode_item(item: Row) -> str:
    return json.dumps(item, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


def decode_item(text: str) -> Row:
    item = json.loads(text)
    for name in _TIMESTAMPS:
        if isinstance(item.get(name), str):
            item[name] = datetime.fromisoformat(item[name])
    return item


class _Recorder:
    """A TeacherClient stand-in for the stage functions: remembers the call, sends nothing."""

    def __init__(self) -> None:
        self.call: tuple[list[dict], int, float, int] | None = None

    async def chat(self, messages: list[dict], *, n: int = 1, temperature: float = 0.7,
                   max_tokens: int = 256) -> CallResult:
        self.call = (messages, n, temperature, max_tokens)
        return CallResult(refused=NOT_SENT, error="not sent: collected into a batch")


class _Replay:
    """A TeacherClient stand-in that answers the stage function's call with a batch result.

    A stage asks again when a reply has fewer choices than asked; a batch cannot, so that
    follow-up fails (the rows become partial / api_error and a later run retries them)."""

    def __init__(self, result: CallResult) -> None:
        self.result: CallResult | None = result

    async def chat(self, messages: list[dict], *, n: int = 1, temperature: float = 0.7,
                   max_tokens: int = 256) -> CallResult:
        result, self.result = self.result, None
        return result or CallResult(error=f"the batch result had fewer choices than asked ({n} missing); "
                                          "a later run asks again")


async def _build(stage: str, items: list[Row], s: StageSettings, teacher: TeacherConfig,
                 prices: PriceTable) -> tuple[list[BatchRequest], list[Row]]:
    requests: list[BatchRequest] = []
    passed: list[Row] = []
    for item in items:
        recorder = _Recorder()
        rows, _ = await STAGE_FNS[stage](recorder, copy.deepcopy(item), s)
        if recorder.call is None:  # an earlier stage failed: the row passes through, skipped
            passed.extend(rows)
            continue
        messages, n, temperature, max_tokens = recorder.call
        body = {"model": teacher.model, "messages": messages, **chat_params(teacher, n, temperature, max_tokens)}
        prompt = max_prompt_tokens(messages)
        worst = prices.worst_case(teacher.model, prompt, n * max_tokens)
        requests.append(BatchRequest(custom_id(stage, item), stage, item, body, worst, prompt + n * max_tokens))
    return requests, passed


def build_requests(stage: str, items: list[Row], s: StageSettings, teacher: TeacherConfig,
                   prices: PriceTable) -> tuple[list[BatchRequest], list[Row]]:
    """The batch requests of ``items`` at ``stage`` (``prices``: batch prices), and the rows that
    need no call (an earlier stage failed: this one is ``skipped``, as online)."""
    return asyncio.run(_build(stage, items, s, teacher, prices))


def status_error(status_code: int, body: Any) -> openai.APIStatusError:
    """The exception the ``openai`` client raises for this HTTP answer (same class and text as
    online; built by the client's own factory, so the two cannot drift apart)."""
    request = httpx.Request("POST", "http://batch" + CHAT_URL)
    response = httpx.Response(status_code, json=body if body is not None else {}, request=request)
    return _client()._make_status_error_from_response(response)  # type: ignore[arg-type]


_CLIENT: list[openai.OpenAI] = []


def _client() -> openai.OpenAI:
    if not _CLIENT:
        _CLIENT.append(openai.OpenAI(api_key="unused", base_url="http://127.0.0.1/v1"))
    return _CLIENT[0]


# error codes of lines a batch never ran (OpenAI writes them for an expired job): sent again
NEVER_RAN = ("batch_expired", "batch_cancelled")


def never_ran(line: Row) -> bool:
    error = line.get("error")
    return not line.get("response") and isinstance(error, dict) and error.get("code") in NEVER_RAN


def line_outcome(line: Row, prices: PriceTable, model: str, latency_s: float, secrets: list[str]) -> CallResult:
    """A result line as the online call's outcome: a 200 is read as online (priced with
    ``prices``); anything else is the error the ``openai`` client would have raised, as text.
    Failed lines are not billed by the Batch API."""
    response = line.get("response") or {}
    status, body = response.get("status_code"), response.get("body")
    if status == 200 and isinstance(body, dict):
        try:
            completion = ChatCompletion.model_validate(body)
        except ValidationError:
            completion = None
        if completion is not None and completion.choices:
            result = CallResult(attempts=1, latency_s=latency_s)
            read_response(completion, result, prices, model)
            result.charged_usd = result.cost_usd if result.cost_usd is not None else 0.0
            return result
        exc: BaseException = status_error(502, {"error": {"message": "the batch result has no chat choices"}})
    elif status is not None:
        exc = status_error(int(status), body)
    else:
        error = line.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        code = error.get("code") if isinstance(error, dict) else None
        exc = status_error(500, {"error": {"message": str(message or "no response"), "code": code}})
    return CallResult(attempts=1, latency_s=latency_s, error=error_text(exc, secrets))


async def _read(work: list[tuple[str, Row, CallResult]], s: StageSettings) -> list[tuple[list[Row], list[CallResult]]]:
    return [await STAGE_FNS[stage](_Replay(outcome), copy.deepcopy(item), s) for stage, item, outcome in work]


def read_results(work: list[tuple[str, Row, CallResult]], s: StageSettings) -> list[tuple[list[Row], list[CallResult]]]:
    """Per (stage, item, outcome): the rows and calls the stage function makes of it (as online)."""
    return asyncio.run(_read(work, s))


def read_jsonl(text: str, what: str) -> list[Row]:
    """Lines of a JSONL file; a bad line is a clear error naming its number."""
    rows = []
    for i, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: line {i} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("custom_id"), str):
            raise ValueError(f"{what}: line {i} has no custom_id")
        rows.append(row)
    return rows
