"""The decomposer deployment (serve/decomposer.py): API, batching, validation fuzz, auth, ILQL guidance.

Models: a *scripted* tiny llama whose attention and MLP outputs are zeroed, so its next token depends
on the current token only, and whose LM head is solved so that after "\\n" (the last token of both
prompt formats) it writes "Q1: Why?<end>" and then eos. That gives real sub-questions to parse, and an
end marker to stop at. It is served twice (one Serve app each, ~10 s start-up apiece):

- as a plain HF directory (prompt_format auto -> chat), behind a bearer token;
- as a subq ILQL checkpoint with big random heads and beta 7.5 in its config (auto -> student).

Model-level tests (Decoder, generate_guided per-row settings) and validation rules run without Ray.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from subq.learner.checkpoint import META_FILE, save_checkpoint
from subq.learner.guided_decoding import generate_guided
from subq.learner.ilql import ILQLConfig, ILQLHeads
from subq.learner.models import load_model_and_tokenizer
from subq.protocol.parse import parse_subquestions
from subq.protocol.prompts import SUBQ_END, format_subquestions, parse_student_output
from subq.serve.chat_api import ApiError
from subq.serve.decompose_api import (
    MAX_BODY_BYTES,
    Limits,
    SubquestionContent,
    parse_decompose_chat,
    parse_decompose_request,
)
from subq.serve.decomposer import DecomposerConfig, build_decomposer_app, start_decomposer, stop_decomposer
from subq.serve.decomposer_model import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_CAP,
    Decoder,
    Job,
    checkpoint_beta,
    default_max_new_tokens,
    heads_from_state,
)
from subq.serve.fields import decode_json
from subq.serve.generation import Completion, generate
from subq.serve.sampling import SamplingParams
from subq.serve.serving import init_replica_torch, replica_device

from tests.ports import free_port
from tests.serve_schema import DECOMPOSER_EXTENSIONS, chat_bodies, decompose_bodies

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is faster
TOKEN_ENV = "SUBQ_TEST_DECOMPOSER_TOKEN"
TOKEN = "decomposer-test-token-value"
TINY = "tiny-random:llama?layers=2&hidden=32&heads=2&ctx=2048&seed=0"  # ctx: the chat prompt is ~1000 bytes
SCRIPT = "Q1: Why?<end>"
CKPT_BETA = 7.5
MAX_NEW = 32
MAX_CHARS = 500
PROBLEM = "Tom has 3 apples and buys 2 more. How many apples does he have?"


# ------------------------------------------------------------------------------------------ models


def _scripted_model():
    """The tiny llama, rewired to write SCRIPT after a newline (then eos), deterministically."""
    model, tok = load_model_and_tokenizer(TINY)
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is now the token's embedding, nothing else
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        sources = tok("\n" + SCRIPT, add_special_tokens=False)["input_ids"]
        targets = [*sources[1:], tok.eos_token_id]
        assert len(set(sources)) == len(sources)  # a token-to-token map needs distinct sources
        hidden = model.model.norm(model.model.embed_tokens(torch.tensor(sources)))  # [n, H]
        onehot = torch.zeros(len(targets), model.config.vocab_size)
        onehot[torch.arange(len(targets)), torch.tensor(targets)] = 30.0
        # Solve W h_i = 30 * e_{target_i} for the n (< H) independent hidden states.
        model.lm_head.weight.copy_(onehot.T @ torch.linalg.pinv(hidden.T))
    return model, tok


def _big_random_heads(model) -> ILQLHeads:
    torch.manual_seed(0)
    heads = ILQLHeads.for_model(model).eval()
    with torch.no_grad():  # large values: beta * (Q - V) swamps the LM's margin of 30 at every step
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    return heads


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("decomposer")
    model, tok = _scripted_model()
    plain = root / "scripted-lm"
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    # As the training driver writes it: the resolved ILQLConfig ends up as its repr string in "extra".
    ckpt = save_checkpoint(root / "scripted-ilql", model, tok, algo="ilql",
                           config={"algo": "ilql", "algo_config": {"beta": CKPT_BETA}},
                           heads=_big_random_heads(model), extra={"algo_config": ILQLConfig(beta=CKPT_BETA)})
    return {"plain": str(plain), "ckpt": str(ckpt)}


@pytest.fixture(scope="module")
def ckpt_decoder(models) -> Decoder:
    return Decoder.load(models["ckpt"])


# --------------------------------------------------------------------------------------- servers


def _cfg(model: str, prefix: str, **kw) -> DecomposerConfig:
    # A batch window twice the default: concurrent requests share a batch on a busy box (they need only
    # arrive within it), while each of the modules' hundreds of sequential requests waits it out alone.
    return DecomposerConfig(model=model, port=free_port(), route_prefix=prefix, app_name=f"subq-test{prefix}",
                            max_batch_size=8, batch_wait_timeout_s=0.1, max_new_tokens=MAX_NEW,
                            max_problem_chars=MAX_CHARS, num_cpus=0.5, torch_threads=1, **kw)


@pytest.fixture(scope="module")
def chat_server(ray_session, models):
    os.environ[TOKEN_ENV] = TOKEN
    cfg = _cfg(models["plain"], "/dec-chat", token_env=TOKEN_ENV)
    url = start_decomposer(cfg)
    yield cfg, url
    stop_decomposer(cfg)
    os.environ.pop(TOKEN_ENV, None)


@pytest.fixture(scope="module")
def ckpt_server(ray_session, models):
    cfg = _cfg(models["ckpt"], "/dec-ckpt")
    url = start_decomposer(cfg)
    yield cfg, url
    stop_decomposer(cfg)


def _client(url: str, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, timeout=60, trust_env=False, headers=headers)


# ------------------------------------------------------------------------- the chat-format server


def test_both_routes_answer_openai_and_plain_http(chat_server):
    cfg, url = chat_server
    assert url.endswith("/dec-chat") and url.startswith("http://127.0.0.1:")
    assert cfg.served_model_name == "scripted-lm"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["scripted-lm"]
    reply = client.chat.completions.create(
        model="scripted-lm", temperature=0, max_tokens=24, user="someone", presence_penalty=0.0,
        messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": "an earlier problem"},
                  {"role": "assistant", "content": "Q1: ?"}, {"role": "user", "content": PROBLEM}])
    assert reply.object == "chat.completion" and reply.model == "scripted-lm"
    content = reply.choices[0].message.content
    # The script's continuation is "Q1: Why?<end>" + eos (the chat format does not know the end marker).
    assert content == "Q1: Why?<end>" and reply.choices[0].finish_reason == "stop"
    assert parse_subquestions(content).subquestions == ["Why?<end>"]
    assert reply.usage.completion_tokens == len(SCRIPT) + 1  # byte tokens + eos
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 900

    with _client(url) as http:
        body = http.post("/decompose", json={"problem": PROBLEM}).json()
        assert set(body) == {"subquestions", "raw", "model", "usage", "beta", "finish_reason"}
        assert body["raw"] == SCRIPT and body["subquestions"] == ["Why?<end>"] and body["model"] == "scripted-lm"
        assert body["beta"] == 0.0 and body["finish_reason"] == "stop"
        assert body["usage"]["prompt_tokens"] == reply.usage.prompt_tokens  # same prompt on both routes
        cut = http.post("/decompose", json={"problem": PROBLEM, "max_tokens": 5}).json()
        assert cut["raw"] == SCRIPT[:5] and cut["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 5
        # OpenAI's stop strings apply to the raw continuation
        stopped = http.post("/v1/chat/completions", json={"model": "scripted-lm", "stop": ["?"],
                                                          "messages": [{"role": "user", "content": PROBLEM}]})
        assert stopped.json()["choices"][0]["message"]["content"] == "Q1: Why"
        assert http.get("/v1/models/scripted-lm").json()["id"] == "scripted-lm"
        assert http.get("/v1/models/other").status_code == 404
        missing = http.get("/no/such/route")
        assert missing.status_code == 404 and "error" in missing.json()
        assert http.get("/decompose").status_code == 405
        assert http.post("/decompose", json={"problem": PROBLEM, "beta": 1.0}).status_code == 400  # no heads


def test_bearer_token_guards_everything_but_health(chat_server):
    _, url = chat_server
    with _client(url, token=None) as anon:
        assert anon.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for resp in (anon.post("/decompose", json={"problem": PROBLEM}, headers=headers),
                         anon.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                                   headers=headers),
                         anon.get("/v1/models", headers=headers), anon.get("/stats", headers=headers)):
                assert resp.status_code == 401 and TOKEN not in resp.text
                assert resp.json()["error"]["type"] == "authentication_error"
        ok = anon.post("/decompose", json={"problem": PROBLEM}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="scripted-lm", messages=[{"role": "user", "content": PROBLEM}])


def test_concurrent_requests_are_decoded_in_shared_batches(chat_server):
    _, url = chat_server
    with _client(url) as http:
        body = {"problem": PROBLEM, "max_tokens": 20}
        before = http.get("/stats").json()
        single = http.post("/decompose", json=body).json()
        mid = http.get("/stats").json()
        single_passes = mid["forward_passes"] - before["forward_passes"]
        assert single_passes == len(SCRIPT) + 1  # stopped at eos, not at max_tokens
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: http.post("/decompose", json=body), range(8)))
        after = http.get("/stats").json()
    assert all(r.status_code == 200 and r.json() == single for r in replies), [r.text for r in replies]
    requests, prefills = after["requests"] - mid["requests"], after["prefills"] - mid["prefills"]
    assert requests == 8 and prefills < requests and after["max_batch_requests"] > 1
    assert after["forward_passes"] - mid["forward_passes"] < 8 * single_passes
    assert after["rows"] - mid["rows"] == 8
    assert after["completion_tokens"] - mid["completion_tokens"] == 8 * single["usage"]["completion_tokens"]


# --- fuzz: every malformed request gets a 4xx -----------------------------------------------------

_valid_problem = st.text(min_size=1, max_size=30).filter(str.strip)
_bad_value = st.one_of(  # invalid for every numeric field (beta, temperature, top_p, max_tokens, n, ...)
    st.text(max_size=5), st.booleans(), st.just(math.nan), st.just(math.inf), st.just(-math.inf),
    st.integers(max_value=-1), st.integers(min_value=1000), st.just(10**400), st.floats(min_value=1000, max_value=1e300),
    st.floats(max_value=-0.001, min_value=-1e300), st.lists(st.integers(), max_size=2), st.fixed_dictionaries({"a": st.just(1)}),
)
_bad_problem = st.one_of(
    st.just(""), st.text(alphabet=" \t\n\r", min_size=1, max_size=5), st.integers(), st.floats(allow_nan=False),
    st.booleans(), st.none(), st.lists(st.text(max_size=3), max_size=3), st.fixed_dictionaries({"text": st.text()}),
    st.just("x" * (MAX_CHARS + 1)), st.just("\ud800 lone surrogate"),
)
_numeric_fields = ("beta", "temperature", "top_p", "max_tokens", "max_subquestions")
_not_json = st.one_of(
    st.binary(max_size=64).filter(lambda b: not _is_json_object(b)),
    st.just(b""), st.just(b"{\"problem\": \"x\""), st.just(b"[" * 5000 + b"]" * 5000), st.just(b"\xff\xfe{}"),
    st.one_of(st.integers(), st.text(), st.lists(st.integers()), st.booleans(), st.none()).map(
        lambda v: json.dumps(v).encode()),
)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


@st.composite
def _bad_decompose_body(draw) -> bytes:
    kind = draw(st.sampled_from(["not_json", "problem", "number", "unknown", "model", "too_big"]))
    if kind == "not_json":
        return draw(_not_json)
    body = {"problem": draw(_valid_problem)}
    if kind == "problem":
        value = draw(_bad_problem)
        body = {} if value is None else {"problem": value}
    elif kind == "number":
        body[draw(st.sampled_from(_numeric_fields))] = draw(_bad_value)
    elif kind == "unknown":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in _numeric_fields + ("problem", "model")))] = 1
    elif kind == "model":
        body["model"] = draw(st.one_of(st.integers(), st.just("gpt-4o")))
    else:
        return b'{"problem": "' + b"x" * (MAX_BODY_BYTES + 1) + b'"}'
    return json.dumps(body).encode()


@st.composite
def _bad_chat_body(draw) -> bytes:
    kind = draw(st.sampled_from(["not_json", "messages", "problem", "number", "unsupported", "model"]))
    if kind == "not_json":
        return draw(_not_json)
    body = {"model": "scripted-lm", "messages": [{"role": "user", "content": draw(_valid_problem)}]}
    if kind == "messages":
        body["messages"] = draw(st.one_of(
            st.just([]), st.just(None), st.text(max_size=5), st.lists(st.integers(), min_size=1, max_size=2),
            st.just([{"content": "no role"}]), st.just([{"role": "system", "content": "no user message"}]),
            st.just([{"role": "user", "content": [{"type": "image_url"}]}]),
        ))
        if body["messages"] is None:
            del body["messages"]
    elif kind == "problem":
        value = draw(_bad_problem)
        body["messages"] = [{"role": "user", "content": value}]
    elif kind == "number":
        body[draw(st.sampled_from((*_numeric_fields, "n")))] = draw(_bad_value)
    elif kind == "unsupported":
        body.update(draw(st.sampled_from([{"stream": "yes"}, {"logprobs": True}, {"tools": [{"type": "function"}]},
                                          {"stop": ["a", ""]}, {"stop": 3}, {"n": 2},
                                          {"response_format": {"type": "json_object"}}, {"top_k": 3},
                                          {"stream_options": {"include_usage": True}}, {"logit_bias": {"x": 1}},
                                          {"messages": [{"role": "user", "content": "x", "name": "n"}]}])))
    else:
        body["model"] = draw(st.one_of(st.integers(), st.just("gpt-4o"), st.none().map(lambda _: ["x"])))
    return json.dumps(body).encode()


def test_fuzzed_malformed_requests_only_get_4xx(chat_server):
    _, url = chat_server
    sent: list[int] = []
    fuzz = settings(max_examples=130, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
    with _client(url) as http:

        def check(path: str, raw: bytes) -> None:
            resp = http.post(path, content=raw, headers={"Content-Type": "application/json"})
            sent.append(resp.status_code)
            assert 400 <= resp.status_code < 500, (path, raw[:200], resp.status_code, resp.text[:300])
            error = resp.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error", resp.text[:300]

        given(_bad_decompose_body())(fuzz(lambda raw: check("/decompose", raw)))()
        given(_bad_chat_body())(fuzz(lambda raw: check("/v1/chat/completions", raw)))()
        assert len(sent) >= 200 and 413 in sent
        assert http.get("/health").status_code == 200
        assert http.post("/decompose", json={"problem": PROBLEM}).json()["raw"] == SCRIPT


def test_fuzzed_schema_requests_never_get_a_5xx(chat_server):
    """Bodies over both routes' schemas (valid, edge and arbitrary values, raw bytes): never a 5xx,
    and /health answers after."""
    _, url = chat_server
    statuses: list[int] = []
    fuzz = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
    with _client(url) as http:

        def check(path: str, raw: bytes) -> None:
            resp = http.post(path, content=raw, headers={"Content-Type": "application/json"})
            statuses.append(resp.status_code)
            assert resp.status_code < 500, (path, raw[:300], resp.status_code, resp.text[:300])

        given(decompose_bodies("scripted-lm"))(fuzz(lambda raw: check("/decompose", raw)))()
        chat = chat_bodies("scripted-lm", vocab=260, extensions=DECOMPOSER_EXTENSIONS)
        given(chat)(fuzz(lambda raw: check("/v1/chat/completions", raw)))()
        assert http.get("/health").status_code == 200
    assert statuses.count(200) >= 20 and sum(400 <= s < 500 for s in statuses) >= 40


def test_chat_streaming_with_the_official_client(chat_server):
    cfg, url = chat_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
    kw = {"model": "scripted-lm", "messages": [{"role": "user", "content": PROBLEM}]}
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_a_hostile_request_does_not_fail_its_batch_mates(chat_server):
    """temperature 1e-40 passed validation, overflowed and answered 500 (with every batch-mate) before the fix."""
    _, url = chat_server
    with _client(url) as http, ThreadPoolExecutor(4) as pool:
        bodies = [{"problem": PROBLEM, "temperature": 1e-40}, {"problem": PROBLEM}] * 2
        before = http.get("/stats").json()
        replies = list(pool.map(lambda b: http.post("/decompose", json=b), bodies))
        after = http.get("/stats").json()
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    assert all(r.json()["raw"] == SCRIPT for r in replies)  # below MIN_TEMPERATURE: greedy
    assert after["prefills"] - before["prefills"] < 4  # some of them shared a batch


# ----------------------------------------------------------------------- the checkpoint server


def test_checkpoint_is_served_in_student_format_with_its_beta(ckpt_server):
    cfg, url = ckpt_server
    assert cfg.served_model_name == "scripted-ilql"
    with _client(url, token=None) as http:
        stats = http.get("/stats").json()
        assert stats["prompt_format"] == "student" and stats["has_heads"] and stats["default_beta"] == CKPT_BETA
        plain = http.post("/decompose", json={"problem": PROBLEM, "beta": 0}).json()
        # student format: the row stops right after "<end>", the text is cut before it
        assert plain["raw"] == "Q1: Why?" and plain["subquestions"] == ["Why?"] and plain["beta"] == 0
        assert plain["usage"]["completion_tokens"] == len(SCRIPT) and plain["finish_reason"] == "stop"
        default = http.post("/decompose", json={"problem": PROBLEM}).json()
        explicit = http.post("/decompose", json={"problem": PROBLEM, "beta": CKPT_BETA}).json()
        assert default["beta"] == CKPT_BETA and default["raw"] == explicit["raw"] != plain["raw"]
        chat = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="scripted-ilql", messages=[{"role": "user", "content": PROBLEM}], extra_body={"beta": 0})
        assert chat.choices[0].message.content == "Q1: Why?"
        assert parse_subquestions(chat.choices[0].message.content).subquestions == plain["subquestions"]
        # streamed: one delta per complete sub-question line, the same content in the end
        stream = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="scripted-ilql", messages=[{"role": "user", "content": PROBLEM}], extra_body={"beta": 0},
            stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "Q1: Why?"
        assert stats["max_new_tokens"] == MAX_NEW  # configured; unset, it derives from the checkpoint


# ------------------------------------------------------------------------- without Ray: the model


def test_prompt_format_auto_and_beta_defaults(models, ckpt_decoder):
    assert ckpt_decoder.prompt_format == "student" and ckpt_decoder.default_beta == CKPT_BETA
    assert ckpt_decoder.heads is not None and ckpt_decoder.heads.two_q
    plain = Decoder.load(models["plain"])
    assert plain.prompt_format == "chat" and plain.heads is None and plain.default_beta == 0.0
    tiny = Decoder.load(TINY)
    assert tiny.prompt_format == "chat" and tiny.heads is None
    assert Decoder.load(models["ckpt"], prompt_format="chat", beta=0.0).default_beta == 0.0
    with pytest.raises(ValueError, match="needs ILQL heads"):
        Decoder.load(TINY, beta=1.0)
    from subq.learner.episodes import encode_prompt

    assert ckpt_decoder.prompt_ids(PROBLEM) == encode_prompt(ckpt_decoder.tokenizer, PROBLEM)  # train == serve


def test_large_beta_changes_greedy_output(ckpt_decoder):
    prompt = ckpt_decoder.prompt_ids(PROBLEM)
    plain, guided = ckpt_decoder.decode([Job(prompt, beta=0.0, max_tokens=16),
                                         Job(prompt, beta=50.0, max_tokens=16)]).decoded
    assert plain.text == "Q1: Why?" and guided.text != plain.text


def test_mixed_rows_decode_together_as_they_would_alone(ckpt_decoder):
    d = ckpt_decoder
    short = d.prompt_ids("Hi?")
    long = d.prompt_ids(PROBLEM)
    jobs = [Job(long, beta=0.0, max_tokens=20), Job(short, beta=CKPT_BETA, max_tokens=6),
            Job(long, beta=0.0, temperature=1.0, max_tokens=3), Job(short, beta=30.0, max_tokens=9),
            Job(long, beta=0.0, max_tokens=20, stop=(":",))]
    together = d.decode(jobs)
    alone = [d.decode([j]) for j in jobs]
    for i in (0, 1, 3, 4):  # greedy rows: the same tokens as alone
        assert together.decoded[i] == alone[i].decoded[0], i
    assert together.decoded[0].text == "Q1: Why?" and together.decoded[0].generated_tokens == len(SCRIPT)
    assert together.decoded[4].text == "Q1" and together.decoded[4].finish_reason == "stop"
    assert together.decoded[2].generated_tokens <= 3
    assert together.forward_passes == max(a.forward_passes for a in alone) < sum(a.forward_passes for a in alone)
    assert d.subquestions("Q1: a?\nb?\n<end>junk", 1) == ["b?"]  # a cap keeps the last sub-question
    assert d.subquestions("Q1: a?\nb?\nc?\nd?\n<end>", 3) == ["a?", "b?", "d?"]


def test_generate_guided_per_row_settings_match_scalar_calls(ckpt_decoder):
    """Per-row beta / temperature / lengths, drop_finished and stop: additive to generate_guided."""
    d = ckpt_decoder
    prompts = [d.prompt_ids(PROBLEM), d.prompt_ids("Hi?")]
    width = max(map(len, prompts))
    ids = torch.tensor([[d.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = {"eos_token_id": d.eos, "pad_token_id": d.pad_id}
    rows = generate_guided(d.model, d.heads, ids, mask, max_new_tokens=torch.tensor([12, 5]),
                           beta=torch.tensor([0.0, 5.0]), do_sample=True, temperature=torch.tensor([0.0, 0.0]),
                           drop_finished=True, **kw)
    for i, beta in enumerate((0.0, 5.0)):
        ref = generate_guided(d.model, d.heads, ids, mask, max_new_tokens=12, beta=beta, **kw)
        n = (12, 5)[i]
        assert torch.equal(rows[i, width:width + n], ref[i, width:width + n])
        assert (rows[i, width + n:] == d.pad_id).all()
    seen: list[tuple[int, int]] = []
    stopped = generate_guided(d.model, None, ids, mask, max_new_tokens=12, beta=0.0,
                              stop=lambda r, t: seen.append((r, len(t))) or len(t) == 2, **kw)
    assert stopped.shape[1] == width + 2 and sorted(seen) == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_the_engine_decodes_what_decoder_decode_decodes(ckpt_decoder):
    """The server's continuous-batching path (serve.generation with the heads) and the static
    Decoder.decode (learner.guided_decoding) agree on guided and plain greedy rows."""
    d = ckpt_decoder
    jobs = [Job(d.prompt_ids(PROBLEM), beta=0.0, max_tokens=20), Job(d.prompt_ids("Hi?"), beta=CKPT_BETA, max_tokens=9),
            Job(d.prompt_ids("Hi?"), beta=30.0, max_tokens=12)]
    static = d.decode(jobs).decoded
    params = [SamplingParams(max_tokens=j.max_tokens, temperature=0, beta=j.beta, stop=(SUBQ_END,)) for j in jobs]
    engine = generate(d.model, d.tokenizer, [j.prompt for j in jobs], params, heads=d.heads, eos_ids=d.eos)
    for old, new in zip(static, engine.completions, strict=True):
        assert (new[0].text, new[0].generated_tokens, new[0].finish_reason) == (old.text, old.generated_tokens,
                                                                               old.finish_reason)
    assert static[0].text == "Q1: Why?" and static[2].text != static[0].text


def test_subquestion_stream_sends_whole_lines():
    content = SubquestionContent(parse_student_output)
    deltas = [content.feed(t) for t in ("How many", " apples?\nHow", " many pears?", "\n")]
    assert deltas == ["", "Q1: How many apples?", "", "\nQ2: How many pears?"]
    final = Completion(text="How many apples?\nHow many pears?\nTotal?", token_ids=[], finish_reason="stop",
                       generated_tokens=9)
    assert content.finish(final) == "\nQ3: Total?"
    assert content.sent == format_subquestions(parse_student_output(final.text))


def test_default_max_new_tokens_comes_from_the_checkpoint(models, tmp_path):
    assert default_max_new_tokens(None) == DEFAULT_MAX_NEW_TOKENS == 128
    assert default_max_new_tokens({"extra": {"data": {"max_target_tokens": 40}}}) == 56  # + 16 at least
    assert default_max_new_tokens({"extra": {"data": {"max_target_tokens": 200}}}) == 250  # + 25%
    assert default_max_new_tokens({"extra": {"data": {"max_target_tokens": 10_000}}}) == MAX_NEW_TOKENS_CAP
    for bad in ({"extra": {"data": {"max_target_tokens": "40"}}}, {"extra": {"data": 3}}, {"extra": None}):
        assert default_max_new_tokens(bad) == DEFAULT_MAX_NEW_TOKENS
    # what the learner records in a checkpoint reaches the Decoder
    meta_file = Path(models["ckpt"]) / META_FILE
    ckpt = tmp_path / "recorded"
    shutil.copytree(models["ckpt"], ckpt)
    meta = json.loads(meta_file.read_text())
    meta["extra"]["data"] = {"max_target_tokens": 40}
    (ckpt / META_FILE).write_text(json.dumps(meta))
    assert default_max_new_tokens(Decoder.load(str(ckpt)).meta) == 56
    assert Decoder.load(models["plain"]).meta is None


# ------------------------------------------------------------------------- without Ray: validation

LIMITS = Limits(served_model="m", max_problem_chars=20, max_new_tokens=16, default_temperature=0.0,
                default_max_subquestions=3)


def test_decompose_validation_rules():
    ok = parse_decompose_request({"problem": "2+2?", "beta": 2, "temperature": 0.5, "max_tokens": 16,
                                  "max_subquestions": 2, "model": "m"}, LIMITS)
    assert (ok.problem, ok.beta, ok.temperature, ok.max_tokens, ok.max_subquestions) == ("2+2?", 2.0, 0.5, 16, 2)
    default = parse_decompose_request({"problem": "x"}, LIMITS)
    assert default.beta is None and default.temperature == 0.0 and default.max_subquestions == 3
    cases = [
        ([1], 400, "must be a JSON object"), ({}, 400, "'problem' is required"), ({"problem": " \n"}, 400, "empty"),
        ({"problem": 3}, 400, "must be a string"), ({"problem": "x" * 21}, 400, "at most 20"),
        ({"problem": "\ud800"}, 400, "lone surrogate"), ({"problem": "x", "beta": math.nan}, 400, "finite"),
        ({"problem": "x", "beta": -1}, 400, "between 0 and 100"), ({"problem": "x", "beta": True}, 400, "a number"),
        ({"problem": "x", "temperature": 10**400}, 400, "between 0 and 2"),
        ({"problem": "x", "max_tokens": 17}, 400, "between 1 and 16"),
        ({"problem": "x", "max_tokens": 2.0}, 400, "an integer"), ({"problem": "x", "max_subquestions": 0}, 400, "between 1"),
        ({"problem": "x", "temprature": 1}, 400, "unknown field(s) 'temprature'"),
        ({"problem": "x", "model": "gpt-4o"}, 404, "this server serves 'm'"),
    ]
    for body, status, fragment in cases:
        with pytest.raises(ApiError) as info:
            parse_decompose_request(body, LIMITS)
        assert info.value.status == status and fragment in info.value.message, (body, info.value.message)


def test_chat_validation_rules():
    body = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                                       {"role": "user", "content": [{"type": "text", "text": "last"}]}],
            "max_tokens": 4, "stop": "\n", "beta": 1.5, "seed": 3, "user": "u"}
    req = parse_decompose_chat(body, LIMITS)
    assert (req.problem, req.max_tokens, req.chat.stop, req.beta, req.temperature) == ("last", 4, ("\n",), 1.5, 0.0)
    sampling = req.sampling(4, 1.5)
    assert (sampling.seed, sampling.stop, sampling.beta, sampling.temperature) == (3, ("\n",), 1.5, 0.0)
    assert parse_decompose_chat({**body, "temperature": 1.0}, LIMITS).temperature == 1.0
    for bad, fragment in [({"messages": [{"role": "system", "content": "s"}]}, "needs a user message"),
                          ({"messages": [{"role": "user", "content": ""}]}, "empty"),
                          ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "'n' must be between 1 and 1"),
                          ({"messages": [{"role": "user", "content": "x"}], "temperature": 10**400}, "between 0 and 2"),
                          ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
                           "response_format"),
                          ({"messages": [{"role": "user", "content": "x"}], "beta": 1, "gamma": 2}, "'gamma'")]:
        with pytest.raises(ApiError) as info:
            parse_decompose_chat(bad, LIMITS)
        assert info.value.status == 400 and fragment in info.value.message, info.value.message
    for raw in (b"", b"{", b"[" * 100_000, b"\xff", b'{"a": [{"b": "\\udc00"}]}'):
        with pytest.raises(ApiError) as info:
            decode_json(raw)
        assert info.value.status == 400


def test_checkpoint_beta_and_heads_config(models, tmp_path):
    assert checkpoint_beta({"extra": {"algo_config": {"beta": 2.5}}}) == 2.5
    assert checkpoint_beta({"extra": {"algo_config": "ILQLConfig(gamma=0.99, betas=(0.9, 0.999), beta=0.25)"}}) == 0.25
    assert checkpoint_beta({"config": {"algo_config": {"beta": 3}}}) == 3.0
    assert checkpoint_beta({}) == ILQLConfig.beta
    model, tok = load_model_and_tokenizer(TINY)
    for two_q, mult, rank in ((False, 0, 0), (True, 2, 0), (True, 1, 8), (False, 0, 4)):  # + low-rank Q heads
        heads = ILQLHeads.for_model(model, two_q=two_q, hidden_mult=mult, q_rank=rank)
        rebuilt = heads_from_state(heads.state_dict(), model)
        assert (rebuilt.two_q, rebuilt.hidden_mult, rebuilt.q_rank) == (two_q, mult, rank)
        for a, b in zip(heads.state_dict().values(), rebuilt.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert heads_from_state({"q": torch.zeros(1)}, model) is None


def test_config_and_app_options():
    with pytest.raises(ValueError, match="prompt_format"):
        DecomposerConfig(model=TINY, prompt_format="raw")
    with pytest.raises(ValueError, match="min_replicas"):
        DecomposerConfig(model=TINY, min_replicas=3, max_replicas=2)
    cfg = DecomposerConfig(model=TINY, route_prefix="x", min_replicas=1, max_replicas=3, max_batch_size=16)
    assert cfg.route_prefix == "/x" and cfg.served_model_name == "tiny-random-llama"
    deployment = build_decomposer_app(cfg)._bound_deployment
    # Serve must never queue in its router (where /health would wait): far above the batch, and the
    # replica's own admission bounds the work (serve/admission.py)
    assert deployment._deployment_config.max_ongoing_requests == 100_000
    bounded = build_decomposer_app(DecomposerConfig(model=TINY, max_batch_size=16, max_queued_requests=4))
    assert bounded._bound_deployment._deployment_config.max_ongoing_requests == 16 + 4 + 1000
    with pytest.raises(ValueError, match="max_queued_requests"):
        DecomposerConfig(model=TINY, max_queued_requests=-1)
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3


def test_replica_placement_policy_and_cli_options(capsys):
    """dtype policy, threads from the Ray reservation, and bad options refused in one line before Ray starts."""
    assert replica_device(0, "auto") == ("cpu", torch.float32)
    assert replica_device(0, "bfloat16") == ("cpu", torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            replica_device(1, "auto")
    threads = torch.get_num_threads()
    try:
        assert init_replica_torch(None, 0.5) == 1 and torch.get_num_threads() == 1
        assert init_replica_torch(None, 2.0) == 2 and torch.get_num_threads() == 2
        assert init_replica_torch(3, 0.5) == 3
    finally:
        torch.set_num_threads(threads)
    from subq.cli import main

    assert main(["serve", "--checkpoint", TINY, "--dtype", "fp8"]) == 2
    assert main(["llm-server", "--model", TINY, "--num-gpus", "-1"]) == 2
    err = capsys.readouterr().err
    assert "dtype must be one of" in err and "num_gpus must be >= 0" in err
