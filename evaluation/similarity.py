"""How close a decomposer's sub-questions are to a reference decomposition (GSM8K socratic, StrategyQA).

Two numbers per problem, as in paper 2's analysis of decomposition quality:
- ``count_diff``: len(pred) - len(ref) (positive: the decomposer asks more than the human did);
- ``rougeL``: ROUGE-L F-measure (Porter stemming) between the sub-questions joined by newlines, so word
  order across sub-questions counts but their numbering and prefixes do not.
Averages skip problems without a reference (most benchmarks) and problems without a decomposition
(the chain-of-thought baseline); both are counted. An empty decomposition (a failed decomposer) is
compared as empty: it scores ROUGE-L 0 and a negative count difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from statistics import fmean
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer


@lru_cache(maxsize=1)
def _scorer() -> RougeScorer:
    # rouge-score imports nltk (+ scipy, sklearn): 1.4 s that every evaluation actor paid at start-up
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def decomposition_similarity(pred: Sequence[str], ref: Sequence[str]) -> dict[str, float]:
    """{"count_diff", "abs_count_diff", "rougeL"} of one predicted decomposition against a reference."""
    diff = len(pred) - len(ref)
    rouge = _scorer().score("\n".join(ref), "\n".join(pred))["rougeL"].fmeasure  # score(target, prediction)
    return {"count_diff": float(diff), "abs_count_diff": float(abs(diff)), "rougeL": float(rouge)}


def aggregate_similarity(pairs: Iterable[tuple[Sequence[str] | None, Sequence[str] | None]]) -> dict[str, Any]:
    """Means over (pred, ref) pairs: {"n", "count_diff", "abs_count_diff", "rougeL",
    "skipped_no_reference", "skipped_no_prediction"}; the means are None when nothing was compared."""
    rows, no_ref, no_pred = [], 0, 0
    for pred, ref in pairs:
        if not ref:
            no_ref += 1
        elif pred is None:
            no_pred += 1
        else:
            rows.append(decomposition_similarity(pred, ref))
    means = {k: (fmean(r[k] for r in rows) if rows else None) for k in ("count_diff", "abs_count_diff", "rougeL")}
    return {"n": len(rows), **means, "skipped_no_reference": no_ref, "skipped_no_prediction": no_pred}
