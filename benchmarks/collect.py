"""Collection throughput and fault tolerance against a local test teacher with fixed latency.

Prints, in one run on one machine:
- capacity: calls/s the test server sustains with 256 concurrent raw HTTP clients;
- (a) a plain asyncio client with 10 concurrent requests (the paper's collection method);
- (b) `subq` collection (Ray Data actor pool, three stages) on the same server;
- (b)/(a) and (b)/capacity;
- then (b) again with 10% injected faults (429, 500, hang, disconnect, malformed, 400):
  records lost, duplicate keys, calls paid twice, and calls sent by a resume (all must be 0).

    python benchmarks/collect.py --problems 256 --latency 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from subq.runtime import configure_env, init_ray  # noqa: E402

configure_env()

import httpx  # noqa: E402 - stats of the test server
import openai  # noqa: E402

from actors.collect import CollectConfig, run_collect  # noqa: E402
from actors.prices import PriceTable  # noqa: E402
from actors.teacher import TeacherConfig  # noqa: E402
from data_store.store import Store  # noqa: E402
from protocol.prompts import decompose_messages  # noqa: E402

MODEL = "test-teacher"


class ServerProcess:
    """The test teacher in its own process, so it never competes with the client's event loop."""

    def __init__(self, latency: float, fault_rate: float = 0.0):
        args = [sys.executable, "-m", "tests.teacher_server", "--port", "0", "--latency", str(latency),
                "--model", MODEL, "--fault-rate", str(fault_rate), "--retry-after", "0.2", "--hang", "5"]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY"):
            raise RuntimeError(f"test server did not start: {line!r}")
        self.base_url = line.split()[1]

    def stats(self) -> dict:
        return httpx.get(self.base_url.removesuffix("/v1") + "/stats", timeout=10).json()

    def reset(self) -> None:
        httpx.post(self.base_url.removesuffix("/v1") + "/stats/reset", timeout=10)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


async def _capacity(base_url: str, calls: int, concurrency: int) -> float:
    """Calls/s with many requests in flight (AsyncOpenAI: raw httpx with hundreds of connections
    is slower than the server here, so it would understate capacity)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.chat.completions.create(
                model=MODEL, messages=decompose_messages(f"Capacity probe {i}: how many apples?"))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    elapsed = time.perf_counter() - start
    await client.close()
    return calls / elapsed


async def _plain_asyncio(base_url: str, problems: list[str], concurrency: int = 10) -> float:
    """The paper's way: one AsyncOpenAI client, a semaphore of 10, decompose calls only."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="test")
    sem = asyncio.Semaphore(concurrency)

    async def one(q: str) -> None:
        async with sem:
            await client.chat.completions.create(model=MODEL, messages=decompose_messages(q), temperature=0.7)

    start = time.perf_counter()
    await asyncio.gather(*(one(q) for q in problems))
    elapsed = time.perf_counter() - start
    await client.close()
    return len(problems) / elapsed


def _subq(base_url: str, store: str, spec: str, args: argparse.Namespace) -> tuple[float, object]:
    cfg = CollectConfig(
        problems=spec, store=store,
        teacher=TeacherConfig(base_url=base_url, model=MODEL, timeout_s=2.0, max_attempts=6,
                              backoff_initial_s=0.05, backoff_max_s=1.0),
        samples_per_problem=3, feedback_samples=3, batch_size=args.batch_size,
        min_actors=1, max_actors=args.max_actors, progress=False,
        prices=PriceTable().with_price(MODEL, 0.5, 1.5),
    )
    start = time.perf_counter()
    report = run_collect(cfg)
    return time.perf_counter() - start, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--max-actors", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    spec = f"gsm8k:train[:{args.problems}]"
    from data_store.datasets import load_problems

    questions = [p["question"] for p in load_problems(spec)]
    init_ray()
    print(f"latency {args.latency * 1000:.0f} ms per call, {args.problems} problems x 3 samples x 3 judgements")

    srv = ServerProcess(args.latency)
    try:
        capacity = asyncio.run(_capacity(srv.base_url, 2000, 128))
        plain = asyncio.run(_plain_asyncio(srv.base_url, questions * 3))
        srv.reset()
        with tempfile.TemporaryDirectory() as store:
            wall, report = _subq(srv.base_url, store, spec, args)
            calls = srv.stats()["requests"]
        ours = calls / wall
        print(f"capacity (128 in flight):       {capacity:8.1f} calls/s")
        print(f"(a) plain asyncio, 10 in flight: {plain:8.1f} calls/s")
        print(f"(b) subq collect ({calls} calls):  {ours:8.1f} calls/s  (wall {wall:.1f} s incl. actor start-up)")
        print(f"(b)/(a) = {ours / plain:.2f}   (b)/capacity = {ours / capacity:.2f}")
        print("    by stage: " + ", ".join(f"{k} {v.written} rows" for k, v in report.stages.items()))
    finally:
        srv.close()

    srv = ServerProcess(args.latency, fault_rate=0.1)
    try:
        with tempfile.TemporaryDirectory() as store:
            wall, report = _subq(srv.base_url, store, spec, args)
            stats = srv.stats()
            rows = Store(store).read_rows("samples", ["sample_key", "status"])
            keys = Counter(r["sample_key"] for r in rows)
            srv.reset()
            _subq(srv.base_url, store, spec, args)
            resume_calls = srv.stats()["requests"]
        expected = args.problems * 3
        outcomes = {k: v for k, v in stats["by_outcome"].items() if v}
        print(f"with 10% faults: {stats['requests']} requests {outcomes}, "
              f"{stats['requests'] / wall:.1f} requests/s")
        print(f"  samples stored {len(rows)}/{expected}: lost {expected - len(keys)}, "
              f"duplicated {sum(v - 1 for v in keys.values())}, "
              f"paid twice {sum(v > 1 for v in stats['billed_by_content'].values())}, "
              f"calls sent by a resume {resume_calls}; status {dict(Counter(r['status'] for r in rows))}")
    finally:
        srv.close()


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
