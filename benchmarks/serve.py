"""Decomposer serving: batched vs. unbatched, ILQL-guided vs. plain, KV cache vs. recomputing the prefix.

Prints, in one run on one machine, for a checkpoint made from --model with fresh ILQL heads (student
prompt format, GSM8K test problems, every request asking for --max-tokens new tokens):

1. requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients (closed loop: each client sends
   its next request when its previous one is answered) against two Serve apps of the same checkpoint,
   measured one after the other: ``max_batch_size=32`` (batched) and ``max_batch_size=1`` (unbatched);
   mean batch size and forward passes from the app's /stats; the batched/unbatched ratio per level.
   With few requests per level, p99 is close to the maximum.
2. ILQL-guided (beta = ILQLConfig.beta) vs. plain (beta 0) decoding through the batched app at 1 and 8
   clients. The heads' output layers are zeroed, so Q - V = 0: both decode the same tokens (asserted)
   and the difference is the cost of evaluating the heads and mixing their scores in.
3. Guided decoding in-process (serve's Decoder, the heads randomised) with the KV cache vs.
   recomputing the whole prefix at every token (paper 1's released decoder), a small batch: tokens/s
   and the speed-up; the two outputs must be identical (asserted).

    python benchmarks/serve.py                            # SmolLM2-135M (~7 min on 2 busy cores)
    python benchmarks/serve.py --model tiny-random:llama  # quick
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
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

from data_store.datasets import load_problems  # noqa: E402
from learner.checkpoint import save_checkpoint  # noqa: E402
from learner.ilql import ILQLConfig, ILQLHeads  # noqa: E402
from learner.models import load_model_and_tokenizer  # noqa: E402
from serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer  # noqa: E402
from serve.decomposer_model import Decoder, Job  # noqa: E402


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
    batches = after["batches"] - stats["batches"]
    return {"clients": clients, "requests": len(bodies), "rps": len(bodies) / wall,
            "p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99),
            "tokens": sum(r["usage"]["completion_tokens"] for r in replies), "wall": wall,
            "batch": (after["rows"] - stats["rows"]) / max(1, batches),
            "passes": after["forward_passes"] - stats["forward_passes"], "replies": replies}


def _row(name: str, r: dict) -> str:
    return (f"   {r['clients']:>7}  {name:<10} {r['requests']:>8}  {r['rps']:7.3f}  {r['p50']:7.2f}  {r['p99']:7.2f}"
            f"  {r['tokens'] / r['wall']:8.1f}  {r['batch']:10.1f}  {r['passes']:>6}")


HEADER = "   clients  app        requests    req/s    p50 s    p99 s  tokens/s  mean batch  passes"


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
    print(f"3. guided decoding in-process (serve Decoder, beta {beta}, random heads), {len(jobs)} prompts of "
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
                    help="batch_wait_timeout_s of the batched app: long enough for 32 simultaneous requests to pass "
                         "the proxy into one batch on a busy 2-core machine (0.1 s split them into 2 x 16)")
    ap.add_argument("--problems", default="gsm8k:test[:64]", help="problems (data_store.datasets spec)")
    ap.add_argument("--cache-prompts", type=int, default=4, help="prompts in the KV cache comparison")
    ap.add_argument("--cache-tokens", type=int, default=24, help="new tokens in the KV cache comparison")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (replicas and this process)")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    problems = [p["question"] for p in load_problems(args.problems)]
    print(f"model {args.model}, torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (other processes skew every figure)")

    with tempfile.TemporaryDirectory(prefix="subq-bench-serve-") as tmp:
        ckpt = _checkpoint(args.model, Path(tmp) / "bench-ilql")
        init_ray()
        common = {"model": str(ckpt), "port": args.port, "max_new_tokens": args.max_tokens, "num_cpus": 0.5,
                  "torch_threads": args.threads}
        cfgs = {"batched": DecomposerConfig(route_prefix="/bench-batched", app_name="bench-batched",
                                            max_batch_size=args.batch_size, batch_wait_timeout_s=args.batch_wait,
                                            **common),
                "unbatched": DecomposerConfig(route_prefix="/bench-unbatched", app_name="bench-unbatched",
                                              max_batch_size=1, **common)}
        t = time.perf_counter()
        urls = {name: start_decomposer(cfg) for name, cfg in cfgs.items()}
        print(f"   (two apps up in {time.perf_counter() - t:.1f} s)")
        try:
            for url in urls.values():  # warm-up: first forward passes, proxy routes
                httpx.post(f"{url}/decompose", json={"problem": problems[0], "max_tokens": 4}, timeout=300,
                           trust_env=False).raise_for_status()
            bench_batching(args, urls, problems)
            bench_guidance(args, urls["batched"], problems)
        finally:
            for cfg in cfgs.values():
                stop_decomposer(cfg)
        bench_cache(args, ckpt, problems)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
