"""One writer per store: a lock file on local paths, a lease object on object stores.

The lock records the holder's pid, host, command and a heartbeat the holder renews every
``heartbeat_s``. A second writer is refused with a message naming the holder. A lock is stale,
and is taken over, when its holder ran on this host and its pid is gone, or when its heartbeat
is older than ``stale_after_s`` (a holder on another machine that died). Local paths create the
file atomically (``O_EXCL``); object stores have no such primitive through pyarrow, so the lease
is written, then read back after a short pause to check that no other writer overwrote it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs
from subq.data_store.store import Store, StoreError

LOCK_NAME = "_writer.lock"


class StoreLocked(StoreError):
    """Another process is writing this store."""


@dataclass
class LockInfo:
    token: str  # unique per acquisition: tells our lock from a successor's
    pid: int
    host: str
    command: str
    started_at: float  # epoch seconds
    heartbeat_at: float


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    def __init__(self, store: Store, command: str = "", stale_after_s: float = 120.0, heartbeat_s: float = 15.0):
        self.store = store
        self.path = f"{store.root}/{LOCK_NAME}"
        self.local = isinstance(store.fs, pafs.LocalFileSystem)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        now = time.time()
        self.info = LockInfo(uuid.uuid4().hex, os.getpid(), socket.gethostname(),
                             command or " ".join(sys.argv[:2]) or "python", now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- acquire / release -----------------------------------------------------------------
    def acquire(self) -> StoreLock:
        self.store.fs.create_dir(self.store.root, recursive=True)
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="store-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            if holder is None:  # vanished or half-written between our try and this read
                time.sleep(0.1)
                continue
            if not self._stale(holder):
                raise StoreLocked(self._message(holder))
            self._remove()  # a dead holder: take over
        raise StoreLocked(f"could not lock store {self.store.root_uri}: {self.path} keeps changing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.token == self.info.token:
            self._remove()

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- helpers ---------------------------------------------------------------------------
    def _payload(self) -> bytes:
        return json.dumps(asdict(self.info)).encode()

    def _create(self) -> bool:
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
            return True
        if self.store.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        self._write()
        time.sleep(0.5)  # another writer racing us would have overwritten the lease by now
        holder = self._read()
        return holder is not None and holder.token == self.info.token

    def _write(self) -> None:
        if self.local:  # atomic replace: a reader never sees half a file
            tmp = f"{self.path}.{self.info.token}.tmp"
            with open(tmp, "wb") as f:
                f.write(self._payload())
            os.replace(tmp, self.path)
            return
        with self.store.fs.open_output_stream(self.path) as f:
            f.write(self._payload())

    def _read(self) -> LockInfo | None:
        try:
            with self.store.fs.open_input_stream(self.path) as f:
                data: dict[str, Any] = json.loads(f.read().decode())
            return LockInfo(**data)
        except (FileNotFoundError, OSError, ValueError, TypeError):
            return None

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.store.fs.delete_file(self.path)

    def _stale(self, holder: LockInfo) -> bool:
        if holder.host == self.info.host and not _pid_alive(holder.pid):
            return True
        return time.time() - holder.heartbeat_at > self.stale_after_s

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder is None or holder.token != self.info.token:
                return  # taken over (we were presumed dead): do not overwrite the new holder
            self.info.heartbeat_at = time.time()
            with contextlib.suppress(OSError):
                self._write()

    def _message(self, holder: LockInfo) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started_at))
        return (f"store {self.store.root_uri} is being written by pid {holder.pid} on {holder.host} "
                f"({holder.command!r}, since {since}); wait for it to finish. If that process is gone, "
                f"its lock goes stale {self.stale_after_s:.0f} s after its last heartbeat, or delete {self.path}")
