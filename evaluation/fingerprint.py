"""Settings fingerprints: what makes an evaluation record's output what it is.

A record is keyed by (benchmark, decomposer label, solver label, fingerprint). The fingerprint hashes
``run_settings``: the decomposer's identity (kind, model, for a checkpoint a hash of its files' content,
for a URL or ``openai:`` decomposer what its ``/v1/models`` entry says it serves (``evaluation.
served_identity``), beta, prompt version, the user's ``decomposer_version``) and decoding settings (temperature, max tokens, max sub-questions), and the
solver's identity (its model name; for a distilled solver served from a checkpoint, a hash of the
checkpoint's files), temperature, max tokens and prompt version. Left out on purpose: URLs of model
endpoints (the same model behind another address answers the same), API keys, timeouts and retry
counts (they change whether a call fails, not what it returns) and the scorer (records are re-scored
on every report). A run with other settings therefore writes other files: it never resumes, reuses
or reports records made with different settings.

Checkpoint content hashes (``content_hash``) live in ``learner.content_hash``, where the decomposer
server reaches them too (it reports its checkpoint's hash in ``/v1/models``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from subq.learner.content_hash import content_hash
from subq.protocol.prompts import DECOMPOSE_VERSION, STUDENT_VERSION
from subq.protocol.solve_prompts import SOLVE_PROMPT_VERSION

# Which prompt each decomposer kind sends (none sends nothing; "served" may use either format).
_PROMPTS = {"teacher": [DECOMPOSE_VERSION], "openai": [STUDENT_VERSION], "url": [DECOMPOSE_VERSION, STUDENT_VERSION],
            "served": [DECOMPOSE_VERSION, STUDENT_VERSION]}
# Kinds whose decoding length is the evaluation's decompose_max_tokens (a served one has its own).
_OWN_MAX_TOKENS = ("teacher", "openai")
# Kinds whose weights may be retrained behind the same name: a --decomposer-version applies to them.
_WITH_WEIGHTS = ("url", "openai", "served")

__all__ = ["content_hash", "decomposer_settings", "describe_change", "fingerprint", "run_settings",
           "solver_settings"]


def decomposer_settings(identity: dict[str, Any], *, temperature: float, max_tokens: int,
                        max_subquestions: int | None, version: str | None = None) -> dict[str, Any]:
    """The decomposer's part of the fingerprint: its identity plus how it is asked to decode.

    ``version`` (``--decomposer-version``) is the user's name for the weights of a decomposer that has
    some (url, openai, served): what tells apart two checkpoints that look alike from outside.
    """
    kind = identity["kind"]
    if kind == "none":
        return dict(identity)
    out = {**identity, "prompts": _PROMPTS.get(kind, []), "temperature": float(temperature),
           "max_subquestions": max_subquestions}
    if version is not None and kind in _WITH_WEIGHTS:
        out["version"] = str(version)
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
