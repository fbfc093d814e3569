"""Strict answers (issue 20 item 4): one table of real-looking replies, hedged and not, run against
evaluation's scorer and collection's answer parser.

Each row: the reply, its answer type, the golds to try (the first is the one the reply means; a
hedge is tried against every value it offers) and the expected reading: a prediction, or ``FAIL``
for a parse failure. A parse failure is never correct, for any gold, and no record is correct and a
parse failure at once.
"""

from __future__ import annotations

from typing import Any

import pytest
from subq.evaluation.scoring import score
from subq.protocol.answers import numbers_match
from subq.protocol.parse import parse_answers

FAIL = None  # the reply is a parse failure: no prediction that can score

AQUA = {"answer_type": "choice", "choices": ["A)5", "B)6", "C)8", "D)10", "E)None of these"]}
BAMBOOGLE = {"answer_type": "text", "dataset": "bamboogle", "answer_text": "Mildred Warner | Mildred Gale"}

# (reply, answer type, golds, expected prediction or FAIL)
TABLE: list[tuple[str, str, tuple[Any, ...], str | None]] = [
    # --- numbers: hedged (the review's examples first) -------------------------------------------
    ("A1: 3 boxes of 6.\nFinal answer: 20 (maybe 18)", "number", (20, 18), FAIL),
    ("Final answer: 20 / 18", "number", (20, 18), FAIL),
    ("Final answer: 20, possibly 18", "number", (20, 18), FAIL),
    ("A1: 18 or 20 apples.\nThe answer is 18 or 20.", "number", (20, 18), FAIL),  # no marker either
    ("Final answer: 18 or 20", "number", (18, 20), FAIL),
    ("Final answer: 18-20", "number", (18, 20), FAIL),
    ("Final answer: 18 to 20", "number", (18, 20), FAIL),
    ("Final answer: from 18 to 20 cookies", "number", (18, 20), FAIL),
    ("Final answer: between 18 and 20 dollars", "number", (18, 20), FAIL),
    ("Final answer: 18, 20", "number", (18, 20), FAIL),
    ("Final answer: 20 (18)", "number", (20, 18), FAIL),
    ("Final answer: 20 dollars (18 dollars)", "number", (20, 18), FAIL),
    ("Final answer: $20 (or $18 after the discount)", "number", (20, 18), FAIL),
    ("Final answer: 18 apples / 20 apples", "number", (18, 20), FAIL),
    ("Final answer: 18 (or 20 if she keeps one)", "number", (18, 20), FAIL),
    ("Final answer: Either 18 or 20", "number", (18, 20), FAIL),
    ("Final answer: probably 18", "number", (18,), FAIL),
    ("Final answer: perhaps 18, I am not sure", "number", (18,), FAIL),
    ("Final answer: 18 or more", "number", (18,), FAIL),  # a bound, not a value
    ("Final answer: 18\nWait, it could be 20.\nFinal answer: 18 or 20", "number", (18, 20), FAIL),  # last wins
    ("She has 3 + 4 = 7 apples.", "number", (7,), FAIL),  # no marker: read, but never correct
    ("**Final answer:** 18 \u2013 20", "number", (18, 20), FAIL),
    # --- numbers: one value ----------------------------------------------------------------------
    ("Final answer: $1,234.50", "number", (1234.5,), "1234.5"),
    ("Final answer: -3", "number", (-3,), "-3"),
    ("Final answer: \u22123 degrees", "number", (-3,), "-3"),
    ("Final answer: 18 dollars", "number", (18,), "18"),
    ("Final answer: 18.", "number", (18,), "18"),
    ("A1: 6 * 3 = 18\nFinal answer: **18**", "number", (18,), "18"),
    ("Final answer: 18 (3 boxes of 6)", "number", (18,), "18"),  # an explanation, not an alternative
    ("Final answer: 18 (6 per box times 3 boxes)", "number", (18,), "18"),
    ("Final answer: $18 (18 dollars)", "number", (18,), "18"),  # the same value restated
    ("Final answer: 3 * 6 = 18", "number", (18,), "18"),
    ("Final answer: 18 minutes, not 20", "number", (18,), "18"),
    ("Final answer: 18.50, which is 18 dollars and 50 cents", "number", (18.5,), "18.5"),
    ("Final answer: 75%", "number", (75,), "75"),
    ("Final answer: 1 1/2 hours", "number", (1.5,), "1.5"),
    ("Final answer: 3/4", "number", (0.75,), "0.75"),  # a fraction is one value
    ("Final answer: 20/18", "number", (20, 18), "1.1111111111111112"),  # a fraction: wrong, not a hedge
    ("Final answer: 2,700,000", "number", (2_700_000,), "2700000"),
    ("The final answer is 42 marbles.", "number", (42,), "42"),
    # --- multiple choice -------------------------------------------------------------------------
    ("Final answer: C (or D)", "choice", ("C", "D"), FAIL),
    ("Final answer: C/D", "choice", ("C", "D"), FAIL),
    ("Final answer: C, possibly D", "choice", ("C", "D"), FAIL),
    ("Final answer: C or D", "choice", ("C", "D"), FAIL),
    ("Final answer: (C) (D)", "choice", ("C", "D"), FAIL),
    ("Final answer: A, C", "choice", ("A", "C"), FAIL),
    ("Final answer: maybe C", "choice", ("C",), FAIL),
    ("20 - 12 = 8.\nAnswer: C", "choice", ("C",), FAIL),  # no marker
    ("Final answer: (C)", "choice", ("C",), "C"),
    ("Final answer: C) 8", "choice", ("C",), "C"),
    ("Final answer: option C", "choice", ("C",), "C"),
    ("Final answer: 8", "choice", ("C",), "C"),
    # --- yes / no --------------------------------------------------------------------------------
    ("Final answer: Yes (or no)", "yesno", ("yes", "no"), FAIL),
    ("Final answer: yes/no", "yesno", ("yes", "no"), FAIL),
    ("Final answer: Yes, possibly.", "yesno", ("yes",), FAIL),
    ("Final answer: No, but maybe yes", "yesno", ("no", "yes"), FAIL),
    ("Final answer: Probably no.", "yesno", ("no",), FAIL),
    ("A week has 7 days.\nYes.", "yesno", ("yes",), FAIL),  # no marker
    ("Final answer: Yes.", "yesno", ("yes",), "yes"),
    ("Final answer: No, because a week has 7 days.", "yesno", ("no",), "no"),
    ("Final answer: Yes, no doubt about it.", "yesno", ("yes",), "yes"),
    # --- text ------------------------------------------------------------------------------------
    ("Final answer: Mildred Warner or Mildred Gale", "text", ("Mildred Warner",), FAIL),
    ("Final answer: maybe Mildred Gale", "text", ("Mildred Warner",), FAIL),
    ("Final answer: Mildred Warner / Augustine Warner", "text", ("Mildred Warner",), FAIL),
    ("Her name was\nAnswer: Mildred Gale", "text", ("Mildred Warner",), FAIL),  # no marker
    ("Final answer: Mildred Gale.", "text", ("Mildred Warner",), "Mildred Gale"),
    ("Final answer: 320 km/h", "text", ("320 km/h",), "320 km/h"),
]


def _problem(answer_type: str, gold: Any) -> dict[str, Any]:
    if answer_type == "number":
        return {"answer_type": "number", "answer_value": float(gold), "gold": str(gold)}
    if answer_type == "choice":
        return {**AQUA, "gold": gold}
    if answer_type == "text":
        return {**BAMBOOGLE, "gold": gold} if gold == "Mildred Warner" else {"answer_type": "text", "gold": gold}
    return {"answer_type": answer_type, "gold": gold}


def _params(answer_type: str | None = None) -> list[Any]:
    return [pytest.param(*row, id=f"{row[1]}:{row[0][-40:]!r}") for row in TABLE
            if answer_type is None or row[1] == answer_type]


def test_the_table_is_big_and_mixed() -> None:
    assert len(TABLE) >= 40
    assert {t for _, t, _, _ in TABLE} == {"number", "choice", "yesno", "text"}
    assert sum(expected is FAIL for *_, expected in TABLE) >= 20


@pytest.mark.parametrize(("reply", "answer_type", "golds", "expected"), _params())
def test_scorer(reply: str, answer_type: str, golds: tuple[Any, ...], expected: str | None) -> None:
    for i, gold in enumerate(golds):
        s = score(reply, _problem(answer_type, gold))
        assert not (s.correct and s.error is not None), "correct and a parse failure at once"
        if expected is FAIL:
            assert not s.correct and s.error is not None, f"gold {gold!r}: {s}"
            assert s.f1 in (None, 0.0)
        else:
            assert s.prediction == expected and s.error is None, s
            if i == 0:
                assert s.correct is (answer_type != "number" or numbers_match(float(expected), float(gold)))
            else:
                assert not s.correct


@pytest.mark.parametrize(("reply", "answer_type", "golds", "expected"), _params("number"))
def test_collection_parser(reply: str, answer_type: str, golds: tuple[Any, ...], expected: str | None) -> None:
    """Collection labels a sample correct iff parse_answers gives a value equal to the gold."""
    p = parse_answers(reply, 1)
    if expected is FAIL:
        assert p.final_value is None and p.error is not None, p
    else:
        assert p.error is None and p.final_value == pytest.approx(float(expected)), p


def test_scorer_and_collection_agree_on_every_number_row() -> None:
    for reply, answer_type, golds, _ in TABLE:
        if answer_type != "number":
            continue
        p = parse_answers(reply, 1)
        for gold in golds:
            s = score(reply, _problem("number", gold))
            collected = p.final_value is not None and numbers_match(p.final_value, float(gold))
            assert s.correct is collected, (reply, gold)
            assert (s.error is None) is (p.error is None), (reply, s.error, p.error)
