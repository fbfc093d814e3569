"""Collection throughput, fault tolerance and use of a rate limit, against a local test teacher.

Prints, in one run on one machine (each scenario with ``--scenario``, default all three):

throughput -- a test teacher with a fixed latency and no limit:
  capacity (calls/s with 128 requests in flight), (a) a plain asyncio client with 10 in flight
  (the paper's method), (b) ``subq collect``; (b)/(a) and (b)/capacity.
storm -- a fault storm: 15% of request contents fault on their first arrival (429, 500, hang,
  disconnect, 400, fewer choices than n, cut at the token limit, slow), malformed and
  usage-less replies on every arrival, and a 5 s outage (503). Four runs on one store, the
  server's counters never reset: a run with a $ budget that stops it; a run killed with
  SIGKILL mid-way; its resume; then, the storm over, one re-run. Prints rows lost, duplicate
  keys, calls paid twice (beyond those in flight at the kill), budget overshoot in $, and rows
  left failed after the one re-run -- all must be 0.
realistic -- 1.5 s per call and a requests-per-minute limit enforced by the server (429 with
  Retry-After): achieved calls/s as a share of the limit (goal >= 0.9) and the share of calls
  answered 429 (goal < 1%), next to a plain asyncio client with 10 in flight.

    python benchmarks/collect.py --problems 256 --latency 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
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
from subq.actors.collect import CollectConfig, run_collect  # noqa: E402
from subq.actors.prices import PriceTable  # noqa: E402
from subq.actors.teacher import TeacherConfig  # noqa: E402
from subq.data_store.datasets import load_problems  # noqa: E402
from subq.data_store.schema import RETRYABLE_STATUSES  # noqa: E402
from subq.data_store.store import Store  # noqa: E402
from subq.protocol.prompts import decompose_messages  # noqa: E402

from tests.teacher_server import FaultPlan  # noqa: E402

MODEL = "test-teacher"
STORM = FaultPlan(rate=0.15, kinds=("429", "500", "hang", "disconnect", "400", "few_choices", "truncated", "slow",
                                    "malformed", "no_usage"), seed=7, persistent=("malformed", "no_usage"),
                  retry_after_s=0.2, hang_s=5.0, slow_s=2.0)
LANDING_S = 0.5  # a call answered this long before the kill counts as in flight (its write was)
REPAID_ON_PURPOSE = ("truncated",)  # a truncated reply is asked again (partial feedback keeps what it got)


class ServerProcess:
    """The test teacher in its own process, so it never competes with the client's event loop."""

    def __init__(self, latency: float, plan: FaultPlan | None = None, *extra: str):
        plan = plan or FaultPlan()
        args = [sys.executable, "-m", "tests.teacher_server", "--port", "0", "--latency", str(latency),
                "--model", MODEL, "--fault-rate", str(plan.rate), "--fault-kinds", ",".join(plan.kinds),
                "--fault-seed", str(plan.seed), "--persistent-kinds", ",".join(plan.persistent),
                "--retry-after", str(plan.retry_after_s), "--hang", str(plan.hang_s), "--slow", str(plan.slow_s),
                *extra]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY"):
            raise RuntimeError(f"test server did not start: {line!r}")
        self.base_url = line.split()[1]
        self.root = self.base_url.removesuffix("/v1")

    def stats(self) -> dict:
        return httpx.get(self.root + "/stats", timeout=10).json()

    def reset(self) -> None:
        httpx.post(self.root + "/stats/reset", timeout=10)

    def faults(self, **change) -> None:
        httpx.post(self.root + "/faults", json=change, timeout=10)

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
    """The paper's way: one AsyncOpenAI client (its default retries), a semaphore of 10."""
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


def _cfg(base_url: str, store: str, spec: str, args: argparse.Namespace, **kw) -> CollectConfig:
    teacher = TeacherConfig(base_url=base_url, model=MODEL, timeout_s=kw.pop("timeout_s", 3.0), max_attempts=6,
                            backoff_initial_s=0.05, backoff_max_s=1.0)
    return CollectConfig(problems=spec, store=store, teacher=teacher, samples_per_problem=3, feedback_samples=3,
                         batch_size=args.batch_size, min_actors=1, max_actors=args.max_actors, progress=False,
                         prices=PriceTable().with_price(MODEL, args.usd_per_m, args.usd_per_m), **kw)


def throughput(args: argparse.Namespace, spec: str, questions: list[str]) -> None:
    srv = ServerProcess(args.latency)
    try:
        capacity = asyncio.run(_capacity(srv.base_url, 2000, 128))
        plain = asyncio.run(_plain_asyncio(srv.base_url, questions * 3))
        srv.reset()
        with tempfile.TemporaryDirectory() as store:
            start = time.perf_counter()
            report = run_collect(_cfg(srv.base_url, store, spec, args))
            wall = time.perf_counter() - start
            calls = srv.stats()["requests"]
        ours = calls / wall
        print(f"[throughput] latency {args.latency * 1000:.0f} ms, {len(questions)} problems x 3 samples x 3 judgements")
        print(f"  capacity (128 in flight):       {capacity:8.1f} calls/s")
        print(f"  (a) plain asyncio, 10 in flight: {plain:8.1f} calls/s")
        print(f"  (b) subq collect ({calls} calls):  {ours:8.1f} calls/s  (wall {wall:.1f} s incl. actor start-up)")
        print(f"  (b)/(a) = {ours / plain:.2f}   (b)/capacity = {ours / capacity:.2f}   ({report.samples_total} samples)")
    finally:
        srv.close()


def _cli(srv: ServerProcess, store: str, spec: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "subq.cli", "collect", "--teacher-base-url", srv.base_url, "--teacher-model", MODEL,
            "--problems", spec, "--store", store, "--samples-per-problem", "3", "--feedback-samples", "3",
            "--batch-size", str(args.batch_size), "--max-actors", str(args.max_actors), "--timeout", "3",
            "--no-progress", *extra]


def storm(args: argparse.Namespace, spec: str, n_problems: int) -> None:
    from tests.processes import kill_tree

    usd = args.usd_per_m
    srv = ServerProcess(args.latency, STORM, "--outage-after", "120", "--outage-s", "5")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    price_file = None
    try:
        with tempfile.TemporaryDirectory() as store:
            price_file = Path(store).parent / f"prices-{os.getpid()}.json"
            price_file.write_text(f'{{"prices": {{"{MODEL}": [{usd}, {usd}]}}}}')
            prices = ["--price-table", str(price_file)]
            billed_usd = lambda st: (st["prompt_tokens"] + st["completion_tokens"]) * usd / 1e6  # noqa: E731
            # 1. a budget run (the outage falls in it): it stops at the budget
            first = subprocess.run(_cli(srv, store, spec, args, "--budget-usd", str(args.budget), *prices),
                                   cwd=ROOT, env=env, capture_output=True, text=True)
            overshoot = max(0.0, billed_usd(srv.stats()) - args.budget)
            ends = [time.time()]  # when each run ended: billing times say which run paid what
            # 2. a run killed mid-way, 3. its resume
            proc = subprocess.Popen(_cli(srv, store, spec, args, *prices), cwd=ROOT, env=env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            after_budget = Store(store).count("samples")
            target = after_budget + n_problems
            while Store(store).count("samples") < target and proc.poll() is None:
                time.sleep(0.2)
            killed_mid_run = proc.poll() is None
            in_flight_at_kill = set(srv.stats()["in_flight_keys"])
            kill_at = time.time()
            kill_tree(proc)
            in_flight_at_kill |= set(srv.stats()["in_flight_keys"])
            at_kill = Store(store).count("samples")
            resume_at = time.time()  # the server bills a call it finishes after its client died
            ends.append(resume_at)
            resume = subprocess.run(_cli(srv, store, spec, args, *prices), cwd=ROOT, env=env, capture_output=True,
                                    text=True)
            failed_before = _retryable(store)
            ends.append(time.time())
            # 4. the storm is over: one re-run
            srv.faults(content_faults=False)
            rerun = subprocess.run(_cli(srv, store, spec, args, *prices), cwd=ROOT, env=env, capture_output=True,
                                   text=True)
            time.sleep(STORM.slow_s + 1)  # the killed run's last calls finish (and are billed)
            st = srv.stats()
            rows = Store(store).read_rows("samples", ["sample_key", "attempt", "status"], history=True)
            current = Store(store).read_rows("samples", ["sample_key", "status"])
        expected = n_problems * 3
        pairs = Counter((r["sample_key"], r["attempt"]) for r in rows)
        twice = {k for k, n in st["billed_by_content"].items() if n > 1}
        on_purpose = {k for k in twice if STORM.kind_for(k) in REPAID_ON_PURPOSE}
        # answered in the last moments before the kill (paid, not yet stored) or after it (the server
        # finishes and bills a call whose client died): in flight at the kill all the same
        landing = {k for k in twice if any(kill_at - LANDING_S <= t <= resume_at for t in st["billed_at"][k])}
        server_in_flight = len(in_flight_at_kill)
        after_kill = {k for k in landing if any(kill_at < t <= resume_at for t in st["billed_at"][k])}
        in_flight_at_kill |= landing
        outcomes = {k: v for k, v in st["by_outcome"].items() if v}
        print(f"[storm] {n_problems} problems x 3 x 3 = {expected} samples, latency {args.latency * 1000:.0f} ms")
        print(f"  samples stored: {after_budget} after the budget run (exit {first.returncode}), {at_kill} at the "
              f"kill ({'mid-run' if killed_mid_run else 'it had ended: no kill'}, {server_in_flight} calls in "
              f"flight), after the resume (exit {resume.returncode}) {failed_before} left to retry, after the "
              f"re-run (exit {rerun.returncode}) {len(current)}")
        print(f"  {st['requests']} requests over 4 runs: {outcomes}")
        print(f"  rows lost {expected - len(current)}, duplicate keys {sum(n - 1 for n in pairs.values())}, "
              f"calls paid twice {len(twice - on_purpose - in_flight_at_kill)} (+{len(twice & in_flight_at_kill)} "
              f"in flight at the kill: {len(after_kill)} finished by the server after it, "
              f"{len(landing - after_kill)} answered in its last {LANDING_S} s and not yet written; "
              f"+{len(on_purpose - in_flight_at_kill)} truncated replies asked again), "
              f"budget overshoot ${overshoot:.4f} (budget ${args.budget}), "
              f"rows left failed after one re-run {_retryable_rows(current)} (before it: {failed_before})")
        print(f"  final status {dict(Counter(r['status'] for r in current))}; attempts stored {len(rows)}")
        unexplained = twice - on_purpose - in_flight_at_kill
        if unexplained:  # which stage, which fault, paid in which runs
            runs = ("budget", "killed", "resume", "re-run")
            why = Counter()
            for k in unexplained:
                per_run = Counter(runs[bisect.bisect_left(ends, t)] for t in st["billed_at"][k])
                paid_in = "+".join(f"{run}x{per_run[run]}" for run in runs if per_run[run])
                why[(st["stage_of"].get(k), STORM.kind_for(k), paid_in)] += 1
            print("  paid twice, by (stage, fault, paid in): " + "; ".join(f"{k}: {n}" for k, n in why.most_common()))
        for name, run in (("budget run", first), ("resume", resume), ("re-run", rerun)):
            out = run.stdout.strip().splitlines()
            print(f"  {name} said: {out[-1] if out else run.stderr.strip()[-300:]}")
    finally:
        srv.close()
        if price_file is not None:
            price_file.unlink(missing_ok=True)


def _retryable(store: str) -> int:
    return _retryable_rows(Store(store).read_rows("samples", ["status"]))


def _retryable_rows(rows: list[dict]) -> int:
    return sum(r["status"] in RETRYABLE_STATUSES for r in rows)


def realistic(args: argparse.Namespace, spec: str, questions: list[str]) -> None:
    rpm = args.rpm
    srv = ServerProcess(1.5, None, "--requests-per-minute", str(rpm))
    try:
        time.sleep(1.0)
        srv.reset()
        plain = asyncio.run(_plain_asyncio(srv.base_url, questions[: args.plain_calls]))
        plain_429 = srv.stats()["by_outcome"]["rate_limited"]
        time.sleep(1.0)  # the bucket refills
        srv.reset()
        with tempfile.TemporaryDirectory() as store:
            report = run_collect(_cfg(srv.base_url, store, spec, args, requests_per_minute=rpm, timeout_s=10.0))
        st = srv.stats()
        times = st["ok_times"]
        rate = (len(times) - 1) / (times[-1] - times[0])  # first answer to last, ramp-up and tail included
        lo, hi = len(times) // 10, len(times) - len(times) // 10  # the middle 80% of the answers
        steady = (hi - 1 - lo) / (times[hi - 1] - times[lo])
        limited = st["by_outcome"]["rate_limited"]
        limit = rpm / 60
        print(f"[realistic] 1.5 s per call, a limit of {rpm:.0f} requests/min ({limit:.1f}/s) enforced by the server")
        print(f"  (a) plain asyncio, 10 in flight: {plain:6.2f} calls/s = {plain / limit:.2f} of the limit "
              f"({plain_429} answered 429)")
        print(f"  (b) subq collect, --requests-per-minute {rpm:.0f}: {rate:6.2f} calls/s = {rate / limit:.2f} of the "
              f"limit from the first answer to the last ({steady / limit:.2f} over the middle 80% of the answers), "
              f"{limited} of {st['requests']} requests answered 429 ({100 * limited / st['requests']:.2f}%), "
              f"{report.samples_total} samples; (b)/(a) = {rate / plain:.2f}")
    finally:
        srv.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=["all", "throughput", "storm", "realistic"], default="all")
    ap.add_argument("--problems", type=int, default=256, help="throughput scenario")
    ap.add_argument("--storm-problems", type=int, default=48)
    ap.add_argument("--realistic-problems", type=int, default=100)
    ap.add_argument("--plain-calls", type=int, default=200, help="calls of the plain client in the realistic scenario")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--rpm", type=float, default=1200.0, help="the realistic scenario's requests-per-minute limit")
    ap.add_argument("--budget", type=float, default=2.0, help="$ budget of the storm's first run")
    ap.add_argument("--usd-per-m", type=float, default=10.0, help="$ per million tokens, in and out")
    ap.add_argument("--max-actors", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    init_ray()
    if args.scenario in ("all", "throughput"):
        spec = f"gsm8k:train[:{args.problems}]"
        throughput(args, spec, [p["question"] for p in load_problems(spec)])
    if args.scenario in ("all", "storm"):
        storm(args, f"gsm8k:train[:{args.storm_problems}]", args.storm_problems)
    if args.scenario in ("all", "realistic"):
        spec = f"gsm8k:train[:{args.realistic_problems}]"
        questions = [p["question"] for p in load_problems(f"gsm8k:train[:{max(args.plain_calls, 1)}]")]
        realistic(args, spec, questions)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
