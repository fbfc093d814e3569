"""Filtered behaviour cloning: BC on the best decompositions only (paper 1's strongest student).

Two rules, both a filter in front of plain BC (the update is :class:`learner.bc.BC`'s, unchanged; all
the algorithm lives in :func:`select`):

- **correct only** (the default: ``correct_only=True, fraction=1.0``): keep every decomposition through
  which the teacher reached the gold answer. This is what paper 1's released code trains on (it drops
  the samples whose ``answer_correctness`` is 0) and paper 2's "ground-truth screening".
- **top fraction by return** (``fraction < 1``): rank by return (``return_kind``) and keep the best
  share, within each problem (``rank_within="problem"``: every problem keeps its best decompositions,
  so easy problems do not crowd out hard ones) or over the whole data set (``"global"``). This is %BC,
  the filtered-BC baseline of the offline-RL literature (Chen et al. 2021; Snell et al. 2022 use it
  against ILQL). Combined with ``correct_only=False`` it can keep incorrect decompositions where a
  problem has too few correct ones, which the correct-only rule never does.

Ties (every 0/1 return ties) are broken by the sample key, so the kept subset depends only on the
data, never on the order in which Ray Data delivers it.

As in paper 1, filtered BC starts from a BC checkpoint, not from the base model: the driver points the
model spec at the BC run's checkpoint directory (any checkpoint is a loadable HF model directory).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from subq.learner.bc import BC, BCConfig
from subq.learner.episodes import RETURN_KINDS, episode_return

RANK_WITHIN = ("problem", "global")


@dataclass
class FilteredBCConfig(BCConfig):
    correct_only: bool = True  # keep only decompositions that led to the gold answer (paper 1's code, paper 2)
    fraction: float = 1.0  # then keep this top share by return, in (0, 1]; 1.0 keeps all (paper 1's rule)
    return_kind: str = "both"  # what ranks when fraction < 1: "correctness", "usefulness" or "both" (episodes.py);
    #                           ours: both kinds of teacher feedback
    rank_within: str = "problem"  # fraction < 1: rank each problem's decompositions ("problem") or all ("global");
    #                              ours: every problem keeps its best, hard problems are not filtered away


class Rankable(Protocol):
    """What selection reads of an episode (an ``Episode`` or a lighter record of the same fields)."""

    correct: float
    usefulness: list[float]
    sample_key: str | None
    problem_id: str | None


E = TypeVar("E", bound=Rankable)


def check_config(cfg: FilteredBCConfig) -> None:
    """Raise ``ValueError`` naming the setting when the filter's config is invalid."""
    if not 0.0 < cfg.fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {cfg.fraction}")
    if cfg.return_kind not in RETURN_KINDS:
        raise ValueError(f"return_kind must be one of {RETURN_KINDS}, got {cfg.return_kind!r}")
    if cfg.rank_within not in RANK_WITHIN:
        raise ValueError(f"rank_within must be one of {RANK_WITHIN}, got {cfg.rank_within!r}")


def _top(group: list[int], episodes: Sequence[Rankable], cfg: FilteredBCConfig) -> list[int]:
    """The ``max(1, round(fraction * n))`` best of ``group`` (indices): highest return, then smallest key."""
    keep = max(1, round(cfg.fraction * len(group)))
    ranked = sorted(group, key=lambda i: (-episode_return(episodes[i], cfg.return_kind),
                                          str(episodes[i].sample_key)))
    return ranked[:keep]


def select(episodes: Sequence[E], cfg: FilteredBCConfig) -> list[E]:
    """The episodes filtered BC trains on, in their input order (see the module docstring).

    ``correct_only`` drops incorrect episodes first. With ``fraction < 1`` each ranking group (a
    problem, or everything) keeps ``round(fraction * n)`` (Python's round, half to even; at least 1)
    of its n episodes with the highest return; ties go to the smaller sample key. The kept *set* is
    a function of the episodes alone, whatever their order.
    """
    check_config(cfg)
    pool = [i for i, ep in enumerate(episodes) if not cfg.correct_only or ep.correct >= 1.0]
    if cfg.fraction < 1.0 and pool:
        groups: dict[object, list[int]] = defaultdict(list)
        for i in pool:
            groups[episodes[i].problem_id if cfg.rank_within == "problem" else None].append(i)
        pool = sorted(i for group in groups.values() for i in _top(group, episodes, cfg))
    return [episodes[i] for i in pool]


class FilteredBC(BC):
    """BC whose data is :func:`select`'s output; the update itself is BC's, unchanged."""

    cfg: FilteredBCConfig

    def select(self, episodes: Sequence[E]) -> list[E]:
        """The training set for this run's config (see :func:`select`)."""
        return select(episodes, self.cfg)
