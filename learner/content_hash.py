"""Content hashes of model directories: what a checkpoint *is*, whatever its path or the time it was saved.

Used where a model must be told apart from another one served under the same name: the evaluation's
settings fingerprints (``evaluation.fingerprint``) and the ``fingerprint`` field of the decomposer
server's ``/v1/models`` entry (``serve/decomposer.py``), so a client at a URL sees when the checkpoint
behind it changed. Pure standard library (floor 3, below ``serve/`` and ``evaluation/``).

Every file of the directory is read once and hashed (SHA-256); with a cache file the digest is cached
by (path, size, mtime), so later hashes re-read only files that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

PREFIX = "sha256:"  # how a content hash is written in identities and model cards


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_hash(directory: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> str:
    """SHA-256 over every file under ``directory`` (relative path and content digest, sorted).

    Hidden files and folders (``.<name>.tmp-*`` leftovers of an interrupted save) are skipped. With
    ``cache_file``, a file whose (path, size, mtime) is unchanged since its last hash is not re-read.
    """
    root = Path(directory).expanduser().resolve()
    cache: dict[str, list] = {}
    if cache_file is not None:
        with contextlib.suppress(OSError, ValueError):
            cache = json.loads(Path(cache_file).read_text())
    total, dirty = hashlib.sha256(), False
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in files:
        st = path.stat()
        key, stamp = str(path), [st.st_size, st.st_mtime_ns]
        entry = cache.get(key)
        if entry is None or entry[:2] != stamp:
            entry, dirty = [*stamp, _file_digest(path)], True
            cache[key] = entry
        total.update(f"{path.relative_to(root).as_posix()}\0{entry[2]}\n".encode())
    if cache_file is not None and dirty:
        target = Path(cache_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, target)  # atomic: a concurrent reader sees the old or the new cache
    return total.hexdigest()


def model_fingerprint(spec: str, cache_file: str | os.PathLike | None = None) -> str | None:
    """``sha256:<content hash>`` of a model directory; None for a registry spec (``embedded:...``,
    ``tiny-random:...``, a hub name), which its name already identifies."""
    path = Path(spec).expanduser()
    return f"{PREFIX}{content_hash(path, cache_file)}" if path.is_dir() else None
