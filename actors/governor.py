"""One governor per run, shared by every teacher call: rate limits, the $ budget, the circuit
breaker, and the stop after a fatal account error.

Collection wraps :class:`Governor` in one Ray actor that the whole pool shares (its methods never
block: callers sleep locally for the delays it returns); a lone client (evaluation) gets a
private in-process instance. :class:`GovernorClient` hides which of the two it talks to.
Before each HTTP attempt a client calls ``admit``; after it, ``settle``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from subq.actors.breaker import GAVE_UP, WAIT, BreakerConfig, CircuitBreaker
from subq.actors.budget import Budget
from subq.actors.rate_limit import RateLimiter

# Why a call was refused (nothing was sent; the work is left for a later run).
REFUSED_BUDGET, REFUSED_OUTAGE, REFUSED_FATAL = "budget", "outage", "fatal"


@dataclass
class Admission:
    wait_s: float = 0.0  # sleep this long first
    again: bool = False  # after the sleep, ask again (the breaker is open)
    refused: str | None = None  # REFUSED_*: send nothing
    ticket: int = 0  # the call's admission number (pool-wide order), handed back to ``settle``


class Settled(NamedTuple):
    pool: bool  # the failure may be the pool's (an outage, or its first seconds): not held against the call
    last_success: int  # ticket of the latest-admitted success
    seen_at: int  # the first ticket admitted after this settle: a success from it on is news after it


@dataclass
class GovernorConfig:
    requests_per_minute: float | None = None  # shared by the whole pool
    tokens_per_minute: float | None = None
    budget_usd: float | None = None  # a cap: worst cases are reserved before sending
    spent_before_usd: float = 0.0  # spend already in the store (a cumulative budget)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


class Governor:
    def __init__(self, cfg: GovernorConfig | None = None):
        cfg = cfg or GovernorConfig()
        limited = cfg.requests_per_minute or cfg.tokens_per_minute
        self.limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute) if limited else None
        self.budget = Budget(cfg.budget_usd, cfg.spent_before_usd) if cfg.budget_usd is not None else None
        self.breaker = CircuitBreaker(cfg.breaker)
        self.fatal: str | None = None
        self.refusals: dict[str, int] = {}
        self.spent_usd = 0.0  # this run's settled spend (worst cases where the cost is unknown)
        self.calls = 0
        self.last_success = 0  # ticket of the latest-admitted healthy answer: a failure that outlives one
        #                        is the call's, not an outage
        self.streak_from: int | None = None  # ticket of the first failed call of the current failure streak
        self.streak_calls: set[int] = set()  # the different calls that failed in it
        self.last_failure: str | None = None  # what the endpoint last failed with (for the stop message)

    def admit(self, est_tokens: int = 0, worst_usd: float = 0.0) -> Admission:
        if self.fatal is not None:
            return self._refuse(REFUSED_FATAL)
        verdict, wait = self.breaker.check()
        if verdict == GAVE_UP:
            return self._refuse(REFUSED_OUTAGE)
        if verdict == WAIT:
            return Admission(wait_s=wait, again=True)
        if self.budget is not None and not self.budget.reserve(worst_usd):
            return self._refuse(REFUSED_BUDGET)
        self.breaker.claim()
        self.calls += 1
        return Admission(wait_s=self.limiter.reserve(est_tokens).wait_s if self.limiter else 0.0, ticket=self.calls)

    def settle(self, worst_usd: float, charged_usd: float, healthy: bool, error: str | None = None,
               ticket: int | None = None, call: int | None = None) -> Settled:
        """Release the reservation, count the spend and tell the breaker. A caller holds a failure
        against its own attempts unless it may be the pool's and no call admitted after its first
        failure was seen (``seen_at`` of that settle) succeeded.

        A success admitted before the current failure streak was seen is a straggler: it may have been
        answered before the outage began (admission order is not arrival order: two actors' requests
        cross), and settled late: it neither closes the breaker nor counts as a success, or the race
        would burn rows into errors during an outage.

        ``call``: the call this attempt belongs to (the ticket of its first attempt; None: each
        attempt is its own call). A failure is excused as the pool's when another call failed in
        the same streak and the breaker opened; a call failing alone is excused only for the
        streak's first ``lone_grace_s`` (other calls may be about to fail too), then it is that
        call's problem."""
        if self.budget is not None:
            self.budget.settle(worst_usd, charged_usd)
        self.spent_usd += charged_usd
        ticket = self.calls if ticket is None else ticket
        seen_at = self.calls + 1
        if healthy:
            if self.streak_from is not None and ticket < self.streak_from:
                return Settled(self.breaker.state != "closed", self.last_success, seen_at)
            self.last_success, self.streak_from = max(self.last_success, ticket), None
            self.streak_calls.clear()
            self.breaker.success()
            return Settled(False, self.last_success, seen_at)
        self.last_failure = error
        if self.streak_from is None:
            self.streak_from = seen_at
        call = ticket if call is None else call
        self.streak_calls.add(call)
        outage = self.breaker.failure(len(self.streak_calls))
        alone = not self.streak_calls - {call}
        if alone:  # an outage's first call, or a call the endpoint always fails: only time tells
            return Settled(self.breaker.streak_age() < self.breaker.cfg.lone_grace_s, self.last_success, seen_at)
        return Settled(outage, self.last_success, seen_at)

    def stop(self, message: str) -> None:
        """A fatal account error: refuse every further call of the run."""
        if self.fatal is None:
            self.fatal = message

    def _refuse(self, reason: str) -> Admission:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return Admission(refused=reason)

    def snapshot(self) -> dict[str, Any]:
        return {"spent_usd": self.spent_usd, "calls": self.calls, "refusals": dict(self.refusals),
                "fatal": self.fatal, "breaker_opened": self.breaker.opened, "breaker_state": self.breaker.state,
                "last_failure": self.last_failure,
                "budget_left_usd": None if self.budget is None else self.budget.left()}


class GovernorClient:
    """Async access to a Governor, in-process or a Ray actor handle."""

    def __init__(self, governor: Any):
        self.g = governor
        self.remote = hasattr(getattr(governor, "admit", None), "remote")

    async def admit(self, est_tokens: int, worst_usd: float) -> Admission:
        if self.remote:
            return await self.g.admit.remote(est_tokens, worst_usd)
        return self.g.admit(est_tokens, worst_usd)

    async def settle(self, worst_usd: float, charged_usd: float, healthy: bool,
                     error: str | None = None, ticket: int | None = None, call: int | None = None
                     ) -> Settled:
        if self.remote:
            return Settled(*await self.g.settle.remote(worst_usd, charged_usd, healthy, error, ticket, call))
        return self.g.settle(worst_usd, charged_usd, healthy, error, ticket, call)

    def settle_nowait(self, worst_usd: float, charged_usd: float, ticket: int | None = None) -> None:
        """A success (or a cancelled call): nothing to wait for (the actor applies calls in order)."""
        if self.remote:
            self.g.settle.remote(worst_usd, charged_usd, True, None, ticket)
        else:
            self.g.settle(worst_usd, charged_usd, True, None, ticket)

    async def stop(self, message: str) -> None:
        if self.remote:
            await self.g.stop.remote(message)
        else:
            self.g.stop(message)
