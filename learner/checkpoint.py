"""Learner checkpoints: a Hugging Face model directory plus subq's metadata and optional value heads.

Layout of a checkpoint directory:

- the model and tokenizer, by ``save_pretrained`` (safetensors): any HF tool, ``serve/`` and the model
  registry (``learner.models``, as a local directory spec) can load it without subq's training code;
- ``heads.safetensors``: the state dict of extra modules, e.g. ILQL's Q / V heads (optional);
- ``subq_checkpoint.json``: algo, step, config (secrets removed), library and prompt versions, extras.
  It is written last, so its presence means "complete".

Writes are atomic: everything goes to a hidden temporary sibling directory, which is renamed into
place at the end. A crash leaves a ``.<name>.tmp-*`` directory without metadata behind, which
:func:`is_checkpoint` rejects, never a half-written checkpoint at ``path``.

A peft (LoRA) model is saved *merged*: the adapters are folded into a copy of the base weights, so a
checkpoint is always a plain causal LM that serving loads like any other (and filtered BC or ILQL can
start from it with fresh adapters). The live model is left untouched and can keep training.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from subq.learner.models import load_model_and_tokenizer
from subq.protocol.prompts import PROMPT_VERSION
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

META_FILE = "subq_checkpoint.json"
HEADS_FILE = "heads.safetensors"
SECRET_WORDS = frozenset({"key", "keys", "apikey", "token", "secret", "secrets", "password", "passwd",
                          "credential", "credentials"})
_LIBRARIES = ("subq", "torch", "transformers", "peft", "safetensors")


@dataclass
class LoadedCheckpoint:
    model: PreTrainedModel  # the causal LM, in eval mode
    tokenizer: PreTrainedTokenizerBase
    meta: dict[str, Any]  # the contents of subq_checkpoint.json
    heads_state: dict[str, torch.Tensor] | None  # heads.safetensors, or None when none were saved


def _is_secret_name(name: str) -> bool:
    """A key named like a credential: one of its words (split at ``_``, ``-``, ``.`` and camelCase) is in
    ``SECRET_WORDS``, or it contains "secret" or "password" anywhere."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    lowered = name.lower()
    return any(w in SECRET_WORDS for w in words) or "secret" in lowered or "password" in lowered


def strip_secrets(config: Any) -> Any:
    """``config`` without any entry whose key is named like a credential (``api_key``, ``hf_token``,
    ``Key``, ``passwordHash``, ``client_secret``), recursively through dicts and lists.

    Matched by whole words, so counts such as ``max_target_tokens`` or ``max_new_tokens`` stay (a
    substring match dropped them, and with them the data statistics serving derives limits from);
    a value is never inspected, so keys belong in the environment, not in a config value.
    """
    if isinstance(config, dict):
        return {k: strip_secrets(v) for k, v in config.items() if not _is_secret_name(str(k))}
    if isinstance(config, list | tuple):
        return [strip_secrets(v) for v in config]
    return config


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _plain_model(model: nn.Module) -> nn.Module:
    """The HF model to save: unwrapped from DDP, and LoRA merged into a copy if it is a peft model."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = copy.deepcopy(model).merge_and_unload()
    return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    algo: str,
    config: dict[str, Any] | Any,
    heads: nn.Module | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint to ``path`` atomically (replacing one already there); returns it.

    ``config`` is a dict or a dataclass; values that are not JSON are stored as their ``str``.
    """
    target = Path(path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    config_dict = asdict(config) if is_dataclass(config) and not isinstance(config, type) else dict(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _plain_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if heads is not None:
            # clone: safetensors refuses tensors that share storage (e.g. tied target heads)
            state = {k: v.detach().to("cpu").clone().contiguous() for k, v in heads.state_dict().items()}
            save_file(state, str(tmp / HEADS_FILE))
        meta = {
            "algo": algo,
            "step": int(step),
            "config": strip_secrets(config_dict),
            "prompt_version": PROMPT_VERSION,
            "versions": _versions(),
            "has_heads": heads is not None,
            "created": time.time(),
            "extra": strip_secrets(dict(extra or {})),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))  # last: marks completion
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a checkpoint is an ordinary, shareable directory
        if target.exists():  # rename cannot replace a non-empty directory: move the old one aside
            stale = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(target, stale)
            os.rename(tmp, target)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when something failed
    return target


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a complete checkpoint directory: its metadata (written last) and model config exist."""
    p = Path(path).expanduser()
    return (p / META_FILE).is_file() and (p / "config.json").is_file()


def training_disk_estimate(model_dir: str | os.PathLike, algo: str, keep_checkpoints: bool = False,
                           final_bytes_per_weight_byte: float = 0.5) -> tuple[int, int]:
    """Rough bytes of one training run from the size of the initial (fp32) weights W: (at its peak while it
    runs, left when it completes).

    Ray keeps two resumable checkpoints, each the weights and AdamW's two moments (3 W); ILQL's Q/V heads
    add up to 1.5 W (full rank, SmolLM2-135M). ``final/`` holds the weights in ``final_dtype``
    (``final_bytes_per_weight_byte``: 0.5 for bf16) and the heads in fp32. Measured on SmolLM2-135M (0.52 GB
    of fp32 weights) with full-rank heads: a Ray checkpoint 1.6 GB (BC), 2.4 GB (ILQL).
    """
    weights = sum(f.stat().st_size for f in Path(model_dir).iterdir()
                  if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt"))
    heads = 0.5 * weights if algo.startswith("ilql") else 0.0
    ray_ckpt = 3 * weights + 3 * heads
    final = final_bytes_per_weight_byte * weights + heads
    return int(2 * ray_ckpt + final), int(final + (2 * ray_ckpt if keep_checkpoints else 0))


def load_checkpoint(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str = "cpu"
) -> LoadedCheckpoint:
    """Load a checkpoint for inference or further training; needs no training code.

    ``dtype=None`` means float32 (see ``learner.models.load_model_and_tokenizer``).
    """
    p = Path(path).expanduser()
    if not is_checkpoint(p):
        raise FileNotFoundError(f"{p} is not a complete subq checkpoint (no {META_FILE} or config.json)")
    meta = json.loads((p / META_FILE).read_text())
    model, tokenizer = load_model_and_tokenizer(str(p), dtype=dtype, device=device)
    heads_file = p / HEADS_FILE
    heads_state = load_file(str(heads_file), device=device) if heads_file.is_file() else None
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, meta=meta, heads_state=heads_state)
