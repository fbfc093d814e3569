"""benchmarks/quality.py end to end on a tiny random model: every student trained by the real driver,
measured, served, reported (the measures themselves are pinned in test_fidelity.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_on_a_tiny_model(ray_session, quality, tmp_path):
    cfg = quality.parse_args([
        "--model", "tiny-random:llama", "--reference", "gsm8k:train[:12]", "--ai-subq-records", "10",
        "--heldout", "5", "--generate", "2", "--bc-steps", "2", "--fbc-steps", "1", "--ilql-steps", "1",
        "--eval-every", "1", "--curve-problems", "3", "--batch-size", "2", "--max-length", "1000",
        "--max-new-tokens", "8", "--out", str(tmp_path / "q"), "--progress", "False", "--port", "8047"])
    result = quality.run(cfg)
    students = result["students"]
    assert list(students) == ["zero-shot", "bc", "filtered-bc", "ilql"]
    for name, s in students.items():
        assert s["nll_human"] > 0 and s["nll_chatgpt"] > 0 and s["nll_human_tokens"] > 100
        assert set(s["generated"]) == ({"beta=0", "beta=1", "beta=4"} if name == "ilql" else {"beta=0"})
        for g in s["generated"].values():
            assert g["problems"] == 2 and 0 <= g["parse_rate"] <= 1 and 0 <= g["stop_rate"] <= 1
    # same problems, same tokens: the students' NLLs are comparable (the zero-shot chat format differs)
    assert len({s["nll_human_tokens"] for n, s in students.items() if n != "zero-shot"}) == 1
    # the learning curve: the initial model, then every step; filtered BC and ILQL continue from BC's end
    assert [step for step, _ in students["bc"]["curve"]] == [0, 1, 2]
    assert [step for step, _ in students["filtered-bc"]["curve"]] == [3]
    assert set(students["ilql"]["value_auc"]) == {"q_last", "v_last", "advantage"}
    auc = students["ilql"]["value_auc"]["q_last"]
    assert auc["positives"] + auc["negatives"] == 5
    assert "zero-shot" not in result["settings"] and result["settings"]["heldout"] == 5
    out = tmp_path / "q"
    assert json.loads((out / "quality.json").read_text())["students"]["bc"]["steps"] == 2
    table = (out / "quality.md").read_text()
    assert table.count("\n| ") == 6  # rows after the header: zero-shot, bc, filtered-bc, ILQL at 3 betas
    assert (out / "quality_curve.png").read_bytes()[:4] == b"\x89PNG"
    # the held-out problems never trained: not in the training store
    from subq.data_store.datasets import load_problems
    from subq.data_store.store import Store

    held_out = {p["problem_id"] for p in load_problems("gsm8k:test[:5]")}
    assert not held_out & {r["problem_id"] for r in Store(str(out / "store")).read_rows("samples")}
