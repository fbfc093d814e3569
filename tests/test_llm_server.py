"""The OpenAI-compatible LLM server (serve/llm_server.py) on a tiny random model, behind a token.

One Serve app per module (start-up costs ~10 s); every test talks to it over real HTTP, most with the
official ``openai`` client. The model's context is 4096 tokens so that a long request decodes for
seconds (long enough to disconnect from it, or to send short ones beside it); prompts are capped
at 255 tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from subq.learner.models import build_byte_tokenizer
from subq.serve.chat_api import ApiError, parse_chat_request
from subq.serve.llm_server import LLMServerConfig, build_llm_app, start_llm_server, stop_llm_server
from subq.serve.serving import read_token

from tests.ports import free_port
from tests.serve_schema import chat_bodies

TOKEN_ENV = "SUBQ_TEST_LLM_TOKEN"
TOKEN = "s3cret-test-token-value"
MODEL = "tiny-random:llama?ctx=4096"
MAX_NEW = 3000


@pytest.fixture(scope="module")
def server(ray_session):
    os.environ[TOKEN_ENV] = TOKEN
    # A batch window twice the default: concurrent requests share a batch on a busy box (they need only
    # arrive within it), while each of the modules' hundreds of sequential requests waits it out alone.
    cfg = LLMServerConfig(model=MODEL, port=free_port(), route_prefix="/tiny", token_env=TOKEN_ENV,
                          max_batch_size=8, batch_wait_timeout_s=0.1, max_new_tokens=MAX_NEW, max_prompt_tokens=255,
                          num_cpus=0.5)
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
         f"between 1 and {MAX_NEW}"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}), 400, "'stop' must be"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 300}]}), 400, "at most 255"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}), 400,
         "'stream' must be true or false"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}),
         400, "only allowed with 'stream': true"),
        # a lone surrogate reached the tokenizer: a 500 before the fix
        ('{"messages": [{"role": "user", "content": "\\ud800 x"}]}', 400, "lone surrogate"),
        # json.loads raised RecursionError: a 500 before the fix
        ('{"messages": ' + "[" * 20_000 + "]" * 20_000 + "}", 400, "not valid JSON"),
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
    requests, prefills = after["requests"] - before["requests"], after["prefills"] - before["prefills"]
    assert requests == 8 and prefills < requests and after["max_batch_requests"] >= 2
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
    gpu = build_llm_app(LLMServerConfig(model="tiny-random:llama", num_gpus=0.5, dtype="bfloat16"))._bound_deployment
    assert gpu.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.5}
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLMServerConfig(model="tiny-random:llama", dtype="fp8")
    with pytest.raises(ValueError, match="is set but that environment variable is empty"):
        read_token(LLMServerConfig(model="tiny-random:llama", token_env="SUBQ_TEST_UNSET_TOKEN_VAR").token_env)


# ---------------------------------------------------------------- streaming, fields, limits, batching

MSG = [{"role": "user", "content": "Say hi"}]
EOS = build_byte_tokenizer().eos_token_id


def _openai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=120)


def _wait_for(http: httpx.Client, done, timeout_s: float = 60.0) -> dict:
    """Poll /stats until ``done(stats)`` (a liveness bound, not a performance figure)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _stats(http)
        if done(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_streaming_with_the_official_client_adds_up_to_the_plain_reply(server):
    cfg, base_url = server
    client = _openai(base_url)
    free = client.chat.completions.create(model=cfg.served_model_name, messages=MSG, temperature=0, max_tokens=40)
    visible = [ch for ch in free.choices[0].message.content[8:] if ch != "\ufffd"]
    kw = {"model": cfg.served_model_name, "messages": MSG, "temperature": 0, "max_tokens": 40,
          "stop": [visible[0] + "~~", "".join(visible[2:4]) or "~"]}
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # n samples stream side by side; without include_usage there is no usage chunk
    many = list(client.chat.completions.create(model=cfg.served_model_name, messages=MSG, n=2, temperature=0,
                                               max_tokens=12, stream=True))
    assert all(c.choices for c in many) and {c.choices[0].index for c in many} == {0, 1}
    texts = ["".join(c.choices[0].delta.content or "" for c in many if c.choices[0].index == i) for i in (0, 1)]
    assert texts[0] == texts[1] == free.choices[0].message.content[:len(texts[0])]


def test_curl_streams_server_sent_events(server):
    cfg, base_url = server
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = {"model": cfg.served_model_name, "messages": MSG, "max_tokens": 8, "temperature": 0, "stream": True}
    out = subprocess.run([curl, "-sSN", "--noproxy", "*", "-H", f"Authorization: Bearer {TOKEN}",
                          "-H", "Content-Type: application/json", "-d", json.dumps(body),
                          f"{base_url}/chat/completions"], capture_output=True, text=True, timeout=120, check=True)
    events = [e for e in out.stdout.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_client_that_disconnects_frees_its_row(http, server):
    cfg, _ = server
    long = {"model": cfg.served_model_name, "messages": MSG, "max_tokens": 2500, "temperature": 0,
            "logit_bias": {str(EOS): -100}}  # ~5 s of decoding: it cannot finish before we leave
    before = _stats(http)
    with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert sum(1 for _, line in zip(range(4), lines, strict=False) if line.startswith("data: ")) >= 2
    after = _wait_for(http, lambda s: s["running_rows"] == 0)
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1 and after["running_rows"] == 0
    assert after["forward_passes"] - before["forward_passes"] < 2500 and after["requests"] == before["requests"]
    # a plain request whose client gives up is freed the same way
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=long, timeout=1.5)
    final = _wait_for(http, lambda s: s["running_rows"] == 0 and s["cancelled_requests"] > after["cancelled_requests"])
    assert final["cancelled_requests"] == after["cancelled_requests"] + 1 and final["running_rows"] == 0
    assert final["forward_passes"] - after["forward_passes"] < 2500


def test_a_short_request_joins_a_running_long_one(http, server):
    """Iteration-level batching: a 2-token request sent while a 2500-token one decodes is answered
    while the long one still runs (it joined the running batch instead of waiting for it)."""
    cfg, _ = server
    long = {"model": cfg.served_model_name, "messages": MSG, "max_tokens": 2500, "temperature": 0,
            "logit_bias": {str(EOS): -100}, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=long) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is decoding
        short = http.post("/v1/chat/completions", json={"model": cfg.served_model_name, "messages": MSG,
                                                         "max_tokens": 2, "temperature": 0})
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] <= 2
        assert not any("finish_reason\": \"length" in line for line in (next(lines), next(lines)))
    assert _stats(http)["max_batch_requests"] >= 2


def test_a_hostile_row_does_not_fail_its_batch_mates(http, server):
    """temperature 1e-40 overflowed logits / T and turned its whole batch into 500s before the fix."""
    cfg, _ = server
    normal = {"model": cfg.served_model_name, "messages": MSG, "max_tokens": 30, "temperature": 0}
    alone = http.post("/v1/chat/completions", json=normal).json()["choices"][0]["message"]["content"]
    hostile = {**normal, "temperature": 1e-40, "max_tokens": 1500, "logit_bias": {str(EOS): -100}}
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(http.post, "/v1/chat/completions", json=hostile)
        time.sleep(0.5)
        fast = http.post("/v1/chat/completions", json=normal)
        assert not slow.done()  # still decoding: the two shared the running batch
        slow = slow.result()
    assert fast.status_code == 200 and fast.json()["choices"][0]["message"]["content"] == alone
    assert slow.status_code == 200 and slow.json()["usage"]["completion_tokens"] == 1500


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "json_object"}), ("top_logprobs", 2),  # without logprobs: true
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f", "parameters": {}}]), ("function_call", "auto"), ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}), ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}), ("reasoning_effort", "low"), ("verbosity", "low"), ("store", True),
    ("service_tier", "flex"),
])
def test_fields_the_server_cannot_honour_are_refused_by_name(server, field, value):
    cfg, base_url = server
    with pytest.raises(openai.BadRequestError) as info:
        _openai(base_url).chat.completions.create(model=cfg.served_model_name, messages=MSG, max_tokens=2,
                                                  extra_body={field: value})
    assert info.value.body["param"] == field and field in info.value.body["message"]


def test_unknown_fields_and_message_fields_are_refused_nulls_are_absent(server, http):
    cfg, base_url = server
    client = _openai(base_url)
    for extra, param in (({"top_k": 5}, "top_k"), ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]},
                                                  "messages[0].tool_call_id")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=cfg.served_model_name, messages=MSG, max_tokens=2, extra_body=extra)
        assert info.value.body["param"] == param
    # null means absent: max_completion_tokens null leaves max_tokens in charge (it was ignored before)
    reply = http.post("/v1/chat/completions", json={"messages": MSG, "max_completion_tokens": None, "max_tokens": 3,
                                                    "temperature": 0, "logit_bias": {str(EOS): -100}}).json()
    assert reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["finish_reason"] == "length"
    nulls = {k: None for k in ("temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "logit_bias",
                               "presence_penalty", "frequency_penalty", "user", "logprobs", "tools", "response_format")}
    assert http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, **nulls}).status_code == 200
    # the "off" values of unsupported features pass
    off = {"logprobs": False, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "store": False}
    assert http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, **off}).status_code == 200


def test_logit_bias_and_penalties_are_honoured(server):
    cfg, base_url = server
    client = _openai(base_url)
    x = ord("x")  # byte-level tokenizer: token id = byte
    forced = client.chat.completions.create(model=cfg.served_model_name, messages=MSG, max_tokens=6, temperature=0,
                                            logit_bias={str(x): 100})
    assert forced.choices[0].message.content == "xxxxxx"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=cfg.served_model_name, messages=MSG, max_tokens=2,
                                       logit_bias={"99999": 1})
    assert info.value.body["param"] == "logit_bias"
    # a frequency penalty forbids repeating: with the bias above it the model alternates instead
    penalised = client.chat.completions.create(model=cfg.served_model_name, messages=MSG, max_tokens=6, temperature=0,
                                               logit_bias={str(x): 100, str(ord("y")): 99}, frequency_penalty=2.0)
    assert penalised.choices[0].message.content == "xyxyxy"
    presence = client.chat.completions.create(model=cfg.served_model_name, messages=MSG, max_tokens=4, temperature=0,
                                              logit_bias={str(x): 100, str(ord("y")): 99}, presence_penalty=2.0)
    assert presence.choices[0].message.content.startswith("xy")


def test_bearer_scheme_is_case_insensitive(server):
    cfg, base_url = server
    root = base_url.removesuffix("/v1")
    body = {"messages": MSG, "max_tokens": 2}
    with httpx.Client(base_url=root, timeout=60, trust_env=False) as anon:
        for scheme in ("bearer", "BEARER", "Bearer"):
            assert anon.post("/v1/chat/completions", json=body,
                             headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200
        assert anon.post("/v1/chat/completions", json=body,
                         headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


def test_health_answers_within_a_second_while_a_maximal_body_is_refused(server, http):
    """The old server tokenized up to 16 MB on its event loop before checking the length: /health froze
    for ~10 s. Now the body is bounded by the context, its characters are counted before tokenizing,
    and parsing runs off the loop."""
    cfg, base_url = server
    stats = _stats(http)
    limit = stats["max_body_bytes"]
    over_chars = json.dumps({"messages": [{"role": "user", "content": "x" * (limit - 100)}]}).encode()
    old_max = json.dumps({"messages": [{"role": "user", "content": "x" * (16 << 20)}]}).encode()[: 16 << 20]
    for body, status in ((over_chars, 400), (old_max, 413)):
        slowest = 0.0
        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(http.post, "/v1/chat/completions", content=body,
                               headers={"Content-Type": "application/json"})
            with httpx.Client(base_url=base_url.removesuffix("/v1"), timeout=30, trust_env=False) as probe:
                while not sent.done():
                    t = time.perf_counter()
                    assert probe.get("/health").status_code == 200
                    slowest = max(slowest, time.perf_counter() - t)
            resp = sent.result()
        assert resp.status_code == status, resp.text[:300]
        assert slowest < 1.0, f"/health took {slowest:.2f} s while a {len(body)}-byte body was refused"
    refused = http.post("/v1/chat/completions", content=over_chars, headers={"Content-Type": "application/json"})
    assert refused.json()["error"]["code"] == "context_length_exceeded"  # the 400 says why


def test_fuzzed_requests_never_get_a_5xx_and_health_stays_live(server, http):
    """Bodies drawn over the whole chat schema (valid, edge and arbitrary values; raw bytes)."""
    cfg, _ = server
    statuses: list[int] = []

    @settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(chat_bodies(cfg.served_model_name, vocab=len(build_byte_tokenizer())))
    def check(raw: bytes) -> None:
        resp = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        statuses.append(resp.status_code)
        assert resp.status_code < 500, (raw[:300], resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            assert resp.json()["error"]["message"]
        elif resp.headers["content-type"].startswith("text/event-stream"):
            assert resp.text.endswith("data: [DONE]\n\n"), resp.text[-300:]

    check()
    assert http.get("/health").status_code == 200
    assert statuses.count(200) >= 5 and sum(400 <= s < 500 for s in statuses) >= 50
