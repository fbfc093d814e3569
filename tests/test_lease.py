"""The store's lease (issue 20 item 5, issue 22): one writer, liveness by heartbeat, writers that
stop when their lease is gone, atomic takeover on local paths and on a real S3 API (moto)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
from subq.data_store import lease as lease_mod
from subq.data_store.lease import LEASE_NAME, LeaseConfig, LeaseInfo, LeaseLost, StoreLocked
from subq.data_store.store import Store, StoreError

FAST = LeaseConfig(ttl_s=60.0, renew_s=20.0, margin_s=1.0)  # renewals never interfere with a test


def _problem(i: int) -> dict:
    return {"problem_id": f"p{i}", "dataset": "t", "split": "train", "index": i, "question": f"q{i}",
            "answer_text": "1", "answer_type": "number"}


def _abandon(lease) -> None:
    """What a killed driver does: stop renewing, release nothing (and leave this process's registry)."""
    lease._stop.set()
    lease._thread.join()
    lease_mod._HELD.pop(lease.backend.ident, None)


def _rewrite(store: Store, **changes) -> None:
    """Edit the stored lease in place (as time passing would)."""
    backend = store._lease_backend()
    data, version = backend.read()
    info = LeaseInfo(**{**json.loads(data), **changes})
    assert backend.replace(info.payload(), version) is not None


def test_a_second_writer_is_refused_naming_the_holder_and_a_nested_lock_joins(tmp_path):
    store = Store(str(tmp_path))
    with store.lock("first", FAST) as held:
        lease_mod._HELD.pop(held.backend.ident)  # as if the second run were another process
        with pytest.raises(StoreLocked, match=rf"pid {os.getpid()} on .*'first', since .*lapses at .* run this"):
            Store(str(tmp_path)).lock("second", FAST).acquire()
        lease_mod._HELD[held.backend.ident] = held
        with Store(str(tmp_path)).lock("nested") as inner:  # this process holds it: joined, same holder
            assert inner.holder == held.holder
        assert (tmp_path / LEASE_NAME).exists()  # the inner exit did not release the outer lease
    assert not (tmp_path / LEASE_NAME).exists()
    with store.lock("third", FAST):  # released: free again
        pass


def test_a_lease_on_a_new_store_leaves_no_trace(tmp_path):
    root = tmp_path / "new"
    with Store(str(root)).lock("x", FAST):
        assert (root / LEASE_NAME).exists()
    assert not root.exists()


def test_the_holder_renews_and_its_writers_write(tmp_path):
    cfg = LeaseConfig(ttl_s=4.0, renew_s=0.2, margin_s=0.5)
    store = Store(str(tmp_path))
    with store.lock("renewing", cfg) as lease:
        first = lease.info.expires_at
        deadline = time.monotonic() + 60
        while lease.info.expires_at == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.info.expires_at > first  # the heartbeat thread pushed the expiry
        stored = LeaseInfo.parse((tmp_path / LEASE_NAME).read_bytes())
        assert stored.holder == lease.holder and stored.expires_at == lease.info.expires_at
        assert Store(str(tmp_path), holder=lease.holder).append("problems", [_problem(1)]).written == 1
        assert store.append("problems", [_problem(2)]).written == 1  # the driver's own store: checked, ok


def test_orphaned_writers_stop_when_the_lease_lapses_or_is_taken_over(tmp_path):
    store = Store(str(tmp_path))
    driver = store.lock("killed driver", FAST).acquire()
    actor = Store(str(tmp_path), holder=driver.holder)  # a collection actor writing for the driver
    assert actor.append("problems", [_problem(1)]).written == 1
    _abandon(driver)  # kill -9: no more renewals
    _rewrite(store, expires_at=time.time() + 0.5)  # within the margin: refused already
    with pytest.raises(LeaseLost, match="expires in"):
        actor.append("problems", [_problem(2)])
    _rewrite(store, expires_at=time.time() - 5)  # lapsed
    with pytest.raises(LeaseLost, match="lapsed"):
        actor.append("problems", [_problem(3)])
    with Store(str(tmp_path)).lock("next run", FAST) as successor:  # takes the lapsed lease over
        with pytest.raises(LeaseLost, match=r"taken over by .*'next run'"):
            actor.append("problems", [_problem(4)])
        assert not driver.renew() and driver.lost  # the old holder cannot renew over its successor
        assert Store(str(tmp_path), holder=successor.holder).append("problems", [_problem(5)]).written == 1
    with pytest.raises(LeaseLost, match="gone"):  # released: nobody's lease, the orphan still stops
        actor.append("problems", [_problem(6)])
    fresh = Store(str(tmp_path))
    assert sorted(fresh.keys("problems")) == ["p1", "p5"]  # nothing of the refused writes landed
    assert not [p for p in (tmp_path / "problems").iterdir() if p.name.startswith("_tmp-")]


def test_compaction_stops_when_the_lease_is_taken_over(tmp_path):
    store = Store(str(tmp_path))
    driver = store.lock("compacting", FAST).acquire()
    for i in range(3):
        store.append("problems", [_problem(i)])
    _abandon(driver)
    _rewrite(store, holder="someone-else")
    with pytest.raises(LeaseLost, match="taken over"):
        Store(str(tmp_path), holder=driver.holder).compact("problems")
    assert sorted(Store(str(tmp_path)).keys("problems")) == ["p0", "p1", "p2"]


def test_lease_settings_are_checked():
    with pytest.raises(StoreError, match="renew_s < ttl_s"):
        LeaseConfig(ttl_s=10, renew_s=10)


# --- racing runs: exactly one wins, every trial ----------------------------------------------

def _racer(root: str, cfg: LeaseConfig, trials: int, start, tried, released, results) -> None:
    store = Store(root)
    for trial in range(trials):
        start.wait()
        lease = store.lock(f"racer {os.getpid()}", cfg)
        try:
            won = lease.acquire().holder
        except StoreLocked:
            won = None
        results.put((trial, won))
        tried.wait()  # everyone has tried before the winner lets go
        if won:
            lease.release()
        released.wait()


def race(root: str, racers: int, trials: int) -> list[list[str]]:
    """``racers`` processes race for the lease ``trials`` times: for a lapsed lease (even trials)
    and for a free one (odd). Returns, per trial, the holders that won."""
    ctx = multiprocessing.get_context("spawn")  # no fork beside the S3 server's threads
    start, tried, released = (ctx.Barrier(racers + 1) for _ in range(3))
    results = ctx.Queue()
    cfg = LeaseConfig(ttl_s=60.0, renew_s=20.0, margin_s=1.0)
    procs = [ctx.Process(target=_racer, args=(root, cfg, trials, start, tried, released, results), daemon=True)
             for _ in range(racers)]
    for p in procs:
        p.start()
    store, winners = Store(root), []
    try:
        for trial in range(trials):
            if trial % 2 == 0:  # a dead run's lease, lapsed a moment ago
                dead = store.lock("dead run", cfg).acquire()
                _abandon(dead)
                _rewrite(store, expires_at=time.time() - 1)
            start.wait(timeout=120)
            won = [results.get(timeout=120) for _ in range(racers)]
            assert sorted(t for t, _ in won) == [trial] * racers
            holders = [h for _, h in won if h]
            data, _ = store._lease_backend().read()
            assert data is not None and holders == [LeaseInfo.parse(data).holder]
            winners.append(holders)
            tried.wait(timeout=120)
            released.wait(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return winners


def test_racing_runs_on_a_local_store_exactly_one_wins_every_trial(tmp_path):
    winners = race(str(tmp_path / "store"), racers=4, trials=20)
    assert [len(w) for w in winners] == [1] * 20


# --- S3 (moto's server: a real S3 API over HTTP) ---------------------------------------------

def test_moto_honours_conditional_puts(s3):
    from botocore.exceptions import ClientError

    client, bucket = s3.client(), s3.bucket()
    etag = client.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")["ETag"]
    for cond in ({"IfNoneMatch": "*"}, {"IfMatch": '"0"'}):
        with pytest.raises(ClientError, match="PreconditionFailed"):
            client.put_object(Bucket=bucket, Key="k", Body=b"2", **cond)
    client.put_object(Bucket=bucket, Key="k", Body=b"3", IfMatch=etag)


def test_racing_runs_on_s3_exactly_one_wins_every_trial(s3):
    winners = race(f"s3://{s3.bucket()}/store", racers=2, trials=20)
    assert [len(w) for w in winners] == [1] * 20


def test_a_store_on_s3_writes_reads_and_keeps_no_credentials(s3):
    from tests.s3_server import ACCESS_KEY, SECRET_KEY

    bucket = s3.bucket()
    uri = f"s3://{bucket}/store"
    store = Store(uri)
    with store.lock("subq collect", FAST) as lease:
        store.append("problems", [_problem(1), _problem(2)])
        actor = Store(uri, holder=lease.holder)  # collection's path: actors append calls and samples
        assert actor.append("calls", [{"call_id": "c1", "charged_usd": 0.5}]).written == 1
        lease_mod._HELD.pop(lease.backend.ident)  # as if the second run were another process
        with pytest.raises(StoreLocked, match="being written by pid"):
            Store(uri).lock("second", FAST).acquire()
        lease_mod._HELD[lease.backend.ident] = lease
    again = Store(uri)
    assert sorted(again.keys("problems")) == ["p1", "p2"] and again.spent_usd() == 0.5
    client = s3.client()
    objects = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert objects and not any(o["Key"].endswith(LEASE_NAME) for o in objects)  # released
    for o in objects:
        body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        assert ACCESS_KEY.encode() not in body and SECRET_KEY.encode() not in body


def test_an_s3_orphan_stops_after_takeover(s3):
    uri = f"s3://{s3.bucket()}/store"
    driver = Store(uri).lock("killed", FAST).acquire()
    actor = Store(uri, holder=driver.holder)
    _abandon(driver)
    _rewrite(Store(uri), expires_at=time.time() - 1)
    with Store(uri).lock("next", FAST), pytest.raises(LeaseLost, match="taken over"):
        actor.append("problems", [_problem(9)])
    assert Store(uri).keys("problems") == set()


def test_a_service_ignoring_conditional_writes_is_refused(s3, monkeypatch):
    from subq.data_store.lease_s3 import S3LeaseBackend

    uri = f"s3://{s3.bucket()}/store"
    store = Store(uri)
    backend = store._lease_backend()
    put = backend.client.put_object

    def careless_put(**kw):  # a service that drops the conditions on the floor
        kw.pop("IfNoneMatch", None)
        kw.pop("IfMatch", None)
        return put(**kw)

    monkeypatch.setattr(backend.client, "put_object", careless_put)
    monkeypatch.setattr(S3LeaseBackend, "_probed", set())
    with pytest.raises(StoreError, match="ignores conditional writes"):
        store.lock("x", FAST).acquire()
    assert backend.read() == (None, None)  # its probe's lease is not left behind


def test_a_second_collect_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import subq.runtime
    from subq.cli import main

    started: list[str] = []
    monkeypatch.setattr(subq.runtime, "init_ray", lambda *a, **k: started.append("ray"))
    root = str(tmp_path / "store")
    running = Store(root).lock("subq collect", FAST).acquire()
    lease_mod._HELD.pop(running.backend.ident)  # the first run is another process
    try:
        rc = main(["collect", "--store", root, "--problems", "gsm8k:train[:2]", "--no-progress",
                   "--teacher-base-url", "http://127.0.0.1:9/v1", "--teacher-model", "m"])
    finally:
        lease_mod._HELD[running.backend.ident] = running
        running.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not started
    assert len(err) == 1 and f"being written by pid {os.getpid()}" in err[0] and "'subq collect'" in err[0], err


def test_a_second_pipeline_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import yaml

    import subq.runtime
    from subq.cli import main

    started: list[str] = []
    monkeypatch.setattr(subq.runtime, "init_ray", lambda *a, **k: started.append("ray"))
    root = str(tmp_path / "store")
    cfg = {"name": "t", "out": str(tmp_path / "run"), "store": root,
           "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
           "collect": {"problems": "gsm8k:train[:2]"}, "train": {"algos": []}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    running = Store(root).lock("subq collect", FAST).acquire()
    lease_mod._HELD.pop(running.backend.ident)  # the first run is another process
    try:
        rc = main(["pipeline", "--config", str(tmp_path / "p.yaml")])
    finally:
        lease_mod._HELD[running.backend.ident] = running
        running.release()
    err = capsys.readouterr().err
    assert rc == 2 and not started and "being written by pid" in err, err
