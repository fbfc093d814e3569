"""The cluster manifests in cluster/ cannot rot silently: they parse, and they keep the properties the
cluster flow depends on (collect workers from 0 with collect_node, GPUs for the learner, the pipeline
as the job, secrets only by reference)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))
LITERAL_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}")  # an OpenAI-style key; "sk-..." placeholders pass
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def _load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def _kuberay_cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        for doc in _load(name):
            if doc.get("kind") == "RayCluster":
                yield name, doc["spec"]
            elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
                yield name, doc["spec"]["rayClusterSpec"]


def _containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        yield from group["template"]["spec"]["containers"]


def _custom_resources(ray_start_params: dict[str, Any]) -> dict[str, float]:
    """KubeRay's `resources: '"{\\"collect_node\\": 100}"'`: a JSON string holding a JSON object."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    value = json.loads(raw)
    return json.loads(value) if isinstance(value, str) else value


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_every_manifest_parses() -> None:
    assert {p.name for p in YAMLS} >= {"ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"}
    for path in YAMLS:
        docs = _load(path.name)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_launcher_config_matches_ray_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    (cfg,) = _load("ray-cluster.yaml")
    jsonschema.validate(cfg, schema)


def test_launcher_node_types() -> None:
    (cfg,) = _load("ray-cluster.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not take work"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    collect = [t for t in workers.values() if t["resources"].get("collect_node", 0) > 0]
    assert len(collect) == 1 and collect[0]["min_workers"] == 0 and collect[0]["max_workers"] > 0
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] > 0
    assert "collect_node" not in gpu[0]["resources"], "collection actors must not take GPU nodes"
    assert re.match(r"(g\d|p\d)", gpu[0]["node_config"]["InstanceType"]), "a GPU instance type"
    # The gpu type's own commands replace the global ones: both must install a pinned torch and the project.
    for commands in (cfg["setup_commands"], gpu[0]["worker_setup_commands"]):
        text = "\n".join(commands)
        assert re.search(r"torch==\d+\.\d+", text) and "--index-url" in text
        assert re.search(r"pip install -e \"?\.\[learn,eval\]", text)
    assert "whl/cu" in "\n".join(gpu[0]["worker_setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_USAGE_STATS_ENABLED=0" in "\n".join(cfg[key])


@pytest.mark.parametrize("name, spec", [pytest.param(n, s, id=n) for n, s in _kuberay_cluster_specs()])
def test_kuberay_cluster_spec(name: str, spec: dict[str, Any]) -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)", dockerfile)
    assert base and spec["rayVersion"] == base.group(1), "rayVersion must match the image's Ray"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must not take work"
    ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert 8265 in ports, "the Jobs API needs the dashboard port"

    groups = spec["workerGroupSpecs"]
    collect = [g for g in groups if _custom_resources(g["rayStartParams"]).get("collect_node", 0) > 0]
    assert len(collect) == 1 and collect[0]["minReplicas"] == 0 and collect[0]["maxReplicas"] > 0

    def gpus(group: dict[str, Any]) -> int:
        return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                   for c in group["template"]["spec"]["containers"])

    gpu = [g for g in groups if gpus(g) >= 1]
    assert len(gpu) == 1 and gpu[0]["minReplicas"] == 0 and gpu[0]["maxReplicas"] > 0
    assert not _custom_resources(gpu[0]["rayStartParams"]).get("collect_node")

    # The pods share no disk (`out` and `store` are bucket URIs): no volume may need a claim to exist.
    for group in [head, *groups]:
        for volume in group["template"]["spec"].get("volumes", []):
            assert "persistentVolumeClaim" not in volume, f"{name}: {volume} needs a PVC; outputs go to a bucket"

    for container in _containers(spec):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_USAGE_STATS_ENABLED", {}).get("value") == "0", container["name"]
        key = env.get("OPENAI_API_KEY")
        assert key is not None, f"{name}: {container['name']} calls the teacher/solver and needs the key"
        for var_name, var in env.items():
            if SECRET_NAME.search(var_name):
                assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), (name, var_name)


def test_rayjob_runs_the_pipeline() -> None:
    (job,) = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["subq", "pipeline", "--config"] and argv[3].endswith((".yaml", ".yml")), argv
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "exactly one way to get a cluster"
    if "rayClusterSpec" in spec:
        assert spec["shutdownAfterJobFinishes"] is True
    # nodes share no disk: out and store are URIs, never a path on one pod
    out = argv[argv.index("--out") + 1] if "--out" in argv else ""
    store = next((a.split("=", 1)[1] for a in argv if a.startswith("store=")), "")
    assert out.startswith("s3://") and store.startswith("s3://"), (out, store)
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert not any(SECRET_NAME.search(k) for k in runtime_env.get("env_vars", {})), "secrets via secretKeyRef only"


def test_no_literal_secrets_anywhere() -> None:
    for path in CLUSTER.iterdir():
        if path.is_file() and path.suffix in {".yaml", ".yml", ".md", ".sh", ""}:
            text = path.read_text()
            assert not LITERAL_KEY.search(text), path
    for _, spec in _kuberay_cluster_specs():
        for node in _walk(spec):
            if isinstance(node, dict) and node.get("name") == "OPENAI_API_KEY":
                assert "value" not in node


def test_local_2node_script() -> None:
    script = CLUSTER / "local-2node.sh"
    assert os.access(script, os.X_OK), "must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    # `ray stop` kills every Ray on the machine (other clusters, a pytest session's own Ray).
    assert not any(re.search(r"\bray\s+stop\b", line) for line in code)
    text = "\n".join(code)
    assert "--node-ip-address=\"$HEAD_IP\"" in text and "HEAD_IP=127.0.0.2" in text and "WORKER_IP=127.0.0.3" in text
    assert '\'{"collect_node": 100}\'' in text and "RAY_AUTH_MODE=disabled" in text
