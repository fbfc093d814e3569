"""Resources no node has fail fast, naming the resource; an autoscaler that may add them is waited for,
with a timeout. The logic on fake clusters (no Ray), then the real commands on this GPU-less machine."""

from __future__ import annotations

import time

import pytest

from subq.cli import main
from subq.resources import (
    Cluster,
    Demand,
    ResourceError,
    actor_pool_demand,
    require,
    shortfall,
    train_demand,
    verdicts,
)

NODE = {"CPU": 2.0, "memory": 8e9, "object_store_memory": 2e9, "node:127.0.0.1": 1.0}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0, "memory": 3e10}


def test_a_resource_no_node_has_is_named_with_what_the_nodes_offer():
    why = shortfall(actor_pool_demand("collection actors", 0.25, {"collect_node": 0.01}, 1), [NODE])
    assert why == ("collection actors request resource 'collect_node' (0.01) but no node has it "
                   "(nodes offer: CPU, memory, object_store_memory)")
    assert shortfall(train_demand("bc", 1, True), [NODE]).startswith("Train workers (bc) request resource 'GPU' (1)")
    assert shortfall(actor_pool_demand("x", 0.25, {}, 1), [NODE]) is None
    assert shortfall(Demand("x", {"GPU": 0.0, "CPU": 0.5}), [NODE]) is None  # zeros ask for nothing


def test_too_much_per_bundle_or_too_many_bundles_at_once():
    assert "largest node has 2" in shortfall(Demand("replicas", {"CPU": 4.0}), [NODE, NODE])
    # 4 GPU workers on two 1-GPU nodes: the worker group can never be placed
    why = shortfall(train_demand("bc", 4, True), [GPU_NODE, GPU_NODE])
    assert "need 4 x ('GPU' 1) at once but the nodes hold only 2" in why
    assert shortfall(train_demand("bc", 2, True), [GPU_NODE, GPU_NODE]) is None


def test_no_autoscaler_fails_at_once_with_the_hint():
    d = train_demand("bc", 1, True, hint="without GPUs: --num-gpus 0")
    with pytest.raises(ResourceError) as e:
        require([d], probe=lambda: Cluster([NODE]), sleep=pytest.fail)
    assert "'GPU'" in str(e.value) and str(e.value).endswith("; without GPUs: --num-gpus 0")


def test_an_autoscaler_without_such_a_node_type_fails_at_once():
    cluster = Cluster([NODE], autoscaler=True, node_types=[{"CPU": 4.0}])
    problems, waits = verdicts([train_demand("bc", 1, True)], cluster)
    assert not waits and "no node type that offers it" in problems[0]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_an_autoscaler_that_may_add_the_node_is_waited_for_until_it_does():
    clock, lines = _Clock(), []
    # node types unknown (an autoscaler that publishes none): wait; the GPU node joins after 10 s
    probe = lambda: Cluster([NODE] + ([GPU_NODE] if clock.now >= 10 else []), autoscaler=True)  # noqa: E731
    require([train_demand("bc", 1, True)], probe=probe, echo=lines.append, timeout_s=60, clock=clock,
            sleep=clock.sleep)
    assert 10 <= clock.now < 60
    assert "waiting up to 60 s (SUBQ_RESOURCE_WAIT_S) for the autoscaler to add a node for Train workers (bc)" \
        in lines[0]


def test_the_wait_gives_up_after_the_timeout(monkeypatch):
    clock, lines = _Clock(), []
    monkeypatch.setenv("SUBQ_RESOURCE_WAIT_S", "30")
    cluster = Cluster([NODE], autoscaler=True, node_types=[GPU_NODE])
    with pytest.raises(ResourceError, match=r"'GPU'.*the autoscaler added no such node within 30 s"):
        require([train_demand("bc", 1, True)], probe=lambda: cluster, echo=lines.append, clock=clock,
                sleep=clock.sleep)
    assert 30 <= clock.now <= 34 and len(lines) == 1


# ------------------------------------------------------------------ the real commands, on this machine


def _fails_fast(argv: list[str], capsys, *names: str) -> None:
    start = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert all(n in err for n in names), err
    assert elapsed < 110, elapsed  # it used to hang until killed


def test_collect_with_a_resource_no_node_has_fails_naming_it(ray_session, tmp_path, capsys):
    _fails_fast(["collect", "--problems", "gsm8k:train[:2]", "--store", str(tmp_path / "store"),
                 "--teacher-base-url", "http://127.0.0.1:9/v1", "--teacher-model", "t",
                 "--actor-resources", '{"collect_node": 0.01}'],
                capsys, "collection actors request resource 'collect_node' (0.01) but no node has it")


def test_train_on_gpu_without_one_fails_naming_it(ray_session, tmp_path, capsys):
    (tmp_path / "store").mkdir()
    _fails_fast(["train", "--init", "tiny-random:llama", "--store", str(tmp_path / "store"),
                 "--out", str(tmp_path / "out"), "--use-gpu"],
                capsys, "Train workers (bc) request resource 'GPU' (1) but no node has it")
    assert not (tmp_path / "out").exists()


def test_llm_server_on_a_gpu_without_one_fails_naming_it(ray_session, capsys):
    _fails_fast(["llm-server", "--model", "tiny-random:llama", "--num-gpus", "1", "--port", "1"],
                capsys, "the llm-server replica request resource 'GPU' (1) but no node has it")


def test_a_cluster_started_by_hand_is_not_taken_for_an_autoscaler():
    from subq.resources import launches_nodes

    # what the v1 monitor writes for `ray.init()` / `ray start` (read-only provider) and for a launcher
    by_hand = {"autoscaler_report": {"node_type_mapping": {"72ec": "node_72ec"}, "pending_launches": {}}}
    launcher = {"autoscaler_report": {"node_type_mapping": {"72ec": "head", "81fa": "cpu-workers"},
                                      "pending_launches": {}}}
    assert not launches_nodes(by_hand) and launches_nodes(launcher) and not launches_nodes({})
    assert launches_nodes({"autoscaler_report": {"node_type_mapping": {"72ec": "node_72ec"},
                                                 "pending_launches": {"gpu-workers": 1}}})
