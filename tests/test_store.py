"""The Parquet store: round trips, unique keys, crash leftovers, corrupt files, URIs, Ray reads."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest
from subq.data_store.schema import PROBLEMS_SCHEMA, SAMPLES_SCHEMA, problem_id, sample_key, to_table
from subq.data_store.store import Store, StoreError


def _problem(i: int) -> dict:
    return {
        "problem_id": problem_id("toy", "test", i),
        "dataset": "toy",
        "split": "test",
        "index": i,
        "question": f"What is {i} + 1?",
        "answer_text": f"#### {i + 1}",
        "answer_value": float(i + 1),
        "answer_type": "number",
        "gold": str(i + 1),
        "choices": None,
        "reference_subquestions": [f"What is {i}?"] if i % 2 else None,
    }


def _sample(i: int, k: int = 0, status: str = "ok", teacher: str = "t1") -> dict:
    pid = problem_id("toy", "test", i)
    now = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    return {
        "sample_key": sample_key(pid, teacher, "v1", k),
        "problem_id": pid,
        "teacher_model": teacher,
        "prompt_version": "v1",
        "sample_index": k,
        "source": "collect",
        "question": f"What is {i} + 1?",
        "gold_value": float(i + 1),
        "subquestions": ["What is i?", "What is i + 1?"],
        "subanswers": ["i", "i + 1"],
        "final_answer": str(i + 1),
        "final_value": float(i + 1),
        "correct": True,
        "usefulness": [1.0, 2 / 3],
        "status": status,
        "decompose_status": status,
        "decompose_raw": "Q1: What is i?\nQ2: What is i + 1?",
        "decompose_tokens_in": 10,
        "decompose_tokens_out": 5,
        "feedback_raw": ["Q1: Yes\nQ2: Yes", "Q1: Yes\nQ2: No"],
        "cost_usd": 0.5,
        "created_at": now,
        "updated_at": now,
    }


def _full(row: dict, schema) -> dict:
    return to_table([row], schema).to_pylist()[0]


def test_round_trip_both_tables(tmp_path):
    store = Store(str(tmp_path / "s"))
    problems = [_problem(i) for i in range(3)]
    samples = [_sample(i, k) for i in range(3) for k in range(2)]
    assert store.append("problems", problems).written == 3
    res = store.append("samples", samples)
    assert (res.written, res.skipped_existing) == (6, 0) and res.path.endswith(".parquet")
    assert store.read_rows("problems") == [_full(p, PROBLEMS_SCHEMA) for p in problems]
    got = sorted(store.read_rows("samples"), key=lambda r: (r["problem_id"], r["sample_index"]))
    want = sorted(
        (_full(s, SAMPLES_SCHEMA) for s in samples), key=lambda r: (r["problem_id"], r["sample_index"])
    )
    assert got == want
    assert store.read_table("samples").schema == SAMPLES_SCHEMA
    assert store.keys("samples") == {s["sample_key"] for s in samples}


def test_key_deduplication_within_batch_and_across_appends(tmp_path):
    store = Store(str(tmp_path))
    first = store.append("problems", [_problem(0), _problem(1), _problem(0)])
    assert (first.written, first.skipped_existing) == (2, 1)
    again = store.append("problems", [_problem(1), _problem(2)])
    assert (again.written, again.skipped_existing) == (1, 1)
    nothing = store.append("problems", [_problem(0)])
    assert (nothing.path, nothing.written, nothing.skipped_existing) == (None, 0, 1)
    # A second Store object (another process) sees the same keys on disk.
    other = Store(str(tmp_path))
    assert other.append("problems", [_problem(2), _problem(3)]).written == 1
    assert sorted(r["index"] for r in other.read_rows("problems")) == [0, 1, 2, 3]
    assert len(store.part_files("problems")) == 3


def test_leftover_tmp_file_is_ignored(tmp_path):
    store = Store(str(tmp_path))
    store.append("problems", [_problem(0)])
    # A writer killed between write and rename leaves a temporary part behind.
    table = to_table([_problem(1)], PROBLEMS_SCHEMA)
    pq.write_table(table, tmp_path / "problems" / "_tmp-part-20240101T000000-dead.parquet")
    (tmp_path / "problems" / "_tmp-part-20240101T000001-half.parquet").write_bytes(b"PAR1\x00trunc")
    fresh = Store(str(tmp_path))
    assert [r["index"] for r in fresh.read_rows("problems")] == [0]
    assert fresh.count("problems") == 1
    assert fresh.append("problems", [_problem(1)]).written == 1  # the lost row is not "stored"


def test_corrupt_part_file_names_the_file(tmp_path):
    store = Store(str(tmp_path))
    store.append("problems", [_problem(0)])
    bad = tmp_path / "problems" / "part-20990101T000000-corrupt.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(StoreError, match=r"corrupt part file .*part-20990101T000000-corrupt\.parquet"):
        Store(str(tmp_path)).read_rows("problems")


def test_unknown_table(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(StoreError, match=r"unknown table 'answers'.*problems"):
        store.append("answers", [])
    with pytest.raises(StoreError, match="unknown table"):
        store.read_rows("answers")


def test_unknown_column_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown columns"):
        Store(str(tmp_path)).append("problems", [{**_problem(0), "typo_column": 1}])


def test_empty_tables_read_empty(tmp_path):
    store = Store(str(tmp_path / "nothing-yet"))
    assert store.read_rows("samples") == []
    assert store.keys("problems") == set()
    assert store.count("samples") == 0


def test_file_uri_root(tmp_path):
    store = Store(f"file://{tmp_path}/s")
    store.append("problems", [_problem(0), _problem(1)])
    assert (tmp_path / "s" / "problems").is_dir()
    # The same data through a plain path.
    assert {r["index"] for r in Store(str(tmp_path / "s")).read_rows("problems")} == {0, 1}


def test_mock_filesystem_uri_root():
    # pyarrow's in-memory filesystem: a store on a non-local filesystem works unchanged.
    store = Store("mock:///bucket/store")
    assert store.append("samples", [_sample(0), _sample(1)]).written == 2
    assert store.append("samples", [_sample(1)]).skipped_existing == 1
    assert {r["problem_id"] for r in store.read_rows("samples")} == {
        problem_id("toy", "test", 0),
        problem_id("toy", "test", 1),
    }
    assert store.part_files("samples")[0].startswith("bucket/store/samples/part-")


def test_bad_root_is_a_store_error():
    with pytest.raises(StoreError, match="cannot open store root"):
        Store("nosuchscheme://bucket/x")


def test_stats_counts(tmp_path):
    store = Store(str(tmp_path))
    store.append("problems", [_problem(i) for i in range(4)])
    rows = [_sample(0), _sample(1, status="parse_error"), _sample(2, teacher="t2")]
    rows[1]["correct"] = None
    rows[2]["cost_usd"] = None
    store.append("samples", rows)
    stats = store.stats()
    assert stats["tables"]["problems"] == 4 and stats["tables"]["samples"] == 3
    assert stats["tables"]["journal_decompose"] == 0
    t1, t2 = stats["teachers"]["t1"], stats["teachers"]["t2"]
    assert t1["samples"] == 2 and t1["status"] == {"ok": 1, "parse_error": 1}
    assert t1["correct"] == 1 and t1["tokens_in"] == 20 and t1["tokens_out"] == 10
    assert t1["cost_usd"] == pytest.approx(1.0) and t1["cost_unknown"] == 0
    assert t2["cost_unknown"] == 1 and t2["cost_usd"] == 0.0


def test_dataset_reads_through_ray(tmp_path, ray_session):
    store = Store(str(tmp_path))
    assert store.dataset("samples").count() == 0
    store.append("samples", [_sample(i) for i in range(3)])
    store.append("samples", [_sample(i, k=1) for i in range(2)])
    ds = store.dataset("samples", columns=["sample_key", "usefulness"])
    rows = ds.take_all()
    assert sorted(r["sample_key"] for r in rows) == sorted(store.keys("samples"))
    assert all(list(r["usefulness"]) == pytest.approx([1.0, 2 / 3]) for r in rows)


# --- attempts, compaction, the writer lock (issue 9) ----------------------------------------


def _attempt(i: int, attempt: int, status: str) -> dict:
    return {**_sample(i, status=status), "attempt": attempt, "decompose_error": f"try {attempt}"}


def test_a_retry_supersedes_the_failed_attempt_and_the_history_stays(tmp_path, ray_session):
    store = Store(str(tmp_path))
    store.append("samples", [_attempt(0, 0, "api_error"), _attempt(1, 0, "ok")])
    assert store.append("samples", [_attempt(0, 1, "ok")]).written == 1
    assert store.append("samples", [_attempt(0, 0, "ok"), _attempt(0, 1, "ok")]).written == 0  # not newer
    fresh = Store(str(tmp_path))
    current = {r["sample_key"]: r for r in fresh.read_rows("samples")}
    assert len(current) == 2 and fresh.count("samples") == 2
    key0 = _sample(0)["sample_key"]
    assert (current[key0]["attempt"], current[key0]["status"]) == (1, "ok")
    history = [r for r in fresh.read_rows("samples", history=True) if r["sample_key"] == key0]
    assert sorted((r["attempt"], r["status"]) for r in history) == [(0, "api_error"), (1, "ok")]
    assert fresh.filter_keys("samples", [key0]).column("attempt").to_pylist() == [1]
    assert fresh.attempts("samples") == {key0: 1, _sample(1)["sample_key"]: 0}
    rows = fresh.dataset("samples", columns=["sample_key", "status"]).take_all()  # Ray Data sees the same
    assert sorted((r["sample_key"], r["status"]) for r in rows) == sorted((k, "ok") for k in current)
    assert fresh.dataset("samples", history=True).count() == 3


def test_part_files_from_before_attempts_read_as_attempt_0(tmp_path):
    old = to_table([_sample(0)], SAMPLES_SCHEMA).drop_columns(["attempt", "fingerprint", "settings", "run_id"])
    (tmp_path / "samples").mkdir()
    pq.write_table(old, tmp_path / "samples" / "part-00000000000000000001-old00000.parquet")
    store = Store(str(tmp_path))
    assert store.attempts("samples") == {_sample(0)["sample_key"]: 0}
    assert store.append("samples", [_attempt(0, 1, "ok")]).written == 1
    assert store.read_rows("samples")[0]["attempt"] == 1


def test_compaction_merges_parts_keeps_every_attempt_and_survives_a_crash(tmp_path):
    store = Store(str(tmp_path))
    for i in range(10):
        store.append("samples", [_attempt(i, 0, "api_error")])
    store.append("samples", [_attempt(i, 1, "ok") for i in range(5)])
    before = sorted(map(str, store.read_rows("samples", history=True)))
    current = sorted(map(str, store.read_rows("samples")))
    assert store.compact("samples") == (11, 1)
    fresh = Store(str(tmp_path))
    assert sorted(map(str, fresh.read_rows("samples", history=True))) == before
    assert sorted(map(str, fresh.read_rows("samples"))) == current
    # a compaction killed after writing its merged file but before deleting the parts: copies
    (merged,) = fresh.part_files("samples")
    copy = tmp_path / "samples" / "part-99999999999999999999-copy0000.parquet"
    copy.write_bytes((tmp_path / "samples" / merged.rsplit("/", 1)[-1]).read_bytes())
    crashed = Store(str(tmp_path))
    assert sorted(map(str, crashed.read_rows("samples"))) == current  # still one row per key
    assert crashed.count("samples") == 10
    assert crashed.compact("samples") == (2, 1)
    assert sorted(map(str, Store(str(tmp_path)).read_rows("samples", history=True))) == before


def test_spent_usd_is_the_ledger(tmp_path):
    store = Store(str(tmp_path))
    assert store.spent_usd() == 0.0
    store.append("calls", [{"call_id": "a", "charged_usd": 0.25}, {"call_id": "b", "charged_usd": 0.5}])
    store.append("calls", [{"call_id": "c", "charged_usd": None}])
    assert Store(str(tmp_path)).spent_usd() == pytest.approx(0.75)


def test_a_lease_needs_a_filesystem_with_conditional_writes():
    """The writer's lease on local paths and s3:// is in tests/test_lease.py; elsewhere it is refused."""
    with pytest.raises(StoreError, match="no conditional write"):
        Store("mock:///bucket/locked").lock("first").acquire()


def test_a_read_that_races_a_compaction_lists_the_files_again(tmp_path):
    """Another process compacts the part files between this reader's listing and its reads (the
    collect benchmark's poller hit it: FileNotFoundError as 'corrupt part file'): it lists again."""
    writer = Store(str(tmp_path))
    for i in range(4):
        writer.append("samples", [_sample(i)])
    reader = Store(str(tmp_path))
    stale = reader.part_files("samples")
    assert writer.compact("samples") == (4, 1)
    listings = []
    real = reader.part_files

    def listing(table: str) -> list[str]:
        listings.append(table)
        return stale if len(listings) == 1 else real(table)

    reader.part_files = listing
    assert sorted(r["sample_key"] for r in reader.read_rows("samples")) == sorted(
        _sample(i)["sample_key"] for i in range(4))
    assert len(listings) >= 2
    reader.part_files = lambda table: stale  # a listing that never catches up: a clear error, not a hang
    reader.refresh()
    with pytest.raises(StoreError, match="keeps vanishing"):
        reader.read_rows("samples")
