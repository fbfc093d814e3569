"""The completions wire format, log-prob scoring and the ecosystem's message shapes, without a server
(issue 21 B). The same rules over HTTP, with real clients, are in tests/test_serve_clients.py."""

from __future__ import annotations

import pytest
import torch
from subq.learner.models import load_model_and_tokenizer
from subq.serve.chat_api import parse_chat_request
from subq.serve.completions_api import legacy_logprobs, parse_completion_request
from subq.serve.decompose_api import Limits, parse_decompose_chat
from subq.serve.fields import ApiError
from subq.serve.logprobs import score_tokens

VOCAB = 260


def _completion(body: dict, **kw):
    return parse_completion_request(body, served_model="m", max_n=4, max_new_tokens=64, vocab_size=VOCAB,
                                    max_prompt_chars=1000, max_prompt_tokens=100, **kw)


def _refused(body: dict, *words: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        _completion(body)
    assert info.value.status == 400 and all(w in info.value.message for w in words), info.value.message
    return info.value


# ------------------------------------------------------------------------------ /v1/completions


def test_prompt_shapes_and_defaults_follow_openai():
    one = _completion({"prompt": "Hello"})
    assert one.prompts == ("Hello",) and one.max_tokens == 16 and one.temperature == 1.0 and one.n == 1
    assert one.logprobs is None and not one.echo and one.add_special_tokens
    assert _completion({"prompt": ["a", "b"], "model": "m"}).prompts == ("a", "b")
    assert _completion({"prompt": [1, 2, 3]}).prompts == ((1, 2, 3),)
    assert _completion({"prompt": [[1, 2], [3]]}).prompts == ((1, 2), (3,))
    lm_eval = _completion({"model": "m", "prompt": [[5, 6, 7]], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                           "seed": 1234, "echo": True})
    assert lm_eval.echo and lm_eval.logprobs == 1 and lm_eval.max_tokens == 1 and lm_eval.seed == 1234
    assert _completion({"prompt": "x", "max_tokens": 0, "echo": True}).max_tokens == 0
    assert not _completion({"prompt": "x", "add_special_tokens": False}).add_special_tokens
    nulls = _completion({"prompt": "x", "suffix": None, "best_of": None, "logprobs": None, "stop": None, "user": None})
    assert nulls.logprobs is None and nulls.stop == ()
    assert _completion({"prompt": "x", "best_of": 2, "n": 2, "suffix": ""}).n == 2


def test_what_the_server_cannot_do_is_refused_by_name():
    assert _refused({"prompt": "x", "best_of": 3}, "best_of").param == "best_of"
    assert _refused({"prompt": "x", "suffix": "end"}, "suffix").param == "suffix"
    assert _refused({"prompt": "x", "stream": True, "logprobs": 1}, "logprobs", "stream").param == "logprobs"
    assert _refused({"prompt": ["a", "b"], "stream": True}, "one prompt").param == "prompt"
    _refused({"prompt": "x", "logprobs": 21}, "logprobs")
    _refused({"prompt": "x", "logprobs": True}, "logprobs")
    _refused({"prompt": "x", "temprature": 0}, "unknown field(s) 'temprature'")


@pytest.mark.parametrize("prompt, words", [
    (None, ("required",)), ("", ("empty",)), ([], ("prompt",)), ([[]], ("prompt",)), ([VOCAB], ("token id",)),
    ([[1], [-1]], ("prompt[1]", "token id")), ([1, "a"], ("prompt",)), ([True], ("prompt",)),
    ("x" * 1001, ("1000 characters",)), (list(range(101)), ("101 tokens",)), ({"text": "x"}, ("prompt",)),
    (["x"] * 65, ("at most 64",)),
])
def test_bad_prompts_are_a_400_that_says_why(prompt, words):
    _refused({"prompt": prompt}, *words)


def test_legacy_logprobs_shape_as_lm_eval_reads_it():
    out = legacy_logprobs(["He", "llo", "!"], [None, -1.5, -0.25], [None, [("llo", -1.5), ("y", -2.0)], [("?", -0.1)]],
                          offset=0)
    assert out["tokens"] == ["He", "llo", "!"] and out["token_logprobs"] == [None, -1.5, -0.25]
    assert out["text_offset"] == [0, 2, 5]
    assert out["top_logprobs"] == [None, {"llo": -1.5, "y": -2.0}, {"?": -0.1, "!": -0.25}]  # the chosen one too
    # lm-evaluation-harness's greedy check: the token's log-prob is the maximum of its top_logprobs
    pairs = zip(out["token_logprobs"][1:], out["top_logprobs"][1:], strict=True)
    assert [lp == max(top.values()) for lp, top in pairs] == [True, False]
    assert legacy_logprobs(["a"], [-1.0], [[]], offset=7)["text_offset"] == [7]
    same = legacy_logprobs(["\ufffd"], [-3.0], [[("\ufffd", -1.0), ("\ufffd", -2.0)]], offset=0)  # two lone bytes
    assert same["top_logprobs"] == [{"\ufffd": -1.0}]


# ------------------------------------------------------------------------------ scoring


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny-random:llama?layers=2&hidden=32&heads=2&ctx=256&seed=3")


def test_scores_are_the_models_log_probs_of_each_next_token(tiny):
    model, tok = tiny
    ids = tok("Natalia sold clips.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    s = score_tokens(model, ids, 0, top_k=3)
    assert s.ids == ids and s.logprobs[0] is None and s.top[0] is None and len(s.logprobs) == len(ids)
    for t in range(1, len(ids)):
        assert s.logprobs[t] == pytest.approx(float(full[t - 1, ids[t]]), abs=1e-5)
        top = [i for i, _ in s.top[t]]
        assert top == full[t - 1].topk(3).indices.tolist()
        assert [lp for _, lp in s.top[t]] == sorted((lp for _, lp in s.top[t]), reverse=True)
    tail = score_tokens(model, ids, 5, top_k=0)  # a completion after its prompt: the same numbers
    assert tail.ids == ids[5:] and tail.logprobs == pytest.approx(s.logprobs[5:], abs=1e-5)
    assert tail.top == [[] for _ in ids[5:]]
    assert score_tokens(model, ids, len(ids), top_k=2).ids == []
    assert score_tokens(model, ids[:1], 0, top_k=2).logprobs == [None]


# ------------------------------------------------------------------------------ message shapes


def _chat(messages: list):
    return parse_chat_request({"messages": messages}, served_model="m", max_n=4, max_new_tokens=64)


def test_messages_with_name_and_null_keys_are_accepted():
    """What LangChain and AutoGen send, and replayed assistant messages (refusal/tool_calls null)."""
    chat = _chat([{"role": "system", "content": "Be brief.", "name": None},
                  {"role": "user", "content": "Hi", "name": "alice"},
                  {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": None, "audio": None,
                   "function_call": None},
                  {"role": "assistant", "content": None, "refusal": None},
                  {"role": "user", "content": [{"type": "text", "text": "2+2?"}], "name": "alice"}])
    assert chat.messages == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi", "name": "alice"},
                             {"role": "assistant", "content": "Hello"}, {"role": "assistant", "content": ""},
                             {"role": "user", "content": "2+2?", "name": "alice"}]
    limits = Limits(served_model="m", max_problem_chars=100, max_new_tokens=64)
    dec = parse_decompose_chat({"messages": [{"role": "user", "content": "Split this.", "name": "bob",
                                              "tool_calls": None}]}, limits)
    assert dec.problem == "Split this."


@pytest.mark.parametrize("message, words", [
    ({"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}, ("tool_calls", "not supported")),
    ({"role": "user", "content": "x", "name": 3}, ("name",)),
    ({"role": "user", "content": "x", "name": ""}, ("name",)),
    ({"role": "user", "content": None}, ("content", "string")),
])
def test_non_null_unsupported_message_keys_are_still_refused(message, words):
    with pytest.raises(ApiError) as info:
        _chat([message])
    assert info.value.status == 400 and all(w in info.value.message for w in words), info.value.message


def test_chat_logprobs_are_honoured_only_where_the_server_says():
    body = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2}
    assert parse_chat_request(body, served_model="m", max_n=1, max_new_tokens=8, logprobs=True).logprobs == 2
    assert parse_chat_request({**body, "top_logprobs": None}, served_model="m", max_n=1, max_new_tokens=8,
                              logprobs=True).logprobs == 0
    assert parse_chat_request({**body, "logprobs": False, "top_logprobs": None}, served_model="m", max_n=1,
                              max_new_tokens=8, logprobs=True).logprobs is None
    for bad, words in [({"stream": True}, "stream"), ({"logprobs": False}, "needs 'logprobs': true"),
                       ({"top_logprobs": 21}, "between")]:
        with pytest.raises(ApiError, match=words):
            parse_chat_request({**body, **bad}, served_model="m", max_n=1, max_new_tokens=8, logprobs=True)
    with pytest.raises(ApiError, match="logprobs are not supported"):  # the decomposer rewrites content: no
        parse_chat_request(body, served_model="m", max_n=1, max_new_tokens=8)
