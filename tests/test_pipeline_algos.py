"""The pipeline's train.algos with DPO and the distilled solver: accepted, wired to the right
initialisation, checked at load time, and only decomposers are evaluated as decomposers."""

from __future__ import annotations

from pathlib import Path

import pytest

from subq.config import ConfigError, load_config
from subq.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs/quickstart.yaml")


def test_dpo_starts_from_bc_and_a_distilled_solver_from_its_own_init(tmp_path):
    cfg, raw = load_config(QUICKSTART, [f"out={tmp_path}", "train.algos=[bc, dpo, solver-bc]",
                                        "train.dpo.algo_config={beta: 0.2, loss_type: ipo}",
                                        "train.solver-bc.algo_config={target: gold}"])
    pipe = Pipeline(cfg, raw, progress=False, echo=lambda _: None)
    dpo, solver = pipe.algo_train_config("dpo"), pipe.algo_train_config("solver-bc")
    assert dpo.init == str(tmp_path / "train" / "bc" / "final")  # BC's checkpoint: the reference model
    assert solver.init == "embedded:smollm2-135m-instruct"  # a solver is distilled from the base model
    assert (dpo.algo, solver.algo, solver.algo_config) == ("dpo", "solver-bc", {"target": "gold"})
    specs = pipe.decomposer_specs()
    assert f"dpo={tmp_path / 'train' / 'dpo' / 'final'}" in specs
    assert not any(s.startswith("solver-bc=") for s in specs)  # a solver is not a decomposer
    # without BC in the run, DPO starts from the configured init
    cfg, raw = load_config(QUICKSTART, [f"out={tmp_path}", "train.algos=[dpo]"])
    assert Pipeline(cfg, raw, progress=False, echo=lambda _: None).algo_train_config("dpo").init.startswith(
        "embedded:")


@pytest.mark.parametrize(("override", "names"), [
    ("train.dpo.algo_config={loss_type: hinge}", ["train.dpo", "loss_type"]),
    ("train.dpo.algo_config={loss_type: ipo, label_smoothing: 0.1}", ["train.dpo", "label_smoothing"]),
    ("train.dpo.algo_config={margn: 1}", ["train.dpo", "margn"]),
    ("train.solver-bc.algo_config={target: oracle}", ["train.solver-bc", "target"]),
])
def test_bad_algorithm_settings_fail_when_the_config_loads(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["train.algos=[bc, dpo, solver-bc]", override])
    for name in names:
        assert name in str(e.value)


# ------------------------------------------------------------------- named runs and paper 2's config

DIVIDE_OR_CONQUER = str(ROOT / "configs/divide-or-conquer.yaml")


def test_divide_or_conquer_wires_two_solver_runs_and_paper_2s_table(tmp_path, monkeypatch):
    """It loads without a key (the key is only read when a call is made) and wires bc, SE-T and SE-A:
    the solvers from the base model with their own targets, evaluated as columns beside the API solver."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg, raw = load_config(DIVIDE_OR_CONQUER, [f"out={tmp_path}"])
    pipe = Pipeline(cfg, raw, progress=False, echo=lambda _: None)
    assert cfg.teacher.api_key_env == "OPENAI_API_KEY" and cfg.collect["max_subquestions"] == 3
    runs = {name: pipe.algo_train_config(name) for name in cfg.train.algos}
    assert {n: (c.algo, c.algo_config.get("target"), c.out) for n, c in runs.items()} == {
        "bc": ("bc", None, str(tmp_path / "train" / "bc")),
        "se-t": ("solver-bc", "teacher", str(tmp_path / "train" / "se-t")),
        "se-a": ("solver-bc", "gold", str(tmp_path / "train" / "se-a"))}
    assert {c.init for c in runs.values()} == {"embedded:smollm2-135m-instruct"}  # none starts from BC
    api = "gpt-3.5-turbo@https://api.openai.com/v1"
    assert pipe.decomposer_specs() == [f"bc={tmp_path / 'train' / 'bc' / 'final'}", "teacher:gpt-3.5-turbo", "none"]
    assert pipe.solver_specs() == [api, f"se-t={tmp_path / 'train' / 'se-t' / 'final'}",
                                   f"se-a={tmp_path / 'train' / 'se-a' / 'final'}"]
    ec = pipe.eval_config()
    solvers = pipe.planned_solvers(ec)
    assert [(s.label, s.served) for s in solvers] == [
        ("gpt-3.5-turbo", None), ("se-t", str(tmp_path / "train" / "se-t" / "final")),
        ("se-a", str(tmp_path / "train" / "se-a" / "final"))]
    assert ec.max_subquestions == 3
    # 3 decomposers x 3 solvers, the teacher decomposing through the API solver's endpoint
    keys = pipe._keys(ec)
    assert {(k.decomposer, k.solver) for k in keys} == {
        (d, s) for d in ("bc", "teacher (gpt-3.5-turbo)", "none (CoT)") for s in ("gpt-3.5-turbo", "se-t", "se-a")}
    # without trained_solvers only the API column is evaluated
    cfg, raw = load_config(DIVIDE_OR_CONQUER, [f"out={tmp_path}", "eval.trained_solvers=false"])
    assert Pipeline(cfg, raw, progress=False, echo=lambda _: None).solver_specs() == [api]


def test_a_named_run_of_a_bc_based_algorithm_starts_from_bc(tmp_path):
    cfg, raw = load_config(QUICKSTART, [f"out={tmp_path}", "train.algos=[bc, fbc-half, filtered-bc]",
                                        "train.fbc-half={algo: filtered-bc, algo_config: {fraction: 0.5}}"])
    pipe = Pipeline(cfg, raw, progress=False, echo=lambda _: None)
    half = pipe.algo_train_config("fbc-half")
    assert (half.algo, half.init, half.out) == ("filtered-bc", str(tmp_path / "train" / "bc" / "final"),
                                                str(tmp_path / "train" / "fbc-half"))
    assert half.algo_config["fraction"] == 0.5
    assert pipe.algo_train_config("filtered-bc").algo_config != half.algo_config  # its own section
    assert f"fbc-half={tmp_path / 'train' / 'fbc-half' / 'final'}" in pipe.decomposer_specs()
    # a named run's section may stay while the run is left out of algos (e.g. --set train.algos=[bc])
    assert load_config(DIVIDE_OR_CONQUER, ["train.algos=[bc]"])[0].train.algos == ["bc"]


@pytest.mark.parametrize(("override", "names"), [
    ("train.algos=[bc, se-x]", ["se-x", "needs a section", "algo: solver-bc"]),
    ("train.se-t.algo=ppo", ["train.se-t.algo", "ppo"]),
    ("train.bc.algo=dpo", ["train.bc.algo", "named after an algorithm"]),
    ("train.algos=[bc, se-t, se-t]", ["distinct"]),
    ("train.algos=[bc, se/t]", ["se/t"]),
    ("train.se-a.algo_config={target: oracle}", ["train.se-a", "target"]),
    ("train.sea={lr: 1}", ["unknown key", "sea"]),
])
def test_named_run_mistakes_fail_when_the_config_loads(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(DIVIDE_OR_CONQUER, [override])
    for name in names:
        assert name in str(e.value), str(e.value)


def test_a_missing_solver_checkpoint_in_a_pipeline_fails_before_any_work(tmp_path):
    cfg, raw = load_config(QUICKSTART, [f"out={tmp_path}", "stages=[eval]",
                                        f"eval.solvers=[se={tmp_path / 'nosuch' / 'final'}]"])
    with pytest.raises(ConfigError) as e:
        Pipeline(cfg, raw, progress=False, echo=lambda _: None).preflight()
    assert "eval:" in str(e.value) and "not a directory" in str(e.value)
