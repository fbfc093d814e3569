"""protocol.solve_prompts: message shapes per answer type, examples the scorer accepts, version pin."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from subq.evaluation.scoring import score
from subq.protocol.solve_prompts import (
    ANSWER_TYPES,
    COT_SYSTEM,
    FINAL_INSTRUCTIONS,
    SOLVE_PROMPT_VERSION,
    SOLVE_SYSTEM,
    cot_messages,
    format_choices,
    solve_messages,
    split_choice,
)

PROBLEM = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
SUBQS = ["How many clips did Natalia sell in May?", "How many clips did she sell altogether?"]
CHOICES = ["A)5", "B)6", "C)8", "D)10", "E)12"]
DATA = Path(__file__).resolve().parents[1] / "data_store" / "data"

# The rendered prompts of SOLVE_PROMPT_VERSION. If this fails you changed a prompt: bump
# SOLVE_PROMPT_VERSION in protocol/solve_prompts.py (records are keyed by it), then record the new hash.
PINNED = {"solve-v1": "5ca166e7b1ced11a1d84fecab8a760bd220eb4c7c8b544044c3e22c5a6f8b929"}


def _all_lists() -> list[tuple[str, str, list[dict[str, str]]]]:
    out = []
    for t in ANSWER_TYPES:
        choices = CHOICES if t == "choice" else None
        out.append(("solve", t, solve_messages(PROBLEM, SUBQS, t, choices)))
        out.append(("cot", t, cot_messages(PROBLEM, t, choices)))
    return out


def test_prompt_text_is_pinned_to_its_version() -> None:
    rendered = json.dumps([_all_lists(), format_choices(CHOICES)], sort_keys=True)
    digest = hashlib.sha256(rendered.encode()).hexdigest()
    assert PINNED.get(SOLVE_PROMPT_VERSION) == digest, (
        f"solver prompts changed under {SOLVE_PROMPT_VERSION!r} (hash {digest}): bump SOLVE_PROMPT_VERSION"
    )


@pytest.mark.parametrize("answer_type", ANSWER_TYPES)
def test_solve_messages_shape(answer_type: str) -> None:
    choices = CHOICES if answer_type == "choice" else None
    messages = solve_messages("  " + PROBLEM + "\n", SUBQS, answer_type, choices)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == SOLVE_SYSTEM + FINAL_INSTRUCTIONS[answer_type]
    last = messages[-1]["content"]
    assert last.startswith(f"Problem: {PROBLEM}\n\n")
    assert last.endswith(f"Q1: {SUBQS[0]}\nQ2: {SUBQS[1]}")
    assert ("Options:\nA) 5\nB) 6\nC) 8\nD) 10\nE) 12" in last) == (answer_type == "choice")
    reply = messages[2]["content"]
    assert reply.startswith("A1: ") and reply.splitlines()[-1].startswith("Final answer: ")


@pytest.mark.parametrize("answer_type", ANSWER_TYPES)
def test_cot_messages_shape(answer_type: str) -> None:
    choices = CHOICES if answer_type == "choice" else None
    messages = cot_messages(PROBLEM, answer_type, choices)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == COT_SYSTEM + FINAL_INSTRUCTIONS[answer_type]
    assert messages[-1]["content"].startswith(f"Problem: {PROBLEM}")
    assert "Q1:" not in messages[-1]["content"] and "A1:" not in messages[2]["content"]
    assert messages[2]["content"].splitlines()[-1].startswith("Final answer: ")


def test_final_instruction_names_what_the_scorer_reads() -> None:
    assert "number" in FINAL_INSTRUCTIONS["number"]
    assert "A to E" in FINAL_INSTRUCTIONS["choice"]
    assert "yes" in FINAL_INSTRUCTIONS["yesno"] and "no" in FINAL_INSTRUCTIONS["yesno"]
    assert "short answer" in FINAL_INSTRUCTIONS["text"]
    assert all('"Final answer: ' in v for v in FINAL_INSTRUCTIONS.values())


def test_unknown_answer_type_is_refused() -> None:
    with pytest.raises(ValueError, match="answer_type"):
        solve_messages(PROBLEM, SUBQS, "essay")
    with pytest.raises(ValueError, match="answer_type"):
        cot_messages(PROBLEM, "essay")


_GOLDS = {"number": {"answer_value": 10.0, "gold": "10"}, "choice": {"gold": "C"}, "yesno": {"gold": "yes"},
          "text": {"gold": "Benjamin Harrison"}}


@pytest.mark.parametrize(("style", "answer_type", "messages"), _all_lists())
def test_few_shot_replies_are_scored_correct_without_error(style: str, answer_type: str, messages: list) -> None:
    """The examples teach exactly the format evaluation.scoring reads."""
    shot_choices = None
    if answer_type == "choice":
        options = messages[1]["content"].split("Options:\n", 1)[1].split("\n\n")[0].splitlines()
        shot_choices = options
    problem = {"answer_type": answer_type, "choices": shot_choices, **_GOLDS[answer_type]}
    s = score(messages[2]["content"], problem)
    assert s.correct and s.error is None, (style, answer_type, s)


def test_stage_detectors_read_both_prompts_as_the_answer_stage() -> None:
    for _, _, messages in _all_lists():
        low = messages[0]["content"].lower()
        assert "answer" in low and not any(w in low for w in ("decompos", "feedback", "useful"))
    teacher_server = pytest.importorskip("tests.teacher_server")
    for _, _, messages in _all_lists():
        assert teacher_server.detect_stage(messages) == "answer"


def test_invented_examples_are_not_benchmark_items() -> None:
    texts = [m["content"] for _, _, ms in _all_lists() for m in ms[1:3]]
    for name in ("aqua/test.json", "strategyqa/dev.json", "strategyqa/train.json", "bamboogle/bamboogle.csv"):
        path = DATA / name
        if not path.exists():
            continue
        data = path.read_text(encoding="utf-8").lower()
        for needle in ("how much change does he get", "fit inside the month of february", "eiffel tower opened"):
            assert needle not in data, (name, needle)
    assert any("Weng" in t for t in texts)  # the number example is the teacher's GSM8K train example


@pytest.mark.parametrize(
    ("choice", "position", "expected"),
    [
        ("A)5", 0, ("A", "5")),
        ("(B) 6", 1, ("B", "6")),
        ("c. 7 apples", 2, ("C", "7 apples")),
        ("D: ten", 3, ("D", "ten")),
        ("E)None of these", 4, ("E", "None of these")),
        ("just text", 1, ("B", "just text")),
        ("  A)  two\n words ", 0, ("A", "two words")),
    ],
)
def test_split_choice(choice: str, position: int, expected: tuple[str, str]) -> None:
    assert split_choice(choice, position) == expected


def test_format_choices() -> None:
    assert format_choices(["A)5", "B)6(√3 + 1)"]) == "Options:\nA) 5\nB) 6(√3 + 1)"
    assert format_choices(["five", "six"]) == "Options:\nA) five\nB) six"
