"""Which sampling parameters a chat model accepts: a table for known models, learning for the rest.

OpenAI's reasoning models (o1, o3, o4-mini, the gpt-5 family) take ``max_completion_tokens``
instead of ``max_tokens`` and refuse any ``temperature`` but the default. Other endpoints
(vLLM, our own server, older OpenAI models) take ``max_tokens``. For a model the table does not
know, the first 400 that names a parameter ("Unsupported parameter: 'max_tokens' ... Use
'max_completion_tokens' instead", "'temperature' does not support 0.7 ...") is learned and
remembered for that endpoint and model in this process, and the call is re-sent at once: a
refused parameter is not the row's failure.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import openai
from subq.actors.prices import model_family

# Families that need max_completion_tokens and take no temperature (OpenAI, 2026).
_REASONING = re.compile(r"^(o\d+(-mini|-pro)?|gpt-5(-mini|-nano|-pro)?)$")


@dataclass
class ParamStyle:
    max_completion_tokens: bool = False  # send max_completion_tokens instead of max_tokens
    temperature: bool = True  # send temperature (False: the model takes only its default)


def known_style(model: str) -> ParamStyle:
    """The table: reasoning families get the new style; everything else the classic one."""
    if _REASONING.match(model_family(model)):
        return ParamStyle(max_completion_tokens=True, temperature=False)
    return ParamStyle()


_learned: dict[tuple[str, str], ParamStyle] = {}  # (base_url, model) -> style, per process
_lock = threading.Lock()


def style_for(base_url: str, model: str) -> ParamStyle:
    with _lock:
        if (base_url, model) not in _learned:
            _learned[(base_url, model)] = known_style(model)
        s = _learned[(base_url, model)]
        return ParamStyle(s.max_completion_tokens, s.temperature)


def request_params(style: ParamStyle, n: int, temperature: float, max_tokens: int) -> dict:
    params: dict = {"n": n}
    params["max_completion_tokens" if style.max_completion_tokens else "max_tokens"] = max_tokens
    if style.temperature:
        params["temperature"] = temperature
    return params


def learn_from(exc: BaseException, base_url: str, model: str, sent: dict) -> bool:
    """Adjust the remembered style after a 400 about a parameter we sent; True if it changed."""
    if not isinstance(exc, openai.BadRequestError):
        return False
    param = str(getattr(exc, "param", None) or "")
    message = str(getattr(exc, "message", "") or exc).lower()
    with _lock:
        style = _learned.setdefault((base_url, model), known_style(model))
        if "max_tokens" in sent and (param == "max_tokens" or "max_completion_tokens" in message):
            style.max_completion_tokens = True
            return True
        if "temperature" in sent and (param == "temperature" or "'temperature'" in message
                                      or "temperature is not supported" in message):
            style.temperature = False
            return True
    return False
