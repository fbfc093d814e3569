"""`subq pipeline --check`: every shipped config passes on this machine (with the overrides its own
comments give for a machine without a GPU), and each kind of problem is one line naming its cause."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from subq.cli import main
from subq.config import ConfigError
from subq.preflight import resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
KEY_VARS = ("OPENAI_API_KEY", "VLLM_API_KEY")
SECRET = "sk-dummy-preflight-0123456789"
# What a config asks of a cluster that this GPU-less single node does not have (the configs' comments say so)
LOCAL = ["collect.actor_resources={}", "train.defaults.use_gpu=false", "serve.num_gpus=0"]


def _local_sets(path: Path) -> list[str]:
    raw = yaml.safe_load(path.read_text())
    sets = [s for s in LOCAL if s.split(".")[0] in raw]  # --set must not add a section the config lacks
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture
def keys(monkeypatch):
    for name in KEY_VARS:
        monkeypatch.setenv(name, SECRET)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_passes_check(ray_session, keys, path, tmp_path, capsys):
    code = main(["pipeline", "--config", str(path), "--check", "--out", str(tmp_path / "run"), *_local_sets(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "check: ok" in out and SECRET not in out + err
    assert not (tmp_path / "run").exists()  # nothing written


def test_cluster_resources_are_named_on_a_machine_without_them(ray_session, keys, tmp_path, capsys):
    code = main(["pipeline", "--config", "gsm8k-openai", "--check", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert all(line.startswith("subq: error: ") for line in lines)
    assert any("collection actors request resource 'collect_node' (0.01) but no node has it" in x for x in lines)
    assert any("Train workers (bc) request resource 'GPU'" in x and "use_gpu=false" in x for x in lines)
    assert any("serve.num_gpus" in x for x in lines)


def test_a_missing_key_variable_is_named_not_its_value(ray_session, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code = main(["pipeline", "--config", "gsm8k-openai", "--check", "--out", str(tmp_path / "run"),
                 *_local_sets(ROOT / "configs/gsm8k-openai.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert "the teacher at https://api.openai.com/v1 needs an API key: the environment variable OPENAI_API_KEY " \
           "is not set" in err
    assert "solver gpt-3.5-turbo at https://api.openai.com/v1" in err


def test_a_hub_id_not_cached_is_reported_not_refused_and_a_bad_spec_is_refused(ray_session, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["pipeline", "--config", "socratic-bc", "--check", "--out", str(tmp_path / "run"),
            *_local_sets(ROOT / "configs/socratic-bc.yaml")]
    code = main([*base, "--set", "train.defaults.init=subq-test-nobody/no-such-model"])
    out = capsys.readouterr().out
    assert code == 0
    assert "hub model 'subq-test-nobody/no-such-model' needs download: not in the local Hugging Face cache" in out
    code = main([*base, "--set", "train.defaults.init=gpt2"])
    err = capsys.readouterr().err
    assert code == 2 and "train.bc.init: unknown model spec 'gpt2'" in err


def test_other_problems_are_one_line_each(ray_session, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    code = main(["pipeline", "--config", "quickstart", "--check", "--out", str(blocked / "run"),
                 "--set", "eval.solvers=[/no/such/checkpoint]", "--set", "teacher.local_model=embedded:nope"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and all(line.startswith("subq: error: ") for line in lines), err
    assert any(f"out {blocked / 'run'}" in x and "not a writable directory" in x for x in lines)
    assert any("teacher.local_model" in x and "nope" in x for x in lines)
    assert any("/no/such/checkpoint" in x for x in lines)


def test_a_budget_needs_a_known_price(ray_session, keys, tmp_path, capsys):
    code = main(["pipeline", "--config", "gsm8k-openai", "--check", "--out", str(tmp_path / "run"),
                 *_local_sets(ROOT / "configs/gsm8k-openai.yaml"), "--set", "teacher.model=my-finetune-7"])
    err = capsys.readouterr().err
    assert code == 2 and "collect.budget_usd: no price known for 'my-finetune-7'" in err


def test_a_shipped_config_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_config("quickstart")).resolve() == (ROOT / "configs/quickstart.yaml").resolve()
    assert Path(resolve_config("gsm8k-openai.yaml")).name == "gsm8k-openai.yaml"
    (tmp_path / "quickstart").write_text("name: mine\n")  # a path that exists wins
    assert resolve_config("quickstart") == "quickstart"
    with pytest.raises(ConfigError, match=r"config file not found: nosuch \(shipped configs: .*quickstart"):
        resolve_config("nosuch")
