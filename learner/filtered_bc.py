"""Filtered behaviour cloning: BC on the best decompositions only (paper 1's strongest student).

Paper 1 ranks the teacher's decompositions by return and clones the top fraction; paper 2's
"ground-truth screening" keeps only decompositions through which the teacher reached the gold answer.
Both are a filter in front of plain BC, so the update is :class:`learner.bc.BC`'s, unchanged, and all
the algorithm lives in :func:`select`.

As in paper 1, filtered BC starts from a BC checkpoint, not from the base model: the driver points the
model spec at the BC run's checkpoint directory (any checkpoint is a loadable HF model directory).
"""

from __future__ import annotations

from dataclasses import dataclass

from learner.bc import BC, BCConfig
from learner.episodes import RETURN_KINDS, Episode, episode_return


@dataclass
class FilteredBCConfig(BCConfig):
    fraction: float = 0.5  # keep this top share of episodes by return, in (0, 1]
    return_kind: str = "both"  # what ranks episodes: "correctness", "usefulness" or "both" (see episodes.py)
    correct_only: bool = False  # paper 2's screening: drop incorrect decompositions before ranking


def select(episodes: list[Episode], cfg: FilteredBCConfig) -> list[Episode]:
    """The episodes filtered BC trains on, in their original order.

    With ``correct_only``, incorrect episodes go first. Of the n left, the ``round(fraction * n)``
    (Python's round, half to even; at least 1 when n > 0) with the highest return are kept. Ties are
    broken by original order (a stable sort), so the selection is deterministic for a fixed input
    order; the driver should pass episodes in a fixed order (e.g. by sample key).
    """
    if not 0.0 < cfg.fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {cfg.fraction}")
    if cfg.return_kind not in RETURN_KINDS:
        raise ValueError(f"return_kind must be one of {RETURN_KINDS}, got {cfg.return_kind!r}")
    pool = [ep for ep in episodes if ep.correct >= 1.0] if cfg.correct_only else list(episodes)
    if not pool:
        return []
    keep = max(1, round(cfg.fraction * len(pool)))
    returns = [episode_return(ep, cfg.return_kind) for ep in pool]
    ranked = sorted(range(len(pool)), key=lambda i: -returns[i])  # stable: ties keep input order
    return [pool[i] for i in sorted(ranked[:keep])]


class FilteredBC(BC):
    """BC whose data is :func:`select`'s output; the update itself is BC's, unchanged."""

    cfg: FilteredBCConfig

    def select(self, episodes: list[Episode]) -> list[Episode]:
        """The training set for this run's config (see :func:`select`)."""
        return select(episodes, self.cfg)
