"""Fail fast on Ray resources no node has.

Ray queues an actor, a Train worker group or a Serve replica whose resources no node offers and waits
forever; its "infeasible" warning goes to logs subq keeps quiet. So every command compares what a stage
will request (``Demand``) with the cluster before it starts the stage:

- some node offers it (its *total*: busy resources free up): go on;
- no node offers it and no autoscaler runs (a local Ray, a fixed cluster): ``ResourceError`` at once,
  one line naming the resource (the CLI prints it and exits 2);
- an autoscaler runs: if it publishes its node types and none offers the resource, fail at once as
  well; otherwise print what we wait for and poll ``ray.nodes()`` until a node offers it, giving up
  after ``$SUBQ_RESOURCE_WAIT_S`` seconds (default 600).

How an autoscaler is detected (Ray 2.60, read from the GCS; no API of its own says "autoscaler on"):
its node types come from ``ray._private.state.state.get_cluster_config()``, which an autoscaler that
reports its config fills with ``node_group_configs`` (the source Ray Data's own autoscaling check,
``ray.data._internal.cluster_autoscaler.util.is_autoscaling_enabled``, reads); an autoscaler that does
not is still seen by its footprint in the GCS key-value store: the v2 "enabled" flag, or node types in
the v1 monitor's ``__autoscaling_status`` (what ``ray status`` prints) other than the read-only
``node_<id>`` ones the monitor uses on a cluster started by hand (see ``launches_nodes``). Then we cannot
tell which node types it has, so we wait with a timeout rather than fail.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

WAIT_ENV = "SUBQ_RESOURCE_WAIT_S"  # seconds to wait for an autoscaler to add a node (default below)
DEFAULT_WAIT_S = 600.0
_EPS = 1e-9


class ResourceError(ValueError):
    """A stage requests resources the cluster cannot give; the message names them."""


@dataclass(frozen=True)
class Demand:
    """What one stage asks Ray for."""

    what: str  # who asks, for the message: "collection actors", "Train workers (bc)", ...
    bundle: dict[str, float]  # one actor's / worker's / replica's resources (zeros are dropped)
    count: int = 1  # how many bundles must be placed at once (Train's worker group, a pool's minimum)
    hint: str = ""  # how to ask for less, e.g. "--set train.defaults.use_gpu=false"

    def wanted(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.bundle.items() if v and v > 0}


@dataclass
class Cluster:
    """What the cluster has and may get."""

    nodes: list[dict[str, float]]  # total resources of each alive node
    autoscaler: bool = False  # an autoscaler runs (it may add nodes)
    node_types: list[dict[str, float]] | None = field(default=None)  # what it can add; None: unknown


# ----------------------------------------------------------------------------- demands of each stage


def actor_pool_demand(what: str, num_cpus: float, resources: dict[str, float] | None, min_actors: int,
                      hint: str = "") -> Demand:
    """A Ray Data actor pool: its minimum size must be placeable."""
    return Demand(what, {"CPU": num_cpus, **(resources or {})}, max(1, min_actors), hint)


def train_demand(name: str, num_workers: int, use_gpu: bool, hint: str = "") -> Demand:
    """Ray Train's worker group: ScalingConfig's default per-worker resources ({"GPU": 1} or {"CPU": 1})."""
    return Demand(f"Train workers ({name})", {"GPU": 1.0} if use_gpu else {"CPU": 1.0}, max(1, num_workers), hint)


def serve_demand(what: str, num_cpus: float, num_gpus: float, replicas: int = 1, hint: str = "") -> Demand:
    return Demand(what, {"CPU": num_cpus, "GPU": num_gpus}, max(1, replicas), hint)


# ----------------------------------------------------------------------------------------- checking


def _fits(bundle: dict[str, float], node: dict[str, float]) -> int:
    """How many copies of ``bundle`` one node can hold."""
    return min((math.floor(node.get(k, 0.0) / v + _EPS) for k, v in bundle.items()), default=1_000_000)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _offered(nodes: list[dict[str, float]]) -> str:
    names = sorted({k for n in nodes for k in n if not k.startswith(("node:", "accelerator_type:"))})
    return ", ".join(names) or "nothing"


def shortfall(demand: Demand, nodes: list[dict[str, float]]) -> str | None:
    """Why ``demand`` cannot be placed on ``nodes`` (None: it can)."""
    want = demand.wanted()
    if not want:
        return None
    absent = {k: v for k, v in want.items() if not any(n.get(k, 0.0) > 0 for n in nodes)}
    if absent:
        noun = "resource" if len(absent) == 1 else "resources"
        asked = ", ".join(f"{k!r} ({_fmt(v)})" for k, v in absent.items())
        return f"{demand.what} request {noun} {asked} but no node has it (nodes offer: {_offered(nodes)})"
    small = {k: v for k, v in want.items() if max(n.get(k, 0.0) for n in nodes) + _EPS < v}
    if small:
        k, v = next(iter(small.items()))
        most = max(n.get(k, 0.0) for n in nodes)
        return f"{demand.what} request {_fmt(v)} {k!r} each but the largest node has {_fmt(most)}"
    placed = sum(_fits(want, n) for n in nodes)
    if placed < demand.count:
        each = ", ".join(f"{k!r} {_fmt(v)}" for k, v in want.items())
        return (f"{demand.what} need {demand.count} x ({each}) at once but the nodes hold only {placed} "
                f"(cluster total: {', '.join(f'{k} {_fmt(sum(n.get(k, 0.0) for n in nodes))}' for k in want)})")
    return None


def _with_hint(msg: str, demand: Demand) -> str:
    return f"{msg}; {demand.hint}" if demand.hint else msg


def verdicts(demands: list[Demand], cluster: Cluster) -> tuple[list[str], list[tuple[Demand, str]]]:
    """(problems that no wait can fix, demands an autoscaler may still satisfy with the reason they wait)."""
    problems: list[str] = []
    waits: list[tuple[Demand, str]] = []
    for d in demands:
        why = shortfall(d, cluster.nodes)
        if why is None:
            continue
        if not cluster.autoscaler:
            problems.append(_with_hint(why, d))
        elif cluster.node_types is not None and all(_fits(d.wanted(), t) < 1 for t in cluster.node_types):
            problems.append(_with_hint(f"{why}, and the autoscaler has no node type that offers it "
                                       f"(its node types offer: {_offered(cluster.node_types)})", d))
        else:
            waits.append((d, why))
    return problems, waits


# ------------------------------------------------------------------------------------- the cluster


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _node_types() -> list[dict[str, float]] | None:
    """Node types an autoscaler reported to the GCS (those it may still start), or None."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older or newer Ray without it: treat as unknown
        return None
    if not config or not config.node_group_configs:
        return None
    return [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs
            if g.max_count != 0 and (g.max_count == -1 or g.max_count > g.min_count or g.min_count > 0)]


def launches_nodes(status: dict) -> bool:
    """The v1 monitor's status (``__autoscaling_status``) is that of an autoscaler that launches nodes.

    The monitor runs on every cluster; on one started by hand (``ray.init``, ``ray start``) it drives a
    read-only provider whose node types are the nodes themselves, named ``node_<node id>``
    (``ray.autoscaler._private.util.format_readonly_node_type``). Any other node type name (a cluster
    launcher's or KubeRay's worker group) means nodes of that type can be launched.
    """
    report = status.get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    named = {**mapping, **{t: t for t in report.get("pending_launches") or {}}}
    return any(t != f"node_{node_id}" for node_id, t in named.items())


def _autoscaler_footprint() -> bool:
    """An autoscaler that launches nodes left its mark in the GCS key-value store (v1 status, v2 flag)."""
    try:
        import json

        import ray._private.ray_constants as rc
        import ray._raylet
        from ray.experimental.internal_kv import _internal_kv_get

        flag = _internal_kv_get(ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY,
                                namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)
        if flag == b"1":
            return True
        raw = _internal_kv_get(rc.DEBUG_AUTOSCALING_STATUS)
        return bool(raw) and launches_nodes(json.loads(raw))
    except Exception:
        return False


def probe_cluster() -> Cluster:
    """The connected Ray cluster (ray.init first)."""
    types = _node_types()
    return Cluster(nodes=cluster_nodes(), autoscaler=types is not None or _autoscaler_footprint(), node_types=types)


def wait_s() -> float:
    raw = os.environ.get(WAIT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise ResourceError(f"{WAIT_ENV} must be a number of seconds, got {raw!r}") from None


def require(demands: list[Demand], *, probe: Callable[[], Cluster] = probe_cluster,
            echo: Callable[[str], None] | None = None, timeout_s: float | None = None,
            poll_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once every demand can be placed; raise ``ResourceError`` (one line per problem) otherwise.

    Waits only where an autoscaler may add the missing node, at most ``timeout_s`` (``$SUBQ_RESOURCE_WAIT_S``).
    """
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    cluster = probe()
    problems, waits = verdicts(demands, cluster)
    if problems:
        raise ResourceError("\n".join(problems))
    if not waits:
        return
    limit = wait_s() if timeout_s is None else timeout_s
    deadline = clock() + limit
    for d, why in waits:
        echo(f"subq: waiting up to {limit:.0f} s ({WAIT_ENV}) for the autoscaler to add a node for {d.what}: {why}")
    while True:
        sleep(poll_s)
        cluster = probe()
        problems, waits = verdicts([d for d, _ in waits], cluster)
        if problems:
            raise ResourceError("\n".join(problems))
        if not waits:
            echo("subq: the autoscaler added the node(s); going on")
            return
        if clock() >= deadline:
            raise ResourceError("\n".join(_with_hint(f"{why}: the autoscaler added no such node within "
                                                     f"{limit:.0f} s ({WAIT_ENV})", d) for d, why in waits))
