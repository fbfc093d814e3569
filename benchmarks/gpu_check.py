"""The GPU check: Ray Train BC and ILQL with ``use_gpu`` and bf16, then both Serve apps on the GPU, next
to the same work on the CPU. Run it through ``benchmarks/gpu_check.sh`` (which sets up the
environment); ``--cpu`` rehearses every step on the CPU with a tiny model.

Steps, per device (cuda first when there is one, then cpu):

1. BC: ``learner.train.run_train`` on GSM8K train problems with their socratic sub-questions
   (``source="reference"``), 1 worker, ``--steps`` optimizer steps, reporting every steps/4;
2. ILQL from that BC checkpoint, the same way (full rewards: usefulness 1.0 and correct 1.0);
3. the ILQL checkpoint served by the decomposer (student format, guided decoding with beta 1 through
   its heads, ``dtype="auto"``: bf16 on the GPU), ``--clients`` concurrent closed-loop clients;
4. the same checkpoint served by the LLM server as a plain causal LM, the same load.

Prints per step: learner tokens/s (median of ``charts/tokens_per_s`` over the report windows after the
first, which holds the warm-up) and the approximate step time (batch x mean episode length / tokens/s), serving requests/s, completion tokens/s and p50 latency; then one table with
the GPU and CPU figures side by side and their ratio. Exits non-zero if any step fails.

    bash benchmarks/gpu_check.sh            # on the GPU machine (see its header for the set-up)
    bash benchmarks/gpu_check.sh --cpu      # dry run here: tiny model, CPU only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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

GPU_MODEL = "tiny-random:llama?layers=8&hidden=512&heads=8&ctx=2048&seed=0"  # ~20M parameters, built in code
CPU_MODEL = "tiny-random:llama?layers=2&hidden=64&heads=4&ctx=1024&seed=0"


def train(algo: str, init: str, store: str, out: Path, device: str, args: argparse.Namespace) -> dict:
    from subq.learner.models import load_tokenizer
    from subq.learner.train import TrainConfig, build_episodes, run_train

    every = max(1, args.steps // 4)  # each report costs Ray Train ~2 s of wall time (not of tokens/s)
    cfg = TrainConfig(algo=algo, init=init, store=store, out=str(out), source="reference", num_workers=1,
                      use_gpu=device == "cuda", bf16=True, batch_size=args.batch_size, max_length=args.max_length,
                      max_steps=args.steps, epochs=100, report_every=every, checkpoint_every=10**6, progress=False)
    episodes, _ = build_episodes(cfg, load_tokenizer(init))
    mean_tokens = statistics.mean(len(e["input_ids"]) for e in episodes)
    start = time.perf_counter()
    summary = run_train(cfg)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the first window holds the first step's warm-up (CUDA kernels, the data shard's start)
    rates = [m["charts/tokens_per_s"] for m in lines if m.get("step", 0) > every] or [lines[-1]["charts/tokens_per_s"]]
    rate = statistics.median(rates)
    result = {"final": summary["final"], "tokens_per_s": rate, "step_s": args.batch_size * mean_tokens / rate,
              "wall_s": wall, "steps": summary["step"]}
    if summary["step"] != args.steps:
        raise RuntimeError(f"{algo} on {device} ran {summary['step']} steps, expected {args.steps}")
    print(f"   {device} {algo:<5} {summary['step']} steps: {rate:9.0f} tokens/s (median after the first report), "
          f"~{result['step_s']:.3f} s/step, run_train {wall:.1f} s", flush=True)
    return result


async def _load(url: str, path: str, bodies: list[dict], clients: int) -> tuple[float, list[float], int]:
    pending = list(reversed(bodies))
    latencies: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=clients + 2)) as http:

        async def client() -> None:
            nonlocal tokens
            while pending:
                body = pending.pop()
                t = time.perf_counter()
                resp = await http.post(path, json=body)
                latencies.append(time.perf_counter() - t)
                resp.raise_for_status()
                tokens += resp.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start, latencies, tokens


def serve_load(name: str, url: str, path: str, bodies: list[dict], device: str, args: argparse.Namespace) -> dict:
    httpx.post(f"{url}{path}", json=bodies[0], timeout=600, trust_env=False).raise_for_status()  # warm-up
    wall, latencies, tokens = asyncio.run(_load(url, path, bodies, args.clients))
    stats = httpx.get(f"{url}/stats", timeout=30, trust_env=False).json()
    result = {"rps": len(bodies) / wall, "tokens_per_s": tokens / wall, "p50": statistics.median(latencies)}
    print(f"   {device} {name:<10} {len(bodies)} requests, {args.clients} clients: {result['rps']:7.2f} req/s, "
          f"{result['tokens_per_s']:8.0f} tokens/s, p50 {result['p50']:.2f} s (replica: {stats['device']}, "
          f"{stats['dtype']}, {stats['max_batch_rows']} rows at most per step)", flush=True)
    return result


def serve_both(ckpt: str, device: str, problems: list[str], args: argparse.Namespace) -> dict[str, dict]:
    from subq.serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer
    from subq.serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server

    gpus = 1.0 if device == "cuda" else 0.0
    n = args.requests
    out: dict[str, dict] = {}
    dec = DecomposerConfig(model=ckpt, port=args.port, route_prefix="/gpu-check-dec", app_name="gpu-check-dec",
                           num_gpus=gpus, num_cpus=1, max_batch_size=args.clients, max_new_tokens=args.new_tokens,
                           batch_wait_timeout_s=0.05)
    url = start_decomposer(dec)
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=60) as http:
            if not http.get("/stats").json()["has_heads"]:
                raise RuntimeError("the ILQL checkpoint was served without its heads")
        bodies = [{"problem": problems[i % len(problems)], "beta": 1.0, "max_tokens": args.new_tokens}
                  for i in range(n)]
        out["decomposer"] = serve_load("decomposer", url, "/decompose", bodies, device, args)
    finally:
        stop_decomposer(dec)
    llm = LLMServerConfig(model=ckpt, port=args.port, route_prefix="/gpu-check-llm", app_name="gpu-check-llm",
                          num_gpus=gpus, num_cpus=1, max_batch_size=args.clients, max_new_tokens=args.new_tokens)
    url = start_llm_server(llm).removesuffix("/v1")
    try:
        bodies = [{"messages": [{"role": "user", "content": problems[i % len(problems)]}], "temperature": 0.7,
                   "seed": i, "max_tokens": args.new_tokens} for i in range(n)]
        out["llm-server"] = serve_load("llm-server", url, "/v1/chat/completions", bodies, device, args)
    finally:
        stop_llm_server(llm)
    return out


def run_device(device: str, store: str, tmp: Path, problems: list[str], args: argparse.Namespace) -> dict:
    print(f"{device}: model {args.model}", flush=True)
    bc = train("bc", args.model, store, tmp / f"{device}-bc", device, args)
    ilql = train("ilql", bc["final"], store, tmp / f"{device}-ilql", device, args)
    return {"bc": bc, "ilql": ilql, **serve_both(ilql["final"], device, problems, args)}


def table(results: dict[str, dict]) -> None:
    rows = [("BC tokens/s", "bc", "tokens_per_s"), ("BC s/step (approx.)", "bc", "step_s"),
            ("ILQL tokens/s", "ilql", "tokens_per_s"), ("ILQL s/step (approx.)", "ilql", "step_s"),
            ("decomposer req/s (guided)", "decomposer", "rps"), ("decomposer tokens/s", "decomposer", "tokens_per_s"),
            ("decomposer p50 s", "decomposer", "p50"), ("llm-server req/s", "llm-server", "rps"),
            ("llm-server tokens/s", "llm-server", "tokens_per_s"), ("llm-server p50 s", "llm-server", "p50")]
    gpu, cpu = results.get("cuda"), results.get("cpu")
    print(f"\n{'':<28}{'GPU':>12}{'CPU':>12}{'GPU / CPU':>12}")
    for label, part, key in rows:
        g = gpu[part][key] if gpu else None
        c = cpu[part][key] if cpu else None
        ratio = f"x{g / c:.1f}" if g is not None and c else "—"
        print(f"{label:<28}{_fmt(g):>12}{_fmt(c):>12}{ratio:>12}")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run: CPU only, tiny model, small sizes")
    ap.add_argument("--model", help=f"model spec (default: {GPU_MODEL} on a GPU, {CPU_MODEL} with --cpu)")
    ap.add_argument("--steps", type=int, help="optimizer steps per algorithm (default 20 on a GPU, 3 with --cpu)")
    ap.add_argument("--batch-size", type=int, help="episodes per step (default 16, 4 with --cpu)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per episode (byte-level tokenizer)")
    ap.add_argument("--requests", type=int, help="requests per served app (default 128, 16 with --cpu)")
    ap.add_argument("--clients", type=int, help="concurrent clients = max_batch_size (default 32, 4 with --cpu)")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per request")
    ap.add_argument("--skip-cpu", action="store_true", help="GPU figures only")
    ap.add_argument("--port", type=int, default=8790)
    args = ap.parse_args()
    small = args.cpu
    args.model = args.model or (CPU_MODEL if small else GPU_MODEL)
    args.steps = args.steps or (3 if small else 20)
    args.batch_size = args.batch_size or (4 if small else 16)
    args.requests = args.requests or (16 if small else 128)
    args.clients = args.clients or (4 if small else 32)
    devices = ["cpu"] if args.cpu else ["cuda", *([] if args.skip_cpu else ["cpu"])]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; run with --cpu for the dry run")
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, {os.cpu_count()} CPUs"
          + (f", {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}" if "cuda" in devices else ""),
          flush=True)
    from subq.data_store.datasets import load_problems
    from subq.data_store.store import Store

    started = time.perf_counter()
    init_ray()
    rows = load_problems(f"gsm8k:train[:{max(64, args.batch_size * args.steps)}]")
    problems = [p["question"] for p in load_problems("gsm8k:test[:64]")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="subq-gpu-check-") as tmp:
        Store(f"{tmp}/store").append("problems", rows)
        for device in devices:
            results[device] = run_device(device, f"{tmp}/store", Path(tmp), problems, args)
    table(results)
    print(f"\ngpu_check finished in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
