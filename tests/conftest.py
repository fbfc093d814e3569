"""Shared fixtures: one Ray instance per test session (each ray.init costs ~4 s and 0.5 GB)."""

from __future__ import annotations

import os

# Before Ray is imported anywhere (DESIGN §4).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, so each tiny run waits up to 2 s to
# learn that it started and again that it finished; the suite runs dozens (it changes no behaviour).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# ...and starts an actor per fit that watches for the node being drained (spot reclaims): no node here is
# ever drained, and the actor's start-up is ~1.5 CPU-seconds of each of the suite's ~40 fits.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Under pytest-xdist (README: `pytest -n 2`) each worker runs on cores of its own, and so do the Ray
# instances and subprocesses it starts (they inherit the mask): the two halves of the suite do not
# oversubscribe each other's cores (torch's threads spinning on a core the other half uses made an
# embedded-model test 8x slower), and each sees a smaller machine, as a test of a real run should.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cpus, _n = sorted(os.sched_getaffinity(0)), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if 1 < _n <= len(_cpus):
        os.sched_setaffinity(0, {c for i, c in enumerate(_cpus) if i % _n == int(_WORKER[2:])})

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Files in this order first (xdist hands files out in collection order, `--no-loadscope-reorder`): the
# end-to-end scenarios, heaviest first, so that both workers finish at about the same time.
FIRST = ("test_shipped_configs_run.py", "test_collect_faults.py", "test_outputs_s3.py", "test_train.py",
         "test_rounds.py", "test_collect.py", "test_pipeline_exit_codes.py", "test_cluster_job.py", "test_eval.py",
         "test_quality_benchmark.py", "test_serve_saturation.py", "test_dpo.py", "test_eval_solver_checkpoint.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(FIRST)))  # stable: the rest as collected


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is much faster than two on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3():
    """A local S3 API (moto server mode) for the session; env points boto3 and pyarrow at it."""
    from tests.s3_server import s3_server

    with s3_server() as server:
        yield server
