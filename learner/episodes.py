"""Decompositions as token-level episodes: what BC, filtered BC and ILQL train on.

The student is a language model that reads ``student_prompt(problem)`` (the *context*) and then
emits the tokens of ``student_target(subquestions)`` (the *actions*): the sub-questions joined by
``SUBQ_SEPARATOR``, then ``SUBQ_END``. Text generation is a token-level decision process: the
state s_t is the prefix ``input_ids[: t + 1]``, the action at t + 1 is the next token.

Batch contract (shared by ``bc.py``, ``filtered_bc.py`` and ``ilql.py``; :func:`collate` builds it).
Every tensor is ``[B, T]``, right-padded:

- ``input_ids`` (long), ``attention_mask`` (long, 1 on real tokens);
- ``action_mask`` (float): ``action_mask[t] = 1`` means token t is an action emitted from the state
  s_{t-1} (the prefix up to t - 1). So the LM logits at position t - 1 predict token t, and the
  first token of an episode is never an action (every episode keeps >= 1 context token);
- ``rewards`` (float), ``dones`` (float): ``rewards[t]`` / ``dones[t]`` belong to the action at t.
  ``dones`` is 1 on the last action token only.
- ``subq_mask`` (float): 1 on the tokens of the sub-questions' own text (the actions minus the
  separators and the end marker): what a fidelity measure such as held-out NLL scores.

Reward placement (DESIGN §1, paper 1):
- ``"full"``: ``usefulness_i`` on the last token of sub-question i (the token before its separator),
  plus ``correct`` added on the last action token (the last token of ``SUBQ_END``);
- ``"sparse"``: only ``correct``, on the last action token.

Tokenisation: the context, each sub-question, each separator and the end marker are tokenised
*separately* and concatenated. Sub-question boundaries are then exact token indices whatever the
tokenizer's merges would do across a boundary (a BPE could merge "?" with "\\n"), at the price of an
action sequence that may differ from the canonical tokenisation of the joined text; the model learns
to emit this one, and decoding it gives the same text. The context alone is tokenised exactly as
:func:`encode_prompt` does at inference. No special tokens anywhere (``add_special_tokens=False``):
neither the tiny byte tokenizer nor SmolLM2's adds a BOS, the student format is plain text without a
chat template, and training and serving must agree, so serving must use :func:`encode_prompt`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from subq.protocol.prompts import SUBQ_END, SUBQ_SEPARATOR, student_prompt, student_target
from transformers import PreTrainedTokenizerBase

PLACEMENTS = ("full", "sparse")
RETURN_KINDS = ("correctness", "usefulness", "both")


@dataclass
class Episode:
    """One decomposition as tokens; all per-token lists have the length of ``input_ids``."""

    input_ids: list[int]  # context + action tokens (an over-long problem is cut in its middle: fit_context)
    action_mask: list[int]  # 1 on the tokens the policy emits (the target), 0 on the context
    rewards: list[float]  # per token: 0 except where the placement puts a reward
    dones: list[int]  # 1 on the last action token
    subq_end_positions: list[int]  # index in input_ids of the last token of each sub-question
    correct: float  # 1.0 if the teacher's answer via these sub-questions was right, else 0.0
    usefulness: list[float]  # per sub-question, 0..1; [] when unknown (sparse episodes only)
    sample_key: str | None = None  # the samples-table key it came from ("reference:<problem_id>" for references)
    problem_id: str | None = None  # the problem it decomposes (filtered BC ranks within it; the val split by it)
    cut_words: int = 0  # problem words cut from the middle of the context to fit max_length (0: none)
    subq_start_positions: list[int] = field(default_factory=list)  # index of each sub-question's first token


def encode_prompt(tokenizer: PreTrainedTokenizerBase, problem: str) -> list[int]:
    """Token ids of the student's context, exactly as in training (no BOS, no chat template)."""
    return _encode(tokenizer, student_prompt(problem))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


CUT_MARKER = "..."  # stands for the words fit_context removed from the middle of a problem


def _cut_middle(words: list[str], keep: int) -> str:
    """The first ceil(keep / 2) and the last floor(keep / 2) words, joined around ``CUT_MARKER``."""
    head, tail = words[: (keep + 1) // 2], words[len(words) - keep // 2:] if keep >= 2 else []
    return " ".join([*head, CUT_MARKER, *tail])


def fit_context(
    tokenizer: PreTrainedTokenizerBase, problem: str, max_tokens: int
) -> tuple[list[int], int] | None:
    """The student's context for ``problem`` in at most ``max_tokens`` tokens, and how many words were cut.

    A prompt that fits is exactly :func:`encode_prompt`'s (0 words cut). An over-long one keeps the
    "Problem:" header and the closing "Sub-questions:" line that serving always sends, and the start
    and the end of the problem (its setting and its question), replacing words from its middle with
    ``CUT_MARKER``; the result is ``encode_prompt`` of that shortened problem, so a server that calls
    this function feeds exactly what training saw. None when not even the header and the marker fit.
    Cutting the left end instead (the old rule) removed the header, which serving never does.
    """
    ids = encode_prompt(tokenizer, problem)
    if len(ids) <= max_tokens:
        return ids, 0
    words = problem.split()
    best: tuple[list[int], int] | None = None
    lo, hi = 0, len(words) - 1  # words kept; all of them do not fit
    while lo <= hi:  # the most words that fit (token counts grow with the words kept)
        keep = (lo + hi) // 2
        cut = encode_prompt(tokenizer, _cut_middle(words, keep))
        if len(cut) <= max_tokens:
            best, lo = (cut, len(words) - keep), keep + 1
        else:
            hi = keep - 1
    return best


def build_episode(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    subquestions: list[str],
    *,
    usefulness: list[float] | None,
    correct: float,
    placement: str = "full",
    max_length: int = 512,
    sample_key: str | None = None,
    problem_id: str | None = None,
) -> Episode | None:
    """Tokenise one decomposition and place its rewards; None when it cannot fit ``max_length``.

    An over-long context loses words from the middle of the problem (:func:`fit_context`; the header,
    the problem's start and its question stay, the sub-questions are never cut); an episode is dropped
    when its actions leave no room for the shortest such context.
    Raises ``ValueError`` on inputs no row should have: no or blank sub-questions, an unknown
    placement, or ``"full"`` without one usefulness value per sub-question.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not subquestions:
        raise ValueError("an episode needs at least one sub-question")
    if placement == "full" and (usefulness is None or len(usefulness) != len(subquestions)):
        raise ValueError("placement 'full' needs one usefulness value per sub-question")
    # student_target cleans each sub-question to one line, so splitting on the separator gives back
    # exactly the cleaned sub-questions and the end marker: the pieces of the joined text.
    pieces = student_target(subquestions).split(SUBQ_SEPARATOR)
    assert len(pieces) == len(subquestions) + 1 and pieces[-1] == SUBQ_END, pieces
    if not all(pieces[:-1]):
        raise ValueError("blank sub-question")

    actions: list[int] = []
    subq_starts: list[int] = []  # relative to the first action token
    subq_ends: list[int] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            actions += _encode(tokenizer, SUBQ_SEPARATOR)
        if i < len(subquestions):
            subq_starts.append(len(actions))
        actions += _encode(tokenizer, piece)
        if i < len(subquestions):
            subq_ends.append(len(actions) - 1)
    fitted = fit_context(tokenizer, problem, max_length - len(actions)) if len(actions) < max_length else None
    if fitted is None:
        return None
    context, cut_words = fitted
    n_ctx, n = len(context), len(context) + len(actions)

    rewards = [0.0] * n
    if placement == "full":
        for end, value in zip(subq_ends, usefulness or [], strict=True):
            rewards[n_ctx + end] += float(value)
    rewards[n - 1] += float(correct)
    dones = [0] * n
    dones[n - 1] = 1
    return Episode(
        input_ids=context + actions,
        action_mask=[0] * n_ctx + [1] * len(actions),
        rewards=rewards,
        dones=dones,
        subq_end_positions=[n_ctx + end for end in subq_ends],
        correct=float(correct),
        usefulness=[float(u) for u in usefulness] if usefulness is not None else [],
        sample_key=sample_key,
        problem_id=problem_id,
        cut_words=cut_words,
        subq_start_positions=[n_ctx + start for start in subq_starts],
    )


def _missing(value: Any) -> bool:
    """None, or NaN (what pandas / Ray Data batches turn a null into)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def episode_from_sample(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, placement: str = "full", max_length: int = 512
) -> tuple[Episode | None, str | None]:
    """One ``samples`` row as an episode, or (None, the reason it is excluded); see :func:`episodes_from_samples`."""
    status = row.get("status")
    if status != "ok":
        return None, str(status or "no_status")
    subqs = row.get("subquestions")
    subqs = [] if _missing(subqs) else [str(q) for q in subqs]
    if not subqs or any(not q.strip() for q in subqs):
        return None, "no_subquestions"
    raw_use = row.get("usefulness")
    use = None if _missing(raw_use) else list(raw_use)
    complete = use is not None and len(use) == len(subqs) and not any(_missing(u) for u in use)
    if placement == "full" and not complete:
        return None, "no_usefulness"
    correct = row.get("correct")
    episode = build_episode(
        tokenizer, str(row["question"]), subqs,
        usefulness=[float(u) for u in use] if complete and use is not None else None,
        correct=0.0 if _missing(correct) else float(bool(correct)),
        placement=placement, max_length=max_length, sample_key=row.get("sample_key"),
        problem_id=row.get("problem_id"),
    )
    return (episode, None) if episode is not None else (None, "too_long")


def episodes_from_samples(
    rows: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    placement: str = "full",
    max_length: int = 512,
) -> tuple[list[Episode], dict[str, int]]:
    """Episodes from ``samples`` rows, and how many rows were excluded for which reason.

    Reasons: the row's status when it is not "ok" ("parse_error", "api_error", ...), "no_subquestions"
    (missing, empty or a blank one), "no_usefulness" (placement "full" only: the list is missing, has the
    wrong length, or holds a null; a null means the judgements failed, and guessing 0 would teach the
    learner that the sub-question was useless), "too_long". For "sparse", an incomplete usefulness list
    is stored as [] (it places no reward). ``correct`` null (no final value or no gold) counts as 0.0:
    a decomposition that led to no answer did not lead to the right one.
    """
    episodes: list[Episode] = []
    excluded: Counter[str] = Counter()
    for row in rows:
        episode, reason = episode_from_sample(row, tokenizer, placement=placement, max_length=max_length)
        if episode is None:
            excluded[str(reason)] += 1
        else:
            episodes.append(episode)
    return episodes, dict(excluded)


def episode_from_reference(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, placement: str = "full", max_length: int = 512
) -> tuple[Episode | None, str | None]:
    """A human decomposition (``reference_subquestions`` of a ``problems`` row) as an episode, or (None, why).

    References are treated as perfect: usefulness 1.0 per sub-question and correct 1.0; the sample key
    is ``reference:<problem_id>``.
    """
    refs = row.get("reference_subquestions")
    subqs = [] if _missing(refs) else [str(q) for q in refs]
    if not subqs or any(not q.strip() for q in subqs):
        return None, "no_subquestions"
    problem_id = row.get("problem_id")
    episode = build_episode(
        tokenizer, str(row["question"]), subqs, usefulness=[1.0] * len(subqs), correct=1.0,
        placement=placement, max_length=max_length, problem_id=problem_id,
        sample_key=None if problem_id is None else f"reference:{problem_id}",
    )
    return (episode, None) if episode is not None else (None, "too_long")


def reference_episodes(
    problem_rows: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 512,
    placement: str = "full",
) -> list[Episode]:
    """Episodes from human decompositions (GSM8K socratic); problems without them, and episodes that
    do not fit ``max_length``, are skipped (see :func:`episode_from_reference`)."""
    built = (episode_from_reference(row, tokenizer, placement=placement, max_length=max_length)[0]
             for row in problem_rows)
    return [ep for ep in built if ep is not None]


def collate(episodes: list[Episode], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``[B, T]`` tensors of the batch contract (module docstring); T = longest episode."""
    if not episodes:
        raise ValueError("cannot collate an empty list of episodes")
    width = max(len(ep.input_ids) for ep in episodes)

    def pad(rows: list[list], value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=dtype)

    return {
        "input_ids": pad([ep.input_ids for ep in episodes], pad_id, torch.long),
        "attention_mask": pad([[1] * len(ep.input_ids) for ep in episodes], 0, torch.long),
        "action_mask": pad([ep.action_mask for ep in episodes], 0, torch.float32),
        "rewards": pad([ep.rewards for ep in episodes], 0.0, torch.float32),
        "dones": pad([ep.dones for ep in episodes], 0, torch.float32),
        "subq_mask": pad([subquestion_mask(ep) for ep in episodes], 0, torch.float32),
    }


def subquestion_mask(ep: Episode) -> list[int]:
    """1 on the tokens of the sub-questions' own text: the actions without separators and end marker."""
    mask = [0] * len(ep.input_ids)
    for start, end in zip(ep.subq_start_positions, ep.subq_end_positions, strict=True):
        mask[start:end + 1] = [1] * (end + 1 - start)
    return mask


def episode_return(ep: Episode, kind: str) -> float:
    """The scalar that filtered BC ranks decompositions by.

    - ``"correctness"``: ``correct`` (0 or 1);
    - ``"usefulness"``: the sum of the sub-questions' usefulness (what the full placement pays out
      before the final reward; it favours more useful sub-questions, hence longer decompositions);
    - ``"both"``: ``correct + mean(usefulness)``: correctness first, usefulness as a tie-breaker in
      [0, 1] that does not reward padding a decomposition with extra sub-questions.
    An unknown usefulness ([]) counts as 0.
    """
    if kind == "correctness":
        return ep.correct
    if kind == "usefulness":
        return float(sum(ep.usefulness))
    if kind == "both":
        return ep.correct + (sum(ep.usefulness) / len(ep.usefulness) if ep.usefulness else 0.0)
    raise ValueError(f"return kind must be one of {RETURN_KINDS}, got {kind!r}")
