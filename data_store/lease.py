"""One writer per store: a lease with an expiry that the writing run renews.

The lease is a small JSON object at ``<root>/_writer.lease``: a holder id (unique per
acquisition), host, pid, command, start time and ``expires_at``. The run's driver renews it every
``renew_s`` to ``now + ttl_s``. Liveness is that heartbeat, not a pid: a run killed with ``kill -9``
stops renewing, its lease lapses ``ttl_s`` later, and the next run takes it over.

Writers stop when the lease is not theirs: a :class:`~subq.data_store.store.Store` bound to a holder
(the driver's stores while it holds the lease, the collection actors' through ``Store(root,
holder=...)``) reads the lease before committing each part file and refuses the commit
(:class:`LeaseLost`) when the lease is gone, held by someone else, or within ``margin_s`` of its
expiry. So a killed driver's orphaned actors stop writing within one ``ttl_s``.

Every change of the lease is atomic, so that when several runs race for a free or lapsed lease
exactly one wins:

- local paths: changes happen under an exclusive ``fcntl.flock`` on the store's root directory (a
  compare-and-swap on the lease's bytes); the lease file itself appears by ``os.link`` or
  ``os.replace`` of a complete temporary file, so lock-free readers never see half a lease;
- ``s3://``: conditional writes through boto3: create with ``If-None-Match: *``, renew and take over
  with ``If-Match: <etag>``. pyarrow's S3 filesystem has no conditional put. A service that ignores
  these headers is detected when the lease is taken (a probe write that must be refused) and
  refused with a clear error rather than trusted.

Other pyarrow filesystems have no conditional write: a lease there is refused (``StoreError``).
Clocks: expiry times are wall-clock seconds written by the holder's host and read by others, so
hosts sharing a store need clocks in sync to well under ``ttl_s`` (NTP).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import pyarrow.fs as pafs
from subq.data_store.store import Store, StoreError

LEASE_NAME = "_writer.lease"


class StoreLocked(StoreError):
    """Another run holds the store's lease."""


class LeaseLost(StoreError):
    """A write was refused: this writer's lease lapsed, was released, or was taken over."""


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise StoreError(f"{name} must be a number of seconds, got {raw!r}") from None


@dataclass
class LeaseConfig:
    # A lease not renewed for this long has lapsed: its writers are refused, another run may take it.
    ttl_s: float = field(default_factory=lambda: _env_float("SUBQ_LEASE_TTL_S", 30.0))
    # The holder renews this often; well under ttl_s, so one or two missed renewals are survived.
    renew_s: float = field(default_factory=lambda: _env_float("SUBQ_LEASE_RENEW_S", 10.0))
    # A writer refuses to commit this close to the expiry it reads (a commit takes time; clocks drift).
    margin_s: float = field(default_factory=lambda: _env_float("SUBQ_LEASE_MARGIN_S", 2.0))

    def __post_init__(self) -> None:
        if not 0 < self.renew_s < self.ttl_s or not 0 <= self.margin_s < self.ttl_s - self.renew_s:
            raise StoreError(f"lease settings need 0 < renew_s < ttl_s and 0 <= margin_s < ttl_s - renew_s, "
                             f"got ttl_s={self.ttl_s}, renew_s={self.renew_s}, margin_s={self.margin_s}")


@dataclass
class LeaseInfo:
    holder: str  # unique per acquisition: tells this run's lease from a successor's
    host: str
    pid: int
    command: str
    started_at: float  # epoch seconds
    expires_at: float  # epoch seconds; renewed by the holder

    def payload(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def parse(data: bytes) -> LeaseInfo | None:
        try:
            return LeaseInfo(**json.loads(data.decode()))
        except (ValueError, TypeError):
            return None


class _Backend(Protocol):
    ident: str  # where the lease lives (one lease per store root)
    where: str  # the same, for messages

    def read(self) -> tuple[bytes | None, Any]: ...  # (content, version) or (None, None) if absent
    def create(self, data: bytes) -> Any: ...  # the new version, or None if a lease exists
    def replace(self, data: bytes, version: Any) -> Any: ...  # the new version, or None if it changed
    def delete(self, version: Any) -> bool: ...  # False if it changed


class _LocalBackend:
    """Compare-and-swap under an exclusive ``flock`` on the store's root directory (no extra file
    that could be removed under a waiter); the version is the lease's bytes. The lease file appears
    by ``os.link`` / ``os.replace`` of a whole temporary file, so lock-free readers see all of it."""

    def __init__(self, root: str):
        self.root = root
        self.path = f"{root}/{LEASE_NAME}"
        self.ident = self.where = self.path
        self.made_root = False  # the lease created the root: an empty root is removed on release

    @contextlib.contextmanager
    def _locked(self, create: bool = False):
        if create and not os.path.isdir(self.root):
            os.makedirs(self.root, exist_ok=True)
            self.made_root = True
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def read(self) -> tuple[bytes | None, Any]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, data

    def _put(self, data: bytes, replace: bool) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            if replace:
                os.replace(tmp, self.path)
            else:
                os.link(tmp, self.path)  # atomic create-if-absent with the whole content
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def create(self, data: bytes) -> Any:
        for _ in range(5):
            try:
                with self._locked(create=True):
                    self._put(data, replace=False)
                return data
            except FileExistsError:
                return None
            except FileNotFoundError:
                continue  # a run releasing a new, empty store removed its root meanwhile
        raise StoreError(f"cannot create the lease {self.path}: its directory keeps vanishing")

    def replace(self, data: bytes, version: Any) -> Any:
        try:
            with self._locked():
                if self.read()[1] != version:
                    return None
                self._put(data, replace=True)
                return data
        except FileNotFoundError:
            return None

    def delete(self, version: Any) -> bool:
        try:
            with self._locked():
                if self.read()[1] != version:
                    return False
                os.unlink(self.path)
                if self.made_root:  # leave no trace of a run that wrote nothing
                    with contextlib.suppress(OSError):
                        os.rmdir(self.root)
                return True
        except FileNotFoundError:
            return False


def backend_for(store: Store) -> _Backend:
    if isinstance(store.fs, pafs.LocalFileSystem):
        return _LocalBackend(store.root)
    if store.fs.type_name == "s3":
        from subq.data_store.lease_s3 import S3LeaseBackend

        return S3LeaseBackend(store.root_uri, store.root, LEASE_NAME)
    raise StoreError(f"store {store.root_uri}: a writer's lease needs a local path or s3:// "
                     f"({store.fs.type_name} has no conditional write)")


# this process's held leases: ident -> lease (a nested ``lock()`` on the same store joins it)
_HELD: dict[str, StoreLease] = {}
_HELD_MUTEX = threading.Lock()


def held_holder(store: Store) -> str | None:
    """The holder id of the lease this process holds on ``store``, if any."""
    if not _HELD:
        return None
    with _HELD_MUTEX:
        for lease in _HELD.values():
            if lease.store.root == store.root and lease.store.fs.type_name == store.fs.type_name:
                return lease.holder
    return None


def check_lease(store: Store, holder: str, config: LeaseConfig | None = None) -> None:
    """Raise :class:`LeaseLost` unless ``holder`` holds the store's lease with more than
    ``margin_s`` left (read afresh: a takeover is seen at the next commit)."""
    margin = (config or LeaseConfig()).margin_s
    backend = store._lease_backend()
    data, _ = backend.read()
    info = LeaseInfo.parse(data) if data is not None else None
    if info is None:
        raise LeaseLost(f"write to {store.root_uri} refused: this run's lease {backend.where} is gone "
                        f"(released, or removed by hand)")
    if info.holder != holder:
        raise LeaseLost(f"write to {store.root_uri} refused: the lease was taken over by pid {info.pid} on "
                        f"{info.host} ({info.command!r}) after this run stopped renewing it")
    left = info.expires_at - time.time()
    if left <= margin:
        raise LeaseLost(f"write to {store.root_uri} refused: this run's lease lapsed {-left:.1f} s ago "
                        f"(its driver stopped renewing it)" if left < 0 else
                        f"write to {store.root_uri} refused: this run's lease expires in {left:.1f} s "
                        f"(its driver stopped renewing it)")


def refuse_if_held(store: Store) -> None:
    """Raise :class:`StoreLocked` now if another run holds an unexpired lease on ``store`` (a cheap
    early look for commands that load a lot before they take the lease; taking it still decides)."""
    data, _ = store._lease_backend().read()
    held = LeaseInfo.parse(data) if data is not None else None
    if held is not None and held.expires_at > time.time() and held_holder(store) != held.holder:
        raise StoreLocked(StoreLease(store)._message(held))


class StoreLease:
    """The store's writer lease as a context manager (``with store.lock("subq collect"):``).

    ``acquire`` raises :class:`StoreLocked` naming the holder when another run holds an unexpired
    lease; a lapsed one is taken over by a conditional write. A second ``lock()`` on the same store in
    this process joins the held lease (so a command can take it before Ray starts and the library
    code it calls can take it again)."""

    def __init__(self, store: Store, command: str = "", config: LeaseConfig | None = None):
        self.store, self.config = store, config or LeaseConfig()
        self.command = command or " ".join(os.path.basename(a) for a in sys.argv[:2]) or "python"
        self.backend = store._lease_backend()
        self.holder: str | None = None
        self.info: LeaseInfo | None = None
        self._version: Any = None
        self._joined: StoreLease | None = None  # the outer lease this one joined
        self._depth = 0  # joins of this (outer) lease still open
        self.lost: str | None = None  # why renewal stopped, if it did
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"StoreLease({self.backend.where!r}, holder={self.holder!r})"

    # ---- acquire / release -----------------------------------------------------------------
    def acquire(self) -> StoreLease:
        if self.holder is not None:
            return self  # already held or joined by this object
        with _HELD_MUTEX:
            outer = _HELD.get(self.backend.ident)
            if outer is not None:
                outer._depth += 1
                self._joined, self.holder, self.info = outer, outer.holder, outer.info
                return self
        for _ in range(5):
            now = time.time()
            info = LeaseInfo(uuid.uuid4().hex, socket.gethostname(), os.getpid(), self.command, now,
                             now + self.config.ttl_s)
            version = self.backend.create(info.payload())
            if version is None:
                data, current = self.backend.read()
                if data is None:
                    continue  # released between our try and the read: try again
                held = LeaseInfo.parse(data)
                if held is not None and held.expires_at > time.time():
                    raise StoreLocked(self._message(held))
                version = self.backend.replace(info.payload(), current)  # a lapsed (or unreadable) lease
                if version is None:
                    continue  # another run took it over, or its holder renewed: look again
            self.holder, self.info, self._version = info.holder, info, version
            with _HELD_MUTEX:
                _HELD[self.backend.ident] = self
            self._thread = threading.Thread(target=self._renew_loop, name="store-lease", daemon=True)
            self._thread.start()
            return self
        raise StoreLocked(f"could not take the lease of store {self.store.root_uri}: "
                          f"{self.backend.where} keeps changing")

    def release(self) -> None:
        if self.holder is None:
            return
        if self._joined is not None:
            with _HELD_MUTEX:
                self._joined._depth -= 1
            self._joined = self.holder = None
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with _HELD_MUTEX:
            if _HELD.get(self.backend.ident) is self:
                del _HELD[self.backend.ident]
        if self.lost is None:
            with contextlib.suppress(OSError, StoreError):
                self.backend.delete(self._version)
        self.holder = None

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- renewal ---------------------------------------------------------------------------
    def renew(self) -> bool:
        """Push the expiry to ``now + ttl_s``; False (and ``lost`` set) if the lease is no longer ours."""
        assert self.info is not None
        info = LeaseInfo(**{**asdict(self.info), "expires_at": time.time() + self.config.ttl_s})
        version = self.backend.replace(info.payload(), self._version)
        if version is None:
            self.lost = "the lease changed under this run (taken over after it lapsed, or removed)"
            return False
        self.info, self._version = info, version
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.config.renew_s):
            try:
                if not self.renew():
                    return  # never overwrite a successor; our writers are refused from now on
            except Exception:  # noqa: BLE001 - a network blip: try again at the next beat
                continue

    def _message(self, held: LeaseInfo) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.started_at))
        until = time.strftime("%H:%M:%S", time.localtime(held.expires_at))
        left = max(0.0, held.expires_at - time.time())
        return (f"store {self.store.root_uri} is being written by pid {held.pid} on {held.host} "
                f"({held.command!r}, since {since}); wait for it to finish. If that run is dead, its lease "
                f"lapses at {until} (in {left:.0f} s, {self.config.ttl_s:.0f} s after its last renewal): "
                f"then run this command again and it takes the lease over")
