"""The Parquet store: a root URI (local path or any pyarrow filesystem URI) holding one folder per table.

Layout: ``<root>/<table>/part-<time>-<uuid>.parquet``. Every append writes one new part file,
first under a temporary name and then renamed, so a killed writer leaves either a whole part or
nothing a reader would pick up. Collection appends a part per finished call (or per few calls,
when they finish together); :meth:`Store.compact` merges small parts, and collection runs it at
the end of its stage.

Keys: appends never store a key twice. Versioned tables (``schema.VERSIONED``) store a key once
per ``attempt``: a retry is a new attempt, reads return the latest attempt of each key, and
``history=True`` returns every attempt. A per-table index of (key, attempt) per part file is built
from the key columns only, read in parallel, and kept up to date incrementally; look-ups read
only the part files that hold the wanted keys.

Bulk reads for pipelines go through Ray Data (:meth:`Store.dataset`); small driver-side reads
(key sets, stats) read the same files with pyarrow, which is far cheaper than a Ray job. Only one
process may write a store at a time (:meth:`Store.lock`, ``data_store.lease``): a store bound to a
lease holder (the driver's while it holds the lease, an actor's through ``holder=``) checks the lease
is still its own before it commits each part file, and refuses the commit otherwise.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from subq.data_store.schema import ATTEMPT_COLUMN, KEYS, SCHEMAS, VERSIONED, to_table

_TMP_PREFIX = "_tmp-"
_T = TypeVar("_T")


class StoreError(RuntimeError):
    """A store problem a user can act on (bad root, corrupt part file, unknown table, locked)."""


class _Vanished(Exception):
    """A part file listed a moment ago is gone: the writer compacted it into a new one. Reads list
    the files again and retry (a reader never holds the writer's lock)."""


_VANISHED_RETRIES = 5


@dataclass
class AppendResult:
    path: str | None  # the part file written, None if every row was already stored
    written: int
    skipped_existing: int


@dataclass
class _TableIndex:
    files: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict)  # path -> keys, attempts
    current: dict[str, int] = field(default_factory=dict)  # key -> its latest attempt

    @property
    def rows(self) -> int:
        return sum(len(k) for k, _ in self.files.values())

    def add(self, path: str, keys: list[str], attempts: list[int]) -> None:
        self.files[path] = (keys, attempts)
        for k, a in zip(keys, attempts, strict=True):
            if a > self.current.get(k, -1):
                self.current[k] = a

    def winner_masks(self) -> dict[str, list[bool]]:
        """Per part file, which rows are current (the latest attempt; the first copy in name order)."""
        out: dict[str, list[bool]] = {}
        seen: set[str] = set()
        for p in sorted(self.files):
            keys, attempts = self.files[p]
            mask = []
            for k, a in zip(keys, attempts, strict=True):
                win = a == self.current[k] and k not in seen
                if win:
                    seen.add(k)
                mask.append(win)
            out[p] = mask
        return out


def _read_parquet(files: list[str], fs: pafs.FileSystem, columns: list[str] | None, table: str):
    """Ray Data's Parquet read of known files through its V1 datasource. The V2 default (Ray >= 2.60)
    starts a pool of footer-reading actors per read (up to 32, each a new worker process): a training
    run's read of a few part files took 2.2-2.6 s warm that way and 0.2-0.5 s through V1, which reads the
    footers on the driver and has no use for V2's listing push-downs here (the files are listed already).
    The flag only steers how ``read_parquet`` builds the datasource, so it is restored right after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, filesystem=fs, columns=columns, schema=SCHEMAS[table])
    finally:
        ctx.use_datasource_v2 = before


def _parallel(fn: Callable[[str], _T], paths: list[str]) -> list[_T]:
    if len(paths) <= 1:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:  # pyarrow releases the GIL
        return list(pool.map(fn, paths))


class Store:
    def __init__(self, root: str, holder: str | None = None):
        self.root_uri = str(root)
        # the lease holder id this store writes for (a collection actor's); None: the lease this
        # process holds on the store, if any (``data_store.lease``); writes without either are unchecked
        self.holder = holder
        self._backend: Any = None
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self._as_uri(self.root_uri))
        except (pa.ArrowInvalid, ValueError, OSError) as e:
            raise StoreError(f"cannot open store root {self.root_uri!r}: {e}") from e
        self.root = self.root.rstrip("/")
        self._index: dict[str, _TableIndex] = {}
        self._mutex = threading.Lock()  # an actor appends from a worker thread while it plans

    @staticmethod
    def _as_uri(root: str) -> str:
        if "://" in root:
            return root
        import os

        return os.path.abspath(os.path.expanduser(root))

    def __repr__(self) -> str:
        return f"Store({self.root_uri!r})"

    def lock(self, command: str = "", config: Any = None):
        """The store's writer lease (a context manager, ``data_store.lease.StoreLease``); acquiring
        raises ``StoreLocked`` naming the holder if another run holds it."""
        from subq.data_store.lease import StoreLease

        return StoreLease(self, command, config)

    def _lease_backend(self) -> Any:
        if self._backend is None:
            from subq.data_store.lease import backend_for

            self._backend = backend_for(self)
        return self._backend

    def check_lease(self) -> None:
        """Raise ``LeaseLost`` if this store writes for a lease that is no longer valid and its own."""
        from subq.data_store.lease import check_lease, held_holder

        holder = self.holder or held_holder(self)
        if holder is not None:
            check_lease(self, holder)

    # ---- paths -----------------------------------------------------------------------------
    def table_dir(self, table: str) -> str:
        if table not in SCHEMAS:
            raise StoreError(f"unknown table {table!r}; tables: {sorted(SCHEMAS)}")
        return f"{self.root}/{table}"

    def part_files(self, table: str) -> list[str]:
        """The finished part files of a table, oldest first (temporary files are ignored)."""
        selector = pafs.FileSelector(self.table_dir(table), allow_not_found=True)
        try:
            info = self.fs.get_file_info(selector)
        except FileNotFoundError:  # the directory was stat-ed, then could not be opened: list once more
            info = self.fs.get_file_info(selector)
        files = [
            f.path
            for f in info
            if f.type == pafs.FileType.File
            and f.base_name.endswith(".parquet")
            and not f.base_name.startswith(_TMP_PREFIX)
        ]
        return sorted(files)

    # ---- the key index ---------------------------------------------------------------------
    def _read_part(self, table: str, path: str, columns: list[str] | None = None) -> pa.Table:
        try:
            return pq.read_table(path, filesystem=self.fs, columns=columns, schema=SCHEMAS[table])
        except FileNotFoundError as e:
            raise _Vanished(path) from e
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"corrupt part file {path} in table {table!r}: {e}") from e

    def _read_keys(self, table: str, path: str) -> tuple[list[str], list[int]]:
        key = KEYS[table]
        if table not in VERSIONED:
            keys = self._read_part(table, path, [key]).column(key).to_pylist()
            return keys, [0] * len(keys)
        t = self._read_part(table, path, [key, ATTEMPT_COLUMN])
        return t.column(key).to_pylist(), [a or 0 for a in t.column(ATTEMPT_COLUMN).to_pylist()]

    def _refresh(self, table: str) -> _TableIndex:
        """Bring the table's index up to date, reading the key columns of new part files only."""
        return self._retrying(lambda: self._refresh_once(table))

    def _retrying(self, read: Callable[[], _T]) -> _T:
        """``read()``, again while a part file it listed was compacted away in the meantime."""
        for _ in range(_VANISHED_RETRIES - 1):
            try:
                return read()
            except _Vanished:
                continue
        try:
            return read()
        except _Vanished as e:
            raise StoreError(f"part file {e} keeps vanishing while it is read (a compaction loop?)") from None

    def _refresh_once(self, table: str) -> _TableIndex:
        files = self.part_files(table)
        with self._mutex:
            idx = self._index.setdefault(table, _TableIndex())
            new = [f for f in files if f not in idx.files]
            gone = set(idx.files) - set(files)
        found = _parallel(lambda p: self._read_keys(table, p), new)
        with self._mutex:
            if gone:  # compacted away: rebuild the latest attempts from what remains
                kept = {p: v for p, v in idx.files.items() if p not in gone}
                idx = self._index[table] = _TableIndex()
                for p, (k, a) in kept.items():
                    idx.add(p, k, a)
            for path, (keys, attempts) in zip(new, found, strict=True):
                idx.add(path, keys, attempts)
            return idx

    def _indexed(self, table: str, fresh: bool) -> _TableIndex:
        self.table_dir(table)  # validates the table name (StoreError, not KeyError)
        if fresh or table not in self._index:
            return self._refresh(table)
        return self._index[table]

    def keys(self, table: str, *, fresh: bool = False) -> set[str]:
        """Stored keys of a table, cached per object; ``fresh=True`` also picks up part files
        other processes wrote since (reading only the key columns of those new files)."""
        idx = self._indexed(table, fresh)
        with self._mutex:
            return set(idx.current)

    def attempts(self, table: str, *, fresh: bool = False) -> dict[str, int]:
        """key -> its latest stored attempt (0 for unversioned tables)."""
        idx = self._indexed(table, fresh)
        with self._mutex:
            return dict(idx.current)

    def refresh(self) -> None:
        """Forget the cached index (another process may have appended)."""
        with self._mutex:
            self._index.clear()

    # ---- writes ----------------------------------------------------------------------------
    def append(self, table: str, rows: list[dict[str, Any]] | pa.Table, *, fresh: bool = True) -> AppendResult:
        """Write new rows as one durable part file. A row whose key (versioned tables: key and an
        attempt no newer than the stored one) is already stored, or repeated in the batch, is
        dropped. ``fresh=False`` trusts this object's index (the caller is the only writer)."""
        directory = self.table_dir(table)  # validates the table name
        schema = SCHEMAS[table]
        data = rows if isinstance(rows, pa.Table) else to_table(list(rows), schema)
        data = data.select(schema.names).cast(schema)
        key = KEYS[table]
        keys = data.column(key).to_pylist()
        attempts = ([a or 0 for a in data.column(ATTEMPT_COLUMN).to_pylist()] if table in VERSIONED
                    else [0] * len(keys))
        current = self.attempts(table, fresh=fresh)
        keep, seen = [], set()
        for k, a in zip(keys, attempts, strict=True):
            keep.append(a > current.get(k, -1) and k not in seen)
            seen.add(k)
        skipped = len(keep) - sum(keep)
        if skipped:
            data = data.filter(pa.array(keep, type=pa.bool_()))
            keys = [k for k, ok in zip(keys, keep, strict=True) if ok]
            attempts = [a for a, ok in zip(attempts, keep, strict=True) if ok]
        if data.num_rows == 0:
            return AppendResult(None, 0, skipped)
        final = self._write_part(directory, data)
        with self._mutex:
            self._index.setdefault(table, _TableIndex()).add(final, keys, attempts)
        return AppendResult(final, data.num_rows, skipped)

    def _write_part(self, directory: str, data: pa.Table) -> str:
        self.fs.create_dir(directory, recursive=True)
        # nanosecond time first: part files sort in write order
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp, final = f"{directory}/{_TMP_PREFIX}{name}", f"{directory}/{name}"
        pq.write_table(data, tmp, filesystem=self.fs)
        try:
            self.check_lease()  # the commit is the move: a writer whose lease lapsed stops here
        except StoreError:
            self.fs.delete_file(tmp)
            raise
        self.fs.move(tmp, final)
        return final

    def compact(self, table: str, target_rows: int = 200_000) -> tuple[int, int]:
        """Merge the table's small part files into files of up to ``target_rows`` rows; every
        attempt is kept. Returns (files before, files after). Call it holding :meth:`lock`.

        The merged file is complete before the parts it replaces are deleted; a crash in between
        leaves copies that reads ignore (first copy wins) and the next compaction removes.
        """
        idx = self._refresh(table)
        files = sorted(idx.files)
        small = [p for p in files if len(idx.files[p][0]) < target_rows]
        groups: list[list[str]] = [[]]
        for p in small:
            if groups[-1] and sum(len(idx.files[q][0]) for q in groups[-1]) + len(idx.files[p][0]) > target_rows:
                groups.append([])
            groups[-1].append(p)
        for group in groups:
            if len(group) < 2:
                continue
            parts = _parallel(lambda p: self._read_part(table, p), group)
            data = pa.concat_tables(parts)
            seen: set[tuple[str, int]] = set()
            keep = []
            for path in group:  # drop exact copies left by a crashed compaction
                for k, a in zip(*idx.files[path], strict=True):
                    keep.append((k, a) not in seen)
                    seen.add((k, a))
            if not all(keep):
                data = data.filter(pa.array(keep, type=pa.bool_()))
            self._write_part(self.table_dir(table), data)
            self.check_lease()
            for path in group:
                self.fs.delete_file(path)
        return len(files), len(self.part_files(table))

    # ---- reads -----------------------------------------------------------------------------
    def read_table(self, table: str, columns: list[str] | None = None, *, history: bool = False) -> pa.Table:
        """The table as one Arrow table: the latest attempt of each key, or every stored row
        with ``history=True`` (driver-side; use :meth:`dataset` for big reads)."""
        return self._retrying(lambda: self._read_table_once(table, columns, history))

    def _read_table_once(self, table: str, columns: list[str] | None, history: bool) -> pa.Table:
        files, masks = self._snapshot(table, history)
        if not files:
            schema = SCHEMAS[table]
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        parts = _parallel(lambda p: self._read_part(table, p, columns), files)
        if masks is not None:
            parts = [t.filter(pa.array(masks[p], pa.bool_())) for p, t in zip(files, parts, strict=True)]
        return pa.concat_tables(parts)

    def _snapshot(self, table: str, history: bool) -> tuple[list[str], dict[str, list[bool]] | None]:
        """The table's part files and, when some rows are superseded, which rows are current."""
        idx = self._refresh(table)
        with self._mutex:
            files = sorted(idx.files)
            masks = None if history or idx.rows == len(idx.current) else idx.winner_masks()
        return files, masks

    def read_rows(self, table: str, columns: list[str] | None = None, *, history: bool = False) -> list[dict[str, Any]]:
        return self.read_table(table, columns, history=history).to_pylist()

    def count(self, table: str) -> int:
        """Keys stored (versioned tables: each key once, whatever its attempts)."""
        return len(self._refresh(table).current)

    def filter_keys(self, table: str, keys: Iterable[str], *, history: bool = False) -> pa.Table:
        """Rows of ``table`` whose key is in ``keys`` (their latest attempts unless ``history``),
        reading only the part files that hold them, in parallel."""
        wanted = set(keys)
        return self._retrying(lambda: self._filter_keys_once(table, wanted, history))

    def _filter_keys_once(self, table: str, wanted: set[str], history: bool) -> pa.Table:
        files, masks = self._snapshot(table, history)
        idx = self._index[table]
        picks: dict[str, list[int]] = {}
        for path in files:
            ks = idx.files[path][0]
            win = masks[path] if masks is not None else None
            rows = [i for i, k in enumerate(ks) if k in wanted and (win is None or win[i])]
            if rows:
                picks[path] = rows
        if not picks:
            return SCHEMAS[table].empty_table()
        parts = _parallel(lambda p: self._read_part(table, p).take(picks[p]), list(picks))
        return pa.concat_tables(parts)

    def dataset(self, table: str, columns: list[str] | None = None, *, history: bool = False):
        """The table as a Ray Data dataset (latest attempts; an empty one when the table has no rows)."""
        import ray.data

        files, masks = self._snapshot(table, history)
        if not files:
            return ray.data.from_arrow(self.read_table(table, columns))
        if masks is None:
            return _read_parquet(files, self.fs, columns, table)
        key = KEYS[table]
        idx = self._index[table]
        with self._mutex:
            pairs = [(k, a) for p in files for k, a in zip(*idx.files[p], strict=True)]
            current = dict(idx.current)
        if len(set(pairs)) != len(pairs):  # copies left by a crashed compaction: dedupe here
            return ray.data.from_arrow(self.read_table(table, columns))
        superseded = {(k, a) for k, a in pairs if a < current[k]}
        cols = None if columns is None else list(dict.fromkeys([*columns, key, ATTEMPT_COLUMN]))

        def latest(batch: pa.Table) -> pa.Table:
            ks, ats = batch.column(key).to_pylist(), batch.column(ATTEMPT_COLUMN).to_pylist()
            keep = [(k, a or 0) not in superseded for k, a in zip(ks, ats, strict=True)]
            batch = batch.filter(pa.array(keep, pa.bool_()))
            return batch if columns is None else batch.select(columns)

        return _read_parquet(files, self.fs, cols, table).map_batches(latest, batch_format="pyarrow")

    def spent_usd(self) -> float:
        """What the teacher calls recorded in this store were charged (the ledger ``calls``)."""
        charged = self.read_table("calls", ["charged_usd"]).column("charged_usd").to_pylist()
        return float(sum(c or 0.0 for c in charged))

    def stats(self) -> dict[str, Any]:
        from subq.data_store.store_stats import store_stats

        return store_stats(self)
