"""evaluation.report: run summaries from records, and the three report files."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from pathlib import Path

import pytest
from subq.evaluation.report import RunSummary, markdown, summarize, write_report

import subq

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REF = ["How many clips in May?", "How many clips in total?"]


def record(i: int, correct: bool = True, *, answer_type: str = "number", cost: float | None = 0.001,
           subquestions: list[str] | None = REF, **extra) -> dict:
    base = dict(
        problem_id=f"p{i}", answer_type=answer_type, subquestions=subquestions, reference_subquestions=REF,
        decompose_tokens_in=100, decompose_tokens_out=20, decompose_latency_s=0.5 + i, decompose_cost_usd=cost,
        solve_tokens_in=300, solve_tokens_out=80, solve_latency_s=1.0 + 2 * i, solve_cost_usd=cost,
        solver_text="A1: 3\nFinal answer: 3", decompose_error=None, solve_error=None,
        prediction="3", correct=correct, f1=1.0 if answer_type == "text" and correct else None, score_error=None,
    )
    return {**base, **extra}


def test_summarize_counts_and_totals() -> None:
    records = [
        record(0, True),
        record(1, False, score_error="no 'Final answer:' line; used the last number in the text"),
        record(2, True, solve_error="api_error: HTTP 500", solver_text="", score_error="empty solver text"),
        record(3, True, decompose_error="parse_error: no sub-questions", subquestions=[]),
    ]
    s = summarize(records, "ilql", "gpt-4o-mini", "gsm8k:test[:4]", "strict")
    assert (s.decomposer, s.solver, s.benchmark, s.scorer, s.n) == ("ilql", "gpt-4o-mini", "gsm8k:test[:4]", "strict", 4)
    assert s.correct == 2 and s.accuracy == 0.5  # the solve_error record is wrong whatever its flag says
    assert s.ci_low < 0.5 < s.ci_high
    assert (s.parse_failures, s.decompose_failures, s.solve_failures) == (1, 1, 1)  # API failures apart
    assert s.subq_per_problem == pytest.approx(6 / 4)  # the failed decomposition counts as 0 sub-questions
    assert (s.decompose_tokens_in, s.decompose_tokens_out, s.solve_tokens_in, s.solve_tokens_out) == (400, 80, 1200, 320)
    assert s.decompose_latency_p50_s == pytest.approx(2.0) and s.solve_latency_p50_s == pytest.approx(4.0)
    assert s.decompose_cost_usd == pytest.approx(0.004) and s.solve_cost_usd == pytest.approx(0.004)
    assert s.cost_per_1k_usd == pytest.approx(2.0)
    assert s.f1_mean is None
    assert s.similarity is not None and s.similarity["n"] == 4
    assert s.similarity["count_diff"] == pytest.approx(-0.5)  # one empty decomposition of 4


def test_summarize_unknown_prices_and_the_baseline() -> None:
    unknown = summarize([record(0), record(1, solve_cost_usd=None)], "teacher", "mystery", "b", "strict")
    assert unknown.decompose_cost_usd == pytest.approx(0.002)
    assert unknown.solve_cost_usd is None and unknown.cost_per_1k_usd is None
    baseline = summarize([record(i, cost=0.0, subquestions=None, decompose_tokens_in=0) for i in range(3)],
                         "none (CoT)", "smollm", "b", "paper1")
    assert baseline.subq_per_problem is None and baseline.similarity is None
    assert baseline.cost_per_1k_usd == 0.0 and baseline.scorer == "paper1"
    no_refs = summarize([record(0, reference_subquestions=None)], "ilql", "smollm", "svamp", "strict")
    assert no_refs.similarity is None


def test_summarize_text_f1_and_empty_input() -> None:
    recs = [record(0, True, answer_type="text"), record(1, False, answer_type="text", f1=0.5),
            record(2, False, answer_type="text", f1=None, prediction=None, score_error="empty final answer")]
    s = summarize(recs, "ilql", "gpt", "bamboogle", "strict")
    assert s.f1_mean == pytest.approx(0.5) and s.correct == 1
    with pytest.raises(ValueError, match="no records"):
        summarize([], "ilql", "gpt", "bamboogle", "strict")


def _runs() -> list[RunSummary]:
    g = "gsm8k:test[:10]"
    return [
        summarize([record(i, i % 2 == 0) for i in range(10)], "filtered_bc", "gpt-4o-mini", g, "strict"),
        summarize([record(i, i % 3 == 0, cost=None) for i in range(10)], "teacher", "mystery|model", g, "strict"),
        summarize([record(i, True, cost=0.0, subquestions=None) for i in range(10)], "none (CoT)", "smollm", g,
                  "strict"),
        summarize([record(i, i < 4, cost=0.0) for i in range(10)], "filtered_bc", "smollm", g, "strict"),
        summarize([record(i, True, cost=0.0, answer_type="text") for i in range(5)], "filtered_bc", "smollm",
                  "bamboogle", "strict"),
    ]


def _table(md: str, section: str) -> list[list[str]]:
    """The first Markdown table after a "## section" heading, as rows of cells (header first)."""
    lines = md.split(f"## {section}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.replace("\\|", "\0").strip("|").split("|")])
    return [[c.replace("\0", "|") for c in row] for row in rows if not set(row[0]) <= {"-"}]


def test_markdown_table_is_decomposers_by_solvers() -> None:
    md = markdown(_runs())
    table = _table(md, "gsm8k:test[:10]")
    assert table[0] == ["decomposer \\ solver", "gpt-4o-mini", "mystery|model", "smollm"]
    assert [row[0] for row in table[1:]] == ["filtered_bc", "teacher", "none (CoT)"]
    assert all(len(row) == 4 for row in table)
    assert table[1] == ["filtered_bc", "0.500 [0.24, 0.76]", "—", "0.400 [0.17, 0.69]"]
    assert table[2][1] == "—" and table[2][2].startswith("0.400 [")
    assert table[3][3].startswith("1.000 [0.72, 1.00]")
    assert _table(md, "bamboogle")[0] == ["decomposer \\ solver", "smollm"]


def test_markdown_detail_rows() -> None:
    md = markdown(_runs())
    detail = md.split("## gsm8k:test[:10]", 1)[1].split("Runs:", 1)[1].split("## ", 1)[0]
    rows = [line for line in detail.splitlines() if line.startswith("| ")]
    header, runs = rows[0], rows[1:]
    assert len(runs) == 4 and header.count("|") == runs[0].count("|")
    for column in ("n", "accuracy [95% CI]", "F1", "sub-q / problem", "decomp tokens in / out", "solve tokens in / out",
                   "decomp p50 s", "solve p50 s", "$/1k decomp", "$/1k solve", "$/1k total", "parse fail",
                   "decomp fail", "solve fail", "sub-q − ref", "ROUGE-L"):
        assert f"| {column} |" in header
    paid = runs[0].split(" | ")
    assert "100 / 20" in paid and "300 / 80" in paid and "1" in paid and "2" in paid  # $/1k: 1 + 1 = 2
    unknown = runs[1].split(" | ")
    assert unknown.count("?") == 3  # decomposition, solving and total: price unknown
    assert "mystery\\|model" in runs[1]
    baseline = runs[2].split(" | ")
    assert baseline[5] == "—" and baseline[-1] == "— |"  # no sub-questions, no ROUGE-L
    assert "| 0.000 |" not in md.split("## bamboogle", 1)[1]  # F1 is shown for the text benchmark
    assert "| 1.000 | 2.00 |" in md.split("## bamboogle", 1)[1]


def test_write_report_writes_three_files(tmp_path: Path) -> None:
    runs = _runs()
    paths = write_report(runs, tmp_path / "out", config={"benchmarks": ["gsm8k:test[:10]"], "scorer": "strict"})
    assert set(paths) == {"json", "markdown", "plot"}
    assert paths["json"].name == "results.json" and paths["markdown"].name == "results.md"
    assert paths["plot"].name == "accuracy_vs_cost.png"
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC and paths["plot"].stat().st_size > 5000
    data = json.loads(paths["json"].read_text())
    assert data["config"]["scorer"] == "strict"
    # which subq wrote it, from which commit, when (the commit: this checkout's, None outside one)
    assert data["subq"]["version"] == subq.__version__
    assert re.fullmatch(r"[0-9a-f]{40}", data["subq"]["git_commit"] or "") or data["subq"]["git_commit"] is None
    assert datetime.fromisoformat(data["subq"]["date"]).tzinfo is not None
    assert [RunSummary(**r) for r in data["runs"]] == runs  # round trip
    assert set(data["runs"][0]) == {f.name for f in dataclasses.fields(RunSummary)}
    assert paths["markdown"].read_text() == markdown(runs)


def test_provenance_outside_a_checkout_has_no_commit(monkeypatch) -> None:
    import subprocess

    from subq.evaluation.report import provenance

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    p = provenance()
    assert p["git_commit"] is None and p["version"] == subq.__version__ and p["date"]


def test_plot_handles_unknown_zero_and_empty(tmp_path: Path) -> None:
    g = "gsm8k:test[:3]"
    only_unknown = [summarize([record(0, cost=None)], "a$b$", "x", g, "strict")]  # "$" pairs are not math
    only_free = [summarize([record(0, cost=0.0)], "ilql", "smollm", g, "strict")]
    for i, runs in enumerate((only_unknown, only_free, [])):
        paths = write_report(runs, tmp_path / str(i))
        assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    assert "No runs." in (tmp_path / "2" / "results.md").read_text()
    data = json.loads((tmp_path / "2" / "results.json").read_text())
    assert data["config"] == {} and data["runs"] == []


def test_format_table_for_the_terminal() -> None:
    from subq.evaluation.report import format_table

    runs = _runs()
    lines = format_table(runs).splitlines()
    assert len(lines) == 1 + len(runs)
    assert lines[0].split()[:4] == ["benchmark", "decomposer", "solver", "n"]
    assert "filtered_bc" in lines[1] and "0.500 [0.24, 0.76]" in lines[1] and "0/0/0" in lines[1]
    assert " ? " in lines[2]  # unknown price
    assert lines[0].index("accuracy") == lines[1].index("0.500 [") == lines[5].index("1.000 [")  # aligned
    assert format_table([]).startswith("benchmark")


def test_plot_is_readable_when_every_dollar_is_zero() -> None:
    """The quickstart's case: four self-hosted runs at $0 with the same accuracy. The x axis switches to
    tokens, never spans negative values, and the runs are told apart (legend, nudged markers)."""
    from subq.evaluation.report import accuracy_vs_cost_figure

    g = "gsm8k:test[:3]"
    runs = [summarize([record(i, False, cost=0.0) for i in range(3)], name, "smollm", g, "strict")
            for name in ("bc", "filtered-bc", "ilql")]
    runs.append(summarize([record(i, False, cost=0.0, subquestions=None, decompose_tokens_in=0,
                                  decompose_tokens_out=0) for i in range(3)], "none (CoT)", "smollm", g, "strict"))
    ax = accuracy_vs_cost_figure(runs).axes[0]
    assert ax.get_xlim()[0] >= 0
    assert "tokens per problem" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "bc / smollm", "filtered-bc / smollm", "ilql / smollm", "none (CoT) / smollm"]
    assert not ax.texts  # no annotations that could overlap
    # the three decomposers sit at the same (tokens, accuracy): their markers are drawn apart
    markers = [line for line in ax.lines if line.get_marker() not in (None, "None", "", "_")]
    screen = {tuple(line.get_transform().transform(line.get_xydata()[0]).round(1)) for line in markers[:3]}
    assert len(screen) == 3


def test_plot_uses_dollars_when_some_run_costs_money() -> None:
    from subq.evaluation.report import accuracy_vs_cost_figure

    ax = accuracy_vs_cost_figure(_runs()[:4]).axes[0]
    assert ax.get_xlabel().startswith("$ per 1k problems") and ax.get_xlim()[0] == 0
    assert any(t.get_text().endswith(r"(\$?)") for t in ax.get_legend().get_texts())  # "$" escaped for mathtext


def test_held_out_nll_column_and_what_training_changed() -> None:
    g = "gsm8k:test[:10]"
    runs = [summarize([record(i, False, cost=0.0) for i in range(4)], d, "smollm", g, "strict", nll_human=v,
                      nll_problems="gsm8k:test[:32]")
            for d, v in (("bc", 0.8), ("ilql", 0.9), ("teacher (smollm)", 0.95))]
    runs.append(summarize([record(i, False, cost=0.0, subquestions=None) for i in range(4)], "none (CoT)", "smollm",
                          g, "strict"))
    md = markdown(runs)
    head = _DETAIL_HEAD_CELLS(md)
    rows = {r[0]: r for r in _detail_rows(md)}
    col = head.index("held-out NLL")
    assert (rows["bc"][col], rows["ilql"][col], rows["none (CoT)"][col]) == ("0.800", "0.900", "—")
    assert ("zero-shot base model (teacher (smollm), prompted as the teacher) 0.950: training lowered it by "
            "0.150 at best (bc)") in md
    worse = [dataclasses.replace(r, nll_human=1.2) if r.decomposer == "bc" else r for r in runs if r.decomposer != "ilql"]
    assert "training did not lower it by 0.250 at best (bc)" in markdown(worse)
    assert "held-out NLL" not in markdown(_runs()).split("Runs:")[0]  # no figures: no sentence


def _DETAIL_HEAD_CELLS(md: str) -> list[str]:  # noqa: N802
    line = next(line for line in md.splitlines() if line.startswith("| decomposer | solver |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _detail_rows(md: str) -> list[list[str]]:
    start = md.index("| decomposer | solver |")
    rows = []
    for line in md[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows
