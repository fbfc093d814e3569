"""Summaries of evaluation runs and the report: ``results.json``, ``results.md``, ``accuracy_vs_cost.png``.

A *run* is one (decomposer, solver, benchmark) combination; :func:`summarize` turns its per-problem
records into a :class:`RunSummary`, :func:`write_report` writes the three files for a list of them.

Record contract (one dict per problem; ``evaluation/run.py`` writes exactly these keys, flat):

=========================== =================== ==========================================================
key                         type                meaning
=========================== =================== ==========================================================
problem_id                  str
answer_type                 str                 number | choice | yesno | text
subquestions                list[str] | None    the decomposer's plan; None for the CoT baseline
reference_subquestions      list[str] | None    human decomposition (GSM8K socratic, StrategyQA)
decompose_tokens_in / _out  int                 usage of the decomposition call (0 for the baseline)
decompose_latency_s         float | None
decompose_cost_usd          float | None        None = the model's price is unknown
solve_tokens_in / _out      int
solve_latency_s             float | None
solve_cost_usd              float | None        None = unknown price
solver_text                 str                 the solver's reply ("" after an API failure)
decompose_error             str | None          API or parse failure of the decomposer
solve_error                 str | None          API failure of the solver (or the solve was skipped because
                                                the decomposition failed at the API): counted wrong, and apart
attempt                     int                 1, then +1 per retry of a record that failed at the API
prediction                  str | None          ``evaluation.scoring.Score`` fields, flat:
correct                     bool                  ``score(solver_text, problem, mode)``
f1                          float | None          (text answers only)
score_error                 str | None            ``Score.error``: the reply did not follow the format
=========================== =================== ==========================================================

Counting: ``correct`` excludes records with a ``solve_error``; ``api_failures`` counts records that
failed at the API (``evaluation.records.failure``): they are not final and a re-run retries them; ``parse_failures`` counts replies (API
failures excluded) whose ``score_error`` is set, including replies scored through a fallback;
token counts and $ are totals over the run, $ is None as soon as one record's price is unknown;
latencies are medians over problems. The tables show tokens per problem and $ per 1k problems.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean, median
from typing import Any

from subq.evaluation.records import failure
from subq.evaluation.scoring import wilson_interval
from subq.evaluation.similarity import aggregate_similarity

DASH = "—"


@dataclass
class RunSummary:
    decomposer: str  # row label, e.g. "filtered_bc", "teacher (gpt-4o-mini)", "none (CoT)"
    solver: str  # column label
    benchmark: str  # dataset spec, e.g. "gsm8k:test[:200]"
    scorer: str  # strict | paper1
    n: int  # problems
    correct: int
    accuracy: float
    ci_low: float  # 95% Wilson interval
    ci_high: float
    f1_mean: float | None  # text answers: mean best token F1 (None for other benchmarks)
    subq_per_problem: float | None  # mean number of sub-questions; None without a decomposer
    decompose_tokens_in: int  # totals over the run
    decompose_tokens_out: int
    solve_tokens_in: int
    solve_tokens_out: int
    decompose_latency_p50_s: float | None  # median seconds per problem
    solve_latency_p50_s: float | None
    decompose_cost_usd: float | None  # totals; None = some price unknown
    solve_cost_usd: float | None
    cost_per_1k_usd: float | None  # (decompose + solve) per 1000 problems
    parse_failures: int  # replies whose answer was not read from a "Final answer" line
    decompose_failures: int  # records with a decompose_error
    solve_failures: int  # records with a solve_error (API failure, counted wrong)
    similarity: dict[str, Any] | None  # evaluation.similarity.aggregate_similarity, when references exist
    api_failures: int = 0  # records that failed at the API: not final, a re-run retries them
    fingerprint: str | None = None  # evaluation.fingerprint of the settings every record of this run shares
    settings: dict[str, Any] | None = None  # those settings: decomposer identity and decoding, solver model...
    nll_human: float | None = None  # the decomposer's held-out NLL per token of human sub-questions (fidelity)
    nll_problems: str | None = None  # ... of these problems (EvalConfig.fidelity_problems)


def _total(values: Iterable[Any]) -> float | None:
    """Sum of costs; None when any is unknown."""
    total = 0.0
    for v in values:
        if v is None:
            return None
        total += float(v)
    return total


def _p50(values: Iterable[Any]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return median(known) if known else None


def summarize(records: Sequence[dict[str, Any]], decomposer: str, solver: str, benchmark: str,
              mode: str, *, fingerprint: str | None = None, settings: dict[str, Any] | None = None,
              nll_human: float | None = None, nll_problems: str | None = None) -> RunSummary:
    """One run's summary from its per-problem records (see the module docstring for the contract)."""
    if not records:
        raise ValueError(f"no records for {decomposer} / {solver} on {benchmark}")
    n = len(records)
    correct = sum(bool(r.get("correct")) and not r.get("solve_error") for r in records)
    lo, hi = wilson_interval(correct, n)
    texts = [r for r in records if r.get("answer_type") == "text"]
    plans = [r["subquestions"] for r in records if r.get("subquestions") is not None]
    dec_cost = _total(r.get("decompose_cost_usd", 0.0) for r in records)
    solve_cost = _total(r.get("solve_cost_usd", 0.0) for r in records)
    similarity = aggregate_similarity((r.get("subquestions"), r.get("reference_subquestions")) for r in records)
    return RunSummary(
        decomposer=decomposer, solver=solver, benchmark=benchmark, scorer=mode,
        n=n, correct=correct, accuracy=correct / n, ci_low=lo, ci_high=hi,
        f1_mean=fmean(float(r.get("f1") or 0.0) for r in texts) if texts else None,
        subq_per_problem=fmean(len(p) for p in plans) if plans else None,
        decompose_tokens_in=sum(int(r.get("decompose_tokens_in") or 0) for r in records),
        decompose_tokens_out=sum(int(r.get("decompose_tokens_out") or 0) for r in records),
        solve_tokens_in=sum(int(r.get("solve_tokens_in") or 0) for r in records),
        solve_tokens_out=sum(int(r.get("solve_tokens_out") or 0) for r in records),
        decompose_latency_p50_s=_p50(r.get("decompose_latency_s") for r in records),
        solve_latency_p50_s=_p50(r.get("solve_latency_s") for r in records),
        decompose_cost_usd=dec_cost, solve_cost_usd=solve_cost,
        cost_per_1k_usd=None if dec_cost is None or solve_cost is None else (dec_cost + solve_cost) / n * 1000,
        parse_failures=sum(not r.get("solve_error") and r.get("score_error") is not None for r in records),
        decompose_failures=sum(r.get("decompose_error") is not None for r in records),
        solve_failures=sum(bool(r.get("solve_error")) for r in records),
        similarity=similarity if similarity["n"] else None,
        api_failures=sum(failure(r) is not None for r in records), fingerprint=fingerprint, settings=settings,
        nll_human=nll_human, nll_problems=nll_problems,
    )


# --- Markdown --------------------------------------------------------------------------------


def _cell(s: RunSummary) -> str:
    return f"{s.accuracy:.3f} [{s.ci_low:.2f}, {s.ci_high:.2f}]"


def _esc(label: str) -> str:
    return label.replace("|", "\\|")


def _num(x: float | None, fmt: str = ".2f") -> str:
    return DASH if x is None else format(x, fmt)


def _usd(total: float | None, n: int) -> str:
    """$ per 1k problems from a run total: "?" when the price is unknown."""
    if total is None:
        return "?"
    return "0" if total == 0 else f"{total / n * 1000:.3g}"


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


_DETAIL_HEAD = (
    "| decomposer | solver | n | accuracy [95% CI] | F1 | sub-q / problem | decomp tokens in / out "
    "| solve tokens in / out | decomp p50 s | solve p50 s | $/1k decomp | $/1k solve | $/1k total "
    "| parse fail | decomp fail | solve fail | sub-q − ref | ROUGE-L | held-out NLL |"
)


def _detail_row(s: RunSummary) -> str:
    sim = s.similarity or {}
    cells = [
        _esc(s.decomposer), _esc(s.solver), str(s.n), _cell(s), _num(s.f1_mean, ".3f"), _num(s.subq_per_problem),
        f"{s.decompose_tokens_in / s.n:.0f} / {s.decompose_tokens_out / s.n:.0f}",
        f"{s.solve_tokens_in / s.n:.0f} / {s.solve_tokens_out / s.n:.0f}",
        _num(s.decompose_latency_p50_s), _num(s.solve_latency_p50_s),
        _usd(s.decompose_cost_usd, s.n), _usd(s.solve_cost_usd, s.n),
        "?" if s.cost_per_1k_usd is None else ("0" if s.cost_per_1k_usd == 0 else f"{s.cost_per_1k_usd:.3g}"),
        str(s.parse_failures), str(s.decompose_failures), str(s.solve_failures),
        _num(sim.get("count_diff"), "+.2f"), _num(sim.get("rougeL"), ".3f"), _num(s.nll_human, ".3f"),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(summaries: Sequence[RunSummary]) -> str:
    """Per benchmark: paper 1's table (rows = decomposers, columns = solvers), then one row per run."""
    modes = ", ".join(_ordered(s.scorer for s in summaries)) or DASH
    out = [
        "# subq evaluation",
        "",
        f"Scorer: {modes}. Cells: accuracy [95% Wilson interval]. Tokens are per problem; $ per 1k problems "
        "from the price table (\"?\" = a model's price is unknown, 0 = self-hosted). A decomposer of "
        "\"none\" is the solver alone with chain of thought.",
    ]
    not_final = sum(s.api_failures for s in summaries)
    if not_final:
        out += ["", f"**Not final:** {not_final} record(s) failed at the API (counted wrong here); run the "
                    "same command again to retry them."]
    for bench in _ordered(s.benchmark for s in summaries):
        runs = [s for s in summaries if s.benchmark == bench]
        decs, solvers = _ordered(s.decomposer for s in runs), _ordered(s.solver for s in runs)
        by_key = {(s.decomposer, s.solver): s for s in runs}
        out += ["", f"## {bench}", "",
                "| decomposer \\ solver | " + " | ".join(_esc(v) for v in solvers) + " |",
                "|---" * (len(solvers) + 1) + "|"]
        for d in decs:
            cells = [_cell(by_key[d, v]) if (d, v) in by_key else DASH for v in solvers]
            out.append(f"| {_esc(d)} | " + " | ".join(cells) + " |")
        out += ["", "Runs:", "", _DETAIL_HEAD, "|---" * (_DETAIL_HEAD.count("|") - 1) + "|"]
        out += [_detail_row(s) for s in runs]
        out += _fidelity_lines(runs)
    if not summaries:
        out += ["", "No runs."]
    return "\n".join(out) + "\n"


def _fidelity_lines(runs: Sequence[RunSummary]) -> list[str]:
    """What training changed, in one sentence: held-out NLL of the zero-shot decomposer vs. the students."""
    nll = {s.decomposer: s.nll_human for s in runs if s.nll_human is not None}
    zero = [d for d in nll if d.startswith("teacher")]
    students = {d: v for d, v in nll.items() if not d.startswith("teacher")}
    if not students:
        return []
    where = next(s.nll_problems for s in runs if s.nll_problems)
    parts = ", ".join(f"{_esc(d)} {v:.3f}" for d, v in students.items())
    line = f"Held-out NLL of the human sub-questions of {where} (nats/token, lower is more faithful): {parts}"
    if zero:
        best = min(students, key=students.get)
        change = students[best] - nll[zero[0]]
        line += (f"; the zero-shot base model ({_esc(zero[0])}, prompted as the teacher) {nll[zero[0]]:.3f}: "
                 f"training {'lowered' if change < 0 else 'did not lower'} it by {abs(change):.3f} at best "
                 f"({_esc(best)})")
    return ["", line + "."]


def format_table(summaries: Sequence[RunSummary]) -> str:
    """A fixed-width plain-text table of the runs, one line each, for a terminal."""
    head = ("benchmark", "decomposer", "solver", "n", "accuracy [95% CI]", "F1", "sub-q", "$/1k",
            "fail parse/dec/solve", "ROUGE-L", "held-out NLL")
    rows = [head] + [
        (s.benchmark, s.decomposer, s.solver, str(s.n), _cell(s), _num(s.f1_mean, ".3f"), _num(s.subq_per_problem),
         "?" if s.cost_per_1k_usd is None else f"{s.cost_per_1k_usd:.3g}",
         f"{s.parse_failures}/{s.decompose_failures}/{s.solve_failures}",
         _num((s.similarity or {}).get("rougeL"), ".3f"), _num(s.nll_human, ".3f"))
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# --- plot ------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    """Text shown literally: matplotlib reads a pair of "$" as math."""
    return text.replace("$", r"\$")


def _cost_axis(runs: Sequence[RunSummary]) -> tuple[str, list[float | None]]:
    """What the x axis shows for these runs: $ per 1k problems when any run has a positive known cost;
    otherwise (every $ is 0 or unknown, e.g. a self-hosted run) tokens per problem, and median seconds
    per problem when there are no tokens either. A $ axis keeps None (unknown price) per run."""
    dollars = [s.cost_per_1k_usd for s in runs]
    if any(d for d in dollars):
        return "$ per 1k problems (decomposition + solving)", dollars
    tokens = [(s.decompose_tokens_in + s.decompose_tokens_out + s.solve_tokens_in + s.solve_tokens_out) / s.n
              for s in runs]
    if any(tokens):
        return "tokens per problem (decomposition + solving; every $ is 0 or unknown)", list(tokens)
    return "median seconds per problem (decomposition + solving)", [
        (s.decompose_latency_p50_s or 0.0) + (s.solve_latency_p50_s or 0.0) for s in runs]


_MARKERS = "osD^vP*Xh<>p"


def accuracy_vs_cost_figure(summaries: Sequence[RunSummary]):
    """One panel per benchmark: accuracy (95% CI bars) against cost, a point per run.

    Cost is $ per 1k problems; when no run of a panel has a positive known $ (self-hosted runs bill
    $0), it is tokens per problem instead, so the points still spread out. Runs are told apart by
    marker and colour in a legend, never by text next to the points (labels would overlap), and
    runs at the same spot are nudged apart sideways. A run whose price is unknown is drawn hollow at
    $0 and its legend entry ends in "($?)". The x axis never shows negative cost.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    from matplotlib.transforms import offset_copy

    benches = _ordered(s.benchmark for s in summaries) or ["no runs"]
    fig = Figure(figsize=(7.5 * len(benches), 4.8), layout="constrained")
    axes = fig.subplots(1, len(benches), squeeze=False)[0]
    for ax, bench in zip(axes, benches, strict=True):
        runs = [s for s in summaries if s.benchmark == bench]
        label, xs = _cost_axis(runs)
        seen: dict[tuple[float, float], int] = {}
        for i, (s, x) in enumerate(zip(runs, xs, strict=True)):
            unknown = x is None
            x = 0.0 if unknown else float(x)
            spot = (round(x, 6), round(s.accuracy, 6))
            k = seen[spot] = seen.get(spot, -1) + 1  # k-th run at this spot: nudge by 7 points per run
            shift = offset_copy(ax.transData, fig=fig, x=7.0 * ((k + 1) // 2) * (1 if k % 2 else -1), units="points")
            color = f"C{i % 10}"
            ax.errorbar([x], [s.accuracy], yerr=[[s.accuracy - s.ci_low], [s.ci_high - s.accuracy]],
                        fmt=_MARKERS[i % len(_MARKERS)], color=color, capsize=3, transform=shift, clip_on=False,
                        mfc="none" if unknown else color,
                        label=_plain(f"{s.decomposer} / {s.solver}" + (" ($?)" if unknown else "")))
        known = [float(x) for x in xs if x is not None]
        top = max(known, default=0.0)
        ax.set_xlim(0.0, top * 1.15 if top > 0 else 1.0)  # cost is never negative
        notes = []
        if label.startswith("$") and any(s.cost_per_1k_usd == 0 for s in runs):
            notes.append("self-hosted = $0")
        if any(x is None for x in xs):
            notes.append("hollow = price unknown, drawn at $0")
        ax.set_title(_plain(bench + (f"\n({'; '.join(notes)})" if notes else "")), fontsize=9)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("accuracy (95% CI)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def plot_accuracy_vs_cost(summaries: Sequence[RunSummary], path: str | Path) -> None:
    """:func:`accuracy_vs_cost_figure` as a PNG."""
    accuracy_vs_cost_figure(summaries).savefig(path, dpi=120)


# --- all three files -------------------------------------------------------------------------


def provenance() -> dict[str, Any]:
    """Which subq wrote a report and when: its version, the git commit of its source (None outside a
    checkout, or without git), and the date (UTC, ISO 8601)."""
    import subprocess
    from datetime import datetime, timezone

    from subq import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"version": __version__, "git_commit": commit, "date": datetime.now(timezone.utc).isoformat()}


def write_report(summaries: Sequence[RunSummary], out_dir: str | Path,
                 config: dict[str, Any] | None = None) -> dict[str, Path | str]:
    """Write results.json, results.md and accuracy_vs_cost.png into ``out_dir``; returns their paths.
    results.json: ``subq`` (:func:`provenance`), ``config`` and ``runs``."""
    import io

    from subq.data_store import uri

    out = uri.resolve(out_dir) if uri.is_uri(out_dir) else str(out_dir)  # a local path, or a URI (one object each)
    paths = {"json": uri.join(out, "results.json"), "markdown": uri.join(out, "results.md"),
             "plot": uri.join(out, "accuracy_vs_cost.png")}
    data = {"subq": provenance(), "config": config or {}, "runs": [asdict(s) for s in summaries]}
    uri.write_text(paths["json"], json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")
    uri.write_text(paths["markdown"], markdown(summaries))
    png = io.BytesIO()
    accuracy_vs_cost_figure(summaries).savefig(png, format="png", dpi=120)
    uri.write_bytes(paths["plot"], png.getvalue())
    return {k: Path(v) if not uri.is_uri(v) else v for k, v in paths.items()}
