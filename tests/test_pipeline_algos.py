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
