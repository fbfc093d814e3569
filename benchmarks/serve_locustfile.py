"""Locust users for ``benchmarks/serve_loadgen.py``: OpenAI completions requests to ``subq llm-server``.

Run by locust itself (``locust -f benchmarks/serve_locustfile.py ...``), never imported by subq: locust
patches the standard library with gevent. Settings come from the environment the driver sets:
``LOADGEN_MODEL`` (served name), ``LOADGEN_RATE`` (requests/s of each user), ``LOADGEN_MAX_TOKENS``.
"""

from __future__ import annotations

import os

from locust import HttpUser, constant_throughput, task

PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many"


class CompletionsUser(HttpUser):
    wait_time = constant_throughput(float(os.environ.get("LOADGEN_RATE", "1")))

    @task
    def complete(self) -> None:
        body = {"model": os.environ["LOADGEN_MODEL"], "prompt": PROMPT, "temperature": 0,
                "max_tokens": int(os.environ.get("LOADGEN_MAX_TOKENS", "16"))}
        with self.client.post("/v1/completions", json=body, name="/v1/completions", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
