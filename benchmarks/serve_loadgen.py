"""``subq llm-server`` under a load generator subq did not write: locust, at a few request rates.

Starts ``subq llm-server`` (a subprocess, its own Ray), waits for ``/health``, then runs locust headless
(``benchmarks/serve_locustfile.py``: ``/v1/completions``, greedy, ``--max-tokens`` each) at each rate
for ``--seconds``, and prints locust's own figures per rate: requests sent, failures, achieved req/s,
p50/p95/p99 and mean latency (ms). Needs the ``bench`` extra (``pip install -e '.[bench]'``)::

    python benchmarks/serve_loadgen.py --model tiny-random:llama --rates 1,2,4 --seconds 20
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"subq llm-server exited with {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"subq llm-server not healthy after {timeout_s:.0f} s")


def run_locust(url: str, model: str, rate: float, users: int, seconds: int, max_tokens: int, out: Path) -> dict:
    """One headless locust run; its aggregated row of the stats CSV."""
    env = {**os.environ, "LOADGEN_MODEL": model, "LOADGEN_RATE": str(rate / users),
           "LOADGEN_MAX_TOKENS": str(max_tokens)}
    prefix = out / f"rate{rate:g}"
    cmd = [shutil.which("locust") or "locust", "-f", str(HERE / "serve_locustfile.py"), "--headless", "--host", url,
           "-u", str(users), "-r", str(users), "--run-time", f"{seconds}s", "--csv", str(prefix), "--only-summary",
           "--stop-timeout", "60", "--loglevel", "WARNING"]
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # figures: the CSV
    with open(f"{prefix}_stats.csv") as f:
        return next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-random:llama", help="what subq llm-server serves")
    ap.add_argument("--rates", default="1,2,4", help="offered request rates (req/s), comma-separated")
    ap.add_argument("--users", type=int, default=8, help="locust users sharing each rate")
    ap.add_argument("--seconds", type=int, default=20, help="duration of each rate")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    ap.add_argument("--max-batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    subq = shutil.which("subq") or str(Path(sys.executable).with_name("subq"))
    server = subprocess.Popen([subq, "llm-server", "--model", args.model, "--port", str(port),
                               "--max-batch-size", str(args.max_batch_size)], stdout=subprocess.DEVNULL)
    try:
        wait_healthy(url, server, 600)
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            import json

            model = json.load(r)["data"][0]["id"]
        print(f"subq llm-server {args.model} (max_batch_size {args.max_batch_size}), locust {args.users} users, "
              f"{args.seconds} s per rate, max_tokens {args.max_tokens}")
        print(f"{'offered':>8} {'sent':>6} {'failed':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'mean ms':>8}")
        with tempfile.TemporaryDirectory() as tmp:
            for rate in (float(r) for r in args.rates.split(",")):
                row = run_locust(url, model, rate, args.users, args.seconds, args.max_tokens, Path(tmp))
                print(f"{rate:>8g} {row['Request Count']:>6} {row['Failure Count']:>6} "
                      f"{float(row['Requests/s']):>7.2f} {row['50%']:>8} {row['95%']:>8} {row['99%']:>8} "
                      f"{float(row['Average Response Time']):>8.0f}", flush=True)
    finally:
        server.terminate()  # subq llm-server deletes its app on SIGTERM
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
