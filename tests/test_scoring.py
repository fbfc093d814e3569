"""evaluation.scoring: strict scoring per answer type, paper 1's exact protocol, Wilson intervals."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from subq.evaluation.scoring import (
    Score,
    paper1_gold,
    paper1_prediction,
    score,
    token_f1,
    wilson_interval,
)


def number(gold: float) -> dict:
    return {"answer_type": "number", "answer_value": float(gold), "gold": str(gold)}


# --- numbers, strict -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gold", "prediction"),
    [
        ("A1: 16 - 3 - 4 = 9 eggs.\nA2: 9 * 2 = 18 dollars.\nFinal answer: 18", 18, "18"),
        ("Final answer: $1,000.50", 1000.5, "1000.5"),
        ("Final answer: 1,000", 1000, "1000"),
        ("Final answer: 1,234,567", 1234567, "1234567"),
        ("Final answer: -5", -5, "-5"),
        ("Final answer: \u22123.25", -3.25, "-3.25"),  # unicode minus
        ("Final answer: -$12", -12, "-12"),
        ("Final answer: 0.50", 0.5, "0.5"),
        ("Final answer: .75", 0.75, "0.75"),
        ("Final answer: 18.0", 18, "18"),
        ("Final answer: 75%", 75, "75"),
        ("Final answer: 12 apples", 12, "12"),
        ("Final answer: 2 * 3 = 6", 6, "6"),
        ("Final answer: 1/2", 0.5, "0.5"),
        ("Final answer: 1 1/2 hours", 1.5, "1.5"),
        ("**Final answer:** 42", 42, "42"),
        ("Final answer:\n\n42", 42, "42"),
        ("The final answer is 42.", 42, "42"),
        ("FINAL ANSWER: 7", 7, "7"),
        ("Final answer: 5\nWait, let me recheck.\nFinal answer: 7", 7, "7"),  # the last marker wins
        ("A1: It costs $1,500.\nFinal answer: 1500 dollars.", 1500, "1500"),
    ],
)
def test_number_strict_correct(text: str, gold: float, prediction: str) -> None:
    s = score(text, number(gold))
    assert s == Score(prediction, True, None, None)


@pytest.mark.parametrize(
    ("text", "gold", "prediction"),
    [
        ("Final answer: 5\nFinal answer: 7", 5, "7"),  # an earlier marker does not count
        ("Final answer: 17", 18, "17"),
        ("Final answer: 5", -5, "5"),
        ("Final answer: 1.5", 15, "1.5"),
    ],
)
def test_number_strict_wrong(text: str, gold: float, prediction: str) -> None:
    s = score(text, number(gold))
    assert s.prediction == prediction and not s.correct and s.error is None


def test_number_without_marker_falls_back_to_the_last_number_and_says_so() -> None:
    s = score("She has 3 + 4 = 7 apples.", number(7))
    assert s.prediction == "7" and not s.correct  # read for the record, never scored (issue 20 item 4)
    assert s.error is not None and "Final answer" in s.error and "last number" in s.error
    s = score("I do not know.", number(7))
    assert s.prediction is None and not s.correct and "no number" in s.error


def test_number_marker_without_a_number_is_wrong_even_if_the_text_has_the_gold() -> None:
    s = score("A1: 7 apples.\nFinal answer: I cannot tell", number(7))
    assert s.prediction is None and not s.correct and "no number in the final answer" in s.error


@pytest.mark.parametrize("text", ["", "   \n", None])
def test_empty_replies(text: str | None) -> None:
    for mode in ("strict", "paper1"):
        s = score(text, number(7), mode)
        assert s == Score(None, False, None, "empty solver text")
    assert score(text, {"answer_type": "text", "gold": "x"}).f1 == 0.0


def test_number_gold_from_the_gold_string_when_answer_value_is_missing() -> None:
    assert score("Final answer: 72", {"answer_type": "number", "gold": "#### 72"}).correct
    assert score("Final answer: 72", {"answer_type": "number", "gold": "72"}).correct
    assert score("Final answer: 72", {"answer_type": "number", "gold": 72}).correct
    assert not score("Final answer: 72", {"answer_type": "number", "gold": None}).correct


# --- paper 1's protocol ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A1: 3 eggs.\nA2: 9 * 2 = 18\n\nFinal answer: 18", 18.0),
        ("Final Answer: 1,000", 1.0),  # the comma ends the number: "1,000" reads 1
        ("final answer: $1,000.50", 1.0),
        ("FINAL ANSWER: 3", 3.0),  # the text is lower-cased first
        ("Final answer:42", 42.0),
        ("Final answer: -2.5", -2.5),
        ("Final answer: -5", 5.0),  # a sign only comes with a decimal point
        ("Final answer: .5", 0.5),
        ("Final answer: 7\nFinal answer: 9", 7.0),  # the FIRST marker
        ("final answer: the 2 items cost 30", 2.0),  # the first number after it
        ("A1: 5\nFinal answer: 3.14 dollars", 3.14),
        ("In 2023 she had 5 apples", 5.0),  # no marker: reading starts at character 12, past "2023"
        ("abcdefghijk7 and 9", 9.0),  # index 11 is skipped, 12 on is read
        ("abcdefghijkl7 and 9", 7.0),
        ("Final answer 18", 18.0),  # no colon: the quirk again ("final answ|er 18")
        ("no numbers in here at all", None),
        ("", None),
        (None, None),
    ],
)
def test_paper1_prediction(text: str | None, expected: float | None) -> None:
    assert paper1_prediction(text) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (72.0, 72.0),
        (72, 72.0),
        ("#### 72", 72.0),
        ("72", 72.0),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),  # after "####", not 48
        ("#### 1,000", 1.0),  # the same comma quirk as the prediction
        ("#### -10", 10.0),
        ("#### 0.5", 0.5),
        ("no number", None),
        (None, None),
        (float("nan"), None),
        (True, None),
    ],
)
def test_paper1_gold(answer: object, expected: float | None) -> None:
    assert paper1_gold(answer) == expected


@pytest.mark.parametrize(
    ("text", "gold", "strict", "paper1"),
    [
        ("Final answer: 1,000", 1000, True, False),
        ("Final answer: $1,000.50", 1000.5, True, False),
        ("Final answer: 5\nFinal answer: 7", 7, True, False),
        ("Final answer: 5\nFinal answer: 7", 5, False, True),
        ("Final answer: -5", -5, True, False),
        ("Final answer: 18", 18, True, True),
        ("Final answer: 18.0", 18, True, True),
        ("In 2023 she had 5 apples", 2023, False, False),  # strict: last number 5; paper 1: 5 too
        ("Final answer: 6 * 3 = 18", 18, True, False),  # paper 1 takes the first number
    ],
)
def test_the_two_modes_differ_where_they_should(text: str, gold: float, strict: bool, paper1: bool) -> None:
    assert score(text, number(gold)).correct is strict
    assert score(text, number(gold), "paper1").correct is paper1


def test_paper1_score_fields() -> None:
    s = score("Final answer: 1,000", number(1000), "paper1")
    assert s == Score("1", False, None, None)
    s = score("In 2023 she had 5 apples", number(5), "paper1")  # read from character 12: upstream's protocol
    assert s == Score("5", True, None, None)
    s = score("Final answer: none", number(5), "paper1")
    assert s.prediction is None and not s.correct and "no number" in s.error
    # a "#### n" gold string when the problem carries no answer_value
    assert score("Final answer: 72", {"answer_type": "number", "gold": "#### 72"}, "paper1").correct


def test_paper1_mode_scores_other_answer_types_strictly() -> None:
    problem = {"answer_type": "yesno", "gold": "yes"}
    assert score("Final answer: Yes", problem, "paper1") == score("Final answer: Yes", problem)


def test_bad_mode_or_answer_type_raise() -> None:
    with pytest.raises(ValueError, match="mode"):
        score("Final answer: 1", number(1), "lenient")
    with pytest.raises(ValueError, match="answer_type"):
        score("Final answer: 1", {"answer_type": "essay", "gold": "1"})


# --- choices -----------------------------------------------------------------------------------

AQUA = {"answer_type": "choice", "gold": "C", "choices": ["A)5", "B)6", "C)8", "D)10", "E)None of these"]}


@pytest.mark.parametrize(
    "text",
    [
        "Final answer: C",
        "Final answer: (C)",
        "Final answer: C)",
        "Final answer: c",
        "Final answer: (c)",
        "Final answer: c)",
        "Final answer: C. 8",
        "Final answer: C) 8",
        "Final answer: C 8",
        "Final answer: **C**",
        "Final answer: option c",
        "Final answer: Option (C)",
        "Final answer: The answer is C.",
        "Final answer: 8",  # the option's number
        "Final answer: $8",
        "A1: 20 - 12 = 8, which is C.\nFinal answer: C",
        "Final answer: B\nOn second thought:\nFinal answer: C",  # the last marker wins
        "The final answer is (C).",
    ],
)
def test_choice_correct(text: str) -> None:
    assert score(text, AQUA) == Score("C", True, None, None)


def test_choice_option_text() -> None:
    problem = {**AQUA, "gold": "E"}
    assert score("Final answer: None of these.", problem) == Score("E", True, None, None)
    real = {"answer_type": "choice", "gold": "A",
            "choices": ["A)5(√3 + 1)", "B)6(√3 + √2)", "C)7(√3 – 1)", "D)8(√3 – 2)", "E)None of these"]}
    assert score("Final answer: 5(√3 + 1)", real).prediction == "A"


@pytest.mark.parametrize(
    ("text", "prediction"),
    [
        ("Final answer: B", "B"),
        ("Final answer: a total of 6 dollars", "B"),  # no letter: the number names option B
        ("Final answer: A total", None),  # an article, not option A
        ("Final answer: 7", None),  # matches no option
        ("Final answer: F", None),
    ],
)
def test_choice_wrong_or_unreadable(text: str, prediction: str | None) -> None:
    s = score(text, AQUA)
    assert s.prediction == prediction and not s.correct
    assert (s.error is None) == (prediction is not None)


def test_choice_without_marker() -> None:
    s = score("Let me think. 20 - 12 = 8.\nAnswer: C", AQUA)
    assert s.prediction == "C" and not s.correct and "Final answer" in s.error
    s = score("So the answer is (C).", AQUA)
    assert s.prediction == "C" and not s.correct and s.error
    s = score("It is 8, I think.", AQUA)
    assert s.prediction is None and not s.correct and s.error


def test_choice_with_duplicate_option_numbers_is_not_guessed() -> None:
    problem = {"answer_type": "choice", "gold": "A", "choices": ["A)8 m", "B)8 cm", "C)9"]}
    assert score("Final answer: 8", problem).prediction is None


# --- yes / no ----------------------------------------------------------------------------------

YES = {"answer_type": "yesno", "gold": "yes"}


@pytest.mark.parametrize(
    ("text", "prediction"),
    [
        ("Final answer: yes", "yes"),
        ("Final answer: Yes.", "yes"),
        ("Final answer: **YES**", "yes"),
        ("Final answer: True", "yes"),
        ("Final answer: Yes, because a week has 7 days.", "yes"),
        ("The final answer is yes", "yes"),
        ("Final answer: No", "no"),
        ("Final answer: false", "no"),
        ("Final answer: It is not possible, so no.", "no"),
        ("Final answer: yes\nHmm, no.\nFinal answer: no", "no"),
    ],
)
def test_yesno(text: str, prediction: str) -> None:
    s = score(text, YES)
    assert s == Score(prediction, prediction == "yes", None, None)
    assert score(text, {"answer_type": "yesno", "gold": "no"}).correct is (prediction == "no")


@pytest.mark.parametrize("text", ["Final answer: maybe", "Final answer: it could be yes or no", "Final answer:"])
def test_yesno_unreadable(text: str) -> None:
    s = score(text, YES)
    assert s.prediction is None and not s.correct and s.error


def test_yesno_without_marker_reads_the_last_line() -> None:
    s = score("A week has 7 days.\nYes.", YES)
    assert s.prediction == "yes" and not s.correct and "last line" in s.error
    s = score("Yes, maybe.\nI am not sure", YES)
    assert s.prediction is None and not s.correct


# --- text: SQuAD EM / F1 -----------------------------------------------------------------------

BAMBOOGLE = {"answer_type": "text", "dataset": "bamboogle", "gold": "Mildred Warner",
             "answer_text": "Mildred Warner | Mildred Gale"}


@pytest.mark.parametrize(
    ("text", "correct", "f1"),
    [
        ("Final answer: Mildred Warner", True, 1.0),
        ("Final answer: mildred warner.", True, 1.0),
        ("Final answer: The Mildred Warner", True, 1.0),  # articles are dropped
        ("Final answer: Mildred Gale", True, 1.0),  # the alternative answer
        ("Final answer: Mildred Warner Washington", False, 0.8),  # P 2/3, R 1
        ("Final answer: Mildred", False, 2 / 3),  # P 1, R 1/2
        ("Final answer: Mary Ball", False, 0.0),
        ("Final answer: Augustine\nFinal answer: Mildred Gale", True, 1.0),
    ],
)
def test_text_em_and_f1(text: str, correct: bool, f1: float) -> None:
    s = score(text, BAMBOOGLE)
    assert s.correct is correct and s.f1 == pytest.approx(f1) and s.error is None


def test_text_alternatives_only_for_bamboogle_rows() -> None:
    other = {"answer_type": "text", "gold": "Mildred Warner", "answer_text": "Mildred Warner | Mildred Gale"}
    assert not score("Final answer: Mildred Gale", other).correct


def test_text_without_marker_or_with_an_empty_answer() -> None:
    s = score("Her name was\nAnswer: Mildred Gale", BAMBOOGLE)
    assert s == Score("Mildred Gale", False, 0.0, s.error) and "last line" in s.error
    s = score("Final answer:", BAMBOOGLE)
    assert s == Score(None, False, 0.0, "empty final answer")


def test_text_on_real_bamboogle_rows() -> None:
    from subq.data_store.datasets import accepted_answers, load_problems

    problem = next(p for p in load_problems("bamboogle") if len(accepted_answers(p)) > 1)
    for answer in accepted_answers(problem):
        assert score(f"A1: ...\nFinal answer: {answer.upper()}.", problem).correct


@pytest.mark.parametrize(
    ("pred", "gold", "f1"),
    [("the cat sat", "a cat sat", 1.0), ("cat sat on the mat", "cat sat", 2 / 3),
     ("", "", 1.0), ("", "cat", 0.0), ("dog", "cat", 0.0), ("a an the", "cat", 0.0),
     ("New York, N.Y.", "new york ny", 1.0)],
)
def test_token_f1(pred: str, gold: str, f1: float) -> None:
    assert token_f1(pred, gold) == pytest.approx(f1)


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-10**12, max_value=10**12))
def test_integers_in_any_format_score_strictly(value: int) -> None:
    for rendered in (f"{value}", f"{value:,}", f"${value:,}" if value >= 0 else f"-${-value:,}", f"{value}.00"):
        assert score(f"A1: something 3.\nFinal answer: {rendered}", number(value)).correct, rendered


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**9))
def test_paper1_reads_plain_integers_and_stops_at_commas(value: int) -> None:
    assert paper1_prediction(f"Final answer: {value}") == value
    assert paper1_prediction(f"Final answer: {value:,}") == float(f"{value:,}".split(",")[0])


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(["number", "choice", "yesno", "text"]), st.sampled_from(["strict", "paper1"]))
def test_score_never_raises_on_model_text(text: str, answer_type: str, mode: str) -> None:
    problem = {"answer_type": answer_type, "gold": "C" if answer_type == "choice" else "yes", "answer_value": 3.0,
               "choices": AQUA["choices"], "dataset": "bamboogle", "answer_text": "yes | no"}
    s = score(text, problem, mode)
    assert isinstance(s.correct, bool)
    assert (s.f1 is not None) == (answer_type == "text")
    if s.prediction is None:
        assert not s.correct and s.error
    assert not (s.correct and s.error is not None)  # never correct and a parse failure at once


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_paper1_prediction_never_raises(text: str) -> None:
    value = paper1_prediction(text)
    assert value is None or math.isfinite(value)


# --- Wilson interval -------------------------------------------------------------------------------


def test_wilson_known_values() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no problems: no information


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (6, 5), (0, -1)])
def test_wilson_rejects_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(k, n)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=100_000), st.data())
def test_wilson_contains_the_estimate(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(min_value=0, max_value=n))
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n + 1e-12 and k / n - 1e-12 <= hi <= 1.0


@pytest.mark.parametrize("spec", ["gsm8k:test[:5]", "svamp[:5]", "aqua[:5]", "strategyqa:dev[:5]", "bamboogle[:5]"])
def test_real_rows_accept_their_own_gold(spec: str) -> None:
    from subq.data_store.datasets import load_problems

    for problem in load_problems(spec):
        reply = f"A1: Let me see.\nFinal answer: {problem['gold']}"
        assert score(reply, problem) == Score(score(reply, problem).prediction, True,
                                              1.0 if problem["answer_type"] == "text" else None, None)
        assert score(reply, problem, "paper1").correct
        assert not score("A1: Let me see.\nFinal answer: zzz", problem).correct


def test_paper1_reads_gsm8k_golds_as_upstream_did() -> None:
    """GSM8K's "#### 2,125" was 2.0 for paper 1: a reply of 2125 was wrong there, "2,125" right."""
    problem = {"answer_type": "number", "answer_value": 2125.0, "gold": "2125",
               "answer_text": "She pays 2,000 + 125 = <<2000+125=2125>>2,125.\n#### 2,125"}
    assert score("Final answer: 2125", problem).correct and score("Final answer: 2,125", problem).correct
    assert not score("Final answer: 2125", problem, "paper1").correct
    assert score("Final answer: 2,125", problem, "paper1").correct
    negative = {"answer_type": "number", "answer_value": -10.0, "gold": "-10", "answer_text": "x\n#### -10"}
    assert score("Final answer: -10", negative, "paper1").correct and score("Final answer: 10", negative, "paper1").correct
    assert not score("Final answer: 10", negative).correct
    svamp = {"answer_type": "number", "answer_value": 1200.0, "gold": "1200", "answer_text": "( 1000.0 + 200.0 )"}
    assert score("Final answer: 1200", svamp, "paper1").correct  # not a "####" text: answer_value


# --- hedged or multi-valued final answers: a parse failure, never a score (issue 9 item 10) ------


@pytest.mark.parametrize(
    "text",
    [
        "Final answer: 18 or 20",
        "Final answer: $18 or $20",
        "Final answer: 18 apples or 20 apples",
        "Final answer: 18 (or 20 if she keeps one)",
        "Final answer: between 18 and 20",
        "Final answer: 18-20",
        "Final answer: 18 \u2013 20 dollars",
        "Final answer: 18 to 20",
        "Final answer: 18% to 20%",
        "Final answer: 18, 20",
        "Final answer: x = 18 or 20",
    ],
)
def test_number_hedged_final_answer_is_a_parse_failure(text: str) -> None:
    for gold in (18, 20):
        s = score(text, number(gold))
        assert s.prediction is None and not s.correct
        assert s.error is not None and "hedged" in s.error


@pytest.mark.parametrize(
    ("text", "prediction"),
    [
        ("Final answer: 2 * 3 = 6", "6"),  # an expression, then its value
        ("Final answer: 6 (2 x 3 = 6 apples)", "6"),
        ("Final answer: $1,000.50", "1000.5"),
        ("Final answer: 1 1/2 hours", "1.5"),
        ("Final answer: 18.50, which is 18 dollars and 50 cents", "18.5"),  # one value, then commentary
        ("Final answer: 25 (5 x 5)", "25"),
    ],
)
def test_number_single_values_are_not_hedges(text: str, prediction: str) -> None:
    s = score(text, number(float(prediction)))
    assert s == Score(prediction, True, None, None)


@pytest.mark.parametrize(
    "text",
    ["Final answer: yes/no", "Final answer: Yes or no", "Final answer: true/false", "Final answer: yes or no.",
     "Final answer: No, yes"],
)
def test_yesno_hedged_final_answer_is_a_parse_failure(text: str) -> None:
    for gold in ("yes", "no"):
        s = score(text, {"answer_type": "yesno", "gold": gold})
        assert s.prediction is None and not s.correct and "hedged" in s.error


def test_yesno_with_a_no_later_in_the_sentence_is_not_a_hedge() -> None:
    assert score("Final answer: Yes, no doubt about it.", YES) == Score("yes", True, None, None)


@pytest.mark.parametrize(
    "text",
    ["Final answer: A, B, C", "Final answer: C or D", "Final answer: (C) or (D)", "Final answer: C/D",
     "Final answer: C and E", "Final answer: A, B, C, D, E"],
)
def test_choice_listing_several_options_is_a_parse_failure(text: str) -> None:
    for gold in ("A", "C"):
        s = score(text, {**AQUA, "gold": gold})
        assert s.prediction is None and not s.correct and "hedged" in s.error
