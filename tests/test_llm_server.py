"""The OpenAI-compatible LLM server (serve/llm_server.py) on a tiny random model, behind a token.

One Serve app per module (start-up costs ~10 s); every test talks to it over real HTTP.
"""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from learner.models import build_byte_tokenizer
from serve.chat_api import ApiError, parse_chat_request
from serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server
from serve.serving import read_token

TOKEN_ENV = "SUBQ_TEST_LLM_TOKEN"
TOKEN = "s3cret-test-token-value"
MODEL = "tiny-random:llama?ctx=256"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session):
    os.environ[TOKEN_ENV] = TOKEN
    # A generous batch window makes "concurrent requests share a batch" deterministic on a busy box.
    cfg = LLMServerConfig(model=MODEL, port=_free_port(), route_prefix="/tiny", token_env=TOKEN_ENV,
                          max_batch_size=8, batch_wait_timeout_s=0.3, max_new_tokens=64)
    base_url = start_llm_server(cfg)
    yield cfg, base_url
    stop_llm_server(cfg)
    os.environ.pop(TOKEN_ENV, None)


@pytest.fixture
def http(server):
    _, base_url = server
    with httpx.Client(base_url=base_url.removesuffix("/v1"), timeout=60, trust_env=False,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def _stats(http: httpx.Client) -> dict:
    return http.get("/stats").json()


def test_openai_client_gets_a_chat_completion_with_usage(server):
    cfg, base_url = server
    assert base_url.endswith("/tiny/v1") and base_url.startswith("http://127.0.0.1:")
    client = openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0)
    reply = client.chat.completions.create(model=cfg.served_model_name, temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": "Say hi"}])
    assert reply.object == "chat.completion" and reply.model == "tiny-random-llama"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    tok = build_byte_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # n samples, stop strings and seeds go through unchanged
    many = client.chat.completions.create(model=cfg.served_model_name, n=3, temperature=1.0, seed=5, max_tokens=8,
                                          stop=["\n"], messages=[{"role": "user", "content": "Say hi"}])
    assert [c.index for c in many.choices] == [0, 1, 2] and all("\n" not in c.message.content for c in many.choices)
    again = client.chat.completions.create(model=cfg.served_model_name, n=3, temperature=1.0, seed=5, max_tokens=8,
                                           stop=["\n"], messages=[{"role": "user", "content": "Say hi"}])
    assert [c.message.content for c in again.choices] == [c.message.content for c in many.choices]
    assert [m.id for m in client.models.list().data] == [cfg.served_model_name]
    assert client.models.retrieve(cfg.served_model_name).owned_by == "subq"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"model": "tiny-random-llama"}), 400, "'messages' is required"),
        (json.dumps({"messages": []}), 400, "non-empty array"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), 400, "content' must be a string"),
        (json.dumps({"messages": ["hi"]}), 400, "must be an object"),
        (json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}), 404,
         "this server serves 'tiny-random-llama'"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), 400, "must be a number"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 3}), 400, "between 0 and 2"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}), 400, "between 0 and 1"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 0}), 400, "'n' must be between 1 and 8"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": True}), 400, "'n' must be an integer"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}), 400,
         "between 1 and 64"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}), 400, "'stop' must be"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 300}]}), 400, "at most 255"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": True}), 400,
         "streaming is not supported"),
        # a 400-digit integer made math.isfinite raise OverflowError: a 500 before the fix
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": 1' + "0" * 400 + "}", 400,
         "'temperature' must be between"),
    ],
)
def test_client_mistakes_get_4xx_with_an_openai_error(http, body, status, fragment):
    resp = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_routes_answer_in_the_same_shape(http):
    resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()
    assert http.get("/v1/chat/completions").status_code == 405


def test_bearer_token_is_required_and_never_echoed(server):
    cfg, base_url = server
    root = base_url.removesuffix("/v1")
    body = {"model": cfg.served_model_name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with httpx.Client(base_url=root, timeout=60, trust_env=False) as anon:
        assert anon.get("/health").status_code == 200  # liveness stays open, and says nothing secret
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            resp = anon.post("/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 401 and TOKEN not in resp.text
            assert resp.json()["error"]["type"] == "authentication_error"
        assert anon.get("/v1/models").status_code == 401 and anon.get("/stats").status_code == 401
        ok = anon.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).chat.completions.create(**body)
    assert TOKEN not in repr(read_token(cfg.token_env)) and TOKEN not in repr(cfg)


def test_concurrent_requests_share_batches(http, server):
    cfg, _ = server
    before = _stats(http)
    bodies = [{"model": cfg.served_model_name, "max_tokens": 4 + i, "temperature": 0.5 * (i % 3),
               "messages": [{"role": "user", "content": "question " * (i + 1)}]} for i in range(8)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    after = _stats(http)
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 8 and batches < requests and after["max_batch_requests"] >= 2
    assert after["completion_tokens"] - before["completion_tokens"] == sum(
        r.json()["usage"]["completion_tokens"] for r in replies)


def test_validation_rules_without_a_server():
    ok = parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}],
                             "max_completion_tokens": 7, "stop": "x"},
                            served_model="m", max_n=4, max_new_tokens=16)
    assert ok.messages == [{"role": "user", "content": "ab"}] and ok.max_tokens == 7 and ok.stop == ("x",)
    assert ok.sampling(7).n == 1 and ok.temperature == 1.0
    with pytest.raises(ApiError, match="only text") as info:
        parse_chat_request({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                           served_model="m", max_n=4, max_new_tokens=16)
    assert info.value.status == 400
    with pytest.raises(ValueError, match="is set but that environment variable is empty"):
        read_token(LLMServerConfig(model="tiny-random:llama", token_env="SUBQ_TEST_UNSET_TOKEN_VAR").token_env)
