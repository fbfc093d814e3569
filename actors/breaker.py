"""A circuit breaker shared by every collection actor: under an outage the pool backs off as one.

Closed: calls go out. After ``failure_threshold`` failures in a row across the pool (5xx,
timeouts, dropped connections, 429s) of at least ``min_calls`` different calls, it opens: no
call goes out for ``cooldown`` seconds (one call failing alone is that call's problem). Then
half-open: one probe call goes out while the others wait; its success closes the breaker, its
failure reopens it with the cooldown doubled (up to ``max_cooldown_s``). Failures of calls that
were already in flight when it opened are counted as the pool's, not held against their rows.
When the endpoint has been failing for longer than ``patience_s`` the breaker gives up: callers
are refused and the run stops with nothing stored as failed (a later run resumes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

GO, WAIT, GAVE_UP = "go", "wait", "gave_up"


@dataclass
class BreakerConfig:
    failure_threshold: int = 3  # consecutive pool-wide failures that open it (<= a call's attempts)
    min_calls: int = 2  # ...of this many different calls: one call failing alone is that call's problem
    lone_grace_s: float = 3.0  # ...once it has failed alone this long: at an outage's start, the first call
    #                            to meet it is alone for a moment, so its retries are not charged before then
    cooldown_s: float = 1.0  # first pause; doubles after each failed probe
    max_cooldown_s: float = 30.0
    patience_s: float = 600.0  # an outage longer than this stops the run (resume later)
    probe_timeout_s: float = 120.0  # a probe that never reports back frees the slot after this


class CircuitBreaker:
    def __init__(self, cfg: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg or BreakerConfig()
        self.clock = clock
        self.state = "closed"  # closed | open | half_open
        self.failures = 0  # in a row, pool-wide
        self.failing_since: float | None = None  # first failure of the current streak
        self.open_until = 0.0
        self.cooldown = self.cfg.cooldown_s
        self.probe_at: float | None = None
        self.opened = 0  # times it opened (reported)

    def check(self) -> tuple[str, float]:
        """(GO | WAIT | GAVE_UP, seconds to wait); no side effects but the open -> half-open turn."""
        now = self.clock()
        if self.failing_since is not None and self.state != "closed" \
                and now - self.failing_since > self.cfg.patience_s:
            return GAVE_UP, 0.0
        if self.state == "open":
            if now < self.open_until:
                return WAIT, self.open_until - now
            self.state, self.probe_at = "half_open", None
        if self.state == "half_open" and self.probe_at is not None \
                and now - self.probe_at < self.cfg.probe_timeout_s:
            return WAIT, min(0.5, self.cooldown)
        return GO, 0.0

    def claim(self) -> None:
        """A call is going out; in half-open state it is the probe."""
        if self.state == "half_open":
            self.probe_at = self.clock()

    def success(self) -> None:
        self.state, self.failures, self.failing_since = "closed", 0, None
        self.cooldown, self.probe_at = self.cfg.cooldown_s, None

    def failure(self, calls: int | None = None) -> bool:
        """Count a failure; True when the pool is in an outage (the breaker is not closed).

        ``calls``: how many different calls failed in the current streak (None: not tracked). A
        streak of one call's retries -- a prompt the endpoint always fails on, a follow-up it
        refuses -- says nothing about the endpoint, and opening on it would hold that call (and
        everyone) for the whole patience when it is the last one left."""
        now = self.clock()
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        if self.state == "half_open":  # the probe (or a straggler) failed: pause longer
            self.cooldown = min(self.cfg.max_cooldown_s, self.cooldown * 2)
            self._open(now)
        elif self.state == "closed" and self.failures >= self.cfg.failure_threshold \
                and (calls is None or calls >= self.cfg.min_calls):
            self._open(now)
        return self.state != "closed"

    def streak_age(self) -> float:
        """Seconds since the current failure streak began (0 when none)."""
        return 0.0 if self.failing_since is None else self.clock() - self.failing_since

    def _open(self, now: float) -> None:
        self.state, self.open_until, self.probe_at = "open", now + self.cooldown, None
        self.opened += 1
