"""The Parquet store: a root URI (local path or any pyarrow filesystem URI) holding one folder per table.

Layout: ``<root>/<table>/part-<time>-<uuid>.parquet``. Every append writes one new part file,
first under a temporary name and then renamed, so a killed writer leaves either a whole part or
nothing a reader would pick up (durable per batch). Keys are unique per table: appends drop rows
whose key is already stored (or repeated in the batch) and say how many they dropped.

Bulk reads for pipelines go through Ray Data (:meth:`Store.dataset`); small driver-side reads
(key sets, stats) read the same files with pyarrow, which is far cheaper than a Ray job.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_store.schema import KEYS, SCHEMAS, to_table

_TMP_PREFIX = "_tmp-"


class StoreError(RuntimeError):
    """A store problem a user can act on (bad root, corrupt part file, unknown table)."""


@dataclass
class AppendResult:
    path: str | None  # the part file written, None if every row was already stored
    written: int
    skipped_existing: int


class Store:
    def __init__(self, root: str):
        self.root_uri = str(root)
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self._as_uri(self.root_uri))
        except (pa.ArrowInvalid, ValueError, OSError) as e:
            raise StoreError(f"cannot open store root {self.root_uri!r}: {e}") from e
        self.root = self.root.rstrip("/")
        self._key_cache: dict[str, set[str]] = {}
        self._files_seen: dict[str, set[str]] = {}  # part files whose keys are in the cache

    @staticmethod
    def _as_uri(root: str) -> str:
        if "://" in root:
            return root
        import os

        return os.path.abspath(os.path.expanduser(root))

    def __repr__(self) -> str:
        return f"Store({self.root_uri!r})"

    # ---- paths -----------------------------------------------------------------------------
    def table_dir(self, table: str) -> str:
        if table not in SCHEMAS:
            raise StoreError(f"unknown table {table!r}; tables: {sorted(SCHEMAS)}")
        return f"{self.root}/{table}"

    def part_files(self, table: str) -> list[str]:
        """The finished part files of a table, oldest first (temporary files are ignored)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.table_dir(table), allow_not_found=True))
        files = [
            f.path
            for f in info
            if f.type == pafs.FileType.File
            and f.base_name.endswith(".parquet")
            and not f.base_name.startswith(_TMP_PREFIX)
        ]
        return sorted(files)

    # ---- writes ----------------------------------------------------------------------------
    def append(self, table: str, rows: list[dict[str, Any]] | pa.Table) -> AppendResult:
        """Write new rows as one durable part file, skipping keys that are already stored."""
        directory = self.table_dir(table)  # validates the table name
        schema = SCHEMAS[table]
        data = rows if isinstance(rows, pa.Table) else to_table(list(rows), schema)
        data = data.select(schema.names).cast(schema)
        key = KEYS[table]
        existing = self.keys(table, fresh=True)  # other writers (actors) may have appended
        seen: set[str] = set()
        keep = []
        for k in data.column(key).to_pylist():
            fresh = k not in existing and k not in seen
            keep.append(fresh)
            seen.add(k)
        skipped = len(keep) - sum(keep)
        data = data.filter(pa.array(keep, type=pa.bool_())) if skipped else data
        if data.num_rows == 0:
            return AppendResult(None, 0, skipped)
        self.fs.create_dir(directory, recursive=True)
        # nanosecond time first: part files sort in write order
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp, final = f"{directory}/{_TMP_PREFIX}{name}", f"{directory}/{name}"
        pq.write_table(data, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)
        self._files_seen.setdefault(table, set()).add(final)
        self._key_cache.setdefault(table, set()).update(data.column(key).to_pylist())
        return AppendResult(final, data.num_rows, skipped)

    # ---- reads -----------------------------------------------------------------------------
    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """The whole table as one Arrow table (driver-side; use :meth:`dataset` for big reads)."""
        files = self.part_files(table)  # validates the table name (StoreError, not KeyError)
        schema = SCHEMAS[table]
        if not files:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        parts = []
        for path in files:
            try:
                parts.append(pq.read_table(path, filesystem=self.fs, columns=columns, schema=schema))
            except (pa.ArrowInvalid, OSError) as e:
                raise StoreError(f"corrupt part file {path} in table {table!r}: {e}") from e
        return pa.concat_tables(parts)

    def read_rows(self, table: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
        return self.read_table(table, columns).to_pylist()

    def keys(self, table: str, *, fresh: bool = False) -> set[str]:
        """Stored keys of a table, cached per object.

        Appends through this object keep the cache true; ``fresh=True`` also picks up part files
        other processes wrote since, reading only those new files (cheap enough per batch).
        """
        self.table_dir(table)  # validates the table name (StoreError, not KeyError)
        if table not in self._key_cache or fresh:
            self._read_new_keys(table)
        return set(self._key_cache[table])

    def _read_new_keys(self, table: str) -> None:
        key = KEYS[table]
        cache = self._key_cache.setdefault(table, set())
        seen = self._files_seen.setdefault(table, set())
        for path in self.part_files(table):
            if path in seen:
                continue
            try:
                cache.update(pq.read_table(path, filesystem=self.fs, columns=[key]).column(key).to_pylist())
            except (pa.ArrowInvalid, OSError) as e:
                raise StoreError(f"corrupt part file {path} in table {table!r}: {e}") from e
            seen.add(path)

    def refresh(self) -> None:
        """Forget cached keys (another process may have appended)."""
        self._key_cache.clear()
        self._files_seen.clear()

    def count(self, table: str) -> int:
        total = 0
        for path in self.part_files(table):
            try:
                total += pq.read_metadata(path, filesystem=self.fs).num_rows
            except (pa.ArrowInvalid, OSError) as e:
                raise StoreError(f"corrupt part file {path} in table {table!r}: {e}") from e
        return total

    def dataset(self, table: str, columns: list[str] | None = None):
        """The table as a Ray Data dataset (an empty one when the table has no rows yet)."""
        import ray.data

        files = self.part_files(table)
        if not files:
            return ray.data.from_arrow(self.read_table(table, columns))
        return ray.data.read_parquet(files, filesystem=self.fs, columns=columns, schema=SCHEMAS[table])

    def filter_keys(self, table: str, keys: Iterable[str]) -> pa.Table:
        """Rows of ``table`` whose key is in ``keys``."""
        key = KEYS[table]
        data = self.read_table(table)
        return data.filter(pc.is_in(data.column(key), value_set=pa.array(list(keys), pa.string())))

    # ---- summary ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts per table; samples by status and teacher, with tokens and $ per teacher."""
        out: dict[str, Any] = {"root": self.root_uri, "tables": {}}
        for table in SCHEMAS:
            out["tables"][table] = self.count(table)
        samples = self.read_table(
            "samples",
            ["teacher_model", "status", "cost_usd", "correct", "decompose_tokens_in",
             "decompose_tokens_out", "answer_tokens_in", "answer_tokens_out",
             "feedback_tokens_in", "feedback_tokens_out"],
        ).to_pylist()
        teachers: dict[str, dict[str, Any]] = {}
        for row in samples:
            t = teachers.setdefault(
                row["teacher_model"],
                {"samples": 0, "status": {}, "correct": 0, "tokens_in": 0, "tokens_out": 0,
                 "cost_usd": 0.0, "cost_unknown": 0},
            )
            t["samples"] += 1
            t["status"][row["status"]] = t["status"].get(row["status"], 0) + 1
            t["correct"] += bool(row["correct"])
            for stage in ("decompose", "answer", "feedback"):
                t["tokens_in"] += row[f"{stage}_tokens_in"] or 0
                t["tokens_out"] += row[f"{stage}_tokens_out"] or 0
            if row["cost_usd"] is None:
                t["cost_unknown"] += 1
            else:
                t["cost_usd"] += row["cost_usd"]
        out["teachers"] = teachers
        return out
