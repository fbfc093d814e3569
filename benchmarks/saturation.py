"""Serving at saturation: a request-rate sweep up to beyond capacity against an OpenAI-compatible server.

At each rate, requests arrive open-loop (Poisson, like real traffic: nobody waits for the server
before sending the next) for ``--duration`` s; each is a streaming chat completion, so time to first
token (TTFT), inter-token latency (ITL: the mean gap between content chunks of a request) and
end-to-end latency are measured by the client. Meanwhile ``/health`` is polled every 0.25 s. Per rate:
requests sent, completed, 429 share (refused at capacity, at once), other errors, TTFT / ITL / e2e
p50 and p99 of completed requests, goodput (completed requests per second that met the SLOs
``--slo-ttft`` and ``--slo-e2e``) and the ``/health`` p99.

The load side is one function per request (:func:`one_request` -> :class:`Sample`) and one summary
(:func:`summarize`), so an external load generator (guidellm, locust) can replace :func:`run_rate`
and still report the same table: feed its per-request records to ``summarize``.

    python benchmarks/saturation.py --model tiny-random:llama --rates 2,8,32     # starts an LLM server
    python benchmarks/saturation.py --url http://127.0.0.1:8000/v1 --served-model NAME   # any server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402


@dataclass
class Sample:
    """One request as the client saw it."""

    status: int  # HTTP status (0: no answer: connection error or client timeout)
    e2e_s: float
    ttft_s: float | None = None  # None: no token arrived
    gaps_s: list[float] = field(default_factory=list)  # between content chunks


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    start = time.perf_counter()
    first, last, gaps = None, None, []
    try:
        async with client.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Sample(resp.status_code, time.perf_counter() - start)
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                if not choices[0].get("delta", {}).get("content"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    except (httpx.HTTPError, json.JSONDecodeError):
        return Sample(0, time.perf_counter() - start)
    return Sample(200, time.perf_counter() - start, None if first is None else first - start, gaps)


async def _health(client: httpx.AsyncClient, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):
            await client.get(url)
        out.append(time.perf_counter() - start)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def run_rate(url: str, body: dict, rate: float, duration_s: float, seed: int = 0) -> tuple[list[Sample],
                                                                                                   list[float]]:
    """Poisson arrivals at ``rate`` requests/s for ``duration_s``; every request's Sample and /health latencies."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    health: list[float] = []
    async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as client, \
            httpx.AsyncClient(timeout=60, trust_env=False) as prober:
        stop = asyncio.Event()
        poll = asyncio.create_task(_health(prober, f"{url.removesuffix('/v1')}/health", stop, health))
        tasks, start = [], time.perf_counter()
        next_at = rng.expovariate(rate)
        while next_at < duration_s:
            await asyncio.sleep(max(0.0, start + next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(client, url, body)))
            next_at += rng.expovariate(rate)
        samples = list(await asyncio.gather(*tasks))
        stop.set()
        await poll
    return samples, health


def summarize(samples: list[Sample], health_s: list[float], wall_s: float, *, slo_ttft_s: float,
              slo_e2e_s: float) -> dict:
    """The sweep's row for one rate (any load generator's per-request records will do)."""
    ok = [s for s in samples if s.status == 200 and s.ttft_s is not None]
    itl = [sum(s.gaps_s) / len(s.gaps_s) for s in ok if s.gaps_s]
    good = [s for s in ok if s.ttft_s <= slo_ttft_s and s.e2e_s <= slo_e2e_s]
    sent = max(1, len(samples))
    return {"sent": len(samples), "ok": len(ok), "share_429": sum(s.status == 429 for s in samples) / sent,
            "errors": sum(s.status not in (200, 429) for s in samples),
            "ttft_p50": _pct([s.ttft_s for s in ok], 0.5), "ttft_p99": _pct([s.ttft_s for s in ok], 0.99),
            "itl_p50": _pct(itl, 0.5), "itl_p99": _pct(itl, 0.99),
            "e2e_p50": _pct([s.e2e_s for s in ok], 0.5), "e2e_p99": _pct([s.e2e_s for s in ok], 0.99),
            "goodput_rps": len(good) / wall_s, "health_p99": _pct(health_s, 0.99)}


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def sweep(url: str, model: str, rates: list[float], *, duration_s: float, max_tokens: int, slo_ttft_s: float,
          slo_e2e_s: float) -> list[dict]:
    """Run every rate in turn and print one table row each."""
    body = {"model": model, "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
            "max_tokens": max_tokens, "temperature": 0}
    print("| rate req/s | sent | ok | 429 share | errors | TTFT p50/p99 s | ITL p50/p99 ms | e2e p50/p99 s "
          "| goodput req/s | /health p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for rate in rates:
        start = time.perf_counter()
        samples, health = asyncio.run(run_rate(url, body, rate, duration_s))
        row = {"rate": rate, **summarize(samples, health, time.perf_counter() - start, slo_ttft_s=slo_ttft_s,
                                         slo_e2e_s=slo_e2e_s)}
        rows.append(row)
        print(f"| {rate:g} | {row['sent']} | {row['ok']} | {row['share_429']:.0%} | {row['errors']} | "
              f"{_fmt(row['ttft_p50'])}/{_fmt(row['ttft_p99'])} | {_fmt(row['itl_p50'], 1e3, 0)}/"
              f"{_fmt(row['itl_p99'], 1e3, 0)} | {_fmt(row['e2e_p50'])}/{_fmt(row['e2e_p99'])} | "
              f"{row['goodput_rps']:.2f} | {_fmt(row['health_p99'], 1e3, 0)} |", flush=True)
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rates", default="1,4,16", help="request rates (req/s), comma-separated, up to beyond capacity")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    ap.add_argument("--sat-max-tokens", type=int, default=32, help="max new tokens per request")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO: time to first token (s)")
    ap.add_argument("--slo-e2e", type=float, default=20.0, help="goodput SLO: end-to-end latency (s)")
    ap.add_argument("--sat-batch-size", type=int, default=8, help="max_batch_size of the server this starts")
    ap.add_argument("--sat-queue", type=int, default=16, help="max_queued_requests of the server this starts")


def run(args: argparse.Namespace, model_spec: str, threads: int, port: int) -> list[dict]:
    """Start an LLM server for ``model_spec`` (or use ``args.url``) and sweep it."""
    rates = [float(r) for r in args.rates.split(",")]
    kw = {"duration_s": args.duration, "max_tokens": args.sat_max_tokens, "slo_ttft_s": args.slo_ttft,
          "slo_e2e_s": args.slo_e2e}
    if getattr(args, "url", None):
        return sweep(args.url, args.served_model, rates, **kw)
    from subq.serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server

    cfg = LLMServerConfig(model=model_spec, port=port, route_prefix="/bench-saturation", app_name="bench-saturation",
                          max_batch_size=args.sat_batch_size, max_queued_requests=args.sat_queue, num_cpus=0.5,
                          torch_threads=threads, max_new_tokens=max(args.sat_max_tokens, 16))
    url = start_llm_server(cfg)
    print(f"saturation sweep: {model_spec}, max_batch_size {cfg.max_batch_size}, max_queued_requests "
          f"{cfg.max_queued_requests}, {args.sat_max_tokens} new tokens a request, {args.duration:g} s per rate")
    try:
        httpx.post(f"{url}/chat/completions", timeout=300, trust_env=False,  # warm-up
                   json={"model": cfg.served_model_name, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 2}).raise_for_status()
        return sweep(url, cfg.served_model_name, rates, **kw)
    finally:
        stop_llm_server(cfg)


def main() -> None:
    from subq.runtime import configure_env

    configure_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="what the started server serves")
    ap.add_argument("--url", help="sweep this running server's OpenAI base URL (…/v1) instead of starting one")
    ap.add_argument("--served-model", default="", help="the model name to send with --url")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the started server")
    ap.add_argument("--port", type=int, default=8766)
    add_arguments(ap)
    args = ap.parse_args()
    run(args, args.model, args.threads, args.port)


if __name__ == "__main__":
    main()
