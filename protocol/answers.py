"""Numeric answer extraction: pull the number out of a model's (or a dataset's) answer text.

Rules, in one place so that collection, scoring and evaluation agree:

- a number is an optional sign (``-``, ``+``, unicode minus ``−``), an optional currency symbol
  (before or after the sign), then a mixed number ``1 1/2``, a fraction ``3/4``, or a decimal with
  optional thousands separators (``1,234.50``, ``3.``, ``.5``);
- a number glued to a word is not a number (``A1``, ``x2``), so ``"A1: 5"`` reads as 5;
- a ``%`` or a unit after the number is ignored: ``"75%"`` is 75.0, not 0.75;
- in answer text the *last* "Final answer" marker wins; inside it, a trailing ``= <number>`` wins
  (``"2 * 3 = 6"`` is 6); without any marker the last number in the text is taken;
- a final answer that hedges is a parse failure (``hedge_reason`` says why, ``read_final_value``
  returns no value): collection's parser and evaluation's scorer treat it as unreadable, never as
  its first number, so it is never correct for any of the values it offers. It hedges when
  * it says "or", "maybe", "possibly", "perhaps", "probably", "either", "alternatively", "could be",
    "not sure" or "unsure" anywhere ("20 (maybe 18)", "20, possibly 18", "18 or more", "probably 18");
  * its first two numbers are joined as alternatives, a range or a list, with at most one unit word
    between: "18-20", "18 to 20", "between 18 and 20", "18, 20", "20 / 18", "18 apples / 20 apples";
  * a parenthesised group holds a lone second value (one number, at most one word, no operator:
    "(18)", "($18)", "(18 dollars)", "(~18)") that differs from the answer: "20 (18)". The same
    value restated is fine ("$18 (18 dollars)"), and so is a parenthesised explanation with more in
    it: "18 (3 boxes of 6)" and "18 (6 per box)" are 18 (but "18 (6 each)" reads as a second value);
- a fraction written without spaces is one value: "3/4" is 0.75 (and "20/18" is 1.11..., a wrong
  answer, not a hedge); with spaces around the slash, "20 / 18" offers two values. GSM8K golds are
  integers, so a fraction scores there only when it equals the integer ("36/2" is 18);
- still one value: "$1,234.50", "-3", "18.", "18 dollars", "75%", "3 * 6 = 18", "18 minutes, not 20",
  "18.50, which is 18 dollars and 50 cents". Approximations ("about 18") are not hedges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

_NUMBER = re.compile(
    r"""
    (?<![\w.,])                                    # not glued to a word, a decimal point or a comma
    (?P<cur1>[$€£¥])?
    (?P<sign>[-+\u2212])?
    (?P<cur2>[$€£¥])?
    (?:
        (?P<whole>[0-9]+)[ \t]+(?P<mnum>[0-9]+)/(?P<mden>[0-9]+)   # mixed number: 1 1/2
      | (?P<fnum>[0-9]+)/(?P<fden>[0-9]+)                         # fraction: 3/4
      | (?P<dec>(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+)
    )
    """,
    re.VERBOSE,
)

# "Final answer" followed by a separator (":", "-", "=", "is") or directly by a number; markdown
# emphasis around it is tolerated. "This is the final answer." is not a marker.
FINAL_MARKER = re.compile(
    r"final\s+answer\b[\s*_]*(?:is\b[\s*_]*)?(?:[:=\-\u2013\u2014][\s*_]*|(?=[-+\u2212$€£¥]?\.?[0-9]))",
    re.IGNORECASE,
)
_GSM8K_GOLD = "####"


def _value(m: re.Match[str]) -> float | None:
    """The value of one regex match, or None when it is not a usable number (x/0, overflow)."""
    negative = m["sign"] in ("-", "\u2212")
    if m["whole"] is not None:
        # float(), not int(): int() refuses strings of more than 4300 digits.
        num, den = float(m["mnum"]), float(m["mden"])
        if den == 0:
            return None
        # An improper "3 10/5" is not a mixed number: read only the whole part.
        value = float(m["whole"]) + num / den if num < den else float(m["whole"])
    elif m["fnum"] is not None:
        den = float(m["fden"])
        if den == 0:
            return None
        value = float(m["fnum"]) / den
    else:
        value = float(m["dec"].replace(",", ""))
    if not math.isfinite(value):
        return None
    return -value if negative else value


def _numbers(text: str) -> Iterator[float]:
    for m in _NUMBER.finditer(text):
        value = _value(m)
        if value is not None:
            yield value


def parse_number(text: str) -> float | None:
    """The first number in a short answer string ("$1,234.50" -> 1234.5, "1 1/2" -> 1.5), else None."""
    return next(_numbers(text), None)


def last_number(text: str) -> float | None:
    """The last number in a text, else None."""
    value = None
    for value in _numbers(text):  # noqa: B007 - we want the last one
        pass
    return value


def find_final_answer(text: str, marker: re.Pattern[str] = FINAL_MARKER, strip: str = "*_") -> str | None:
    """The text of the last ``marker`` (rest of its line, or the next non-empty line, trimmed of
    spaces and the markdown characters in ``strip``), else None.

    Returns "" when the last marker is followed by nothing.
    """
    last = None
    for last in marker.finditer(text):  # noqa: B007 - we want the last one
        pass
    if last is None:
        return None
    for line in text[last.end():].splitlines():
        answer = line.strip().strip(strip).strip()
        if answer:
            return answer
    return ""


def _value_part(answer: str) -> str:
    """Where a final answer's value is read: after its last "=" when a number follows it, else all of it."""
    if "=" in answer:
        tail = answer.rsplit("=", 1)[1]
        if parse_number(tail) is not None:
            return tail
    return answer


def final_answer_value(answer: str) -> float | None:
    """The number of a final-answer string: after its last "=" when there is one, else its first."""
    return parse_number(_value_part(answer))


# Words that make any final answer a hedge (all answer types use them; see the module docstring).
HEDGE_WORDS = re.compile(
    r"\b(?:or|maybe|possibly|perhaps|probably|either|alternatively|could\s+be|not\s+sure|unsure)\b",
    re.IGNORECASE)
# Uncertainty alone (no "or"): for answer types whose option texts may contain "or" (choices, names).
UNSURE_WORDS = re.compile(
    r"\b(?:maybe|possibly|perhaps|probably|either|alternatively|could\s+be|not\s+sure|unsure)\b",
    re.IGNORECASE)
# What joins the first two values of a hedge: a range or list joiner after at most one unit word
# ("5 to 7", "5% - 7%", "18, 20", "5 and 7", "20 / 18", "18 apples / 20 apples").
_HEDGE_GAP = re.compile(
    r"^\s*(?:[^\s\d]+\s*)?(?:and|to|through|thru|-|\u2013|\u2014|~|,|&|/)\s*$", re.IGNORECASE)
# A parenthesised group that is a lone value: one number and at most one word ("(18)", "(18 dollars)").
_PAREN = re.compile(r"[(\[]([^()\[\]]*)[)\]]")
# Besides its number, a lone value has at most one word and no operator ("(10+J)" is an expression).
_ONE_WORD = re.compile(r"^[\s$€£¥%~=\u2248:.,]*(?:[^\W\d]+)?[\s$€£¥%~=\u2248:.,]*$")


def _matches(text: str) -> list[re.Match[str]]:
    return [m for m in _NUMBER.finditer(text) if _value(m) is not None]


def _lone_value(group: str) -> float | None:
    """The value of a parenthesised group that holds one number and at most one word, else None."""
    found = _matches(group)
    if len(found) != 1:
        return None
    rest = group[: found[0].start()] + " " + group[found[0].end():]
    return _value(found[0]) if _ONE_WORD.match(rest) else None


def hedge_reason(answer: str) -> str | None:
    """Why a final-answer string offers more than one value or no committed one, else None.

    See the module docstring for the rules; "18 or 20", "20 (maybe 18)", "20 / 18", "18-20" and
    "20 (18)" hedge; "2 * 3 = 6", "$1,000", "1 1/2", "18 (3 boxes of 6)" and "3/4" do not.
    """
    word = HEDGE_WORDS.search(answer)
    if word is not None:
        return f"it says {word[0].lower()!r}"
    part = _value_part(answer)
    found = _matches(part)
    if len(found) >= 2 and _HEDGE_GAP.search(part[found[0].end():found[1].start()]) is not None:
        return "it gives a range or a list of values"
    if found:
        first = _value(found[0])
        for group in _PAREN.finditer(part[found[0].end():]):
            other = _lone_value(group[1])
            if other is not None and not numbers_match(other, first):
                return "it gives a second value in parentheses"
    return None


def hedged_value(answer: str) -> bool:
    """Whether a final-answer string hedges (``hedge_reason`` is not None)."""
    return hedge_reason(answer) is not None


def hedge_error(reason: str, answer: str) -> str:
    """The error message of a hedged final answer (shared, so collection and evaluation say the same)."""
    return f"hedged final answer ({reason}): {answer[:80]!r}"


def read_final_value(answer: str) -> tuple[float | None, str | None]:
    """The value of a final-answer string and None, or None and why it has no value (a hedge or no
    number): the one reading that collection's parser and evaluation's scorer share."""
    reason = hedge_reason(answer)
    if reason is not None:
        return None, hedge_error(reason, answer)
    value = final_answer_value(answer)
    return value, None if value is not None else f"no number in the final answer {answer[:80]!r}"


def extract_final_value(text: str) -> float | None:
    """The number of the last "Final answer" in a text; with no marker, the last number in the text."""
    answer = find_final_answer(text)
    if answer is None:
        return last_number(text)
    return final_answer_value(answer)


def gsm8k_gold(answer_text: str) -> float | None:
    """The gold value of a GSM8K answer: the number after the (last) "####"."""
    if _GSM8K_GOLD not in answer_text:
        return None
    return parse_number(answer_text.rsplit(_GSM8K_GOLD, 1)[1])


def numbers_match(pred: float | None, gold: float | None, rel_tol: float = 1e-6) -> bool:
    """Whether a predicted value equals the gold value (relative tolerance; exact zero handled)."""
    if pred is None or gold is None or not (math.isfinite(pred) and math.isfinite(gold)):
        return False
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=1e-9)


def format_number(value: float) -> str:
    """A gold value as an answer text: "72" for 72.0, "0.5", "-3.25" (shortest round-trip form)."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value}")
    return str(int(value)) if float(value).is_integer() else repr(float(value))
