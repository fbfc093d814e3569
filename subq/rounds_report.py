"""Per-round figures of iterated distillation (``subq/rounds.py``): a table, JSON and a plot against the round.

Per round r: over the decompositions collected that round (round 1: the teacher's, r > 1: round r-1's
student's), the share whose answer the teacher got right (``correct``), the mean usefulness of their
sub-questions, sub-questions per decomposition, and the teacher's $ and tokens spent on them (round 1:
every stage; later rounds: answers and judgements, the student decomposes for free); then for round
r's chosen student, on held-out problems it never trained on:

- against the human sub-questions: NLL per token (``eval.fidelity_problems``) and ROUGE-L of its
  decompositions of the first benchmark;
- against the teacher's sub-questions: the teacher's decompositions of that benchmark in round 1's
  evaluation (``eval.teacher_decomposes``); their NLL per token under the student (student format, as
  the human NLL) and ROUGE-L of the student's decompositions of the same problems. Rounds in which the
  student learns from itself may move it away from the teacher while the teacher still judges it;
- accuracy with the first solver on the first benchmark.

A figure that was not evaluated is None.
"""

from __future__ import annotations

import io
import json
from statistics import fmean
from typing import Any

from subq.data_store import uri

FIGURES = ("correct_share", "mean_usefulness", "subq_per_decomposition", "teacher_usd", "teacher_tokens",
           "accuracy", "nll_human", "nll_teacher", "rougeL_human", "rougeL_teacher")
TEACHER_NLL_FILE = "fidelity_teacher.json"  # in a round's eval folder: the NLL of the teacher's sub-questions

Decompositions = dict[str, tuple[str, list[str]]]  # problem_id -> (question, sub-questions)


def round_figures(pipe: Any, r: int, summaries: list[Any],
                  teacher: tuple[str, Decompositions] | None = None) -> dict[str, Any]:
    """The figures of round ``r`` (``pipe``: the Pipeline that ran it; ``teacher``: the teacher's held-out
    decompositions, :func:`teacher_decompositions`)."""
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
        "student": pipe.final_dir(student),
        "accuracy": mine[0].accuracy if mine else None,
        "nll_human": read_fidelity(uri.join(pipe.out, "eval")).get(student),
        "rougeL_human": sim.get("rougeL"),
        **against_teacher(pipe, mine, teacher),
    }


def teacher_decompositions(pipe: Any, summaries: list[Any]) -> tuple[str, Decompositions] | None:
    """(benchmark, its problems' teacher decompositions) from ``pipe``'s evaluation of the teacher decomposer
    (round 1's, with ``eval.teacher_decomposes``) on its first benchmark; None when it was not evaluated."""
    from subq.evaluation.records import read_records, records_path

    out = pipe.eval_config().out_dir
    for s in summaries:
        if s.decomposer.startswith("teacher ("):  # subq.eval_setup.decomposer_label's teacher row
            recs = read_records(records_path(out, s.benchmark, s.decomposer, s.solver, s.fingerprint))
            return s.benchmark, {rec["problem_id"]: (rec["question"], list(rec["subquestions"])) for rec in recs
                                 if rec.get("subquestions")}
    return None


def against_teacher(pipe: Any, mine: list[Any], teacher: tuple[str, Decompositions] | None) -> dict[str, Any]:
    """``nll_teacher`` and ``rougeL_teacher`` of the student whose summaries are ``mine`` (None: not evaluated)."""
    from subq.evaluation.records import read_records, records_path
    from subq.evaluation.similarity import aggregate_similarity
    from subq.learner.train import cpu_bf16_on

    bench, theirs = teacher or (None, {})
    run = next((s for s in mine if s.benchmark == bench), None)
    if not theirs or run is None:
        return {"nll_teacher": None, "rougeL_teacher": None}
    ec = pipe.eval_config()
    recs = read_records(records_path(ec.out_dir, bench, run.decomposer, run.solver, run.fingerprint))
    sim = aggregate_similarity((rec.get("subquestions"), theirs.get(rec["problem_id"], (None, None))[1])
                               for rec in recs)
    nll = teacher_nll(uri.join(ec.out_dir, TEACHER_NLL_FILE), run.decomposer, pipe.final_dir(run.decomposer),
                      list(theirs.values()), bf16=cpu_bf16_on(ec.fidelity_cpu_bf16))
    return {"nll_teacher": nll, "rougeL_teacher": sim["rougeL"]}


def teacher_nll(cache: str, label: str, spec: str, pairs: list[tuple[str, list[str]]], *,
                bf16: bool = False) -> float | None:
    """NLL per token of ``pairs`` (the teacher's decompositions) under the checkpoint ``spec`` (student format),
    kept in the JSON file ``cache`` by label until the weights or the pairs change."""
    import hashlib

    from subq.evaluation.fidelity import decomposer_nll
    from subq.learner.checkpoint import META_FILE

    meta = uri.join(spec, META_FILE)
    identity = {"spec": spec, "bf16": bf16,
                "created": json.loads(uri.read_text(meta)).get("created") if uri.is_file(meta) else None,
                "pairs": hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()}
    table = json.loads(uri.read_text(cache)) if uri.is_file(cache) else {}
    if table.get(label, {}).get("identity") != identity:
        table[label] = {**decomposer_nll(spec, "student", pairs, bf16=bf16), "identity": identity}
        uri.write_text(cache, json.dumps(table, indent=2))
    return table[label]["nll_per_token"]


def format_rounds(figures: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    head = ["round", "decomposer", "decompositions", *FIGURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(f.get(k)) for k in head) + " |" for f in figures]
    return "\n".join(lines)


def write_rounds(out: str, figures: list[dict[str, Any]], echo: Any = print) -> None:
    """``rounds.json``, ``rounds.md`` and ``rounds.png`` (each figure against the round) under ``out`` (a path
    or URI: one whole object each)."""
    uri.write_text(uri.join(out, "rounds.json"), json.dumps(figures, indent=2))
    table = format_rounds(figures)
    uri.write_text(uri.join(out, "rounds.md"), table + "\n")
    echo(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(17, 6))
    for ax, name in zip(axes.flat, FIGURES, strict=True):
        points = [(f["round"], f[name]) for f in figures if f.get(name) is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks([f["round"] for f in figures])
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    uri.write_bytes(uri.join(out, "rounds.png"), png.getvalue())
