"""Every prompt subq sends, and the student's input/target text format.

Three teacher stages, each a chat message list that starts with its own system constant (a test
server tells the stages apart by comparing the first message with these constants):

1. decompose: the problem -> "Q1: ..." lines (sub-questions only, no answers);
2. answer: the problem + sub-questions -> "A1: ..." lines, then "Final answer: <number>";
3. feedback: the problem + sub-questions + answers -> "Q1: Yes" / "Q1: No" lines (was it useful?).

The embedded default teacher is a 135M-parameter model, so the instructions are short and every
stage has few-shot examples in exactly the format the parsers expect. The examples are GSM8K *train*
problems (sub-questions adapted from GSM8K socratic), never test problems.

Versions: each stage has its own version string and ``PROMPT_VERSION`` is built from all of them; it is
stored with every sample, so change the version of any prompt you edit (tests/test_protocol_prompts.py
pins a hash of the rendered prompts to catch a forgotten bump).
"""

from __future__ import annotations

from dataclasses import dataclass

from subq.protocol.parse import strip_subquestion_prefix

DECOMPOSE_VERSION = "decompose-v1"
ANSWER_VERSION = "answer-v1"
FEEDBACK_VERSION = "feedback-v1"
STUDENT_VERSION = "student-v1"
PROMPT_VERSION = "subq-prompts:" + ",".join(
    (DECOMPOSE_VERSION, ANSWER_VERSION, FEEDBACK_VERSION, STUDENT_VERSION)
)

Messages = list[dict[str, str]]

DECOMPOSE_SYSTEM = (
    "Split the math problem into the sub-questions needed to solve it. "
    "Do not answer them. Write one sub-question per line: \"Q1: ...\", \"Q2: ...\". "
    "The last sub-question asks for what the problem asks."
)
ANSWER_SYSTEM = (
    "Answer each sub-question of the math problem in order, one line each: \"A1: ...\", \"A2: ...\". "
    "Show the calculation. Then write a last line \"Final answer: <number>\"."
)
FEEDBACK_SYSTEM = (
    "For each sub-question, judge whether it was useful for solving the math problem. "
    "Reply with one line per sub-question: \"Q1: Yes\" or \"Q1: No\"."
)


@dataclass(frozen=True)
class _Example:
    problem: str
    subquestions: tuple[str, ...]
    subanswers: tuple[str, ...]
    final: str


# GSM8K train problems 2 and 3 (0-based: Weng, Betty), sub-questions adapted from the socratic split.
_EXAMPLES = (
    _Example(
        problem=(
            "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
            "How much did she earn?"
        ),
        subquestions=(
            "How much does Weng earn per minute?",
            "How much did Weng earn for 50 minutes of babysitting?",
        ),
        subanswers=(
            "Weng earns 12 / 60 = 0.2 dollars per minute.",
            "She earned 0.2 * 50 = 10 dollars.",
        ),
        final="10",
    ),
    _Example(
        problem=(
            "Betty is saving money for a new wallet which costs $100. Betty has only half of the money "
            "she needs. Her parents decided to give her $15 for that purpose, and her grandparents twice "
            "as much as her parents. How much more money does Betty need to buy the wallet?"
        ),
        subquestions=(
            "How much money does Betty have in the beginning?",
            "How much money do her grandparents give her?",
            "How much more money does Betty need to buy the wallet?",
        ),
        subanswers=(
            "Betty has 100 / 2 = 50 dollars.",
            "Her grandparents give her 15 * 2 = 30 dollars.",
            "Betty needs 100 - 50 - 15 - 30 = 5 dollars more.",
        ),
        final="5",
    ),
)

# The feedback example shows a "No": the Weng example with a sub-question that does not help.
_FEEDBACK_EXAMPLE = (
    _EXAMPLES[0].problem,
    [_EXAMPLES[0].subquestions[0], "How many minutes are in a day?", _EXAMPLES[0].subquestions[1]],
    [_EXAMPLES[0].subanswers[0], "A day has 24 * 60 = 1440 minutes.", _EXAMPLES[0].subanswers[1]],
    "Q1: Yes\nQ2: No\nQ3: Yes",
)


def format_subquestions(subquestions: list[str]) -> str:
    """ "Q1: ...\\nQ2: ..." (stripped, line breaks inside one become spaces; an existing "Q3:" prefix
    is replaced, not doubled)."""
    one_line = (" ".join(q.splitlines()) for q in subquestions)
    return "\n".join(f"Q{i}: {strip_subquestion_prefix(q)}" for i, q in enumerate(one_line, 1))


def _problem(problem: str) -> str:
    return f"Problem: {problem.strip()}"


def _system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def _pair(user: str, assistant: str) -> Messages:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def decompose_messages(problem: str, max_subquestions: int | None = None) -> Messages:
    """Chat messages asking the teacher to decompose ``problem`` into "Q1: ..." lines.

    The system message is always ``DECOMPOSE_SYSTEM`` verbatim, so the limit goes into each user
    message ("Write at most N sub-questions."); examples with more sub-questions than N are left out.
    """
    limit = "" if max_subquestions is None else f"\n\nWrite at most {max_subquestions} sub-questions."
    messages = [_system(DECOMPOSE_SYSTEM)]
    for ex in _EXAMPLES:
        if max_subquestions is None or len(ex.subquestions) <= max_subquestions:
            messages += _pair(_problem(ex.problem) + limit, format_subquestions(list(ex.subquestions)))
    messages.append({"role": "user", "content": _problem(problem) + limit})
    return messages


def _answer_user(problem: str, subquestions: list[str]) -> str:
    return _problem(problem) + "\n\n" + format_subquestions(subquestions)


def answer_reply(subanswers: list[str] | tuple[str, ...], final: str) -> str:
    """The answer format: "A1: ..." lines, then "Final answer: <final>" (what the teacher's answer stage
    and the solver prompts ask for, and what a distilled solver learns to write)."""
    return "\n".join([*(f"A{i}: {a}" for i, a in enumerate(subanswers, 1)), f"Final answer: {final}"])


def answer_messages(problem: str, subquestions: list[str]) -> Messages:
    """Chat messages asking the teacher to answer the sub-questions in order, then the problem."""
    messages = [_system(ANSWER_SYSTEM)]
    for ex in _EXAMPLES:
        messages += _pair(_answer_user(ex.problem, list(ex.subquestions)), answer_reply(ex.subanswers, ex.final))
    messages.append({"role": "user", "content": _answer_user(problem, subquestions)})
    return messages


def _feedback_user(problem: str, subquestions: list[str], subanswers: list[str]) -> str:
    # Missing answers (a parse that found fewer A-lines) are shown as such, extra ones are dropped.
    answers = [*subanswers, *["(no answer)"] * len(subquestions)][: len(subquestions)]
    questions = format_subquestions(subquestions).splitlines()
    lines = [f"{q}\nA{i}: {a.strip()}" for i, (q, a) in enumerate(zip(questions, answers, strict=True), 1)]
    return _problem(problem) + "\n\n" + "\n".join(lines)


def feedback_messages(problem: str, subquestions: list[str], subanswers: list[str]) -> Messages:
    """Chat messages asking the teacher whether each sub-question was useful ("Q1: Yes/No" lines)."""
    ex_problem, ex_subqs, ex_answers, ex_reply = _FEEDBACK_EXAMPLE
    return [
        _system(FEEDBACK_SYSTEM),
        *_pair(_feedback_user(ex_problem, ex_subqs, ex_answers), ex_reply),
        {"role": "user", "content": _feedback_user(problem, subquestions, subanswers)},
    ]


# --- the student's format: plain text (no chat template), prompt + target -------------------------

SUBQ_SEPARATOR = "\n"  # between sub-questions in the target (they never contain a newline)
SUBQ_END = "<end>"  # closes the target: a stop string for decoding, unambiguous in GSM8K text
_STUDENT_PROMPT = "Problem: {problem}\nSub-questions:\n"


def student_prompt(problem: str) -> str:
    """What the student sees; its continuation is ``student_target(...)``."""
    return _STUDENT_PROMPT.format(problem=" ".join(problem.split()))  # one line: newlines are ours


def student_target(subquestions: list[str]) -> str:
    """The sub-questions, one per line, then the end marker: "Q a?\\nQ b?\\n<end>"."""
    clean = [" ".join(q.split()) for q in subquestions]
    return SUBQ_SEPARATOR.join([*clean, SUBQ_END])


def parse_student_output(text: str) -> list[str]:
    """Sub-questions from a student's continuation; never raises.

    Stops at the end marker (or at an invented "Problem:" line when the marker is missing), drops blank
    lines, stray "Q1:" prefixes and exact repeats (small models loop).
    """
    body = text.split(SUBQ_END, 1)[0]
    found: list[str] = []
    for line in body.splitlines():
        if found and line.lstrip().startswith("Problem:"):
            break
        question = strip_subquestion_prefix(line)
        if question:
            found.append(question)
    return list(dict.fromkeys(found))
