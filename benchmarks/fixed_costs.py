"""What a pipeline step costs before it does any work, on this machine (the floor of every tiny run).

Prints, each measured ``--repeat`` times in one Ray session (the first of each includes warm-up):

- ``import <module>``: a fresh interpreter importing what each kind of Ray worker loads (a collection
  actor, an evaluation actor, a Train worker, a served decomposer replica);
- ``train: no-op fit``: a Ray Train ``TorchTrainer`` with one CPU worker whose function returns at once
  (controller, worker group, process group, shutdown);
- ``serve: start`` / ``serve: stop``: a tiny random decomposer deployed with ``start_decomposer`` until
  ``/health`` answers, then deleted with ``stop_decomposer``; ``serve: swap``: another tiny model loaded
  into a running one with ``swap_decomposer`` (what evaluation does for every checkpoint after its first);
- ``read``: a training run's read of a small store (5 part files) through ``Store.dataset`` (Ray Data's
  V1 Parquet datasource) and through ``ray.data.read_parquet``'s default (V2: a footer-reading actor pool).

    python benchmarks/fixed_costs.py [--repeat 3]

A tiny test run of the pipeline is mostly these floors: per training run one fit plus the data step, per
served student one start and one stop, per evaluation pass one evaluation actor.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from subq.runtime import configure_env  # noqa: E402
from tests.ports import free_port  # noqa: E402

TINY = "tiny-random:llama?layers=1&hidden=32&heads=2&ctx=2048&seed=0"
WORKER_MODULES = {  # what each kind of worker imports before its first call
    "collection actor": "subq.actors.stage_worker",
    "evaluation actor": "subq.evaluation.run",
    "Train worker": "subq.learner.train_loop",
    "decomposer replica": "subq.serve.decomposer",
}


def import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT, env=os.environ)
    return time.perf_counter() - start


def _noop(config: dict) -> None:
    return None


def _same(batch):
    return batch


def reads(repeat: int) -> list[tuple[str, list[float]]]:
    """Map and count the rows of a 5-part store table (as a training run's data step reads them) through
    Store.dataset and through Ray Data's default reader."""
    import ray.data
    from subq.data_store.store import Store

    store = Store(tempfile.mkdtemp())
    for i in range(5):
        store.append("problems", [{"problem_id": f"p{i}-{j}", "dataset": "bench", "split": "train", "index": j,
                                   "question": "q", "answer_type": "number"} for j in range(20)])
    files = [str(p) for p in Path(store.root).glob("problems/*.parquet")]
    assert len(files) == 5, files
    ray.data.DataContext.get_current().enable_progress_bars = False
    ours, default = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        assert store.dataset("problems").map_batches(_same, batch_format="pyarrow").count() == 100
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert ray.data.read_parquet(files).map_batches(_same, batch_format="pyarrow").count() == 100
        default.append(time.perf_counter() - start)
    return [("read: Store.dataset, 5 part files (V1 datasource)", ours),
            ("read: ray.data.read_parquet default (V2), same files", default)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    configure_env()  # what every subq command sets before Ray starts (the imports below inherit it)
    rows: list[tuple[str, list[float]]] = []
    for kind, module in WORKER_MODULES.items():
        rows.append((f"import {module} ({kind})", [import_seconds(module) for _ in range(args.repeat)]))

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from subq.serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer, swap_decomposer

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    fits = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        TorchTrainer(_noop, scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(name="noop", storage_path=tempfile.mkdtemp())).fit()
        fits.append(time.perf_counter() - start)
    rows.append(("train: no-op fit, 1 CPU worker", fits))
    port, starts, stops = free_port(), [], []
    for i in range(args.repeat):
        cfg = DecomposerConfig(model=TINY, port=port, route_prefix=f"/bench-{i}", app_name=f"bench-{i}",
                               num_cpus=0.1, num_gpus=0, max_new_tokens=8)
        start = time.perf_counter()
        start_decomposer(cfg)
        starts.append(time.perf_counter() - start)
        start = time.perf_counter()
        stop_decomposer(cfg)
        stops.append(time.perf_counter() - start)
    rows += [("serve: start a tiny decomposer (to /health)", starts), ("serve: stop it (app deleted)", stops)]
    cfg = DecomposerConfig(model=TINY, port=port, route_prefix="/bench-swap", app_name="bench-swap", num_cpus=0.1,
                           num_gpus=0, max_new_tokens=8)
    start_decomposer(cfg)
    swaps = []
    for i in range(args.repeat):
        start = time.perf_counter()
        swap_decomposer(cfg, TINY.replace("seed=0", f"seed={i + 1}"))
        swaps.append(time.perf_counter() - start)
    stop_decomposer(cfg)
    rows.append(("serve: swap another tiny model into it", swaps))
    rows += reads(args.repeat)
    ray.shutdown()

    width = max(len(name) for name, _ in rows)
    print(f"{'what'.ljust(width)}  {'first':>7}  {'then (mean)':>11}")
    for name, secs in rows:
        rest = secs[1:] or secs
        print(f"{name.ljust(width)}  {secs[0]:6.2f}s  {sum(rest) / len(rest):10.2f}s")


if __name__ == "__main__":
    main()
