"""The solver's prompts for evaluation: decompose-then-solve and the single-stage baseline.

- ``solve_messages``: the problem and a decomposer's sub-questions; the solver answers them in order
  ("A1: ..." lines) and ends with "Final answer: ...". It is the teacher's answer stage
  (``protocol.prompts.answer_messages``) generalised to every benchmark answer type.
- ``cot_messages``: the solver alone (no sub-questions), step by step, ending with "Final answer: ...".

The last line asks for what ``evaluation.scoring`` reads, by answer type: a number; one letter A-E
(the options are listed); yes or no; a short text. Each list has one few-shot example of its answer
type so that a 135M model sees the exact format; strong models just follow the instruction. The number
example is the teacher's (a GSM8K *train* problem, one source of truth); the others are invented
here, never benchmark test items.

Every system message contains "answer" and none "decompos"/"feedback"/"useful", so a stage detector
that looks at the first message reads both as the answer stage (tests/teacher_server.py does).

``SOLVE_PROMPT_VERSION`` is stored with every evaluation record; change it with any prompt text
(tests/test_solve_prompts.py pins a hash of the rendered prompts to catch a forgotten bump).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from subq.protocol.prompts import _EXAMPLES, answer_reply, format_subquestions

SOLVE_PROMPT_VERSION = "solve-v1"
ANSWER_TYPES = ("number", "choice", "yesno", "text")

Messages = list[dict[str, str]]

# What the last line must hold, per answer type (shared by both prompt styles).
FINAL_INSTRUCTIONS = {
    "number": 'Then write a last line "Final answer: <number>" with the number only.',
    "choice": 'Then write a last line "Final answer: <letter>" with one letter from A to E.',
    "yesno": 'Then write a last line "Final answer: yes" or "Final answer: no".',
    "text": 'Then write a last line "Final answer: <answer>" with a short answer of a few words.',
}
SOLVE_SYSTEM = 'Answer each sub-question of the problem in order, one line each: "A1: ...", "A2: ...". '
COT_SYSTEM = "Solve the problem step by step and answer it. "

# "A)5", "(B) 6", "c. 7" -> letter and option text.
_OPTION = re.compile(r"^\s*\(?\s*([A-Ea-e])\s*[).:]\s*(.*)$", re.DOTALL)


@dataclass(frozen=True)
class _Example:
    problem: str
    choices: tuple[str, ...] | None
    subquestions: tuple[str, ...]
    subanswers: tuple[str, ...]
    reasoning: str  # the chain-of-thought reply, without its "Final answer" line
    final: str


_weng = _EXAMPLES[0]
_SHOTS: dict[str, _Example] = {
    "number": _Example(
        problem=_weng.problem,
        choices=None,
        subquestions=_weng.subquestions,
        subanswers=_weng.subanswers,
        reasoning=" ".join(_weng.subanswers),
        final=_weng.final,
    ),
    "choice": _Example(
        problem="A pen costs $3. Tom buys 4 pens and pays with a $20 bill. How much change does he get?",
        choices=("A)5", "B)6", "C)8", "D)10", "E)12"),
        subquestions=("How much do 4 pens cost?", "How much change does Tom get from $20?"),
        subanswers=("4 pens cost 4 * 3 = 12 dollars.", "He gets 20 - 12 = 8 dollars, which is option C."),
        reasoning="4 pens cost 4 * 3 = 12 dollars, so Tom gets 20 - 12 = 8 dollars back. That is option C.",
        final="C",
    ),
    "yesno": _Example(
        problem="Could a trip of one week fit inside the month of February?",
        choices=None,
        subquestions=("How many days does a week have?", "How many days does February have?",
                      "Is one week at most as long as February?"),
        subanswers=("A week has 7 days.", "February has 28 or 29 days.", "Yes, 7 days is less than 28 days."),
        reasoning="A week has 7 days and February has at least 28 days, so a week fits inside February.",
        final="yes",
    ),
    "text": _Example(
        problem="Who was the president of the United States when the Eiffel Tower opened?",
        choices=None,
        subquestions=("In which year did the Eiffel Tower open?",
                      "Who was the president of the United States in that year?"),
        subanswers=("The Eiffel Tower opened in 1889.",
                    "Benjamin Harrison was president from March 1889."),
        reasoning="The Eiffel Tower opened in 1889, and Benjamin Harrison was president from March 1889.",
        final="Benjamin Harrison",
    ),
}


def split_choice(choice: str, position: int) -> tuple[str, str]:
    """("A)5", 0) -> ("A", "5"); an option without a letter gets the letter of its position."""
    m = _OPTION.match(choice)
    if m:
        return m[1].upper(), " ".join(m[2].split())
    return "ABCDE"[position] if position < 5 else str(position + 1), " ".join(choice.split())


def format_choices(choices: list[str] | tuple[str, ...]) -> str:
    """ "Options:\\nA) 5\\nB) 6" (one option per line, normalised to "<letter>) <text>")."""
    return "Options:\n" + "\n".join("{}) {}".format(*split_choice(c, i)) for i, c in enumerate(choices))


def _check(answer_type: str) -> None:
    if answer_type not in FINAL_INSTRUCTIONS:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")


def _problem_block(problem: str, choices: list[str] | tuple[str, ...] | None) -> str:
    text = f"Problem: {problem.strip()}"
    return text + "\n\n" + format_choices(choices) if choices else text


def _solve_user(problem: str, subquestions: list[str], choices: list[str] | tuple[str, ...] | None) -> str:
    return _problem_block(problem, choices) + "\n\n" + format_subquestions(subquestions)


def solve_messages(problem: str, subquestions: list[str], answer_type: str,
                   choices: list[str] | None = None) -> Messages:
    """Chat messages asking the solver to answer the sub-questions in order, then the problem."""
    _check(answer_type)
    ex = _SHOTS[answer_type]
    reply = answer_reply(ex.subanswers, ex.final)
    return [
        {"role": "system", "content": SOLVE_SYSTEM + FINAL_INSTRUCTIONS[answer_type]},
        {"role": "user", "content": _solve_user(ex.problem, list(ex.subquestions), ex.choices)},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": _solve_user(problem, subquestions, choices)},
    ]


def cot_messages(problem: str, answer_type: str, choices: list[str] | None = None) -> Messages:
    """Chat messages asking the solver alone to reason step by step (the single-stage baseline)."""
    _check(answer_type)
    ex = _SHOTS[answer_type]
    return [
        {"role": "system", "content": COT_SYSTEM + FINAL_INSTRUCTIONS[answer_type]},
        {"role": "user", "content": _problem_block(ex.problem, ex.choices)},
        {"role": "assistant", "content": f"{ex.reasoning}\nFinal answer: {ex.final}"},
        {"role": "user", "content": _problem_block(problem, choices)},
    ]


# --- the distilled solver (paper 2's SE-T / SE-A): what `subq train --algo solver-bc` teaches ------------

SOLVER_TARGETS = ("teacher", "gold")  # whose final answer ends the target (see solver_reply)
SOLVER_ANSWER_TYPE = "number"  # the teacher's answer stage asks for a number: every stored sample is one


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def solver_reply(subanswers: list[str], final: str) -> str:
    """What a distilled solver learns to write after ``solve_messages(problem, subquestions, "number")``:
    ``answer_reply`` with each answer and the final answer on one line (the prompt asks for one line
    each; line breaks inside a stored answer become spaces). The two targets of paper 2:

    - ``"teacher"`` (SE-T): the teacher's stored sub-answers, then "Final answer: <the teacher's final
      answer text>";
    - ``"gold"`` (SE-A): the same teacher sub-answers, then "Final answer: <gold>", the gold value written
      by ``protocol.answers.format_number`` ("72", "0.5"); the sub-answers may then disagree with it
      when the teacher was wrong, as in paper 2.
    """
    return answer_reply([_one_line(a) for a in subanswers], _one_line(final))
