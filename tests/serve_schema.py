"""Hypothesis strategies over the request schemas of subq's two Serve apps, for the no-5xx fuzz tests.

A body follows the schema's shape: the required fields plus a few optional ones (every field of
OpenAI's chat schema, or of ``/decompose``), each with a valid value; then, in most bodies, one or
two fields get a bad value instead (``null``, 1e-40, NaN, huge integers, lone surrogates, wrong
types, arbitrary JSON, a field the schema does not know). A few bodies are raw bytes. Valid requests
are answered by the model, so ``max_tokens`` is small when valid.
"""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

SURROGATE = "\ud800"
_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
any_json = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=8)
_bad_number = st.one_of(st.just(1e-40), st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.just(10**400),
                        st.just(-(10**400)), st.floats(min_value=3, max_value=1e300), st.floats(max_value=-3), any_json)
_bad_int = st.one_of(st.integers(max_value=0), st.just(10**400), st.floats(0, 5), any_json)
_bad_text = st.one_of(st.just(SURROGATE + " lone"), st.just(""), st.just(" \n"), st.just("x" * 5000), any_json)
_text = st.text(min_size=1, max_size=40).filter(str.strip)
_unit = st.floats(min_value=0, max_value=1)


def _message(role: st.SearchStrategy = st.sampled_from(["user", "system", "assistant"])) -> st.SearchStrategy:
    parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}), min_size=1, max_size=2)
    return st.fixed_dictionaries({"role": role, "content": st.one_of(_text, parts)})


def _chat_fields(vocab: int) -> dict[str, tuple[st.SearchStrategy, st.SearchStrategy]]:
    """field -> (valid values, bad values)."""
    messages = st.lists(_message(), min_size=0, max_size=2).map(lambda m: [*m, {"role": "user", "content": "Hi"}])
    bad_messages = st.one_of(
        st.just([]), any_json, st.lists(any_json, min_size=1, max_size=2),
        st.builds(lambda t: [{"role": "user", "content": t}], _bad_text),
        st.just([{"role": "user", "content": "x", "name": "bob"}]), st.just([{"role": "", "content": "x"}]),
        st.just([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
    )
    token = st.integers(0, vocab - 1).map(str)
    return {
        "messages": (messages, bad_messages),
        "max_tokens": (st.integers(1, 6), _bad_int),
        "max_completion_tokens": (st.integers(1, 6), _bad_int),
        "temperature": (st.one_of(st.floats(0, 2), st.just(1e-40)), _bad_number),
        "top_p": (_unit, _bad_number),
        "n": (st.integers(1, 3), _bad_int),
        "seed": (st.integers(-(2**63), 2**63 - 1), st.one_of(st.just(2**64), st.floats(0, 1), any_json)),
        "stop": (st.one_of(_text, st.lists(_text, min_size=1, max_size=4)),
                 st.one_of(st.just(""), st.lists(_text, min_size=5, max_size=6), any_json)),
        "stream": (st.booleans(), any_json),
        "stream_options": (st.just({"include_usage": True}), st.one_of(any_json, st.just({"include_usage": 1}))),
        "logit_bias": (st.dictionaries(token, st.floats(-100, 100), max_size=3),
                       st.one_of(st.just({str(vocab + 1): 1}), st.just({"0": 101}), st.just({"-1": 1}), any_json)),
        "presence_penalty": (st.floats(-2, 2), _bad_number),
        "frequency_penalty": (st.floats(-2, 2), _bad_number),
        "user": (st.text(max_size=5), any_json),
        "response_format": (st.just({"type": "text"}), st.one_of(st.just({"type": "json_object"}), any_json)),
        "logprobs": (st.just(False), st.one_of(st.just(True), any_json)),
        "tools": (st.just([]), any_json),
    }


@st.composite
def _body(draw, fields: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]], required: tuple[str, ...],
          unknown: str) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=64))
    optional = sorted(set(fields) - set(required))
    names = [*required, *draw(st.lists(st.sampled_from(optional), max_size=3, unique=True))]
    body = {name: draw(fields[name][0]) for name in names}
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        name = draw(st.sampled_from([*sorted(fields), unknown]))
        if name == unknown:
            body[unknown] = draw(any_json)
        elif draw(st.integers(0, 9)) == 0:
            body[name] = None  # null: the same as absent
        else:
            body[name] = draw(fields[name][1])
    return json.dumps(body).encode()


def chat_bodies(model: str, vocab: int, extensions: dict | None = None) -> st.SearchStrategy[bytes]:
    """/v1/chat/completions bodies; ``extensions`` adds the server's own fields (valid, bad)."""
    fields = {**_chat_fields(vocab), "model": (st.just(model), st.one_of(st.just("gpt-4o"), any_json)),
              **(extensions or {})}
    return _body(fields, ("messages", "max_tokens"), "top_k")


def decompose_bodies(model: str) -> st.SearchStrategy[bytes]:
    """/decompose bodies."""
    fields = {
        "problem": (_text, _bad_text), "max_tokens": (st.integers(1, 6), _bad_int),
        "beta": (st.just(0.0), _bad_number), "temperature": (st.floats(0, 2), _bad_number),
        "top_p": (_unit, _bad_number), "max_subquestions": (st.integers(1, 64), _bad_int),
        "model": (st.just(model), st.one_of(st.just("gpt-4o"), any_json)),
    }
    return _body(fields, ("problem", "max_tokens"), "temprature")


DECOMPOSER_EXTENSIONS = {"beta": (st.just(0.0), _bad_number), "max_subquestions": (st.integers(1, 64), _bad_int)}
