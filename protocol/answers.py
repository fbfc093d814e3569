"""Numeric answer extraction: pull the number out of a model's (or a dataset's) answer text.

Rules, in one place so that collection, scoring and evaluation agree:

- a number is an optional sign (``-``, ``+``, unicode minus ``−``), an optional currency symbol
  (before or after the sign), then a mixed number ``1 1/2``, a fraction ``3/4``, or a decimal with
  optional thousands separators (``1,234.50``, ``3.``, ``.5``);
- a number glued to a word is not a number (``A1``, ``x2``), so ``"A1: 5"`` reads as 5;
- a ``%`` or a unit after the number is ignored: ``"75%"`` is 75.0, not 0.75;
- in answer text the *last* "Final answer" marker wins; inside it, a trailing ``= <number>`` wins
  (``"2 * 3 = 6"`` is 6); without any marker the last number in the text is taken;
- a final answer that gives more than one value ("18 or 20", "between 5 and 7", "5-7", "18, 20") is
  *hedged* (``hedged_value``): parsers and scorers treat it as unreadable, never as its first number.
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


# What joins two values in a hedge: "or" anywhere between them ("18 (or 20)", "18 apples or 20 apples"),
# else only a range or list joiner, after at most one unit word ("5 to 7", "5% - 7%", "18, 20", "5 and 7").
_HEDGE_GAP = re.compile(
    r"\bor\b|^\s*(?:[^\s\d]+\s*)?(?:and|to|through|thru|-|\u2013|\u2014|~|,|&)\s*$", re.IGNORECASE)


def hedged_value(answer: str) -> bool:
    """Whether a final-answer string offers more than one value: its first two numbers (where
    ``final_answer_value`` reads) are joined by "or", "and", "to", a dash or a bare comma.

    "18 or 20", "between 5 and 7", "5-7", "18, 20" are hedged; "2 * 3 = 6", "$1,000", "1 1/2",
    "18.50, which is 18 dollars and 50 cents" and "18 or more" are not.
    """
    part = _value_part(answer)
    found = [m for m in _NUMBER.finditer(part) if _value(m) is not None][:2]
    return len(found) == 2 and _HEDGE_GAP.search(part[found[0].end():found[1].start()]) is not None


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
