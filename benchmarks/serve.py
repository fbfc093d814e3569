"""Decomposer serving: mixed-load latency, batched vs. unbatched, ILQL-guided vs. plain, KV cache vs. recompute.

Prints, in one run on one machine, for a checkpoint made from --model with fresh ILQL heads (student
prompt format, GSM8K test problems, every request asking for --max-tokens new tokens):

1. requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients (closed loop: each client sends
   its next request when its previous one is answered) against two Serve apps of the same checkpoint,
   measured one after the other: ``max_batch_size=32`` (batched) and ``max_batch_size=1`` (unbatched);
   mean rows per step and forward passes from the app's /stats; the batched/unbatched ratio per level.
   With few requests per level, p99 is close to the maximum.
2. ILQL-guided (beta = ILQLConfig.beta) vs. plain (beta 0) decoding through the batched app at 1 and 8
   clients. The heads' output layers are zeroed, so Q - V = 0: both decode the same tokens (asserted)
   and the difference is the cost of evaluating the heads and mixing their scores in.
3. Mixed load (head-of-line blocking): --long-clients closed-loop clients send --long-tokens requests
   while short requests (--short-tokens new tokens) arrive every --short-interval s; p50/p99 latency of
   the short ones, on this tree's decomposer (continuous batching: a request joins the running batch
   between decoding steps) and, with --baseline-tree, on the same checkpoint served by another checkout
   (e.g. ``git worktree add /tmp/subq-main main``; its ``subq serve`` runs as a subprocess with its own
   local Ray, after this tree's apps are gone), with the ratio. Both use --mixed-batch-size.
4. Guided decoding in-process (serve's Decoder, the heads randomised) with the KV cache vs.
   recomputing the whole prefix at every token (paper 1's released decoder), a small batch: tokens/s
   and the speed-up; the two outputs must be identical (asserted).

5. With --saturation: a request-rate sweep up to beyond capacity against the LLM server serving
   --model with a bounded queue (``benchmarks/saturation.py``, also runnable alone and against any
   server): TTFT / ITL / end-to-end p50/p99, goodput, 429 share and /health p99 at each rate.

    python benchmarks/serve.py --baseline-tree /tmp/subq-main   # SmolLM2-135M (~12 min on 2 busy cores)
    python benchmarks/serve.py --model tiny-random:llama        # quick
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from subq.runtime import configure_env, init_ray  # noqa: E402

configure_env()

import httpx  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from subq.data_store.datasets import load_problems  # noqa: E402
from subq.learner.checkpoint import save_checkpoint  # noqa: E402
from subq.learner.ilql import ILQLConfig, ILQLHeads  # noqa: E402
from subq.learner.models import load_model_and_tokenizer  # noqa: E402
from subq.serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer  # noqa: E402
from subq.serve.decomposer_model import Decoder, Job  # noqa: E402

from benchmarks import saturation  # noqa: E402


def _checkpoint(model_spec: str, path: Path) -> Path:
    """``model_spec`` saved as an ILQL checkpoint whose heads output Q = V = 0 (guidance changes nothing)."""
    model, tok = load_model_and_tokenizer(model_spec)
    torch.manual_seed(0)
    heads = ILQLHeads.for_model(model)
    with torch.no_grad():
        for head in (heads.v_head, heads.q1_head, heads.q2_head, heads.target_q1, heads.target_q2):
            last = head[-1] if isinstance(head, torch.nn.Sequential) else head
            last.weight.zero_()
            last.bias.zero_()
    return save_checkpoint(path, model, tok, algo="ilql", config={"algo": "ilql", "init": model_spec},
                           heads=heads, extra={"algo_config": ILQLConfig()})


def _pct(values: list[float], q: float) -> float:
    """The q-quantile by the nearest-rank method (p99 of 32 samples is their maximum)."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


async def _closed_loop(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], list[dict]]:
    """Send ``bodies`` with ``clients`` concurrent clients; wall seconds, latencies, responses."""
    pending = list(reversed(bodies))
    latencies: list[float] = []
    replies: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=900, trust_env=False, limits=limits) as http:

        async def client() -> None:
            while pending:
                body = pending.pop()
                t = time.perf_counter()
                resp = await http.post("/decompose", json=body)
                latencies.append(time.perf_counter() - t)
                resp.raise_for_status()
                replies.append({**resp.json(), "problem": body["problem"]})

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start, latencies, replies


def _level(url: str, bodies: list[dict], clients: int) -> dict:
    stats = httpx.get(f"{url}/stats", trust_env=False).json()
    wall, latencies, replies = asyncio.run(_closed_loop(url, bodies, clients))
    after = httpx.get(f"{url}/stats", trust_env=False).json()
    steps = after["steps"] - stats["steps"]
    return {"clients": clients, "requests": len(bodies), "rps": len(bodies) / wall,
            "p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99),
            "tokens": sum(r["usage"]["completion_tokens"] for r in replies), "wall": wall,
            "batch": (after["row_steps"] - stats["row_steps"]) / max(1, steps),
            "passes": after["forward_passes"] - stats["forward_passes"], "replies": replies}


def _row(name: str, r: dict) -> str:
    return (f"   {r['clients']:>7}  {name:<10} {r['requests']:>8}  {r['rps']:7.3f}  {r['p50']:7.2f}  {r['p99']:7.2f}"
            f"  {r['tokens'] / r['wall']:8.1f}  {r['batch']:9.1f}  {r['passes']:>6}")


HEADER = "   clients  app        requests    req/s    p50 s    p99 s  tokens/s  rows/step  passes"


def bench_batching(args: argparse.Namespace, urls: dict[str, str], problems: list[str]) -> None:
    levels = [int(x) for x in args.levels.split(",")]
    print(f"1. /decompose, closed loop, {args.max_tokens} max new tokens, greedy, beta 0; "
          f"batched = max_batch_size {args.batch_size}, unbatched = 1:")
    print(HEADER)
    ratios = []
    for clients in levels:
        n = args.serial_requests if clients == 1 else max(clients, args.requests)
        bodies = [{"problem": problems[i % len(problems)], "max_tokens": args.max_tokens, "beta": 0}
                  for i in range(n)]
        results = {name: _level(urls[name], bodies, clients) for name in ("batched", "unbatched")}
        for name, r in results.items():
            print(_row(name, r), flush=True)
        ratios.append(f"x{results['batched']['rps'] / results['unbatched']['rps']:.2f} at {clients}")
    print(f"   batched / unbatched requests/s: {', '.join(ratios)}")


def bench_guidance(args: argparse.Namespace, url: str, problems: list[str]) -> None:
    beta = ILQLConfig().beta
    print(f"2. ILQL-guided (beta {beta}, heads evaluated, Q - V = 0) vs. plain (beta 0), batched app:")
    print(HEADER)
    for clients, n in ((1, args.serial_requests // 2 or 1), (8, max(8, args.requests // 2))):
        out = {}
        for name, b in (("plain", 0.0), ("guided", beta)):
            bodies = [{"problem": problems[i % len(problems)], "max_tokens": args.max_tokens, "beta": b}
                      for i in range(n)]
            out[name] = _level(url, bodies, clients)
            print(_row(name, out[name]), flush=True)
        same = sorted((r["problem"], r["raw"]) for r in out["plain"]["replies"]) == sorted(
            (r["problem"], r["raw"]) for r in out["guided"]["replies"])
        if not same:
            raise AssertionError("guided decoding with Q - V = 0 changed the output")
        print(f"   guided / plain at {clients} client(s): p50 latency x{out['guided']['p50'] / out['plain']['p50']:.2f}, "
              f"requests/s x{out['guided']['rps'] / out['plain']['rps']:.2f} (same tokens: yes)")


async def _mixed(url: str, args: argparse.Namespace, problems: list[str]) -> list[float]:
    """Latencies of the short requests sent every --short-interval s while --long-clients closed-loop
    clients keep long requests running."""
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=args.long_clients + args.short_requests + 2)
    async with httpx.AsyncClient(base_url=url, timeout=900, trust_env=False, limits=limits) as http:

        async def long_client(k: int) -> None:
            i = k
            while not stop.is_set():
                body = {"problem": problems[i % len(problems)], "max_tokens": args.long_tokens, "beta": 0}
                (await http.post("/decompose", json=body)).raise_for_status()
                i += args.long_clients

        async def short(i: int) -> float:
            await asyncio.sleep(i * args.short_interval)
            body = {"problem": problems[-1 - i % len(problems)], "max_tokens": args.short_tokens, "beta": 0}
            t = time.perf_counter()
            (await http.post("/decompose", json=body)).raise_for_status()
            return time.perf_counter() - t

        longs = [asyncio.create_task(long_client(k)) for k in range(args.long_clients)]
        await asyncio.sleep(args.short_interval)  # the long requests are decoding before the first short one
        latencies = await asyncio.gather(*(short(i) for i in range(args.short_requests)))
        stop.set()
        await asyncio.gather(*longs)
    return list(latencies)


def bench_mixed(args: argparse.Namespace, name: str, url: str, problems: list[str]) -> dict:
    httpx.post(f"{url}/decompose", json={"problem": problems[0], "max_tokens": 2}, timeout=300,
               trust_env=False).raise_for_status()  # warm-up
    latencies = asyncio.run(_mixed(url, args, problems))
    result = {"name": name, "p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99), "max": max(latencies)}
    print(f"   {name:<34} p50 {result['p50']:6.2f} s   p99 {result['p99']:6.2f} s   ({len(latencies)} short requests)",
          flush=True)
    return result


def baseline_mixed(args: argparse.Namespace, ckpt: Path, problems: list[str]) -> dict:
    """The same mixed load against ``subq serve`` of --baseline-tree, in a subprocess with its own local Ray."""
    tree = Path(args.baseline_tree).resolve()
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(tree), "TMPDIR": os.environ.get("TMPDIR", tempfile.gettempdir())}
    port = args.port + 1
    cmd = [sys.executable, "-c", "import sys; from subq.cli import main; sys.exit(main())", "serve",
           "--checkpoint", str(ckpt), "--port", str(port), "--max-batch-size", str(args.mixed_batch_size),
           "--max-new-tokens", str(max(args.long_tokens, args.max_tokens))]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the baseline server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the baseline server did not answer /health in 300 s")
            time.sleep(1)
        return bench_mixed(args, f"baseline {tree.name}" + (f" @ {commit}" if commit else ""), url, problems)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # subq serve deletes its app; its local Ray goes with it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_cache(args: argparse.Namespace, ckpt: Path, problems: list[str]) -> None:
    decoder = Decoder.load(str(ckpt))
    torch.manual_seed(1)
    with torch.no_grad():  # random heads: the guidance really steers, so the equality below means something
        for p in decoder.heads.parameters():
            p.normal_(0.0, 0.02)
    beta = ILQLConfig().beta
    jobs = [Job(decoder.prompt_ids(p), beta=beta, max_tokens=args.cache_tokens) for p in problems[:args.cache_prompts]]
    decoder.decode([Job(jobs[0].prompt, beta=beta, max_tokens=2)])  # warm-up
    timings = {}
    outputs = {}
    for use_cache in (True, False):
        t = time.perf_counter()
        outputs[use_cache] = decoder.decode(jobs, use_cache=use_cache)
        timings[use_cache] = time.perf_counter() - t
    tokens = sum(d.generated_tokens for d in outputs[True].decoded)
    width = max(len(j.prompt) for j in jobs)
    print(f"4. guided decoding in-process (serve Decoder, beta {beta}, random heads), {len(jobs)} prompts of "
          f"<= {width} tokens, {tokens} new tokens (<= {args.cache_tokens} each), {torch.get_num_threads()} threads:")
    print(f"   KV cache:          {timings[True]:7.2f} s  {tokens / timings[True]:8.1f} tokens/s")
    print(f"   recompute prefix:  {timings[False]:7.2f} s  {tokens / timings[False]:8.1f} tokens/s")
    print(f"   speed-up of the cache: x{timings[False] / timings[True]:.2f}")
    if outputs[True].decoded != outputs[False].decoded:
        raise AssertionError("cached and recomputed decoding differ")
    print("   outputs identical: yes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct",
                    help="model spec (learner/models.py); tiny-random:llama for a quick run")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least one per client)")
    ap.add_argument("--serial-requests", type=int, default=6, help="requests at 1 client")
    ap.add_argument("--max-tokens", type=int, default=48, help="max new tokens per request")
    ap.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched app")
    ap.add_argument("--batch-wait", type=float, default=0.2,
                    help="batch_wait_timeout_s of the batched app: how long an idle replica waits for company "
                         "before its first prefill (32 simultaneous requests pass the proxy over ~0.1-0.2 s here)")
    ap.add_argument("--long-clients", type=int, default=4, help="mixed load: closed-loop clients of long requests")
    ap.add_argument("--long-tokens", type=int, default=96, help="mixed load: max new tokens of a long request")
    ap.add_argument("--short-tokens", type=int, default=2, help="mixed load: max new tokens of a short request")
    ap.add_argument("--short-requests", type=int, default=12, help="mixed load: short requests sent")
    ap.add_argument("--short-interval", type=float, default=1.5, help="mixed load: seconds between short requests")
    ap.add_argument("--mixed-batch-size", type=int, default=8, help="mixed load: max_batch_size of both servers")
    ap.add_argument("--baseline-tree", help="a checkout to compare the mixed load against (e.g. main)")
    ap.add_argument("--skip-batching", action="store_true", help="only the mixed load and the KV cache sections")
    ap.add_argument("--problems", default="gsm8k:test[:64]", help="problems (data_store.datasets spec)")
    ap.add_argument("--cache-prompts", type=int, default=4, help="prompts in the KV cache comparison")
    ap.add_argument("--cache-tokens", type=int, default=24, help="new tokens in the KV cache comparison")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (replicas and this process)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--saturation", action="store_true", help="also section 5, the request-rate sweep")
    saturation.add_arguments(ap)
    args = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    problems = [p["question"] for p in load_problems(args.problems)]
    print(f"model {args.model}, torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (other processes skew every figure)")

    with tempfile.TemporaryDirectory(prefix="subq-bench-serve-") as tmp:
        ckpt = _checkpoint(args.model, Path(tmp) / "bench-ilql")
        init_ray()
        common = {"model": str(ckpt), "port": args.port, "max_new_tokens": max(args.max_tokens, args.long_tokens),
                  "num_cpus": 0.5, "torch_threads": args.threads}
        cfgs = {"batched": DecomposerConfig(route_prefix="/bench-batched", app_name="bench-batched",
                                            max_batch_size=args.batch_size, batch_wait_timeout_s=args.batch_wait,
                                            **common),
                "unbatched": DecomposerConfig(route_prefix="/bench-unbatched", app_name="bench-unbatched",
                                              max_batch_size=1, **common),
                "mixed": DecomposerConfig(route_prefix="/bench-mixed", app_name="bench-mixed",
                                          max_batch_size=args.mixed_batch_size, **common)}
        if args.skip_batching:
            cfgs = {"mixed": cfgs["mixed"]}
        t = time.perf_counter()
        urls = {name: start_decomposer(cfg) for name, cfg in cfgs.items()}
        print(f"   ({len(urls)} apps up in {time.perf_counter() - t:.1f} s)")
        try:
            for url in urls.values():  # warm-up: first forward passes, proxy routes
                httpx.post(f"{url}/decompose", json={"problem": problems[0], "max_tokens": 4}, timeout=300,
                           trust_env=False).raise_for_status()
            if not args.skip_batching:
                bench_batching(args, urls, problems)
                bench_guidance(args, urls["batched"], problems)
            print(f"3. mixed load: {args.long_clients} closed-loop clients of {args.long_tokens}-token requests, a "
                  f"{args.short_tokens}-token request every {args.short_interval} s, max_batch_size "
                  f"{args.mixed_batch_size}; latency of the short requests:")
            after = bench_mixed(args, "this tree (continuous batching)", urls["mixed"], problems)
        finally:
            for cfg in cfgs.values():
                stop_decomposer(cfg)
        if args.baseline_tree:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()  # the baseline starts its own local Ray: one Serve per cluster
            before = baseline_mixed(args, ckpt, problems)
            print(f"   short-request latency, baseline / this tree: p50 x{before['p50'] / after['p50']:.1f}, "
                  f"p99 x{before['p99'] / after['p99']:.1f}")
        bench_cache(args, ckpt, problems)
        if args.saturation:
            print("5. saturation: Poisson arrivals at each rate, streaming chat completions")
            saturation.run(args, args.model, args.threads, args.port)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
