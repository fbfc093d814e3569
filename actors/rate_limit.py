"""One limiter shared by every collection actor: requests/min, tokens/min and the $ budget.

Actors ask for a *reservation* and sleep locally for the returned delay, so the limiter never
blocks and a single actor serves a whole pool. The schedule is a GCRA-style virtual clock per
limit: each reservation pushes the limit's clock forward by its cost (one request, or its
estimated tokens), with a burst allowance of ``burst_s`` seconds of capacity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Reservation:
    wait_s: float  # sleep this long, then send
    allowed: bool  # False once the $ budget is spent: send nothing, leave the work for a resume


class RateLimiter:
    """Plain class; collection wraps it in ``ray.remote`` so one instance serves the pool."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        budget_usd: float | None = None,
        burst_s: float = 1.0,
    ):
        self.rpm, self.tpm, self.budget_usd = requests_per_minute, tokens_per_minute, budget_usd
        self.burst_s = burst_s
        self._req_clock = self._tok_clock = time.monotonic()
        self.spent_usd = 0.0
        self.calls = 0
        self.tokens = 0

    def reserve(self, est_tokens: int = 0) -> Reservation:
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            return Reservation(0.0, False)
        now = time.monotonic()
        wait = 0.0
        if self.rpm:
            tat = max(self._req_clock, now)  # theoretical arrival time of this request
            self._req_clock = tat + 60.0 / self.rpm
            wait = max(wait, tat - self.burst_s - now)
        if self.tpm and est_tokens:
            tat = max(self._tok_clock, now)
            self._tok_clock = tat + 60.0 * est_tokens / self.tpm
            wait = max(wait, tat - self.burst_s - now)
        return Reservation(max(0.0, wait), True)

    def record(self, tokens: int, cost_usd: float | None) -> None:
        """Account a finished (billed) call."""
        self.calls += 1
        self.tokens += tokens
        if cost_usd:
            self.spent_usd += cost_usd

    def budget_left(self) -> float | None:
        return None if self.budget_usd is None else max(0.0, self.budget_usd - self.spent_usd)

    def snapshot(self) -> dict[str, float]:
        return {"spent_usd": self.spent_usd, "calls": self.calls, "tokens": self.tokens}
