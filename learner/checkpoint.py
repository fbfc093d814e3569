"""Learner checkpoints: a Hugging Face model directory plus subq's metadata and optional value heads.

Layout of a checkpoint directory:

- the model and tokenizer, by ``save_pretrained`` (safetensors): any HF tool, ``serve/`` and the model
  registry (``learner.models``, as a local directory spec) can load it without subq's training code;
- ``heads.safetensors``: the state dict of extra modules, e.g. ILQL's Q / V heads (optional);
- ``subq_checkpoint.json``: algo, step, config (secrets removed), library and prompt versions, extras.
  It is written last, so its presence means "complete".

A decomposer's checkpoint also describes how to prompt it, for tools that know nothing of subq
(``transformers``, ``vllm serve``): its tokenizer's chat template renders the last user message as
exactly the prompt it was trained on (:func:`student_chat_template`), and ``generation_config.json``
holds greedy decoding, the ``<end>`` marker as a stop string, the eos ids serving stops at and the
default token budget serving uses (:func:`default_max_new_tokens`). A solver (``solver-bc``) keeps its
base model's chat template: it is prompted through it.

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
from subq.learner.train import SOLVERS
from subq.protocol.prompts import PROMPT_VERSION, SUBQ_END, student_prompt
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

META_FILE = "subq_checkpoint.json"
HEADS_FILE = "heads.safetensors"
SECRET_WORDS = frozenset({"key", "keys", "apikey", "token", "secret", "secrets", "password", "passwd",
                          "credential", "credentials"})
_LIBRARIES = ("subq", "torch", "transformers", "peft", "safetensors")
DEFAULT_MAX_NEW_TOKENS = 128  # when a checkpoint does not record its training targets' length
MAX_NEW_TOKENS_CAP = 512  # a derived default never exceeds this


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


def default_max_new_tokens(meta: dict[str, Any] | None) -> int:
    """A decomposition's default token budget: the longest training target the learner recorded
    (``extra.data.max_target_tokens``) plus a quarter (at least 16 tokens) of margin, capped at
    ``MAX_NEW_TOKENS_CAP``; ``DEFAULT_MAX_NEW_TOKENS`` when the checkpoint does not say."""
    data = ((meta or {}).get("extra") or {}).get("data")
    longest = data.get("max_target_tokens") if isinstance(data, dict) else None
    if isinstance(longest, int) and not isinstance(longest, bool) and longest > 0:
        return min(MAX_NEW_TOKENS_CAP, longest + max(16, longest // 4))
    return DEFAULT_MAX_NEW_TOKENS


def student_chat_template() -> str:
    """A Jinja chat template that renders a conversation as the student's training prompt.

    Like ``subq serve``'s chat route, the last user message is the problem and every other message is
    ignored (the student never saw a system prompt or earlier turns); its whitespace is collapsed as
    ``protocol.prompts.student_prompt`` does (Python's ``str.split``). The prompt already ends where the
    student starts writing, so ``add_generation_prompt`` adds nothing. Built from ``student_prompt`` itself,
    so a change of the format cannot leave the template behind.
    """
    head, tail = student_prompt("\x00").split("\x00")
    return (
        "{%- set ns = namespace(problem=none) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if message['content'] is string -%}{%- set ns.problem = message['content'] -%}"
        "{%- else -%}{%- set ns.problem = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('') -%}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.problem is none -%}"
        "{{- raise_exception('a subq decomposer needs a user message: the problem to decompose') -}}"
        "{%- endif -%}"
        f"{{{{- {json.dumps(head)} + (ns.problem.split() | join(' ')) + {json.dumps(tail)} -}}}}"
    )


def student_generation_config(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                              max_new_tokens: int) -> GenerationConfig:
    """The base model's generation config with the student's decoding: greedy, stopping at ``SUBQ_END``
    (a string of several tokens, so a stop string, not an eos id) or at any eos id serving stops at (the
    model's and the tokenizer's), with serving's default budget."""
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    eos: set[int] = set()
    for value in (tokenizer.eos_token_id, config.eos_token_id):
        eos.update([value] if isinstance(value, int) else list(value or ()))
    config.eos_token_id = sorted(eos) if len(eos) > 1 else next(iter(eos), None)
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    config.stop_strings = [SUBQ_END]
    config.max_new_tokens = max_new_tokens
    config._from_model_config = False  # a config of its own: transformers must not rebuild it from config.json
    return config


def _save_student_format(path: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                         extra: dict[str, Any] | None) -> None:
    """The chat template and generation config that let plain transformers / vLLM prompt the student."""
    described = copy.deepcopy(tokenizer)  # the live tokenizer keeps its template (training may use it)
    described.chat_template = student_chat_template()
    described.save_pretrained(path)
    max_new = default_max_new_tokens({"extra": extra or {}})
    student_generation_config(model, tokenizer, max_new).save_pretrained(path)


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
        plain = _plain_model(model)
        plain.save_pretrained(tmp)
        if algo in SOLVERS:
            tokenizer.save_pretrained(tmp)
        else:
            _save_student_format(tmp, plain, tokenizer, extra)
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
    """True for a complete checkpoint directory: its metadata (written last) and model config exist. At a
    URI (``s3://.../final``) the same objects are looked for (``final/`` is uploaded with them last)."""
    from subq.data_store import uri

    if uri.is_uri(path):
        return uri.is_file(uri.join(str(path), META_FILE)) and uri.is_file(uri.join(str(path), "config.json"))
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

    ``dtype=None`` means float32 (see ``learner.models.load_model_and_tokenizer``). A URI is read from a
    local copy in the cache (``data_store.uri.local_copy``), downloaded once per version of it.
    """
    from subq.data_store import uri

    if uri.is_uri(path):
        if not is_checkpoint(path):
            raise FileNotFoundError(f"{uri.redact(str(path))} is not a complete subq checkpoint (no {META_FILE} "
                                    "or config.json)")
        path = uri.local_copy(str(path), complete=META_FILE)
    p = Path(path).expanduser()
    if not is_checkpoint(p):
        raise FileNotFoundError(f"{p} is not a complete subq checkpoint (no {META_FILE} or config.json)")
    meta = json.loads((p / META_FILE).read_text())
    model, tokenizer = load_model_and_tokenizer(str(p), dtype=dtype, device=device)
    heads_file = p / HEADS_FILE
    heads_state = load_file(str(heads_file), device=device) if heads_file.is_file() else None
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, meta=meta, heads_state=heads_state)
