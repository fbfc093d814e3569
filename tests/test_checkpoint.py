"""Checkpoints (learner/checkpoint.py): round trip, secrets, heads, peft merging, atomic writes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from subq.learner.checkpoint import (
    HEADS_FILE,
    META_FILE,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
    strip_secrets,
)
from subq.learner.models import load_model_and_tokenizer
from subq.protocol.prompts import PROMPT_VERSION
from torch import nn

IDS = torch.tensor([[80, 114, 111, 98, 108, 101, 109, 58, 32, 49, 43, 49, 63, 10]])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return load_model_and_tokenizer("tiny-random:llama?seed=3")


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@dataclass
class _Cfg:
    lr: float = 1e-4
    wandb_api_key: str = "sk-live"
    hf_token: str = "hf_abc"


def test_round_trip_gives_identical_logits_and_metadata(tiny, tmp_path):
    model, tok = tiny
    config = {"lr": 1e-4, "api_key": "sk-secret", "teacher": {"Bearer_Token": "x", "model": "m"},
              "DB_PASSWORD": "p", "client_secret": "s", "layers": [{"secret": 1, "n": 2}]}
    path = save_checkpoint(tmp_path / "ckpt", model, tok, algo="bc", config=config, step=7, extra={"epoch": 1})
    assert is_checkpoint(path)

    loaded = load_checkpoint(path)
    assert torch.equal(_logits(loaded.model), _logits(model))
    assert loaded.tokenizer("Problem: 1+1?\n", add_special_tokens=False)["input_ids"] == IDS[0].tolist()
    assert loaded.tokenizer.pad_token_id == tok.pad_token_id
    assert loaded.heads_state is None and not (path / HEADS_FILE).exists()
    meta = loaded.meta
    assert meta["algo"] == "bc" and meta["step"] == 7 and meta["extra"] == {"epoch": 1}
    assert meta["config"] == {"lr": 1e-4, "teacher": {"model": "m"}, "layers": [{"n": 2}]}
    assert meta["prompt_version"] == PROMPT_VERSION
    assert meta["versions"]["torch"] and meta["versions"]["transformers"]
    assert "sk-secret" not in (path / META_FILE).read_text()
    assert list(path.glob("*.safetensors")) == [path / "model.safetensors"]


def test_dataclass_config_secrets_stripped(tiny, tmp_path):
    model, tok = tiny
    path = save_checkpoint(tmp_path / "c", model, tok, algo="bc", config=_Cfg())
    text = (path / META_FILE).read_text()
    assert json.loads(text)["config"] == {"lr": 1e-4}
    assert "sk-live" not in text and "hf_abc" not in text
    assert strip_secrets({"Key": 1, "ok": (1, {"passwordHash": 2})}) == {"ok": [1, {}]}
    named = {"openai_api_key": 1, "hf_token": 2, "token_env": 3, "client-secret": 4, "apiKey": 5, "tokenizer": 6,
             "max_target_tokens": 7, "p99_target_tokens": 8, "max_new_tokens": 9, "keyboard": 10}
    assert strip_secrets(named) == {"tokenizer": 6, "max_target_tokens": 7, "p99_target_tokens": 8,
                                    "max_new_tokens": 9, "keyboard": 10}


def test_heads_are_saved_and_loaded(tiny, tmp_path):
    model, tok = tiny
    torch.manual_seed(0)
    heads = nn.ModuleDict({"q": nn.Linear(64, 260), "v": nn.Linear(64, 1)})
    path = save_checkpoint(tmp_path / "ilql", model, tok, algo="ilql", config={}, heads=heads, step=3)
    loaded = load_checkpoint(path)
    assert loaded.meta["has_heads"] is True
    assert loaded.heads_state.keys() == heads.state_dict().keys()
    assert all(torch.equal(loaded.heads_state[k], v) for k, v in heads.state_dict().items())
    fresh = nn.ModuleDict({"q": nn.Linear(64, 260), "v": nn.Linear(64, 1)})
    fresh.load_state_dict(loaded.heads_state)
    x = torch.randn(2, 64)
    assert torch.equal(fresh["q"](x), heads["q"](x))


def test_peft_model_is_saved_merged_and_left_usable(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the outputs
                p.normal_(std=0.5)
    expected = _logits(peft_model)
    path = save_checkpoint(tmp_path / "lora", peft_model, tok, algo="bc", config={})
    assert not (path / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_file(str(path / "model.safetensors")))
    loaded = load_checkpoint(path)
    assert torch.allclose(_logits(loaded.model), expected, atol=1e-5)
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())  # the live model is untouched
    assert torch.equal(_logits(peft_model), expected)


def test_overwrite_replaces_the_old_checkpoint(tiny, tmp_path):
    model, tok = tiny
    path = save_checkpoint(tmp_path / "c", model, tok, algo="bc", config={}, step=1)
    save_checkpoint(path, model, tok, algo="bc", config={}, step=2)
    assert load_checkpoint(path).meta["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp or stale dirs left


def test_half_written_checkpoint_is_never_read(tiny, tmp_path, monkeypatch):
    model, tok = tiny

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", crash)  # fails after the weights were written
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c", model, tok, algo="bc", config={})
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # a crash that killed the process leaves a temp dir with the weights but no metadata
    half = tmp_path / ".c.tmp-123"
    model.save_pretrained(half)
    assert not is_checkpoint(half) and not is_checkpoint(tmp_path / "c") and not is_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(half)
