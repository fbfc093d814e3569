"""Per-round figures of iterated distillation (``subq/rounds.py``): a table, JSON and a plot against the round.

Per round r: over the decompositions collected that round (round 1: the teacher's, r > 1: round r-1's
student's), the share whose answer the teacher got right (``correct``), the mean usefulness of their
sub-questions, sub-questions per decomposition, and the teacher's $ and tokens spent on them (round 1:
every stage; later rounds: answers and judgements, the student decomposes for free); then for round
r's chosen student: held-out NLL of the human sub-questions (``eval.fidelity_problems``), ROUGE-L
against the human sub-questions and accuracy with the first solver on the first benchmark (when
evaluated).
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean
from typing import Any

FIGURES = ("correct_share", "mean_usefulness", "subq_per_decomposition", "teacher_usd", "teacher_tokens",
           "heldout_nll", "rougeL", "accuracy")


def round_figures(pipe: Any, r: int, summaries: list[Any]) -> dict[str, Any]:
    """The figures of round ``r`` (``pipe``: the Pipeline that ran it)."""
    from subq.data_store.datasets import load_problems
    from subq.data_store.store import Store
    from subq.evaluation.fidelity_report import read_fidelity
    from subq.learner.data import sample_round

    cc = pipe.collect_config()
    wanted = {p["problem_id"] for p in load_problems(cc.problems)} if cc is not None else set()
    rows = [row for row in Store(pipe.cfg.store_uri).read_rows("samples")
            if row["problem_id"] in wanted and sample_round(row) == r and (r > 1 or row["policy"] is None)]
    stages = ("decompose", "answer", "feedback") if r == 1 else ("answer", "feedback")
    judged = [row for row in rows if row["correct"] is not None]
    useful = [u for row in rows for u in (row["usefulness"] or []) if u is not None]
    student = pipe.cfg.rounds_student
    mine = [s for s in summaries if s.decomposer == student]
    sim = (mine[0].similarity or {}) if mine else {}
    return {
        "round": r,
        "decomposer": "teacher" if r == 1 else f"{student} of round {r - 1}",
        "decompositions": len(rows),
        "correct_share": fmean(bool(row["correct"]) for row in judged) if judged else None,
        "mean_usefulness": fmean(useful) if useful else None,
        "subq_per_decomposition": fmean(len(row["subquestions"]) for row in rows if row["subquestions"])
        if any(row["subquestions"] for row in rows) else None,
        "teacher_usd": sum(row[f"{s}_cost_usd"] or 0.0 for row in rows for s in stages),
        "teacher_tokens": sum((row[f"{s}_tokens_in"] or 0) + (row[f"{s}_tokens_out"] or 0)
                              for row in rows for s in stages),
        "student": str(pipe.train_dir(student) / "final"),
        "heldout_nll": read_fidelity(str(pipe.out / "eval")).get(student),
        "rougeL": sim.get("rougeL"),
        "accuracy": mine[0].accuracy if mine else None,
    }


def format_rounds(figures: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    head = ["round", "decomposer", "decompositions", *FIGURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(f.get(k)) for k in head) + " |" for f in figures]
    return "\n".join(lines)


def write_rounds(out: Path, figures: list[dict[str, Any]], echo: Any = print) -> None:
    """``rounds.json``, ``rounds.md`` and ``rounds.png`` (each figure against the round) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.json").write_text(json.dumps(figures, indent=2))
    table = format_rounds(figures)
    (out / "rounds.md").write_text(table + "\n")
    echo(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, name in zip(axes.flat, FIGURES, strict=True):
        points = [(f["round"], f[name]) for f in figures if f.get(name) is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks([f["round"] for f in figures])
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=100)
    plt.close(fig)
