"""What a decomposer reached by address serves: its ``/v1/models`` entry, read once per plan.

A URL (a running ``subq serve``) or ``openai:MODEL@BASE_URL`` (vLLM or any OpenAI-compatible server)
decomposer is more than its address: a retrained checkpoint served at the same URL must not reuse the
old one's records. Its identity therefore holds the stable fields of the served model's entry:
``id``, ``root`` and ``parent`` (vLLM: the served name, the path or hub id it loaded, the base model of
a LoRA adapter) and ``fingerprint`` (subq's decomposer server: ``sha256:`` content hash of its
checkpoint's files). ``created`` is left out on purpose: vLLM reports the request's time there and
subq's servers their start time, so every restart would start new records; ``permission`` and
``owned_by`` say nothing about the weights.

What it cannot see: a server that does not list its models (404: the identity is the address and
model name only), and vLLM serving a checkpoint retrained in place at the same path (same ``id`` and
``root``). For those, ``--decomposer-version`` (``EvalConfig.decomposer_version``) is what tells two
models apart.
"""

from __future__ import annotations

import os
from typing import Any

from subq.actors.teacher import NO_KEY_PLACEHOLDER, TeacherFatalError, TeacherUnreachable, api_key_from_env

IDENTITY_FIELDS = ("id", "root", "parent", "fingerprint")  # of a /v1/models entry; None-valued ones dropped


def _card(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        return {}
    return {k: entry[k] for k in IDENTITY_FIELDS if entry.get(k) is not None}


def served_model(kind: str, url: str, model: str | None, token_env: str | None,
                 timeout_s: float = 30.0) -> dict[str, Any] | list[dict[str, Any]] | None:
    """The identity fields of what ``url`` serves.

    ``kind`` "url": ``GET <url>/v1/models`` of a subq decomposer app, its one entry (a list of entries
    if it lists several); "openai": ``GET <url>/models`` (``url`` is the /v1 root), the entry of
    ``model``. None when the server has no models route (404). An endpoint that cannot be reached,
    does not serve ``model`` raises :class:`TeacherUnreachable` (one line, exit 2), one that refuses the
    credentials :class:`TeacherFatalError` (exit 3):
    without it, which records are this decomposer's cannot be known.
    """
    import httpx

    base = url.rstrip("/")
    if kind == "openai":
        key = api_key_from_env(token_env or "OPENAI_API_KEY", base)
        token, where = (None if key == NO_KEY_PLACEHOLDER else key), f"{base}/models"
    else:
        token, where = (os.environ.get(token_env, "") if token_env else "") or None, f"{base}/v1/models"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    what = f"the decomposer at {base}"
    try:
        r = httpx.get(where, headers=headers, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as e:
        raise TeacherUnreachable(f"cannot reach {what} to read what it serves ({where}: {type(e).__name__}); "
                                 "start it, or leave it out of --decomposer") from None
    if r.status_code in (401, 403):
        env = token_env or ("OPENAI_API_KEY" if kind == "openai" else None)
        if env is None:
            raise TeacherUnreachable(f"{what} wants a token (HTTP {r.status_code}): --decomposer-token-env NAME")
        # credentials refused: the account, not the input (exit 3, as a refusal mid-run)
        raise TeacherFatalError(f"{what} refused the credentials (HTTP {r.status_code}) from ${env}: nothing was "
                                "started; check the key, then run the same command again")
    if r.status_code == 404:
        return None
    try:
        r.raise_for_status()
        entries = [_card(e) for e in r.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        raise TeacherUnreachable(f"{where} did not return an OpenAI model list (HTTP {r.status_code})") from None
    if kind == "openai":
        match = [e for e in entries if e.get("id") == model]
        if not match:
            shown = ", ".join(str(e.get("id")) for e in entries[:10])
            raise TeacherUnreachable(f"model {model!r} is not served at {base} (served: {shown or 'none'})")
        return match[0]
    if len(entries) == 1:
        return entries[0]
    return sorted(entries, key=lambda e: str(e.get("id")))
