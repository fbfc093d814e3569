"""The whole pipeline as a `ray job submit` on a real 2-node Ray cluster with no shared disk (DESIGN §4).

The head runs on 127.0.0.2 (dashboard = Jobs API), a second raylet on 127.0.0.3 advertises
``collect_node``. Each node gets its own private folder (Ray's temp dir, ``TMPDIR``, ``HOME``,
``SUBQ_CACHE_DIR``) and they share none; where the machine allows a private mount namespace
(``unshare``), each node sees an empty folder where the other's is, so even an absolute path handed
from one node to the other does not resolve (checked: workers reading the driver's local staging of
the training data fail here). The job's code travels as its runtime_env working_dir
(uploaded to the GCS, unpacked by each node), the config is a shipped one by name plus ``--set``, and
``out`` and ``store`` are in an S3 bucket (moto's server, ``tests/s3_server.py``). Train runs one worker
per node, so a stage that leaves something on one node's disk for another fails here. The test checks
what a user would: the job succeeded, the bucket holds the store (complete, no duplicates), the
students' ``final/`` with their records, the evaluation and its report, no secret anywhere, and
collection ran on the worker node while Train used both.

Stopping: ``ray stop`` kills *every* Ray process on the machine (it matches process names), which
would take down the pytest session's own Ray (tests/conftest.py) and other people's tests. So
every process this module starts carries a marker environment variable (set for ``ray start`` and
the teacher, inherited by GCS, raylets and dashboard), and teardown signals exactly the processes
that carry this run's marker plus their descendants (workers, agents, actors and the job driver
rename themselves and lose a readable environment, but are children of a marked raylet). A cluster
left by a crashed run (its owning pytest process is gone) is swept at start the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
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
PROBLEMS, SAMPLES = 2, 1
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 420
TINY = "tiny-random:llama?layers=1&hidden=32&heads=2&ctx=512&seed=0"
# num_workers 2 on two 1-CPU nodes: one Train worker per node
SMALL_TRAIN = {"init": TINY, "num_workers": 2, "batch_size": 2, "max_length": 256, "max_steps": 1, "epochs": 1,
               "checkpoint_every": 1, "cpu_bf16": "off"}


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
    # to add a node even on Linux. Unset, as on a real cluster. Caches and temp folders are the node's own
    # (_node_env); a shared one (XDG_CACHE_HOME, HF_HOME) would hide a reliance on a common disk.
    drop = {"RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "XDG_CACHE_HOME", "HF_HOME", "TRANSFORMERS_CACHE"}
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


def _node_env(env: dict[str, str], private: Path) -> dict[str, str]:
    """A node's environment: every folder it writes is its own (what separate machines have). Its raylet,
    workers, actors and (on the head) the job driver inherit it; the job's runtime_env sets none of these."""
    dirs = {"TMPDIR": private / "tmp", "HOME": private / "home", "SUBQ_CACHE_DIR": private / "cache"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return {**env, **{k: str(v) for k, v in dirs.items()}}


def _can_hide() -> bool:
    """Whether this machine lets a process see an empty folder where another node's folder is (a private
    mount namespace: root or CAP_SYS_ADMIN; Linux containers often allow it)."""
    probe = tempfile.mkdtemp(prefix="sq-probe-", dir="/tmp")
    try:
        return shutil.which("unshare") is not None and subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "none", probe],
            capture_output=True, timeout=10).returncode == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _hiding(other: Path) -> list[str]:
    """A command prefix that runs a node in its own mount namespace with ``other`` (the other node's private
    folder) covered by an empty tmpfs: the two "nodes" share this machine's disk, and an absolute path one of
    them hands the other (a file left in its cache or TMPDIR) must not resolve, as on two machines. The
    processes `ray start` leaves behind stay in that namespace."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"',
            str(other)]


def _ray_start(args: list[str], env: dict[str, str], temp_dir: Path, hide: Path | None = None) -> None:
    prefix = _hiding(hide) if hide is not None else []
    out = subprocess.run([*prefix, str(VENV_BIN / "ray"), "start", *args], env=env, capture_output=True, text=True,
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
def loopback_cluster(run_marker: tuple[str, Path], s3) -> LoopbackCluster:
    """Head (1 CPU) and worker (1 CPU, ``collect_node``): a 2-worker Train run must use both. The nodes get
    the bucket's endpoint and dummy keys from their environment (``s3`` sets AWS_*), as a real cluster's
    nodes would from an instance role: never from the job's runtime_env."""
    marker, temp_dir = run_marker
    env = _cluster_env(marker)
    gcs_port, dash_port = _free_port(), _free_port()

    # Port 0 = the OS picks: the agent's default 52365 (it binds 127.0.0.1 too) and the metrics port
    # clash between the two nodes and with any other Ray here; a head whose agent has no HTTP server
    # answers job submissions with "No available agent to submit job".
    common = ["--disable-usage-stats", "--num-gpus=0", "--object-store-memory=200000000",
              "--dashboard-agent-listen-port=0", "--metrics-export-port=0"]

    head_env, worker_env = _node_env(env, temp_dir / "h"), _node_env(env, temp_dir / "w")
    hide = _can_hide()
    if not hide:  # still private by every variable that names a folder, but an absolute path would resolve
        warnings.warn("no private mount namespace here (unshare): each node's folder is visible to the other",
                      stacklevel=1)
    _ray_start(["--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
                "--include-dashboard=true", f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dash_port}",
                f"--ray-client-server-port={_free_port()}", "--num-cpus=1", '--resources={"head_only": 1}',
                f"--temp-dir={temp_dir / 'h' / 'ray'}", *common], head_env, temp_dir / "h" / "ray",
               hide=temp_dir / "w" if hide else None)
    _ray_start([f"--address={HEAD_IP}:{gcs_port}", f"--node-ip-address={WORKER_IP}", "--num-cpus=1",
                '--resources={"collect_node": 100}', f"--temp-dir={temp_dir / 'w' / 'ray'}", *common],
               worker_env, temp_dir / "w" / "ray", hide=temp_dir / "h" if hide else None)
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


def pipeline_args(teacher_base_url: str, bucket: str, serve_port: int, *, on_worker: bool = True) -> list[str]:
    """``subq pipeline`` arguments after the subcommand: the quickstart config by name (no file to share),
    ``out`` and ``store`` in ``bucket``, tiny students, the test teacher as teacher and solver, the smallest
    sizes. ``on_worker``: collection actors ask for ``collect_node`` (only the worker node has it; off to
    run the same pipeline on one node, for a wall time to compare)."""
    url = teacher_base_url
    sets = {
        "store": f"s3://{bucket}/store",
        "teacher.base_url": url, "teacher.model": "test-teacher", "teacher.api_key_env": "SUBQ_TEST_KEY",
        "collect.problems": f"gsm8k:train[:{PROBLEMS}]", "collect.samples_per_problem": SAMPLES,
        "collect.max_tokens": 64, "collect.max_actors": 1,
        "collect.actor_resources": '{"collect_node": 0.01}' if on_worker else "{}",
        "import.reference": "gsm8k:train[:4]",
        "train.algos": "[bc]",  # quickstart's BC (on the imported human sub-questions); one Train run
        **{f"train.defaults.{k}": v for k, v in SMALL_TRAIN.items()},
        **{f"train.bc.{k}": SMALL_TRAIN[k] for k in ("batch_size", "max_steps", "epochs", "cpu_bf16")},  # its own
        "serve.port": serve_port, "serve.num_gpus": 0, "serve.num_cpus": 0.1, "serve.max_new_tokens": 16,
        "eval.solvers": f'["test-teacher@{url}"]', "eval.benchmarks": '["gsm8k:test[:1]"]',
        "eval.solve_max_tokens": 16, "eval.batch_size": 1, "eval.fidelity_problems": "gsm8k:test[:1]",
        "eval.decompose_max_tokens": 16,
    }
    return ["--config", "quickstart", "--out", f"s3://{bucket}/run", "--no-progress",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def bucket_objects(s3, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _stage(key: str) -> str:
    """The part of a run a bucket key belongs to: store table, training run folder, evaluation, pipeline."""
    parts = key.split("/")
    if parts[0] == "store":
        return f"store/{parts[1]}" if len(parts) > 2 else "store (lease)"
    if parts[1:2] == ["train"] and len(parts) > 3:
        return f"train {parts[2]}/{parts[3]}"
    if parts[1:2] == ["eval"]:
        return "eval/records" if parts[2:3] == ["records"] else "eval (report)"
    return "pipeline"


def objects_per_stage(keys: list[str]) -> dict[str, int]:
    """Objects left in the bucket by stage (folder markers not counted)."""
    return dict(sorted(Counter(_stage(k) for k in keys if not k.endswith("/")).items()))


def writes_per_stage(request_log: list[str], bucket: str) -> dict[str, int]:
    """Objects *written* by stage, from moto's request log: a whole PUT, or a completed multipart upload
    (pyarrow's output streams), counted once each, including objects deleted later (Ray Train's
    checkpoints, the lease); folder markers (empty PUTs of ``key/``) and DELETEs counted apart."""
    found: Counter[str] = Counter()
    for line in request_log:
        m = re.search(rf'"(PUT|POST|DELETE) /{bucket}/(\S*?)(\?\S*)? HTTP', line)
        if not m or (m[1] == "PUT" and "partNumber" in (m[3] or "")) or (m[1] == "POST" and "uploadId" not in (m[3] or "")):
            continue
        found["DELETE" if m[1] == "DELETE" else "folder markers" if m[2].endswith("/") else _stage(m[2])] += 1
    return dict(sorted(found.items()))


@contextlib.contextmanager
def moto_requests() -> Iterator[list[str]]:
    """The request lines moto's server (werkzeug, in this process) logs while the block runs."""
    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, log = Grab(logging.INFO), logging.getLogger("werkzeug")
    log.addHandler(handler)
    try:
        yield lines
    finally:
        log.removeHandler(handler)


def _runtime_env() -> dict[str, Any]:
    # Ray already skips .git/.venv/__pycache__ and what .gitignore lists; say so explicitly anyway,
    # since an uploaded venv would be GBs. Secrets in env_vars show in the dashboard (fine for a dummy).
    return {"working_dir": str(REPO), "env_vars": {"SUBQ_TEST_KEY": TEST_KEY},
            "excludes": [".venv", ".git", "**/__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache"]}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_the_pipeline_runs_as_a_job_on_two_nodes_sharing_only_a_bucket(
        loopback_cluster: LoopbackCluster, teacher_url: tuple[str, str], s3) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    from tests.s3_server import ACCESS_KEY, SECRET_KEY

    cluster = loopback_cluster
    bucket = s3.bucket()
    submission_id = f"subq-test-{uuid.uuid4().hex[:8]}"
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
              "--submission-id", submission_id, "--runtime-env-json", json.dumps(_runtime_env()),
              "--", "subq", "pipeline", *pipeline_args(teacher_url[0], bucket, _free_port())]
    with moto_requests() as requests:
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

    # The working dir travelled through the GCS, small (no venv, no git history), unpacked on each node.
    pkgs = [p for p in cluster.temp_dir.glob("?/ray/session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert pkgs, "no unpacked working_dir on the nodes"
    for pkg in pkgs:
        assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()
        assert _dir_bytes(pkg) < 64 * 2**20, f"working_dir upload is {_dir_bytes(pkg) / 2**20:.0f} MiB"

    # Every stage ran, and everything it wrote is in the bucket.
    stages = json.loads(s3.client().get_object(Bucket=bucket, Key="run/pipeline_summary.json")["Body"].read())
    assert {s["stage"]: s["status"] for s in stages} == {
        "collect": "done", "import": "done", "train bc": "done", "serve + eval": "done", "report": "done"}, stages
    objects = bucket_objects(s3, bucket)
    for key in ("run/train/bc/final/config.json", "run/train/bc/final/subq_checkpoint.json",
                "run/train/bc/final/pipeline_trained_on.json", "run/pipeline_config.yaml",
                "run/eval/results.json", "run/eval/fidelity.json", "run/eval/accuracy_vs_cost.png"):
        assert key in objects, (key, sorted(objects))
    runs = json.loads(objects["run/eval/results.json"])["runs"]
    assert {r["decomposer"] for r in runs} == {"bc", "teacher (test-teacher)"}, runs  # the student named after its run
    assert any(k.startswith("run/eval/records/") for k in objects)  # each batch of records an object
    assert "bc" in json.loads(objects["run/eval/fidelity.json"])  # the driver read the student from the bucket
    print(f"\n2-node job wall {wall:.1f} s; stages {[(x['stage'], round(x['wall_s'], 1)) for x in stages]}; "
          f"objects written per stage: {writes_per_stage(requests, bucket)}; left: {objects_per_stage(list(objects))}")
    for secret in (TEST_KEY, ACCESS_KEY, SECRET_KEY):
        assert not [k for k, v in objects.items() if secret.encode() in v], f"{secret} reached the bucket"
    # Nothing anywhere took the URI for a local path (a folder "s3:" under a node's working dir or cache).
    assert not [p for p in cluster.temp_dir.rglob("s3:*")], "a local folder named after the scheme"

    # The store: every problem x sample exactly once.
    rows = Store(f"s3://{bucket}/store").read_rows("samples")
    keys = Counter(r["sample_key"] for r in rows)
    assert len(rows) == PROBLEMS * SAMPLES and len(keys) == PROBLEMS * SAMPLES, keys

    # Collection actors (Ray Data names them MapWorker(MapBatches(StageWorker))) ran on the worker only;
    # the two Train workers ran one on each node.
    actors = list_actors(address=cluster.dashboard_url, detail=True, limit=10_000, raise_on_missing_output=False)
    stage = Counter(a.node_id for a in actors if "StageWorker" in a.class_name)
    assert set(stage) == {cluster.worker_node_id}, (
        f"StageWorker actors by node: {stage}; worker={cluster.worker_node_id} head={cluster.head_node_id}")
    train = Counter(a.node_id for a in actors if "TrainWorker" in a.class_name)
    assert set(train) == {cluster.worker_node_id, cluster.head_node_id}, (
        f"Train workers by node: {train}; actors: {sorted({a.class_name for a in actors})}")
