"""Settings fingerprints: what makes an evaluation record's output what it is.

A record is keyed by (benchmark, decomposer label, solver label, fingerprint). The fingerprint hashes
``run_settings``: the decomposer's identity (kind, model, for a checkpoint a hash of its files' content,
beta, prompt version) and decoding settings (temperature, max tokens, max sub-questions), and the
solver's identity (its model name; for a distilled solver served from a checkpoint, a hash of the
checkpoint's files), temperature, max tokens and prompt version. Left out on purpose: URLs of model
endpoints (the same model behind another address answers the same), API keys, timeouts and retry
counts (they change whether a call fails, not what it returns) and the scorer (records are re-scored
on every report). A run with other settings therefore writes other files: it never resumes, reuses
or reports records made with different settings.

Checkpoint content hashes: every file of the directory is read once and hashed (SHA-256); the digest
is cached by (path, size, mtime) in a JSON file, so later runs re-read only files that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from subq.protocol.prompts import DECOMPOSE_VERSION, STUDENT_VERSION
from subq.protocol.solve_prompts import SOLVE_PROMPT_VERSION

# Which prompt each decomposer kind sends (none sends nothing; "served" may use either format).
_PROMPTS = {"teacher": [DECOMPOSE_VERSION], "openai": [STUDENT_VERSION], "url": [DECOMPOSE_VERSION, STUDENT_VERSION],
            "served": [DECOMPOSE_VERSION, STUDENT_VERSION]}
# Kinds whose decoding length is the evaluation's decompose_max_tokens (a served one has its own).
_OWN_MAX_TOKENS = ("teacher", "openai")


def decomposer_settings(identity: dict[str, Any], *, temperature: float, max_tokens: int,
                        max_subquestions: int | None) -> dict[str, Any]:
    """The decomposer's part of the fingerprint: its identity plus how it is asked to decode."""
    kind = identity["kind"]
    if kind == "none":
        return dict(identity)
    out = {**identity, "prompts": _PROMPTS.get(kind, []), "temperature": float(temperature),
           "max_subquestions": max_subquestions}
    if kind in _OWN_MAX_TOKENS:
        out["max_tokens"] = int(max_tokens)
    return out


def solver_settings(identity: dict[str, Any], *, temperature: float, max_tokens: int) -> dict[str, Any]:
    """The solver's part: its identity (``{"model": name}`` for an API model; for a checkpoint served
    for the run, the content hash of its files) plus how it is asked to decode."""
    return {**identity, "prompt": SOLVE_PROMPT_VERSION, "temperature": float(temperature),
            "max_tokens": int(max_tokens)}


def run_settings(decomposer: dict[str, Any], solver: dict[str, Any]) -> dict[str, Any]:
    return {"decomposer": decomposer, "solver": solver}


def fingerprint(settings: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of ``settings``."""
    canon = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """"decomposer.beta 1.0 -> 2.0; solver.max_tokens 256 -> 512": what differs between two settings."""
    a, b = _flat(old), _flat(new)
    changed = [f"{k} {a.get(k, '(unset)')!s} -> {b.get(k, '(unset)')!s}" for k in sorted(a.keys() | b.keys())
               if a.get(k) != b.get(k)]
    return "; ".join(changed) or "nothing visible (older records without settings)"


# --- checkpoint content -------------------------------------------------------------------------


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
