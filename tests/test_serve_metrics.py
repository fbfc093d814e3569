"""``GET /metrics`` (serve/metrics.py): Prometheus text that parses, vLLM's names and labels, and
counts that match what happened; ``/health`` turns 503 when the engine dies."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from subq.learner.models import build_byte_tokenizer
from subq.serve.metrics import ServerMetrics

from tests.ports import free_port

MODEL = "tiny-random:llama?ctx=4096"
EOS = build_byte_tokenizer().eos_token_id
MSG = [{"role": "user", "content": "Say hi"}]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without model_name): value} of a /metrics page (it must parse)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def test_metrics_render_as_prometheus_text_with_vllm_names():
    m = ServerMetrics("m1", running=lambda: 2, waiting=lambda: 5, running_rows=lambda: 3)
    m.ttft.observe(0.2)
    m.token_intervals(0.05, 3)
    m.finished(1.5, prompt_tokens=7, generated=[4, 6], reasons=["stop", "length"])
    m.response(200)
    m.response(429)
    text = m.render().decode()
    assert 'model_name="m1"' in text
    got = samples(text)
    assert got[("vllm:num_requests_running", ())] == 2 and got[("vllm:num_requests_waiting", ())] == 5
    assert got[("subq:num_rows_running", ())] == 3
    assert got[("vllm:time_to_first_token_seconds_count", ())] == 1
    assert got[("vllm:inter_token_latency_seconds_count", ())] == 3
    assert got[("vllm:e2e_request_latency_seconds_sum", ())] == 1.5
    assert got[("vllm:prompt_tokens_total", ())] == 7 and got[("vllm:generation_tokens_total", ())] == 10
    assert got[("vllm:request_success_total", (("finished_reason", "length"),))] == 1
    assert got[("subq:requests_total", (("status", "429"),))] == 1


def test_a_dead_engine_fails_its_requests_and_health_with_503():
    from subq.learner.models import load_model_and_tokenizer
    from subq.serve.engine import Engine, RequestError, RequestStream
    from subq.serve.generation import BatchDecoder
    from subq.serve.sampling import SamplingParams
    from subq.serve.serving import check_engine, health_response

    model, tok = load_model_and_tokenizer("tiny-random:llama")
    engine = Engine(BatchDecoder(model, tok), max_rows=2, wait_s=0)
    assert health_response(engine, "m").status_code == 200

    def broken(requests) -> None:  # a bug outside any one request's handling
        raise RuntimeError("boom")

    engine.decoder.admit = broken
    params = SamplingParams(max_tokens=3)

    async def main() -> None:
        with pytest.raises(RequestError) as info:
            await RequestStream(engine, [1, 2, 3], params).result()
        assert info.value.status == 503
        with pytest.raises(RequestError) as again:  # refused at once afterwards, not hung
            RequestStream(engine, [1, 2, 3], params)
        assert again.value.status == 503

    asyncio.run(main())
    assert not engine.alive
    response = health_response(engine, "m")
    assert response.status_code == 503 and b"RuntimeError" in response.body
    with pytest.raises(RuntimeError):
        check_engine(engine)


@pytest.fixture(scope="module")
def server(ray_session):
    from subq.serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server

    cfg = LLMServerConfig(model=MODEL, port=free_port(), route_prefix="/metrics-llm", app_name="subq-metrics-llm",
                          max_batch_size=1, max_queued_requests=0, max_new_tokens=3000, num_cpus=0.5,
                          torch_threads=1)
    url = start_llm_server(cfg)
    yield cfg, url.removesuffix("/v1")
    stop_llm_server(cfg)


def test_metrics_count_what_happened(server):
    cfg, base = server
    name = cfg.served_model_name
    long = {"model": name, "messages": MSG, "max_tokens": 2500, "temperature": 0, "logit_bias": {str(EOS): -100},
            "stream": True}
    with httpx.Client(base_url=base, timeout=120, trust_env=False) as http:
        with http.stream("POST", "/v1/chat/completions", json=long) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it holds the only row
            during = samples(http.get("/metrics").text)
            refused = http.post("/v1/chat/completions", json={"model": name, "messages": MSG, "max_tokens": 2})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert during[("vllm:num_requests_running", ())] == 1 and during[("subq:num_rows_running", ())] == 1
        assert during[("vllm:num_requests_waiting", ())] == 0
        usage = []
        for _ in range(3):  # the row is free again once the stream's client left (retry until the engine saw it)
            for _attempt in range(100):
                r = http.post("/v1/chat/completions", json={"model": name, "messages": MSG, "max_tokens": 5,
                                                            "temperature": 0, "logit_bias": {str(EOS): -100}})
                if r.status_code != 429:
                    break
                time.sleep(0.1)
            assert r.status_code == 200
            usage.append(r.json()["usage"])
        page = http.get("/metrics")
    assert page.headers["content-type"].startswith("text/plain")
    got = samples(page.text)
    refusals = got[("subq:requests_total", (("status", "429"),))]
    assert got[("subq:requests_total", (("status", "200"),))] == 4 and refusals >= 1
    assert got[("vllm:request_success_total", (("finished_reason", "length"),))] == 3
    assert got[("vllm:generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usage) == 15
    assert got[("vllm:prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usage)
    assert got[("vllm:e2e_request_latency_seconds_count", ())] == 3  # the cancelled stream did not finish
    assert got[("vllm:time_to_first_token_seconds_count", ())] == 4  # it did get its first token
    assert got[("vllm:inter_token_latency_seconds_count", ())] >= 3 * 4
    assert got[("vllm:num_requests_running", ())] == 0 and got[("vllm:num_requests_waiting", ())] == 0
