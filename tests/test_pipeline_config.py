"""Pipeline configs: the shipped YAMLs load, and every kind of mistake fails naming the key or file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from subq.config import ConfigError, apply_overrides, load_config, train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_shipped_config_loads():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "gsm8k-openai.yaml", "gsm8k-vllm.yaml", "socratic-bc.yaml"} <= names
    for path in CONFIGS:
        cfg, _ = load_config(str(path))
        assert cfg.train.algos, path
        assert cfg.eval.solvers, path


def test_quickstart_is_the_embedded_offline_default():
    cfg, _ = load_config(str(ROOT / "configs/quickstart.yaml"))
    assert cfg.teacher.base_url is None  # served locally
    assert cfg.teacher.local_model.startswith("embedded:")
    assert cfg.eval.solvers == ["local"]
    assert cfg.train.algos == ["bc", "filtered-bc", "ilql"]
    bc = train_config(cfg.train, "bc", "/s", "/o")
    assert bc.init.startswith("embedded:") and not bc.use_gpu
    assert (bc.algo, bc.store, bc.out) == ("bc", "/s", "/o")
    # bf16 autocast where the CPU has AMX, for BC only: it worsened ILQL's held-out NLL
    assert bc.cpu_bf16 == "auto" and train_config(cfg.train, "ilql", "/s", "/o").cpu_bf16 == "off"


def test_real_configs_use_gpus_and_take_keys_from_the_environment():
    for name in ("gsm8k-openai.yaml", "gsm8k-vllm.yaml", "socratic-bc.yaml"):
        cfg, raw = load_config(str(ROOT / "configs" / name))
        tc = train_config(cfg.train, cfg.train.algos[0], "/s", "/o")
        assert tc.use_gpu and tc.num_workers >= 2, name
        assert not re.search(r"sk-[A-Za-z0-9]{8,}", (ROOT / "configs" / name).read_text())  # no literal key
    cfg, _ = load_config(str(ROOT / "configs/socratic-bc.yaml"))
    assert train_config(cfg.train, "bc", "/s", "/o").source == "reference"
    assert cfg.imports.reference == "gsm8k:train"


def test_overrides_reach_every_level(tmp_path):
    cfg, raw = load_config(str(ROOT / "configs/quickstart.yaml"), [
        "out=" + str(tmp_path), "train.defaults.max_steps=7", "train.ilql.algo_config={beta: 2.5}",
        "eval.benchmarks=[svamp]", "collect.samples_per_problem=1", "serve.max_batch_size=2",
    ])
    assert cfg.out == str(tmp_path)
    assert train_config(cfg.train, "filtered-bc", "/s", "/o").max_steps == 7  # bc sets its own
    assert train_config(cfg.train, "ilql", "/s", "/o").algo_config == {"beta": 2.5}
    assert cfg.eval.settings["benchmarks"] == ["svamp"]
    assert cfg.collect["samples_per_problem"] == 1
    assert cfg.serve.max_batch_size == 2
    assert raw["train"]["defaults"]["max_steps"] == 7  # the resolved mapping is what gets saved


@pytest.mark.parametrize(("override", "names"), [
    ("collect.samples_per_problme=2", ["collect", "samples_per_problme"]),
    ("teacher.modle=x", ["teacher", "modle"]),
    ("train.defaults.max_stepz=3", ["max_stepz"]),
    ("train.bc.lr=0.1", ["train", "lr"]),  # lr belongs in algo_config
    ("train.dqn={}", ["dqn"]),
    ("eval.benchmark=[gsm8k]", ["benchmark"]),
    ("serve.prot=1", ["prot"]),
    ("colect={}", ["colect"]),
])
def test_unknown_keys_are_named(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(str(ROOT / "configs/quickstart.yaml"), [override])
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize(("override", "names"), [
    ("train.defaults.max_steps=ten", ["max_steps", "int", "ten"]),
    ("train.defaults.use_gpu=3", ["use_gpu", "bool"]),
    ("collect.max_tokens=1.5", ["max_tokens", "int"]),
    ("serve.port=[1]", ["port", "int"]),
    ("eval.solvers=local", ["solvers", "list"]),
    ("train.algos=[bc, ppo]", ["ppo"]),
    ("eval.benchmarks=[nosuchset]", ["nosuchset"]),
    ("eval.scorer=lenient", ["scorer"]),
    ("train.bc.cpu_bf16=maybe", ["train.bc", "cpu_bf16"]),
    ("train.bc.cpu_bf16=3", ["train.bc", "cpu_bf16"]),
    ("stages=[collect, dance]", ["dance"]),
    ("teacher.base_url=http://127.0.0.1:9/v1", ["teacher.model"]),
])
def test_wrong_types_and_values_are_named(override, names):
    with pytest.raises((ConfigError, ValueError)) as e:
        load_config(str(ROOT / "configs/quickstart.yaml"), [override])
    for name in names:
        assert name in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="price_table.*missing.json"):
        load_config(str(ROOT / "configs/quickstart.yaml"), [f"teacher.price_table={tmp_path}/missing.json"])
    with pytest.raises(ConfigError, match="gsm8k_ai_subq.*gone.jsonl"):
        load_config(str(ROOT / "configs/quickstart.yaml"), [f"import.gsm8k_ai_subq={tmp_path}/gone.jsonl"])


def test_malformed_yaml_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"out": "x"}, ["out.deeper=1"])
