"""protocol.answers: numbers in answer strings, final answers, GSM8K gold values, matching."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from subq.protocol.answers import (
    extract_final_value,
    final_answer_value,
    find_final_answer,
    gsm8k_gold,
    hedge_reason,
    last_number,
    numbers_match,
    parse_number,
    read_final_value,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("72", 72.0),
        ("1,234", 1234.0),
        ("$1,234.50", 1234.5),
        ("-3", -3.0),
        ("\u22123", -3.0),  # unicode minus
        ("+3", 3.0),
        ("3.", 3.0),
        (".5", 0.5),
        ("0.25", 0.25),
        ("75%", 75.0),  # a percent stays a percent, not 0.75
        ("12 apples", 12.0),
        ("3/4", 0.75),
        ("1 1/2", 1.5),
        ("-2/3", -2 / 3),
        ("-1 1/2", -1.5),
        ("-$5", -5.0),
        ("$-5", -5.0),
        ("€20", 20.0),
        ("She has 18 apples and 3 pears.", 18.0),  # the first number
        ("A1: 5 dollars", 5.0),  # "A1" is a label, not a number
        ("x2 is 7", 7.0),
        ("(-4)", -4.0),
        ("1,2345", 1.0),  # not a thousands separator
        ("1,000,000", 1_000_000.0),
        ("3 10/5", 3.0),  # an improper "mixed number" is only its whole part
        ("1/0 or 2", 2.0),  # division by zero is skipped
        ("007", 7.0),
        ("\uff13", None),  # full-width digits are not read
        ("three", None),
        ("", None),
        ("-", None),
        ("$", None),
        ("9" * 400, None),  # overflows a float: not a usable number
        ("9" * 5000 + "/3", None),  # longer than int()'s digit limit: must not raise
    ],
)
def test_parse_number(text: str, value: float | None) -> None:
    got = parse_number(text)
    if value is None:
        assert got is None
    else:
        assert got == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10 - 4 = 6", 6.0),  # a binary minus is not a sign
        ("5-3", 3.0),
        ("we get 3, then 4 apples", 4.0),
        ("no numbers here", None),
        ("version 1.2.3", 1.2),
    ],
)
def test_last_number(text: str, value: float | None) -> None:
    assert last_number(text) == (None if value is None else pytest.approx(value))


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("A1: 24\nFinal answer: 72", "72"),
        ("final answer: 72", "72"),
        ("**Final answer:** 72", "72"),
        ("**Final Answer -** $72", "$72"),
        ("The final answer is 42.", "42."),
        ("The final answer is: 42", "42"),
        ("Final Answer = 9", "9"),
        ("Final answer:\n\n  **8**", "8"),  # marker on its own line: the next non-empty line
        ("Final answer: 5\nWait, that is wrong.\nFinal answer: 7", "7"),  # the last one wins
        ("Final answer:", ""),
        ("This is the final answer.", None),  # prose, not a marker
        ("The final answer is the sum.", None),
        ("Answer: 5", None),
        ("", None),
    ],
)
def test_find_final_answer(text: str, answer: str | None) -> None:
    assert find_final_answer(text) == answer


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("A1: 24\nA2: 72\nFinal answer: 72", 72.0),
        ("Final answer: 2 * 3 = 6", 6.0),  # a trailing "= x" wins inside the final answer
        ("Final answer: 6 (2 x 3 = 6 apples)", 6.0),
        ("Final answer: $1,234.50 in total", 1234.5),
        ("Final answer: -3", -3.0),
        ("Final answer: 1 1/2 cups", 1.5),
        ("Final answer: 5\nFinal answer: 7", 7.0),
        ("Final answer: 5\nFinal answer: unknown", None),  # the last marker wins even without a number
        ("So 48 + 24 = 72 clips.", 72.0),  # no marker: the last number
        ("nothing", None),
        ("", None),
    ],
)
def test_extract_final_value(text: str, value: float | None) -> None:
    assert extract_final_value(text) == (None if value is None else pytest.approx(value))


def test_final_answer_value_falls_back_when_nothing_after_equals() -> None:
    assert final_answer_value("72 = seventy-two") == 72.0
    assert final_answer_value("=") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),
        ("...\n#### 1,000", 1000.0),
        ("...\n#### -5", -5.0),
        ("...\n#### 0.5", 0.5),
        ("#### 3 #### 4", 4.0),
        ("no gold marker 12", None),
        ("####", None),
    ],
)
def test_gsm8k_gold(text: str, value: float | None) -> None:
    assert gsm8k_gold(text) == value


def test_numbers_match() -> None:
    assert numbers_match(72.0, 72.0)
    assert numbers_match(72.0000001, 72.0)
    assert not numbers_match(72.01, 72.0)
    assert numbers_match(0.0, 0.0) and numbers_match(-0.0, 0.0)
    assert not numbers_match(1e-3, 0.0)
    assert numbers_match(1 / 3, 0.3333333333)
    assert not numbers_match(None, 1.0) and not numbers_match(1.0, None) and not numbers_match(None, None)
    assert not numbers_match(math.nan, math.nan) and not numbers_match(math.inf, math.inf)
    assert numbers_match(100.0, 100.5, rel_tol=0.01)


# --- properties ---------------------------------------------------------------------------------


@st.composite
def formatted_numbers(draw: st.DrawFn) -> tuple[str, float]:
    """A number written as people write it, and its value."""
    cents = draw(st.integers(min_value=0, max_value=10**12))
    decimals = draw(st.sampled_from([0, 1, 2]))
    value = cents / 10**decimals  # exact enough: compared with approx below
    body = f"{value:,.{decimals}f}" if draw(st.booleans()) else f"{value:.{decimals}f}"
    negative = draw(st.booleans()) and value != 0
    sign = draw(st.sampled_from(["-", "\u2212"])) if negative else draw(st.sampled_from(["", "+"]))
    currency = draw(st.sampled_from(["", "$"]))
    prefix = draw(st.sampled_from([f"{sign}{currency}", f"{currency}{sign}"]))
    suffix = draw(st.sampled_from(["", "%", " apples", " dollars.", "$", " km/h", "!"]))
    lead = draw(st.sampled_from(["", "It is ", "Final: ", "= "]))
    return f"{lead}{prefix}{body}{suffix}", -value if negative else value


@settings(max_examples=200, deadline=None)
@given(formatted_numbers())
def test_parse_number_reads_formatted_numbers(case: tuple[str, float]) -> None:
    text, value = case
    assert parse_number(text) == pytest.approx(value, rel=1e-12, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(1, 10**6))
def test_parse_number_reads_fractions(a: int, b: int) -> None:
    assert parse_number(f"{a}/{b}") == pytest.approx(float(Fraction(a, b)))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**4), st.integers(1, 999), st.integers(2, 1000))
def test_parse_number_reads_mixed_numbers(whole: int, num: int, den: int) -> None:
    num = num % den or 1  # a proper fraction
    assert parse_number(f"{whole} {num}/{den} cups") == pytest.approx(whole + num / den)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_extractors_never_raise(text: str) -> None:
    for fn in (parse_number, last_number, extract_final_value, gsm8k_gold):
        value = fn(text)
        assert value is None or math.isfinite(value)
    assert find_final_answer(text) is None or isinstance(find_final_answer(text), str)
    value, error = read_final_value(text)
    assert (value is None) != (error is None) and (value is None or math.isfinite(value))


# --- strict answers: hedges (issue 20 item 4; the big table is tests/test_hedged_answers.py) -------


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("20 (maybe 18)", "it says 'maybe'"),
        ("18 or more", "it says 'or'"),
        ("I could be wrong, 18", "it says 'could be'"),
        ("20 / 18", "it gives a range or a list of values"),
        ("18 - 20", "it gives a range or a list of values"),
        ("20 (18)", "it gives a second value in parentheses"),
        ("20 ($18)", "it gives a second value in parentheses"),
        ("$20 (~18 dollars)", "it gives a range or a list of values"),  # "(~" reads as a range joiner
        ("20 (18 dollars)", "it gives a second value in parentheses"),
        ("18 (6 each)", "it gives a second value in parentheses"),  # one number, one word: a lone value
        ("18 (3 boxes of 6)", None),  # an explanation: more than a lone value
        ("18 (6 per box)", None),
        ("(10+J) + J = 100-(10+J)-J", None),  # an expression in parentheses is not a lone value
        ("$18 (18 dollars)", None),  # the same value restated
        ("3/4", None),
        ("36/2", None),
        ("18 minutes, not 20", None),
        ("-3", None),
        ("the author", None),  # "or" only as a word
    ],
)
def test_hedge_reason(answer: str, reason: str | None) -> None:
    assert hedge_reason(answer) == reason


def test_read_final_value() -> None:
    assert read_final_value("36/2") == (18.0, None)  # a fraction equal to an integer gold scores
    assert read_final_value("$1,234.50") == (1234.5, None)
    value, error = read_final_value("20 (maybe 18)")
    assert value is None and error == "hedged final answer (it says 'maybe'): '20 (maybe 18)'"
    assert read_final_value("unknown") == (None, "no number in the final answer 'unknown'")
