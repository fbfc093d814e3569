"""What the test teacher writes: the stage a request is for, and deterministic, content-derived
replies (decompositions, answers, judgements, a student's completion). Test-only code, used by
``tests.teacher_server``."""

from __future__ import annotations

import hashlib
import re
from typing import Any

_Q_LINE = re.compile(r"^\s*Q(\d+)\s*[:.)]\s*(.*?)\s*$", re.MULTILINE)
_AT_MOST = re.compile(r"at most (\d+) sub-questions", re.IGNORECASE)
_PROBLEM = re.compile(r"Problem:\s*(.*?)\s*(?:\n\s*\n|\n\s*Q\d+\s*[:.)]|\Z)", re.DOTALL)


def _h(*parts: Any) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process)."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


_PROMPTS: dict[str, str] = {}


def _system_prompts() -> dict[str, str]:
    """System prompt -> stage, from protocol.prompts (imported lazily, kept once found; {} if absent)."""
    if not _PROMPTS:
        try:
            from subq.protocol import prompts
        except ImportError:
            return {}
        names = {"DECOMPOSE_SYSTEM": "decompose", "ANSWER_SYSTEM": "answer", "FEEDBACK_SYSTEM": "feedback"}
        _PROMPTS.update({getattr(prompts, n): s for n, s in names.items()
                         if isinstance(getattr(prompts, n, None), str)})
    return _PROMPTS


def detect_stage(messages: list[dict[str, Any]]) -> str | None:
    """The stage from the first (system) message: exact match with protocol's prompts, else keywords."""
    if not messages or messages[0].get("role") != "system":
        return None
    system = str(messages[0].get("content") or "")
    stage = _system_prompts().get(system)
    if stage is None:  # fallback for hand-written prompts in tests
        low = system.lower()
        for word, s in (("feedback", "feedback"), ("useful", "feedback"), ("decompos", "decompose"),
                        ("answer", "answer")):
            if word in low:
                return s
    return stage


def _user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_TEMPLATES = (
    "How many {w} are there at the start?",
    "What is the total number of {w}?",
    "How much is left after the {w} are used?",
    "What is the cost of the {w}?",
    "How many {w} are added in the second step?",
    "What is the difference in {w}?",
)


def decompose_reply(problem: str, salt: Any, limit: int | None = None) -> str:
    words = re.findall(r"\b[a-z]{4,}\b", problem) or ["items"]
    k = 2 + _h(problem, salt, "k") % 3
    k = min(k, max(limit, 1)) if limit else k
    lines = []
    for i in range(1, k + 1):
        w = words[_h(problem, salt, i, "w") % len(words)]
        lines.append(f"Q{i}: " + _TEMPLATES[_h(problem, salt, i, "t") % len(_TEMPLATES)].format(w=w))
    return "\n".join(lines)


def answer_reply(problem: str, n_sub: int, final: float) -> str:
    lines = [f"A{i}: The result of step {i} is {_h(problem, i, 'a') % 100}." for i in range(1, n_sub + 1)]
    return "\n".join([*lines, f"Final answer: {_number(final)}"])


def feedback_reply(problem: str, subqs: list[str], salt: Any) -> str:
    return "\n".join(
        f"Q{i}: {'Yes' if _h(problem, q, salt, 'fb') % 4 else 'No'}" for i, q in enumerate(subqs, 1)
    )


def default_answer(problem: str) -> float:
    return float(_h(problem, "gold") % 1000)


# The student's prompt, as protocol.prompts.student_prompt writes it (one line of problem).
_STUDENT = re.compile(r"Problem: (?P<problem>[^\n]*)\nSub-questions:\n")
STUDENT_END = "<end>"  # protocol.prompts.SUBQ_END


def student_reply(problem: str, salt: Any) -> str:
    """What a trained student writes: sub-questions one per line, the end marker, then it rambles on."""
    lines = [line.split(": ", 1)[1] for line in decompose_reply(problem, salt).splitlines()]
    return "\n".join([*lines, STUDENT_END, "Problem: Tom has 3 apples. How many now?"])
