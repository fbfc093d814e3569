"""Score a solver's reply against a problem: per answer type, in our strict mode or paper 1's protocol.

**strict** (our default; the solver was asked for a last line "Final answer: ..."):
- number: the *last* "Final answer" wins and is read by ``protocol.answers`` (the same code that
  decides ``correct`` during collection): "$1,000.50" is 1000.5, "75%" is 75, "2 * 3 = 6" is 6,
  fractions, negatives. Compared with ``numbers_match`` (relative tolerance 1e-6).
- choice: a letter A-E after the marker: "B", "(B)", "B)", "b", "B. 6", "option B"; else the option
  whose text (or number) the answer repeats.
- yesno: yes/no (true/false) as the first word after the marker, else every one in that line must agree.
- text: SQuAD normalisation (lower case, no punctuation, no articles, single spaces); correct = exact
  match with any accepted answer (Bamboogle lists alternatives); ``f1`` = best token F1 over them.

**Strict answers, no hedge scores.** A final answer that hedges gets no prediction and ``error``
"hedged final answer (...)": a parse failure, counted as one, never correct for any value it offers.
- number: the rules of ``protocol.answers`` (module docstring), shared with collection's parser:
  "or", "maybe", "possibly", "perhaps", "probably", "either", ... anywhere ("20 (maybe 18)",
  "20, possibly 18", "18 or more"), a range or list ("18-20", "18 to 20", "18, 20", "20 / 18"), a
  lone second value in parentheses ("20 (18)"). A parenthesised explanation is allowed:
  "18 (3 boxes of 6)" is 18. "3/4" is one value (0.75).
- choice: two different letters side by side or joined ("C or D", "C (or D)", "C/D", "A, C",
  "(C) (D)", "C, possibly D"), or an uncertainty word ("maybe C"; "or" alone is not one here, as
  option texts may hold it).
- yesno: yes and no side by side or joined ("Yes (or no)", "yes/no", "No, but maybe yes"), or any
  hedge word ("Yes, possibly", "Probably no").
- text: "or", an uncertainty word or a spaced " / " ("X or Y", "maybe X", "X / Y"), unless the
  whole answer is itself an accepted answer.

A reply without the marker gets a ``prediction`` from a fallback, for the record (number: the last
number in the text, as ``protocol.answers.extract_final_value`` does; choice: "Answer: B"; yesno and
text: the last non-empty line), but it is **never correct** (f1 0.0) and ``error`` says the format
was not followed. So ``error`` is None only when the answer came from a marker, and a record is
never correct and a parse failure at once (``correct`` implies ``error is None``, in both modes).

**paper1** (``mode="paper1"``): Tarasov & Shridhar's released evaluation (``results_processing/
get_all_results.py`` in DT6A/GSM8K-AI-SubQ), reproduced quirks included, for number answers:
lower-case the reply; read from just after the *first* "final answer:"; without that marker
``s.find(...) + len(marker)`` is 12, so reading starts at character 12; the prediction is the first
match of ``[-+]?\\d*\\.\\d+|\\d+|,\\d+`` (the upstream pattern, alternatives tried in that order at each
position), commas removed, as float. So "1,000" reads 1.0, "-5" reads 5.0 (a sign is only taken with a
decimal point), ".5" reads 0.5. Correct iff prediction == gold as floats. The gold is the first such
number of the gold answer; a "#### n" string reads n (we read after the last "####", so a full GSM8K
rationale also gives n, where upstream, which never passed rationales, would take its first number).
For a GSM8K row the gold is read that way from ``answer_text``, so "#### 2,125" is 2.0 and "#### -10"
is 10.0, as in upstream's files (16 of the 1,319 test problems); other rows use ``answer_value``.
Paper 1 evaluated GSM8K only: other answer types are scored strictly in this mode. A paper-1 parse
failure is a reply with no number to read (upstream had no other): a reply without the marker, read
from character 12, has ``error`` None, and a hedge is read by its first number, as upstream did.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

from subq.data_store.datasets import accepted_answers
from subq.protocol.answers import (
    HEDGE_WORDS,
    UNSURE_WORDS,
    find_final_answer,
    gsm8k_gold,
    hedge_error,
    last_number,
    numbers_match,
    parse_number,
    read_final_value,
)
from subq.protocol.solve_prompts import split_choice

MODES = ("strict", "paper1")


@dataclass
class Score:
    prediction: str | None  # what was read: "18", "B", "yes", "james madison"; None when nothing
    correct: bool
    f1: float | None  # text answers only: best token F1 over the accepted answers (0.0 without a prediction)
    error: str | None  # None when the answer came from a "Final answer" marker as instructed


def _fmt(value: float) -> str:
    """18.0 -> "18", 0.5 -> "0.5" (a float's exact repr otherwise)."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


# "Final answer: B", "**Final answer** - yes", "The final answer is Benjamin Harrison" (non-number types).
_MARKER = re.compile(r"final\s+answer[\s*_]*(?:is\b|[:=\-\u2013\u2014])[\s*_:]*", re.IGNORECASE)
_NO_MARKER = "no 'Final answer:' line"


def _unsure(answer: str, words: re.Pattern[str] = UNSURE_WORDS) -> str | None:
    """Why an answer hedges by its wording ("maybe", "possibly", ...), else None."""
    m = words.search(answer)
    return None if m is None else f"it says {m[0].lower()!r}"


def _after_last_marker(text: str) -> str | None:
    """The rest of the line after the last marker (or the next non-empty line), None without one."""
    return find_final_answer(text, _MARKER, _MARKDOWN)


_MARKDOWN = "*_`"


def _clean(s: str) -> str:
    return s.strip().strip(_MARKDOWN).strip()


def _last_line(text: str) -> str:
    lines = [_clean(line) for line in text.splitlines() if _clean(line)]
    return lines[-1] if lines else ""


# --- numbers ---------------------------------------------------------------------------------


def _number_gold(problem: dict[str, Any]) -> float | None:
    if problem.get("answer_value") is not None:
        return float(problem["answer_value"])
    gold = problem.get("gold")
    if gold is None:
        return None
    if isinstance(gold, (int, float)):
        return float(gold)
    return gsm8k_gold(gold) if "####" in gold else parse_number(gold)


def _score_number(text: str, problem: dict[str, Any]) -> Score:
    answer = find_final_answer(text)
    if answer is None:
        value = last_number(text)
        error = f"{_NO_MARKER}; used the last number in the text" if value is not None else \
            f"{_NO_MARKER} and no number in the text"
    else:
        value, error = read_final_value(answer)  # the reading collection uses: hedges have no value
    correct = error is None and numbers_match(value, _number_gold(problem))
    return Score(None if value is None else _fmt(value), correct, None, error)


# --- choices -----------------------------------------------------------------------------------

# A letter leading the answer: "B", "(B)", "B)", "B. 6", "B: 6", "B 6", "b" / "b)" (lower case only when
# alone or closed by ")", so "a total of 8" is not option A; "A total of 8" is not either).
_LEAD_LETTER = re.compile(r"^\(?([A-E])\)?(?:[).:,]|\s*$|\s+(?![a-z]))|^\(?([a-e])(?:\)|\)?[.]?\s*$)")
# "option B" / "choice (b)" / "option c"; "the answer is C" (after "answer", a lower-case letter only in
# parentheses: "the answer is a total of 8" names no option).
_NAMED_LETTER = re.compile(
    r"\b(?i:option|choice)\s*[:\-]?\s*\(?([A-Ea-e])\)?(?!\w)"
    r"|\b(?i:answer)\s*(?i:is\s*)?[:\-]?\s*(?:\(([A-Ea-e])\)|([A-E])\)?)(?!\w)"
)
_ANSWER_LETTER = re.compile(r"\b(?i:answer)\s*(?i:is\s*)?[:\-]?[\s*]*\(?([A-E])\)?(?!\w)")  # no marker: "Answer: B"
# Two option letters side by side or joined: "A, B, C", "C or D", "(C) or (D)", "C/D", "C and E",
# "C (or D)", "(C) (D)", "C, possibly D".
_SEVERAL_LETTERS = re.compile(
    r"(?<!\w)\(?([A-E])\)?\s*[(\[]?\s*"
    r"(?:(?:,|/|&|\bor\b|\band\b|\bmaybe\b|\bpossibly\b|\bperhaps\b|\bprobably\b)\s*)*"
    r"[(\[]?\s*([A-E])\)?(?!\w)")


def _letter(answer: str, choices: list[str] | None) -> str | None:
    m = _LEAD_LETTER.match(answer)
    if m:
        return (m[1] or m[2]).upper()
    m = _NAMED_LETTER.search(answer)
    if m:
        return (m[1] or m[2] or m[3]).upper()
    if not choices:
        return None
    # The answer repeats an option: same normalised text, else the same number (unique).
    options = [split_choice(c, i) for i, c in enumerate(choices)]
    norm = _normalize(answer)
    hits = [letter for letter, text in options if norm and _normalize(text) == norm]
    if len(hits) != 1:
        value = parse_number(answer)
        hits = [letter for letter, text in options if value is not None and numbers_match(parse_number(text), value)]
    return hits[0] if len(hits) == 1 else None


def _score_choice(text: str, problem: dict[str, Any]) -> Score:
    gold = str(problem.get("gold") or "").strip().upper()
    answer = _after_last_marker(text)
    several = answer is not None and any(m[1] != m[2] for m in _SEVERAL_LETTERS.finditer(answer))
    reason = "it names more than one option" if several else (_unsure(answer) if answer is not None else None)
    if reason is not None:
        letter, error = None, hedge_error(reason, answer)
    elif answer is not None:
        letter = _letter(answer, problem.get("choices"))
        error = None if letter else f"no option letter in the final answer {answer[:80]!r}"
    else:
        found = list(_ANSWER_LETTER.finditer(text))
        letter = found[-1][1].upper() if found else None
        error = f"{_NO_MARKER}; read 'Answer: {letter}'" if letter else f"{_NO_MARKER} and no 'Answer: <letter>'"
    return Score(letter, error is None and letter is not None and letter == gold, None, error)


# --- yes / no ----------------------------------------------------------------------------------

_YESNO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_FIRST_WORD = re.compile(r"^\W*(yes|no|true|false)\b", re.IGNORECASE)
_ANY_YESNO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
# "yes/no", "Yes or no.", "true, false", "Yes (or no)": two answers side by side ("Yes, no doubt" is one).
_YESNO_PAIR = re.compile(r"\b(yes|no|true|false)\s*[(\[]?\s*(?:(?:/|,|\bor\b|\band\b)\s*)?(yes|no|true|false)\b"
                         r"(?=\s*(?:$|[.,;:!?()\]]))", re.IGNORECASE)


def _score_yesno(text: str, problem: dict[str, Any]) -> Score:
    gold = str(problem.get("gold") or "").strip().lower()
    answer = _after_last_marker(text)
    pair = answer is not None and any(_YESNO[m[1].lower()] != _YESNO[m[2].lower()] for m in _YESNO_PAIR.finditer(answer))
    reason = "it says both yes and no" if pair else (_unsure(answer, HEDGE_WORDS) if answer is not None else None)
    if reason is not None:
        word, error = None, hedge_error(reason, answer)
    elif answer is not None:
        m = _FIRST_WORD.match(answer)
        # "Yes, because ..." reads its first word; otherwise every yes/no in the line must agree.
        words = [m[1]] if m else list({_YESNO[w.lower()] for w in _ANY_YESNO.findall(answer)})
        word = words[0] if len(words) == 1 else None
        error = None if word else f"no yes/no in the final answer {answer[:80]!r}"
    else:
        found = _ANY_YESNO.findall(_last_line(text))
        word = found[-1] if found else None
        error = f"{_NO_MARKER}; read the last line" if word else f"{_NO_MARKER} and no yes/no on the last line"
    pred = _YESNO[word.lower()] if word else None
    return Score(pred, error is None and pred is not None and pred == _YESNO.get(gold, gold), None, error)


# --- text (SQuAD-style EM / F1) ----------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def _normalize(s: str) -> str:
    """SQuAD's normalize_answer: lower case, drop punctuation and articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between two answers (after normalisation)."""
    pred, ref = _normalize(prediction).split(), _normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_TEXT_HEDGE = re.compile(rf"{HEDGE_WORDS.pattern}|\s/\s", re.IGNORECASE)


def _score_text(text: str, problem: dict[str, Any]) -> Score:
    golds = accepted_answers(problem)
    answer = _after_last_marker(text)
    error = None
    if answer is None:
        answer = re.sub(r"^answer\s*:\s*", "", _last_line(text), flags=re.IGNORECASE)
        error = f"{_NO_MARKER}; read the last line"
    answer = answer.rstrip(".").strip()
    if not answer:
        return Score(None, False, 0.0, error or "empty final answer")
    em = any(_normalize(answer) == _normalize(g) for g in golds)
    reason = None if em else _unsure(answer, _TEXT_HEDGE)
    if reason is not None:  # "X or Y", "maybe X": no answer (an accepted answer holding "or" is one)
        return Score(None, False, 0.0, hedge_error(reason, answer))
    if error is not None:  # read without the marker: recorded, never scored
        return Score(answer, False, 0.0, error)
    f1 = max((token_f1(answer, g) for g in golds), default=0.0)
    return Score(answer, em, f1, error)


# --- paper 1 -----------------------------------------------------------------------------------

PAPER1_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+|,\d+")  # upstream's extract_first_number, verbatim
PAPER1_MARKER = "final answer:"


def _paper1_first_number(s: str) -> float | None:
    m = PAPER1_NUMBER.search(s)
    return float(m.group().replace(",", "")) if m else None


def paper1_prediction(text: str | None) -> float | None:
    """Paper 1's predicted value of a solver reply (see the module docstring for its quirks)."""
    if text is None:
        return None
    s = text.lower()
    start = s.find(PAPER1_MARKER) + len(PAPER1_MARKER)  # 12 when the marker is absent: kept on purpose
    return _paper1_first_number(s[start:])


def paper1_gold(answer: float | int | str | None) -> float | None:
    """Paper 1's gold value: a number as is; a string's first number (after its last "####" if any)."""
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return float(answer) if math.isfinite(answer) else None
    return _paper1_first_number(answer.rsplit("####", 1)[-1])


def _paper1_problem_gold(problem: dict[str, Any]) -> float | None:
    text = problem.get("answer_text")
    if isinstance(text, str) and "####" in text:  # GSM8K: parse "#### 2,125" as upstream did (2.0)
        return paper1_gold(text)
    value = problem.get("answer_value")
    return paper1_gold(value if value is not None else problem.get("gold"))


def _score_paper1(text: str, problem: dict[str, Any]) -> Score:
    gold = _paper1_problem_gold(problem)
    pred = paper1_prediction(text)
    # Without the marker paper 1 reads from character 12 and scores what it finds: that is its
    # protocol, not a parse failure (a record is never correct and a parse failure at once).
    error = "no number found (paper 1 protocol)" if pred is None else None
    return Score(None if pred is None else _fmt(pred), pred is not None and pred == gold, None, error)


# --- entry points ------------------------------------------------------------------------------

_STRICT = {"number": _score_number, "choice": _score_choice, "yesno": _score_yesno, "text": _score_text}


def score(solver_text: str | None, problem: dict[str, Any], mode: str = "strict") -> Score:
    """Score one solver reply against a problem row (``answer_type``, ``gold``, ``answer_value``,
    ``choices``, and for Bamboogle ``answer_text``). Never raises on the reply's content."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    answer_type = problem.get("answer_type")
    if answer_type not in _STRICT:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {tuple(_STRICT)}")
    if not solver_text or not solver_text.strip():
        return Score(None, False, 0.0 if answer_type == "text" else None, "empty solver text")
    if mode == "paper1" and answer_type == "number":
        return _score_paper1(solver_text, problem)
    return _STRICT[answer_type](solver_text, problem)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (z=1.96: 95%). n=0 gives (0, 1): no information."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)
