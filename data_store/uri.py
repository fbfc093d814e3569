"""Outputs at a local path or a URI (``s3://``, ``gs://``, anything ``pyarrow.fs.FileSystem.from_uri`` opens).

On a Ray cluster the nodes share no disk unless one is mounted, so every output of a run (the store,
``subq train``'s ``out``, ``subq eval``'s records and reports) may live in an object store. This module
is the one place that knows the difference: callers pass a *location* (a string: a local path, relative
or absolute, or a URI) and read, write, list, upload and download through it.

- A local path stays local (``~`` expanded, made absolute); nothing here ever makes a folder named after
  a URI scheme (``Path("s3://b/k")`` would be ``s3:/b/k``: callers must not wrap locations in ``Path``).
- A URI is opened by pyarrow; credentials, region and endpoint come from the environment (``AWS_*``,
  ``GOOGLE_APPLICATION_CREDENTIALS``) or the URI's query (``?endpoint_override=...``), and never reach an
  error message (:func:`redact`).
- Writes of one object are whole (a PUT, or a local temp file renamed); a directory is uploaded with its
  marker files last (:func:`upload_dir`), so a reader that checks the marker never takes half of it.
- Libraries that need a directory (transformers) read a local copy (:func:`local_copy`), cached under
  ``$SUBQ_CACHE_DIR`` (default ``~/.cache/subq``) by the URI and the listing's sizes and times.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_SECRET_QUERY = re.compile(r"(?i)(secret|token|password|session|access_key|credential)")


class UriError(ValueError):
    """A location that cannot be opened (unknown scheme, missing filesystem support): bad input."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a local path is not a URI)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def redact(location: str | os.PathLike) -> str:
    """``location`` without user info or secret-looking query values, for messages."""
    text = str(location)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(p if not _SECRET_QUERY.search(p.split("=", 1)[0]) else p.split("=", 1)[0] + "=***"
                     for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def resolve(location: str | os.PathLike) -> str:
    """A URI as given (without a trailing slash), a local path absolute (workers may start elsewhere)."""
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_uri(text):
        parts = urlsplit(text)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") or "/")) if parts.path else text
    return str(Path(text).expanduser().resolve())


def join(location: str, *names: str) -> str:
    """``location/names...``; keeps a URI's query (``?endpoint_override=...``) at the end."""
    if not is_uri(location):
        return os.path.join(location, *names)
    parts = urlsplit(location)
    path = "/".join([parts.path.rstrip("/"), *(n.strip("/") for n in names)])
    return urlunsplit(parts._replace(path=path))


def name(location: str) -> str:
    """The last component (a run's folder name)."""
    return (urlsplit(location).path if is_uri(location) else location).rstrip("/").rsplit("/", 1)[-1]


def open_fs(location: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it); a clear :class:`UriError` when the location cannot be opened."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    text = resolve(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), text
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UriError(f"cannot open {redact(text)}: {reason}") from None
    return fs, path.rstrip("/")


def check(location: str | os.PathLike) -> str:
    """``location`` resolved, after making sure its filesystem opens (before any work)."""
    open_fs(location)
    return resolve(location)


def _info(location: str):
    fs, path = open_fs(location)
    return fs, path, fs.get_file_info(path)


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    return _info(location)[2].type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    import pyarrow.fs as pafs

    return _info(location)[2].type == pafs.FileType.File


def read_bytes(location: str) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = open_fs(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    """One whole object (S3: one PUT); locally a temp file renamed into place, so never half a file."""
    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    fs, path = open_fs(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def list_files(location: str) -> dict[str, tuple[int, float]]:
    """Every file under ``location`` (recursively): relative path -> (size, mtime); {} if there is none."""
    import pyarrow.fs as pafs

    fs, path = open_fs(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return {}
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            found[info.path[len(path):].lstrip("/")] = (int(info.size or 0), mtime)
    return found


def listdir(location: str) -> list[str]:
    """Names directly under ``location`` (files and folders), sorted; [] if it is no folder."""
    import pyarrow.fs as pafs

    fs, path = open_fs(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos)


def remove(location: str) -> None:
    """Delete a file or a folder with everything in it; nothing there is fine."""
    import pyarrow.fs as pafs

    fs, path, info = _info(location)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local: str | os.PathLike, location: str, last: Iterable[str] = ()) -> None:
    """Copy the local folder ``local`` to ``location``, replacing what was there; files named in ``last``
    (markers such as a checkpoint's metadata) go after everything else, and are removed first."""
    last = list(last)
    src = Path(local)
    if not is_uri(location):
        tmp = Path(f"{location.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copytree(src, tmp)
        if os.path.exists(location):
            shutil.rmtree(location)
        os.rename(tmp, location)
        return
    for marker in last:  # a reader must not find the old marker next to half-replaced files
        if is_file(join(location, marker)):
            remove(join(location, marker))
    remove(location)
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    for rel in sorted(files, key=lambda f: (f in last, last.index(f) if f in last else 0, f)):
        write_bytes(join(location, rel), (src / rel).read_bytes())


def download_dir(location: str, local: str | os.PathLike) -> Path:
    """Copy every file under ``location`` into the local folder ``local`` (made if needed)."""
    target = Path(local)
    target.mkdir(parents=True, exist_ok=True)
    for rel in list_files(location):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(join(location, rel)))
    return target


def cache_dir() -> Path:
    return Path(os.environ.get("SUBQ_CACHE_DIR") or Path.home() / ".cache" / "subq").expanduser()


def local_copy(location: str, kind: str = "models", complete: str | None = None) -> str:
    """A local folder with the contents of ``location``: itself when local, else a cached download.

    The cache entry is named by a hash of the URI and its listing (sizes and times), so a replaced
    ``final/`` is downloaded again. ``complete``: a marker file that must be there (else FileNotFoundError
    naming the location, before anything is downloaded)."""
    if not is_uri(location):
        return location
    files = list_files(location)
    if complete is not None and complete not in files:
        raise FileNotFoundError(f"{redact(location)} has no {complete} (not a complete output)")
    key = hashlib.sha256(repr((resolve(location), sorted(files.items()))).encode()).hexdigest()[:24]
    target = cache_dir() / kind / key
    if (target / ".subq-complete").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        download_dir(location, tmp)
        (tmp / ".subq-complete").write_text(redact(location))
        with contextlib.suppress(OSError):  # another process finished the same download first
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def stage_dir(location: str) -> Path:
    """A local working folder for outputs bound for ``location``: the folder itself when local, else one
    per URI under the cache (the same on every node, so a driver and a rank 0 beside it share it)."""
    if not is_uri(location):
        return Path(location)
    return cache_dir() / "runs" / hashlib.sha256(resolve(location).encode()).hexdigest()[:16]


def parent(location: str) -> str:
    """The folder that holds ``location`` (a URI keeps its query)."""
    if not is_uri(location):
        return os.path.dirname(location.rstrip("/"))
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/").rsplit("/", 1)[0]))
