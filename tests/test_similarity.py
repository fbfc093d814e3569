"""evaluation.similarity: sub-question count difference and ROUGE-L against a reference decomposition."""

from __future__ import annotations

import pytest
from subq.evaluation.similarity import aggregate_similarity, decomposition_similarity

REF = ["How many clips did Natalia sell in May?", "How many clips did Natalia sell altogether in April and May?"]


def test_identical_decompositions() -> None:
    assert decomposition_similarity(REF, REF) == {"count_diff": 0.0, "abs_count_diff": 0.0, "rougeL": 1.0}


def test_count_difference_has_a_sign() -> None:
    more = decomposition_similarity([*REF, "Anything else?"], REF)
    fewer = decomposition_similarity(REF[:1], REF)
    assert (more["count_diff"], more["abs_count_diff"]) == (1.0, 1.0)
    assert (fewer["count_diff"], fewer["abs_count_diff"]) == (-1.0, 1.0)


def test_rouge_uses_stemming_and_ignores_case_and_punctuation() -> None:
    assert decomposition_similarity(["She buys apples?"], ["she buy apple"])["rougeL"] == pytest.approx(1.0)


def test_rouge_rewards_order_and_overlap() -> None:
    close = decomposition_similarity(["How many clips did she sell in May?", "How many clips in total?"], REF)
    reversed_order = decomposition_similarity(REF[::-1], REF)
    unrelated = decomposition_similarity(["How old is the sky?"], REF)
    assert 0.0 < unrelated["rougeL"] < close["rougeL"] < 1.0
    assert reversed_order["rougeL"] < 1.0
    assert decomposition_similarity(["zebra quokka"], REF)["rougeL"] == 0.0


def test_empty_prediction() -> None:
    assert decomposition_similarity([], REF) == {"count_diff": -2.0, "abs_count_diff": 2.0, "rougeL": 0.0}


def test_aggregate_means_and_skips() -> None:
    pairs = [
        (REF, REF),  # rouge 1, diff 0
        ([], REF),  # a failed decomposer: rouge 0, diff -2
        (None, REF),  # the CoT baseline: no decomposition
        (REF, None),  # no reference
        (REF, []),  # an empty reference counts as none
    ]
    agg = aggregate_similarity(pairs)
    assert agg == {"n": 2, "count_diff": -1.0, "abs_count_diff": 1.0, "rougeL": 0.5,
                   "skipped_no_reference": 2, "skipped_no_prediction": 1}


def test_aggregate_with_nothing_to_compare() -> None:
    agg = aggregate_similarity([(REF, None), (None, None)])
    assert agg == {"n": 0, "count_diff": None, "abs_count_diff": None, "rougeL": None,
                   "skipped_no_reference": 2, "skipped_no_prediction": 0}
    assert aggregate_similarity([])["n"] == 0


def test_gsm8k_socratic_references_against_themselves() -> None:
    from subq.data_store.datasets import load_problems

    refs = [p["reference_subquestions"] for p in load_problems("gsm8k:test[:3]")]
    assert all(refs)
    agg = aggregate_similarity((r, r) for r in refs)
    assert agg["n"] == 3 and agg["rougeL"] == pytest.approx(1.0) and agg["count_diff"] == 0.0
