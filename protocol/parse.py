"""Parsers for the teacher's three stages: decomposition, answers, usefulness feedback.

They never raise on model text: each returns a dataclass whose ``error`` is None when the text had
the expected shape and a short human-readable message otherwise (partial results are still filled).

Shared tolerance rules (small models ramble, so these matter):
- prefixes may carry markdown (``**Q1:**``), bullets, leading spaces, and ``:`` ``.`` ``)`` ``-``;
- a model that goes on to invent a new example is cut off: parsing stops at a ``Problem:`` line, or
  when the numbering restarts at 1 after it had moved on (``Q1 Q2 Q1`` keeps ``Q1 Q2``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from subq.protocol.answers import FINAL_MARKER, find_final_answer, read_final_value

_BULLET = r"(?:[-*\u2022]\s+)?"  # "- Q1: ..." / "* Q1: ..." / "• Q1: ..."
# "Q1: ...", "**Q1.** ...", "Question 2) ...", "Sub-question 3 - ...", "Q4 ..." (no punctuation).
# Without punctuation the number must touch the letter ("Q1 How ..."), so prose such as
# "A 5 dollar tip ..." is not read as answer 5.
_LABELLED = (
    r"^\s*{bullet}(?P<lead>[*_#]*)\s*{word}"
    r"(?:\s*(?P<num>[0-9]+)\s*[:.)\-](?P<close>[*_]*)|(?P<bare_num>[0-9]+)(?=\s|$))\s*(?P<rest>.*)$"
)
_Q_LINE = re.compile(_LABELLED.format(bullet=_BULLET, word=r"(?:sub[-\s]?)?q(?:uestion)?"), re.IGNORECASE)
# Fallback for plain numbered lists: "1. ...", "2) ...", "3: ..." (the punctuation and a space are
# required, so "3.5 apples" is not item 3).
_NUMBERED_LINE = re.compile(
    rf"^\s*{_BULLET}(?P<lead>[*_#]*)\s*(?P<num>[0-9]+)[.):](?P<close>[*_]*)(?:\s+|$)(?P<rest>.*)$"
)
_A_LINE = re.compile(_LABELLED.format(bullet=_BULLET, word=r"a(?:nswer)?"), re.IGNORECASE)
# Feedback lines: "Q1: Yes", "**Q2:** no", "3. Yes", "Question 4 - No, because ...".
_VOTE_LINE = re.compile(
    rf"^\s*{_BULLET}[*_#]*\s*(?:(?:sub[-\s]?)?q(?:uestion)?\s*)?(?P<num>[0-9]+)\s*[*_]*\s*"
    r"[:.)\-]?\s*(?P<rest>.*)$",
    re.IGNORECASE,
)
_VOTE_FIRST = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)  # "Yes, because ..."
_VOTE_LAST = re.compile(r"\b(yes|no)\W*$", re.IGNORECASE)  # "How many ...? Yes"
_VOTE_BARE = re.compile(r"^\W*(yes|no)\W*$", re.IGNORECASE)  # a line that is only "Yes." / "**No**"
_NEW_PROBLEM = re.compile(r"^\s*[*_#]*\s*problem\s*[*_]*\s*:", re.IGNORECASE)
# What format_subquestions removes before numbering: an existing "Q3:" / "Q3." / "Q3)" prefix.
_OWN_PREFIX = re.compile(r"^\s*[*_]*\s*q\s*[0-9]+\s*[:.)][*_]*\s*", re.IGNORECASE)


@dataclass
class ParsedSubquestions:
    subquestions: list[str]
    error: str | None


@dataclass
class ParsedAnswers:
    subanswers: list[str]
    final_answer: str | None  # the text after the last "Final answer" marker
    final_value: float | None  # the number in it; None when it has none or hedges (protocol.answers)
    error: str | None


@dataclass
class ParsedFeedback:
    votes: list[bool | None]  # one per sub-question: useful (True), not (False), no vote (None)
    error: str | None


def strip_subquestion_prefix(text: str) -> str:
    """ "Q2: How many?" -> "How many?" (an explicit, punctuated Q-prefix only); also strips whitespace."""
    return _OWN_PREFIX.sub("", text, count=1).strip()


def _content(m: re.Match[str]) -> str:
    """The text after a prefix, without the markdown that closes "**Q1:** ..." or "**Q1: ...**"."""
    rest = m["rest"].strip()
    if m["lead"] and set(m["lead"]) & set("*_"):
        rest = rest.strip("*_").strip()
    return rest


def _num(m: re.Match[str]) -> int:
    groups = m.groupdict()
    return int(groups["num"] or groups.get("bare_num") or 0)


def _restarts(num: int, last_num: int) -> bool:
    """Numbering went back to 1 after it had moved on: the model started another example."""
    return num == 1 and last_num > 1


def parse_subquestions(text: str, max_subquestions: int | None = None) -> ParsedSubquestions:
    """The sub-questions of a decomposition, in order, de-duplicated, at most ``max_subquestions``."""
    lines = text.splitlines()
    found = _numbered_items(lines, _Q_LINE)
    if not found:
        found = _numbered_items(lines, _NUMBERED_LINE)
    # Drop empties and *consecutive* repeats (a model stuck in a loop); a repeat further on can be
    # a real step of the plan (the same question about another week), so it stays.
    subquestions = [q for i, q in enumerate(found) if q and (i == 0 or q != found[i - 1])]
    if not subquestions:
        return ParsedSubquestions([], "no sub-questions found (expected lines like 'Q1: ...')")
    if max_subquestions is not None and max_subquestions >= 0:
        subquestions = subquestions[:max_subquestions]
    return ParsedSubquestions(subquestions, None)


def cap_subquestions(subquestions: list[str], max_subquestions: int | None) -> list[str]:
    """At most ``max_subquestions`` of a plan: the first N - 1 and the last one.

    Where a *student's* output is capped (evaluation, paper 2's "at most 3"), the last sub-question
    is the one that asks what the problem asks (the teacher prompt says so, and the training targets
    end with it), so cutting the tail would drop the one step the solver needs most; the middle
    steps are the ones a solver can best do without. We cap rather than tell the student the limit
    in its prompt: the student was trained on uncapped plans with a fixed prompt, so an instruction
    it never saw in training would be ignored at best. ``None`` or a number < 1 keeps everything.
    """
    if max_subquestions is None or max_subquestions < 1 or len(subquestions) <= max_subquestions:
        return list(subquestions)
    return [*subquestions[: max_subquestions - 1], subquestions[-1]]


def _numbered_items(lines: list[str], pattern: re.Pattern[str]) -> list[str]:
    items: list[str] = []
    last_num = 0
    for line in lines:
        if items and _NEW_PROBLEM.match(line):
            break
        m = pattern.match(line)
        if m is None:
            continue
        num = _num(m)
        if _restarts(num, last_num):
            break
        last_num = num
        items.append(_content(m))
    return items


def parse_answers(text: str, n_subquestions: int) -> ParsedAnswers:
    """The "A<k>: ..." answers in order (multi-line allowed) and the last "Final answer" with its value.

    A-lines after the first final answer are ignored; a later "Final answer" still wins.
    """
    kept: list[str] = []  # the lines before the model started another example
    answers: list[list[str]] = []
    current: list[str] | None = None  # the answer whose continuation lines we are collecting
    last_num, seen_final = 0, False
    for line in text.splitlines():
        if (answers or seen_final) and _NEW_PROBLEM.match(line):
            break
        m = _A_LINE.match(line)
        if m is not None:
            num = _num(m)
            if _restarts(num, last_num) or (num == 1 and seen_final):
                break
            last_num = num
            if seen_final:  # an A-line repeated after a final answer is commentary, not a new answer
                m = None
        if m is not None:
            current = [_content(m)]
            answers.append(current)
            body = current[0]
        else:
            body = line
        kept.append(line)
        final = FINAL_MARKER.search(body)
        if final is not None:
            seen_final = True
            if current is not None:  # "A3: 5, so Final answer: 5" keeps "5, so" as A3
                before = body[: final.start()].rstrip().rstrip("*_#").rstrip()  # "**Final..." markdown
                if m is None:
                    current.append(before)
                else:
                    current[0] = before
            current = None
        elif m is None and current is not None:
            current.append(line)

    # Empty answers stay (as ""), so that answer i still belongs to sub-question i.
    subanswers = ["\n".join(parts).strip() for parts in answers]
    final_answer = find_final_answer("\n".join(kept))
    if final_answer is None:
        return ParsedAnswers(
            subanswers, None, None,
            f"no 'Final answer:' line (found {len(subanswers)} of {n_subquestions} answers)",
        )
    # A hedge ("18 or 20", "20 (maybe 18)") has no value: it must not count as correct for any of them.
    value, error = read_final_value(final_answer)
    return ParsedAnswers(subanswers, final_answer, value, error)


def _vote(rest: str) -> bool | None:
    m = _VOTE_FIRST.match(rest) or _VOTE_LAST.search(rest)
    return None if m is None else m.group(1).lower() == "yes"


def parse_feedback(text: str, n_subquestions: int) -> ParsedFeedback:
    """One usefulness vote per sub-question from "Q<i>: Yes/No" lines (first vote per i wins)."""
    votes: dict[int, bool] = {}
    last_num = 0
    lines = text.splitlines()
    for line in lines:
        if votes and _NEW_PROBLEM.match(line):
            break
        m = _VOTE_LINE.match(line)
        if m is None:
            continue
        vote = _vote(m["rest"])
        if vote is None:
            continue
        num = int(m["num"])
        if _restarts(num, last_num) and 1 in votes:  # "Q3 Q1 Q2" is out of order, not a restart
            break
        last_num = num
        if 1 <= num <= n_subquestions:
            votes.setdefault(num, vote)
    if not votes:  # fallback: bare "Yes" / "No" lines, in order
        bare = [_VOTE_BARE.match(line) for line in lines]
        in_order = [b.group(1).lower() == "yes" for b in bare if b is not None]
        votes = {i: v for i, v in enumerate(in_order[:n_subquestions], 1)}
    result = [votes.get(i) for i in range(1, n_subquestions + 1)]
    if n_subquestions > 0 and not votes:
        return ParsedFeedback(result, "no votes found (expected lines like 'Q1: Yes')")
    missing = [f"Q{i}" for i, v in enumerate(result, 1) if v is None]
    return ParsedFeedback(result, f"no vote for {', '.join(missing)}" if missing else None)


def usefulness(feedbacks: list[ParsedFeedback], n_subquestions: int) -> list[float | None]:
    """Per sub-question: the share of "useful" among the votes cast (None where nobody voted)."""
    shares: list[float | None] = []
    for i in range(n_subquestions):
        cast = [f.votes[i] for f in feedbacks if i < len(f.votes) and f.votes[i] is not None]
        shares.append(sum(cast) / len(cast) if cast else None)
    return shares
