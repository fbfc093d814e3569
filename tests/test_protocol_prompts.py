"""protocol.prompts: message shapes, few-shot examples that obey our own parsers, versioning, and the
student's text format."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from subq.protocol import prompts
from subq.protocol.answers import gsm8k_gold, numbers_match
from subq.protocol.parse import parse_answers, parse_feedback, parse_subquestions
from subq.protocol.prompts import (
    ANSWER_SYSTEM,
    DECOMPOSE_SYSTEM,
    FEEDBACK_SYSTEM,
    PROMPT_VERSION,
    SUBQ_END,
    SUBQ_SEPARATOR,
    answer_messages,
    decompose_messages,
    feedback_messages,
    format_subquestions,
    parse_student_output,
    student_prompt,
    student_target,
)

PROBLEM = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
SUBQS = ["How many clips did Natalia sell in May?", "How many clips did she sell altogether?"]
GSM8K = Path(__file__).resolve().parents[1] / "data_store" / "data" / "gsm8k"

# The rendered prompts of PROMPT_VERSION. If this fails you changed a prompt: bump the version of the
# stage you changed in protocol/prompts.py (samples are keyed by it), then record the new hash here.
PINNED = {
    "subq-prompts:decompose-v1,answer-v1,feedback-v1,student-v1": (
        "0cd80043b259123e691ef6a3a3fcf3605e072a8e50c920c6054fc7d43cf589d3"
    ),
}


def _all_lists() -> list[tuple[str, list[dict[str, str]]]]:
    return [
        ("decompose", decompose_messages(PROBLEM)),
        ("decompose", decompose_messages(PROBLEM, 3)),
        ("answer", answer_messages(PROBLEM, SUBQS)),
        ("feedback", feedback_messages(PROBLEM, SUBQS, ["24", "72"])),
    ]


# --- message shapes -----------------------------------------------------------------------------


def test_system_prompts_are_distinct_and_used_verbatim() -> None:
    systems = {"decompose": DECOMPOSE_SYSTEM, "answer": ANSWER_SYSTEM, "feedback": FEEDBACK_SYSTEM}
    assert len(set(systems.values())) == 3
    for stage, messages in _all_lists():
        assert messages[0] == {"role": "system", "content": systems[stage]}
        # system, then user/assistant few-shot pairs, then the real user message
        roles = [m["role"] for m in messages[1:]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
        assert all(m["content"].strip() for m in messages)


def test_the_test_teacher_recognises_each_stage() -> None:
    teacher_server = pytest.importorskip("tests.teacher_server")
    for stage, messages in _all_lists():
        assert teacher_server.detect_stage(messages) == stage


def test_decompose_messages() -> None:
    messages = decompose_messages("  " + PROBLEM + "\n")
    assert messages[-1] == {"role": "user", "content": f"Problem: {PROBLEM}"}
    assert len(messages) == 1 + 2 * 2 + 1  # two few-shot pairs
    assert "Q1:" in DECOMPOSE_SYSTEM and "not answer" in DECOMPOSE_SYSTEM.lower()


def test_decompose_messages_with_a_limit() -> None:
    messages = decompose_messages(PROBLEM, 2)
    assert messages[-1]["content"] == f"Problem: {PROBLEM}\n\nWrite at most 2 sub-questions."
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert all(u.endswith("at most 2 sub-questions.") for u in users)
    # few-shot examples never break the limit they come with
    for m in messages:
        if m["role"] == "assistant":
            assert len(parse_subquestions(m["content"]).subquestions) <= 2
    assert len(decompose_messages(PROBLEM, 1)) == 2  # no example fits: zero-shot


def test_answer_messages() -> None:
    messages = answer_messages(PROBLEM, SUBQS)
    assert messages[-1]["content"] == f"Problem: {PROBLEM}\n\n" + format_subquestions(SUBQS)
    assert messages[-1]["content"].endswith(f"Q1: {SUBQS[0]}\nQ2: {SUBQS[1]}")
    assert "Final answer:" in ANSWER_SYSTEM and "A1:" in ANSWER_SYSTEM


def test_feedback_messages() -> None:
    content = feedback_messages(PROBLEM, SUBQS, ["24", "72 clips."])[-1]["content"]
    assert content == f"Problem: {PROBLEM}\n\nQ1: {SUBQS[0]}\nA1: 24\nQ2: {SUBQS[1]}\nA2: 72 clips."
    padded = feedback_messages(PROBLEM, SUBQS, ["24"])[-1]["content"]  # a missing answer is shown
    assert padded.endswith(f"Q2: {SUBQS[1]}\nA2: (no answer)")
    extra = feedback_messages(PROBLEM, SUBQS[:1], ["24", "72"])[-1]["content"]  # extra ones dropped
    assert "A2" not in extra
    assert "Q1: Yes" in FEEDBACK_SYSTEM and "Q1: No" in FEEDBACK_SYSTEM


def test_format_subquestions() -> None:
    assert format_subquestions(["  a?  ", "b?"]) == "Q1: a?\nQ2: b?"
    assert format_subquestions(["Q1: a?", "Q7. b?", "**Q3:** c?"]) == "Q1: a?\nQ2: b?\nQ3: c?"
    assert format_subquestions(["two\nlines?"]) == "Q1: two lines?"
    assert format_subquestions([]) == ""


# --- few-shot examples obey the protocol they teach --------------------------------------------


def _pairs(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    shots = messages[1:-1]
    return [(shots[i]["content"], shots[i + 1]["content"]) for i in range(0, len(shots), 2)]


def _problem_of(user: str) -> str:
    return user.split("\n\n")[0].removeprefix("Problem: ")


def test_few_shot_examples_parse_and_are_correct() -> None:
    decompose_pairs = _pairs(decompose_messages(PROBLEM))
    answer_pairs = _pairs(answer_messages(PROBLEM, SUBQS))
    assert [_problem_of(u) for u, _ in decompose_pairs] == [_problem_of(u) for u, _ in answer_pairs]
    golds = {"Weng": 10.0, "Betty": 5.0}
    for (_, decomposition), (user, reply) in zip(decompose_pairs, answer_pairs, strict=True):
        subqs = parse_subquestions(decomposition)
        assert subqs.error is None and user.endswith(format_subquestions(subqs.subquestions))
        answers = parse_answers(reply, len(subqs.subquestions))
        assert answers.error is None and len(answers.subanswers) == len(subqs.subquestions)
        assert answers.final_value == golds[_problem_of(user).split()[0]]
    ((user, reply),) = _pairs(feedback_messages(PROBLEM, SUBQS, ["24", "72"]))
    n = len(re.findall(r"^Q\d+:", user, re.MULTILINE))
    assert parse_feedback(reply, n).votes == [True, False, True]


def test_few_shot_problems_come_from_gsm8k_train_not_test() -> None:
    if not (GSM8K / "train.jsonl").exists() or not (GSM8K / "test.jsonl").exists():
        pytest.skip("GSM8K files not in data_store/data")
    train_rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()]
    train = {r["question"]: r["answer"] for r in train_rows}
    test = {json.loads(line)["question"] for line in (GSM8K / "test.jsonl").read_text().splitlines()}
    for user, reply in _pairs(answer_messages(PROBLEM, SUBQS)):
        problem = _problem_of(user)
        assert problem in train and problem not in test
        assert numbers_match(parse_answers(reply, 0).final_value, gsm8k_gold(train[problem]))


# --- versioning ---------------------------------------------------------------------------------


def test_prompt_version_is_built_from_the_stage_versions() -> None:
    for part in (prompts.DECOMPOSE_VERSION, prompts.ANSWER_VERSION, prompts.FEEDBACK_VERSION,
                 prompts.STUDENT_VERSION):
        assert part and part in PROMPT_VERSION


def _rendered() -> str:
    student = [student_prompt(PROBLEM), student_target(SUBQS), SUBQ_SEPARATOR, SUBQ_END]
    return json.dumps([_all_lists(), decompose_messages(PROBLEM, 1), student], sort_keys=True)


def test_prompt_text_is_pinned_to_its_version() -> None:
    digest = hashlib.sha256(_rendered().encode()).hexdigest()
    assert PINNED.get(PROMPT_VERSION) == digest, (
        f"prompts changed under {PROMPT_VERSION!r} (hash {digest}): bump the stage's version"
    )


# --- student format -----------------------------------------------------------------------------


def test_student_prompt_and_target() -> None:
    prompt = student_prompt(f"  {PROBLEM}\n")
    assert prompt == f"Problem: {PROBLEM}\nSub-questions:\n"
    assert student_prompt("Line one.\nLine  two.").count("\n") == 2  # the problem is kept on one line
    target = student_target(SUBQS)
    assert target == SUBQS[0] + SUBQ_SEPARATOR + SUBQS[1] + SUBQ_SEPARATOR + SUBQ_END
    assert student_target(["two\nlines?"]).startswith("two lines?")
    assert student_target([]) == SUBQ_END


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a?\nb?\n<end>", ["a?", "b?"]),
        ("a?\nb?\n<end>\nc?\n<end>", ["a?", "b?"]),  # junk after the marker
        ("a?\nb?", ["a?", "b?"]),  # no marker (ran out of tokens)
        ("a?\nb?\n\nProblem: Tom has 3 cats.\nSub-questions:\nc?", ["a?", "b?"]),  # an invented example
        ("  a?  \n\n\nb?\n<end>", ["a?", "b?"]),
        ("Q1: a?\nQ2: b?\n<end>", ["a?", "b?"]),  # stray prefixes
        ("a?\na?\na?\nb?", ["a?", "b?"]),  # a model stuck in a loop
        ("a?\r\nb?<end>", ["a?", "b?"]),
        ("<end>", []),
        ("", []),
        ("\n\n", []),
    ],
)
def test_parse_student_output(text: str, expected: list[str]) -> None:
    assert parse_student_output(text) == expected


_clean = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60
).map(lambda s: " ".join(s.split())).filter(
    lambda s: bool(s) and SUBQ_END not in s and not s.startswith("Problem:")
    and not re.match(r"^[*_\s]*q\s*\d+\s*[:.)]", s, re.IGNORECASE)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_clean, min_size=1, max_size=8, unique=True))
def test_student_target_round_trips(subquestions: list[str]) -> None:
    assert parse_student_output(student_target(subquestions)) == subquestions
    # what the student sees plus what it should write is one well-formed text
    assert (student_prompt(PROBLEM) + student_target(subquestions)).endswith(SUBQ_END)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_student_output_never_raises(text: str) -> None:
    out = parse_student_output(text)
    assert all(q and q == q.strip() and "\n" not in q for q in out) and len(out) == len(set(out))
