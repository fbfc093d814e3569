"""`ray job submit` against a real 2-node Ray cluster on loopback addresses (DESIGN §4).

The head runs on 127.0.0.2 (dashboard = Jobs API), a second raylet on 127.0.0.3 advertises
``collect_node``; a job submitted with ``--working-dir`` runs the real ``subq`` CLI against the
fault-free test teacher, and the test checks what a user would: the job succeeded, the store is
complete without duplicates, and the collection actors ran on the worker node only.

Stopping: ``ray stop`` kills *every* Ray process on the machine (it matches process names), which
would take down the pytest session's own Ray (tests/conftest.py) and other people's tests. So
every process this module starts carries a marker environment variable (set for ``ray start`` and
the teacher, inherited by GCS, raylets and dashboard), and teardown signals exactly the processes
that carry this run's marker plus their descendants (workers, agents, actors and the job driver
rename themselves and lose a readable environment, but are children of a marked raylet). A cluster
left by a crashed run (its owning pytest process is gone) is swept at start the same way.

The job command lives in ``_job_command`` alone; the assertions look only at the job status, the
store and the actors, so the command can become ``subq pipeline --config <tiny yaml>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from subq.data_store.store import Store

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `subq` live here
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
MARKER = "SUBQ_TEST_CLUSTER"  # env var on every process of a test cluster: "<owner pid>:<owner start>:<dir>"
TEST_KEY = "sk-subq-test-0123456789abcdef"  # dummy: the local teacher ignores it; must never be stored
PROBLEMS, SAMPLES = 4, 2
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 300


# --- process bookkeeping -----------------------------------------------------------------------


def _marker_of(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get(MARKER)
    except (psutil.Error, OSError):  # gone, or another user's process
        return None


def _owner_alive(marker: str) -> bool:
    pid, started, _ = marker.split(":", 2)
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1.0
    except (psutil.Error, ValueError):
        return False


def _kill(procs: list[psutil.Process], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is left, as `ray stop` does (raylet and GCS often outlive a
    SIGTERM by many seconds while they wait for each other; the test has checked everything by then)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def _sweep(predicate: Callable[[str], bool]) -> None:
    """Stop the processes whose marker satisfies ``predicate``, and all their descendants.

    Descendants matter: processes that rename themselves with setproctitle (``ray::IDLE``,
    ``ray::DashboardAgent``, the actors) overwrite their environ, so only the tree finds them. The
    whole tree is collected before the first signal, while nothing has been re-parented yet.
    """
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        if p.pid != me and (m := _marker_of(p)) and predicate(m):
            found[p.pid] = p
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in p.children(recursive=True) if c.pid != me})
    _kill(list(found.values()))


def _sweep_leftovers() -> None:
    """A crashed earlier run may have left a cluster: its owner process is gone, so it is garbage."""
    dead: set[str] = set()

    def orphaned(marker: str) -> bool:
        if _owner_alive(marker):
            return False
        dead.add(marker.split(":", 2)[2])
        return True

    _sweep(orphaned)
    for d in dead:
        shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # all interfaces: also free for the 127.0.0.x addresses
        return s.getsockname()[1]


# --- the cluster ---------------------------------------------------------------------------


@dataclass
class LoopbackCluster:
    gcs_address: str  # head's GCS, host:port
    dashboard_url: str  # Jobs API and state API
    env: dict[str, str]  # environment for `ray` CLI calls against this cluster
    temp_dir: Path
    head_node_id: str
    worker_node_id: str


def _cluster_env(marker: str) -> dict[str, str]:
    # Not RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: conftest sets it to 0, which makes `ray start --address` refuse
    # to add a node even on Linux. Unset, as on a real cluster.
    drop = {"RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        RAY_AUTH_MODE="disabled",  # DESIGN §4: else token auth may switch on from ~/.ray state
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        # the job's entrypoint is resolved by a shell on the head: `subq` must be on its PATH
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **{MARKER: marker},
    )
    return env


def _ray_start(args: list[str], env: dict[str, str], temp_dir: Path) -> None:
    out = subprocess.run([str(VENV_BIN / "ray"), "start", *args], env=env, capture_output=True, text=True,
                         timeout=START_TIMEOUT_S)
    if out.returncode != 0:
        logs = "".join(f"\n--- {f}\n{f.read_text(errors='replace')[-3000:]}"
                       for f in sorted(temp_dir.glob("session_latest/logs/raylet.*")) + sorted(
                           temp_dir.glob("session_latest/logs/gcs_server.*")))
        raise RuntimeError(f"ray start {args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                           f"{out.stderr[-3000:]}{logs}")


def _alive_nodes(dashboard_url: str) -> dict[str, str]:
    """node_ip -> node_id of the alive nodes, via the dashboard (never the session's own Ray)."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return {n.node_ip: n.node_id for n in nodes}


@pytest.fixture(scope="module")
def run_marker() -> Iterator[tuple[str, Path]]:
    """This run's marker and private temp dir; on exit, stops every process that carries the marker."""
    _sweep_leftovers()
    # Unix socket paths must stay under ~107 bytes: a short private dir, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="sq-", dir="/tmp"))
    me = psutil.Process()
    marker = f"{me.pid}:{me.create_time()}:{temp_dir}"
    try:
        yield marker, temp_dir
    finally:
        _sweep(lambda m: m == marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def loopback_cluster(run_marker: tuple[str, Path]) -> LoopbackCluster:
    marker, temp_dir = run_marker
    env = _cluster_env(marker)
    gcs_port, dash_port = _free_port(), _free_port()

    # Port 0 = the OS picks: the agent's default 52365 (it binds 127.0.0.1 too) and the metrics port
    # clash between the two nodes and with any other Ray here; a head whose agent has no HTTP server
    # answers job submissions with "No available agent to submit job".
    common = ["--disable-usage-stats", "--num-gpus=0", "--object-store-memory=200000000",
              "--dashboard-agent-listen-port=0", "--metrics-export-port=0"]

    _ray_start(["--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
                "--include-dashboard=true", f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dash_port}",
                f"--ray-client-server-port={_free_port()}", "--num-cpus=1", '--resources={"head_only": 1}',
                f"--temp-dir={temp_dir / 'h'}", *common], env, temp_dir / "h")
    _ray_start([f"--address={HEAD_IP}:{gcs_port}", f"--node-ip-address={WORKER_IP}", "--num-cpus=2",
                '--resources={"collect_node": 100}', f"--temp-dir={temp_dir / 'w'}", *common], env, temp_dir / "w")
    dashboard_url = f"http://{HEAD_IP}:{dash_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    nodes: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            nodes = _alive_nodes(dashboard_url)
        except Exception:  # dashboard still starting
            nodes = {}
        if {HEAD_IP, WORKER_IP} <= nodes.keys():
            break
        time.sleep(1)
    else:
        raise RuntimeError(f"cluster did not come up; alive nodes: {nodes}")
    return LoopbackCluster(f"{HEAD_IP}:{gcs_port}", dashboard_url, env, temp_dir, nodes[HEAD_IP], nodes[WORKER_IP])


@pytest.fixture(scope="module")
def teacher_url(run_marker: tuple[str, Path]) -> Iterator[tuple[str, str]]:
    """The fault-free test teacher in its own process on 127.0.0.1 (both raylets reach it); marked,
    so a crashed run's leftover sweep stops it too."""
    model = "test-teacher"
    env = {**os.environ, MARKER: run_marker[0]}
    proc = subprocess.Popen([sys.executable, "-m", "tests.teacher_server", "--port", "0", "--model", model,
                             "--latency", "0.05"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("READY "), f"teacher server did not start: {line!r}"
        yield line.split()[1], model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- the job -------------------------------------------------------------------------------


def _job_command(teacher: tuple[str, str], store: Path) -> list[str]:
    """The entrypoint after ``--``: a tiny pipeline (collect on the worker node, then BC on a tiny
    random model) from a config written next to the store. Every path is absolute: the job runs in
    the uploaded copy of the repo, not here."""
    base_url, model = teacher
    out = store.parent / "run"
    config = {
        "name": "cluster-test", "out": str(out), "store": str(store), "stages": ["collect", "train"],
        "teacher": {"base_url": base_url, "model": model, "api_key_env": "SUBQ_TEST_KEY"},
        "collect": {"problems": f"gsm8k:train[:{PROBLEMS}]", "samples_per_problem": SAMPLES, "feedback_samples": 1,
                    "max_tokens": 64, "actor_resources": {"collect_node": 0.01}},
        "train": {"algos": ["bc"], "defaults": {"init": "tiny-random:llama?layers=2&hidden=32&seed=0",
                                                "batch_size": 4, "max_length": 96, "max_steps": 1,
                                                "checkpoint_every": 1, "report_every": 1}},
    }
    path = store.parent / "cluster-test.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return ["subq", "pipeline", "--config", str(path), "--no-progress"]


def _runtime_env() -> dict[str, Any]:
    # Ray already skips .git/.venv/__pycache__ and what .gitignore lists; say so explicitly anyway,
    # since an uploaded venv would be GBs. Secrets in env_vars show in the dashboard (fine for a dummy).
    return {"env_vars": {"SUBQ_TEST_KEY": TEST_KEY},
            "excludes": [".venv", ".git", "**/__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache"]}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_job_submit_runs_the_pipeline_with_collection_on_the_worker_node(loopback_cluster: LoopbackCluster, teacher_url: tuple[str, str],
                                                tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    cluster = loopback_cluster
    store = tmp_path / "store"
    submission_id = f"subq-test-{uuid.uuid4().hex[:8]}"
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
              "--submission-id", submission_id, "--working-dir", str(REPO),
              "--runtime-env-json", json.dumps(_runtime_env()), "--", *_job_command(teacher_url, store)]
    t0 = time.monotonic()
    out = subprocess.run(submit, env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    wall = time.monotonic() - t0
    logs = out.stdout + out.stderr
    assert out.returncode == 0, f"ray job submit failed after {wall:.0f}s:\n{logs[-6000:]}"

    # `ray job submit` exits 0 for a STOPPED job too: ask the Jobs API for the final status.
    client = JobSubmissionClient(cluster.dashboard_url)
    info = client.get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED, (info.status, info.message)
    assert TEST_KEY not in client.get_job_logs(submission_id)
    # Why cluster/README.md says to keep real keys out of runtime envs: Ray shows them in the job's info.
    assert (info.runtime_env or {}).get("env_vars", {}).get("SUBQ_TEST_KEY") == TEST_KEY

    # The working dir was uploaded small: no venv, no git history.
    pkgs = [p for p in (cluster.temp_dir / "h").glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert pkgs, "no unpacked working_dir on the head node"
    for pkg in pkgs:
        assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()
        assert _dir_bytes(pkg) < 64 * 2**20, f"working_dir upload is {_dir_bytes(pkg) / 2**20:.0f} MiB"

    # The pipeline trained on what was collected, and says so.
    assert (tmp_path / "run" / "train" / "bc" / "final" / "subq_checkpoint.json").is_file(), logs[-3000:]
    assert "collect" in logs and "train bc" in logs

    # The store: every problem x sample exactly once, and the key never written anywhere.
    rows = Store(str(store)).read_rows("samples")
    keys = Counter(r["sample_key"] for r in rows)
    assert len(rows) == PROBLEMS * SAMPLES and len(keys) == PROBLEMS * SAMPLES, keys
    assert len({r["problem_id"] for r in rows}) == PROBLEMS
    for f in store.rglob("*"):
        assert not f.is_file() or TEST_KEY.encode() not in f.read_bytes(), f

    # Collection actors (Ray Data names them MapWorker(MapBatches(StageWorker))) ran on the worker only.
    actors = list_actors(address=cluster.dashboard_url, detail=True, limit=10_000, raise_on_missing_output=False)
    stage = [a for a in actors if "StageWorker" in a.class_name]
    assert stage, f"no StageWorker actors among {sorted({a.class_name for a in actors})}"
    placed = Counter(a.node_id for a in stage)
    assert set(placed) == {cluster.worker_node_id}, (
        f"StageWorker actors by node: {placed}; worker={cluster.worker_node_id} head={cluster.head_node_id}")
