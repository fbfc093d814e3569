"""Prometheus metrics of one serving replica (``GET /metrics``), named as vLLM names them.

vLLM counterparts (same name, type and ``model_name`` label, so a vLLM dashboard reads ours):
``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` (gauges: requests holding rows /
queued for them), ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds`` and
``vllm:e2e_request_latency_seconds`` (histograms; TTFT and end-to-end count from arrival at the
replica, queueing included), ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total``
(tokens of requests that finished), ``vllm:request_success_total{finished_reason}``. subq's own:
``subq:num_rows_running`` (rows = samples, what the batch size counts), ``subq:requests_total{status}``
(responses of the generation routes by HTTP status; 429 = refused at capacity).

Each replica has its own registry (not the process-global one, which Ray's own metrics share), so
with several replicas ``/metrics`` shows the replica that answered: scrape each replica, or use the
Serve-level metrics Ray exports. Observations come from the event loop and the engine thread;
prometheus_client is thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# vLLM's buckets (seconds), so histograms from both servers line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The metrics of one replica serving ``model_name``."""

    def __init__(self, model_name: str, *, running: Callable[[], float], waiting: Callable[[], float],
                 running_rows: Callable[[], float]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        label, r = ["model_name"], self.registry
        for name, doc, read in (
                ("vllm:num_requests_running", "Requests holding rows of the running batch.", running),
                ("vllm:num_requests_waiting", "Requests queued for rows.", waiting),
                ("subq:num_rows_running", "Rows (samples) of the running batch, admitted ones included.", running_rows)):
            Gauge(name, doc, label, registry=r).labels(model_name).set_function(read)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (from arrival).", label,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a sample.", label,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token of finished requests.",
                             label, buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", label,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests.", label,
                                         registry=r).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._status = Counter("subq:requests", "Responses of the generation routes by HTTP status.",
                               ["model_name", "status"], registry=r)

    def token_intervals(self, seconds: float, count: int) -> None:
        """``count`` samples each produced a token ``seconds`` after their previous one."""
        for _ in range(count):
            self.itl.observe(seconds)

    def finished(self, e2e_s: float, prompt_tokens: int, generated: Iterable[int], reasons: Iterable[str]) -> None:
        """A request whose every sample finished; it counts once, as "length" if any sample ran out of room."""
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(sum(generated))
        reasons = set(reasons)
        self._success.labels(self.model_name, "length" if "length" in reasons else min(reasons, default="stop")).inc()

    def response(self, status: int) -> None:
        self._status.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
