"""The decomposer's wire format: request validation and response bodies (no Ray).

Two ways in, one validated :class:`DecomposeRequest` out:

- ``POST /decompose`` takes ``{"problem": str, "max_subquestions"?, "beta"?, "temperature"?, "top_p"?,
  "max_tokens"?, "model"?}``. Unknown keys are *rejected* (400 naming them): a misspelt ``"temprature"``
  silently ignored would give a client greedy output it did not ask for.
- ``POST /v1/chat/completions`` is OpenAI's schema, validated by ``serve.chat_api`` (so the rules are
  the LLM server's: every field honoured or refused, streaming included). The last ``user`` message is
  the problem; earlier messages are context the decomposer does not use. ``n > 1`` is refused. Two
  extensions, sent with the openai client's ``extra_body``: ``beta`` and ``max_subquestions``. An absent
  ``temperature`` means the server's default (greedy unless configured), not OpenAI's 1.0.

Every client mistake is an :class:`~serve.fields.ApiError` (4xx, OpenAI's error shape), never a 500.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from subq.protocol.prompts import format_subquestions
from subq.serve.chat_api import ChatRequest, chat_completion, parse_chat_request
from subq.serve.fields import ApiError, check_model, integer, json_type, number, refuse_unknown
from subq.serve.generation import Completion
from subq.serve.sampling import SamplingParams

MAX_BODY_BYTES = 1 << 20  # a problem is at most max_problem_chars; 1 MiB leaves room for a chat history
MAX_BETA = 100.0  # guidance far beyond any useful strength; bounds the scores' magnitude
MAX_SUBQUESTIONS = 64
DECOMPOSE_FIELDS = ("problem", "max_subquestions", "beta", "temperature", "top_p", "max_tokens", "model")
CHAT_EXTENSIONS = ("beta", "max_subquestions")


@dataclass(frozen=True)
class Limits:
    """What one server accepts and assumes when a client leaves a field out."""

    served_model: str  # the name a request's optional "model" must match
    max_problem_chars: int  # longer problems are refused (400)
    max_new_tokens: int  # the cap on "max_tokens"
    default_temperature: float = 0.0  # used when a request does not say
    default_max_subquestions: int | None = None  # used when a request does not say
    vocab_size: int | None = None  # bounds logit_bias token ids


@dataclass(frozen=True)
class DecomposeRequest:
    """A validated request from either route."""

    problem: str
    max_subquestions: int | None  # cut the parsed list to this many; None: keep all
    beta: float | None  # ILQL guidance; None: the server's default
    temperature: float  # 0: greedy
    top_p: float
    max_tokens: int | None  # None: the server's default
    chat: ChatRequest | None = None  # the chat route's other settings (stop, seed, penalties, streaming)

    def sampling(self, max_tokens: int, beta: float) -> SamplingParams:
        if self.chat is None:
            return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, beta=beta)
        return replace(self.chat.sampling(max_tokens, beta), temperature=self.temperature)


def parse_decompose_request(body: Any, limits: Limits) -> DecomposeRequest:
    """Validate a ``/decompose`` body (already decoded from JSON)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object like {{\"problem\": \"...\"}}, "
                            f"not a JSON {json_type(body)}", code="invalid_json")
    refuse_unknown(body, DECOMPOSE_FIELDS, "/decompose")
    check_model(body.get("model"), limits.served_model)
    return DecomposeRequest(
        problem=_problem(body.get("problem"), "problem", limits.max_problem_chars),
        **_options(body, limits),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0),
        temperature=number(body, "temperature", limits.default_temperature, 0.0, 2.0),
        max_tokens=integer(body, "max_tokens", 1, limits.max_new_tokens),
    )


def parse_decompose_chat(body: Any, limits: Limits) -> DecomposeRequest:
    """Validate an OpenAI chat-completions body; the last user message is the problem."""
    chat = parse_chat_request(body, served_model=limits.served_model, max_n=1, max_new_tokens=limits.max_new_tokens,
                              vocab_size=limits.vocab_size, extensions=CHAT_EXTENSIONS)
    users = [m for m in chat.messages if m["role"] == "user"]
    if not users:
        raise ApiError(400, "'messages' needs a user message: its content is the problem to decompose",
                       param="messages")
    assert isinstance(body, dict)  # parse_chat_request checked it
    return DecomposeRequest(
        problem=_problem(users[-1]["content"], "messages", limits.max_problem_chars),
        **_options(body, limits),
        top_p=chat.top_p,
        # OpenAI's default is 1.0; a decomposer's is its configured one (greedy by default).
        temperature=limits.default_temperature if body.get("temperature") is None else chat.temperature,
        max_tokens=chat.max_tokens,
        chat=chat,
    )


# ------------------------------------------------------------------------------------------ responses


def decompose_response(*, model: str, subquestions: list[str], raw: str, prompt_tokens: int,
                       completion_tokens: int, beta: float, finish_reason: str) -> dict[str, Any]:
    """The ``/decompose`` answer: sub-questions, the raw continuation they were parsed from, usage."""
    return {
        "subquestions": subquestions,
        "raw": raw,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "beta": beta,
        "finish_reason": finish_reason,  # "stop" (end marker, stop string or eos) or "length"
    }


def chat_response(*, model: str, subquestions: list[str], prompt_tokens: int, completion_tokens: int,
                  finish_reason: str) -> dict[str, Any]:
    """A ``chat.completion`` whose content is "Q1: ..." lines, which ``parse_subquestions`` reads back."""
    text = format_subquestions(subquestions)
    return chat_completion(model, prompt_tokens, [Completion(text=text, token_ids=[], finish_reason=finish_reason,
                                                             generated_tokens=completion_tokens)])


class SubquestionContent:
    """Streamed chat content of the decomposer: its "Q1: ..." lines, sent as each sub-question's line is
    complete, so the concatenated deltas equal the non-streamed reply's content.

    ``parse(raw_text)`` is the server's own parser (with its cap on the number of sub-questions).
    """

    def __init__(self, parse: Callable[[str], list[str]]) -> None:
        self.parse = parse
        self.raw = ""
        self.sent = ""

    def feed(self, delta: str) -> str:
        self.raw += delta
        complete = self.raw[: self.raw.rfind("\n") + 1]  # the last line may still grow
        return self._advance(format_subquestions(self.parse(complete)) if complete else "")

    def finish(self, completion: Completion) -> str:
        return self._advance(format_subquestions(self.parse(completion.text)))

    def _advance(self, content: str) -> str:
        # Parsing is line by line, so a longer text only appends lines; if a parser ever rewrote an
        # earlier line, nothing is sent until the content extends what was sent again.
        if not content.startswith(self.sent):
            return ""
        delta, self.sent = content[len(self.sent):], content
        return delta


# -------------------------------------------------------------------------------------------- fields


def _problem(value: Any, param: str, max_chars: int) -> str:
    where = "'problem'" if param == "problem" else "the last user message"
    if value is None:
        raise ApiError(400, f"{where} is required: the problem to decompose", code="missing_required_parameter",
                       param=param)
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string, not a JSON {json_type(value)}", code="invalid_type",
                       param=param)
    if not value.strip():
        raise ApiError(400, f"{where} is empty; send the problem to decompose", param=param)
    if len(value) > max_chars:
        raise ApiError(400, f"{where} has {len(value)} characters; this server accepts at most {max_chars}",
                       code="problem_too_long", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry lone surrogates ("\ud800"); no tokenizer can
        raise ApiError(400, f"{where} is not valid Unicode (it contains a lone surrogate)", param=param) from None
    return value


def _options(body: dict, limits: Limits) -> dict[str, Any]:
    """The two decomposer settings both routes accept."""
    beta = None if body.get("beta") is None else number(body, "beta", 0.0, 0.0, MAX_BETA)
    max_subq = integer(body, "max_subquestions", 1, MAX_SUBQUESTIONS)
    return {"beta": beta, "max_subquestions": limits.default_max_subquestions if max_subq is None else max_subq}
