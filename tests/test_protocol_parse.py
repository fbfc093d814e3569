"""protocol.parse: sub-questions, answers and feedback parsers (tolerant, never raising)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from subq.protocol.parse import (
    ParsedFeedback,
    cap_subquestions,
    parse_answers,
    parse_feedback,
    parse_subquestions,
    strip_subquestion_prefix,
    usefulness,
)
from subq.protocol.prompts import format_subquestions

# --- parse_subquestions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Q1: How many clips in May?\nQ2: How many in total?", ["How many clips in May?", "How many in total?"]),
        ("Q1. a?\nQ2) b?\nQ3 - c?", ["a?", "b?", "c?"]),
        ("**Q1:** a?\n**Q2: b?**", ["a?", "b?"]),  # markdown around the prefix
        ("   Q1: a?\n\n\n   Q2:    b?   ", ["a?", "b?"]),  # spaces and blank lines
        ("- Q1: a?\n* Q2: b?", ["a?", "b?"]),  # bullets
        ("q1: a?\nQuestion 2: b?\nSub-question 3: c?", ["a?", "b?", "c?"]),
        ("Q1 a?\nQ2 b?", ["a?", "b?"]),  # "Q1" without a colon
        ("Sure! Here are the sub-questions:\nQ1: a?\nQ2: b?\nHope this helps.", ["a?", "b?"]),
        ("1. a?\n2) b?\n3: c?", ["a?", "b?", "c?"]),  # plain numbered list as a fallback
        ("Q1: a?\n1. not a sub-question", ["a?"]),  # the fallback is only a fallback
        ("3.5 apples are left\n1. a?", ["a?"]),  # "3.5" is not item 3
        ("Q1: a?\nQ2: \nQ3: c?", ["a?", "c?"]),  # empty ones dropped
        ("Q1: a?\nQ2: a?\nQ3: b?", ["a?", "b?"]),  # consecutive repeats dropped
        ("Q1: a?\nQ2: b?\nQ3: a?", ["a?", "b?", "a?"]),  # a later repeat is a step of the plan
        ("Q1: a?\nQ2: b?\nQ1: c?\nQ2: d?", ["a?", "b?"]),  # numbering restarts: another example
        ("Q1: a?\nQ1: b?", ["a?", "b?"]),  # a model stuck on "Q1" is not restarting
        ("Q1: a?\nQ2: b?\n\nProblem: Tom has 3 cats.\nQ1: c?", ["a?", "b?"]),  # invented next example
        ("Problem: Tom has 3 cats.\nQ1: a?", ["a?"]),  # an echoed problem before the list is fine
        ("Q1: ¿Cuántos gatos? 🐱\nQ2: 猫は何匹？", ["¿Cuántos gatos? 🐱", "猫は何匹？"]),
        ("Q1: a?\r\nQ2: b?\r\n", ["a?", "b?"]),
        ("Q1: a?\nA1: 5\nQ2: b?", ["a?", "b?"]),  # answers mixed in are ignored
    ],
)
def test_parse_subquestions(text: str, expected: list[str]) -> None:
    parsed = parse_subquestions(text)
    assert parsed.subquestions == expected
    assert parsed.error is None


@pytest.mark.parametrize(
    "text", ["", "   \n\n", "I cannot help with that.", "Q1:", "Q1:\nQ2:  ", "#$%^&*(", "The answer is 42."]
)
def test_parse_subquestions_errors_when_nothing_found(text: str) -> None:
    parsed = parse_subquestions(text)
    assert parsed.subquestions == [] and parsed.error


def test_parse_subquestions_keeps_the_first_n_without_error() -> None:
    text = "Q1: a?\nQ2: b?\nQ3: c?\nQ4: d?"
    assert parse_subquestions(text, 3).subquestions == ["a?", "b?", "c?"]
    assert parse_subquestions(text, 3).error is None
    assert parse_subquestions(text, 10).subquestions == ["a?", "b?", "c?", "d?"]
    assert parse_subquestions(text, None).subquestions == ["a?", "b?", "c?", "d?"]


def test_strip_subquestion_prefix() -> None:
    assert strip_subquestion_prefix("  Q3: How many?  ") == "How many?"
    assert strip_subquestion_prefix("**Q3.** How many?") == "How many?"
    assert strip_subquestion_prefix("Quarter 3 sales?") == "Quarter 3 sales?"  # no Q-prefix
    assert strip_subquestion_prefix("Q3 is what?") == "Q3 is what?"  # only a punctuated prefix


# --- parse_answers ------------------------------------------------------------------------------


def test_parse_answers_well_formed() -> None:
    p = parse_answers("A1: 48 / 2 = 24 clips.\nA2: 48 + 24 = 72 clips.\nFinal answer: 72", 2)
    assert p.subanswers == ["48 / 2 = 24 clips.", "48 + 24 = 72 clips."]
    assert p.final_answer == "72" and p.final_value == 72.0 and p.error is None


def test_parse_answers_multiline_and_markdown() -> None:
    text = "**A1:** She sells 24.\nThat is half of 48.\n\n**A2:** 72 in total.\n**Final Answer -** $72."
    p = parse_answers(text, 2)
    assert p.subanswers == ["She sells 24.\nThat is half of 48.", "72 in total."]
    assert p.final_answer == "$72." and p.final_value == 72.0 and p.error is None


def test_parse_answers_prose_starting_with_a_is_not_an_answer_label() -> None:
    p = parse_answers("A1: The bill is 50.\nA 5 dollar tip is added.\nA2: 55\nFinal answer: 55", 2)
    assert p.subanswers == ["The bill is 50.\nA 5 dollar tip is added.", "55"]


def test_parse_answers_final_answer_inside_an_answer_line() -> None:
    p = parse_answers("A1: 24\nA2: 24 + 48 = 72, so the Final answer: 72", 2)
    assert p.subanswers == ["24", "24 + 48 = 72, so the"]
    assert p.final_value == 72.0 and p.error is None


def test_parse_answers_last_final_answer_wins() -> None:
    p = parse_answers("A1: 3\nFinal answer: 3\nOops, I forgot the May clips.\nFinal answer: 72", 1)
    assert p.final_answer == "72" and p.final_value == 72.0 and p.subanswers == ["3"]


def test_parse_answers_ignores_answer_lines_after_a_final_answer() -> None:
    # SmolLM2-135M, verbatim: it repeated A3 after its final answer.
    text = ("A1: 60 / 3 = 15 meters.\nA2: 15 * 3 = 40 meters.\nA3: 40 + 15 = 55 meters.\nFinal answer: 55."
            "\n\nA3: 40 + 15 = 55.\nJames runs 55 meters per week.\nFinal answer: 55.\n\nA1: 60 / 3 = 20 m")
    p = parse_answers(text, 3)
    assert p.subanswers == ["60 / 3 = 15 meters.", "15 * 3 = 40 meters.", "40 + 15 = 55 meters."]
    assert p.final_value == 55.0 and p.error is None
    p = parse_answers("A1: 3\nFinal answer: 3\nA2: no, 4\nFinal answer: 4", 2)
    assert p.subanswers == ["3"] and p.final_value == 4.0


def test_parse_answers_keeps_empty_answers_in_place() -> None:
    p = parse_answers("A1: 24\nA2:\nA3: 72\nFinal answer: 72", 3)
    assert p.subanswers == ["24", "", "72"]
    assert parse_answers("A1:\n24\nFinal answer: 24", 1).subanswers == ["24"]


def test_parse_answers_stops_at_an_invented_next_example() -> None:
    text = "A1: 24\nA2: 72\nFinal answer: 72\n\nProblem: Tom has 3 cats.\nA1: 3\nFinal answer: 3"
    p = parse_answers(text, 2)
    assert p.subanswers == ["24", "72"] and p.final_value == 72.0
    p = parse_answers("A1: 24\nA2: 72\nFinal answer: 72\nA1: 3\nFinal answer: 3", 2)
    assert p.subanswers == ["24", "72"] and p.final_value == 72.0


def test_parse_answers_tolerates_missing_and_extra_answer_lines() -> None:
    p = parse_answers("A1: 24\nFinal answer: 72", 3)
    assert p.subanswers == ["24"] and p.final_value == 72.0 and p.error is None
    p = parse_answers("A1: 1\nA2: 2\nA3: 3\nFinal answer: 3", 1)
    assert p.subanswers == ["1", "2", "3"] and p.error is None
    p = parse_answers("Half of 48 is 24, so 72 in all.\nFinal answer: 72", 2)
    assert p.subanswers == [] and p.final_value == 72.0 and p.error is None


def test_parse_answers_without_final_answer() -> None:
    p = parse_answers("A1: 24\nA2: 72", 3)
    assert p.subanswers == ["24", "72"] and p.final_answer is None and p.final_value is None
    assert p.error and "Final answer" in p.error and "2 of 3" in p.error


@pytest.mark.parametrize("text", ["Final answer: unknown", "A1: x\nFinal answer:", "Final answer: three"])
def test_parse_answers_final_answer_without_number(text: str) -> None:
    p = parse_answers(text, 1)
    assert p.final_answer is not None and p.final_value is None and p.error


def test_parse_answers_hedged_final_answer_has_no_value() -> None:
    """A teacher that answers "18 or 20" must not be labelled correct for either (issue 9 item 10)."""
    p = parse_answers("A1: 9 * 2 = 18\nFinal answer: 18 or 20", 1)
    assert p.final_answer == "18 or 20" and p.final_value is None and "hedged final answer (it says 'or')" in p.error


@pytest.mark.parametrize("text", ["", "garbage ∑∂ 🤖", "A1", "Final", "This is the final answer."])
def test_parse_answers_malformed(text: str) -> None:
    p = parse_answers(text, 2)
    assert p.final_value is None and p.error


# --- parse_feedback and usefulness --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "votes"),
    [
        ("Q1: Yes\nQ2: No\nQ3: Yes", [True, False, True]),
        ("q1: yes.\nQ2: NO\nQ3: Yes, because it gives the total.", [True, False, True]),
        ("**Q1:** no\n**Q2: Yes**\n- Q3 - yes", [False, True, True]),
        ("Q1: How many clips in May? Yes\nQ2: What is 2 + 2? No.", [True, False, None]),
        ("1. Yes\n2) No\n3: yes", [True, False, True]),
        ("Q3: No\nQ1: Yes\nQ2: Yes", [True, True, False]),  # by number, not by order
        ("Q1: Yes\nQ1: No\nQ2: No\nQ3: No", [True, False, False]),  # the first vote per question wins
        ("Q1: Yes\nQ2: No\nQ3: Yes\nQ1: No\nQ2: No\nQ3: No", [True, False, True]),  # restart ignored
        ("Q1: Yes\nQ2: No\nQ3: Yes\nQ4: Yes", [True, False, True]),  # extra votes dropped
        ("Yes\nNo\nYes", [True, False, True]),  # bare lines, in order, when nothing is numbered
        ("Q1: Yes\nQ2: Maybe\nQ3: Yes", [True, None, True]),
    ],
)
def test_parse_feedback(text: str, votes: list[bool | None]) -> None:
    parsed = parse_feedback(text, 3)
    assert parsed.votes == votes
    missing = [f"Q{i}" for i, v in enumerate(votes, 1) if v is None]
    if missing:
        assert parsed.error and all(q in parsed.error for q in missing)
    else:
        assert parsed.error is None


@pytest.mark.parametrize("text", ["", "I think they are all fine.", "Q1\nQ2", "🤖🤖", "Nope"])
def test_parse_feedback_without_votes(text: str) -> None:
    parsed = parse_feedback(text, 2)
    assert parsed.votes == [None, None] and parsed.error


def test_parse_feedback_zero_subquestions() -> None:
    assert parse_feedback("Q1: Yes", 0) == ParsedFeedback([], None)


def test_usefulness() -> None:
    feedbacks = [
        parse_feedback("Q1: Yes\nQ2: No\nQ3: Yes", 4),
        parse_feedback("Q1: Yes\nQ2: Yes", 4),
        parse_feedback("Q1: No\nQ2: No\nQ3: Yes", 4),
        parse_feedback("garbage", 4),
    ]
    shares = usefulness(feedbacks, 4)
    assert shares[:3] == pytest.approx([2 / 3, 1 / 3, 1.0]) and shares[3] is None
    assert usefulness([], 2) == [None, None]
    assert usefulness([ParsedFeedback([True], None)], 2) == [1.0, None]  # a shorter vote list


# --- properties ---------------------------------------------------------------------------------

# Line content a model could write: no control characters or line/paragraph separators (those end a
# line); stripped, not blank, and not itself starting with something a parser reads as a Q-prefix.
_LOOKS_LIKE_PREFIX = re.compile(r"^[\s*_#\-\u2022]*(?:sub[-\s]?)?q(?:uestion)?\s*\d", re.IGNORECASE)
_line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60
).map(str.strip).filter(lambda s: bool(s) and not _LOOKS_LIKE_PREFIX.match(s))


@settings(max_examples=200, deadline=None)
@given(st.lists(_line_text, min_size=1, max_size=8, unique=True))
def test_format_then_parse_subquestions_round_trips(subquestions: list[str]) -> None:
    parsed = parse_subquestions(format_subquestions(subquestions))
    assert parsed.subquestions == subquestions and parsed.error is None


@settings(max_examples=200, deadline=None)
@given(st.text(), st.integers(0, 6))
def test_parsers_never_raise(text: str, n: int) -> None:
    subqs = parse_subquestions(text, n or None)
    assert isinstance(subqs.subquestions, list) and (subqs.error is None) == bool(subqs.subquestions)
    answers = parse_answers(text, n)
    assert (answers.error is None) == (answers.final_value is not None)
    feedback = parse_feedback(text, n)
    assert len(feedback.votes) == n
    assert len(usefulness([feedback, feedback], n)) == n


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from([True, False, None]), min_size=3, max_size=3), max_size=5))
def test_usefulness_is_the_share_of_yes(vote_lists: list[list[bool | None]]) -> None:
    texts = ["\n".join(f"Q{i}: {'Yes' if v else 'No'}" for i, v in enumerate(vs, 1) if v is not None)
             for vs in vote_lists]
    shares = usefulness([parse_feedback(t, 3) for t in texts], 3)
    for i, share in enumerate(shares):
        cast = [vs[i] for vs in vote_lists if vs[i] is not None]
        assert share == (sum(cast) / len(cast) if cast else None)


def test_cap_subquestions_keeps_the_last_one() -> None:
    plan = ["a?", "b?", "c?", "d?"]
    assert cap_subquestions(plan, 3) == ["a?", "b?", "d?"]  # first N - 1, then the one the problem asks
    assert cap_subquestions(plan, 1) == ["d?"]
    assert cap_subquestions(plan, 4) == plan and cap_subquestions(plan, 9) == plan
    assert cap_subquestions(plan, None) == plan and cap_subquestions(plan, 0) == plan
    assert cap_subquestions([], 2) == []
