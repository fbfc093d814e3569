"""The run's governor: the budget is a cap under any concurrency, the breaker backs the pool off
together and gives up after the patience, a fatal error refuses everything (pure Python)."""

from __future__ import annotations

import random

import pytest
from subq.actors.breaker import GAVE_UP, GO, WAIT, BreakerConfig, CircuitBreaker
from subq.actors.budget import Budget
from subq.actors.governor import Governor, GovernorConfig


def test_budget_never_overspends_with_many_calls_in_flight():
    rng = random.Random(0)
    budget = Budget(limit_usd=1.0)
    in_flight: list[float] = []
    for _ in range(10_000):
        if in_flight and rng.random() < 0.5:  # settle a random call at a random share of its worst case
            worst = in_flight.pop(rng.randrange(len(in_flight)))
            budget.settle(worst, worst * rng.choice([0.0, 0.3, 1.0]))
        else:
            worst = rng.uniform(0.001, 0.05)
            if budget.reserve(worst):
                in_flight.append(worst)
        assert budget.spent + budget.reserved <= 1.0 + 1e-9
    for worst in in_flight:
        budget.settle(worst, worst)
    assert budget.spent <= 1.0 + 1e-9 and budget.reserved == pytest.approx(0.0, abs=1e-9)


def test_budget_counts_the_spend_already_in_the_store():
    budget = Budget(limit_usd=1.0, spent_before_usd=0.9)
    assert not budget.reserve(0.2) and budget.reserve(0.1) and not budget.reserve(0.001)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_failures_probes_once_and_doubles_its_pause():
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_s=1.0, patience_s=100.0), clock)
    for _ in range(2):
        assert not b.failure()
    assert b.failure() and b.check()[0] == WAIT  # open
    clock.t = 1.01
    assert b.check() == (GO, 0.0)  # half-open: one probe
    b.claim()
    assert b.check()[0] == WAIT  # the others wait for the probe
    assert b.failure()  # the probe failed: open again, for twice as long
    clock.t = 2.5
    assert b.check()[0] == WAIT
    clock.t = 3.1
    assert b.check()[0] == GO
    b.claim()
    b.success()
    assert b.state == "closed" and b.check() == (GO, 0.0) and b.opened == 2


def test_breaker_gives_up_after_the_patience():
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=1.0, patience_s=10.0), clock)
    b.failure()
    for t in range(1, 10):
        clock.t = float(t)
        if b.check()[0] == GO:
            b.claim()
            b.failure()
    clock.t = 10.5
    assert b.check()[0] == GAVE_UP


def test_governor_refuses_after_a_fatal_error_and_on_an_empty_budget():
    g = Governor(GovernorConfig(budget_usd=0.5))
    assert g.admit(worst_usd=0.4).refused is None
    assert g.admit(worst_usd=0.4).refused == "budget"  # 0.4 is still reserved
    g.settle(0.4, 0.1, healthy=True)
    assert g.admit(worst_usd=0.4).refused is None
    g.stop("quota exhausted")
    assert g.admit().refused == "fatal" and g.snapshot()["fatal"] == "quota exhausted"


def test_a_straggling_success_does_not_end_an_outage():
    """Calls 1-4 go out; 2, 3, 4 fail (the outage), then call 1's success is settled late (another
    actor): it was sent before the streak began, so the breaker stays open and a failing call still
    sees no success since its first failure. A success of a call admitted later closes it."""
    g = Governor(GovernorConfig(breaker=BreakerConfig(failure_threshold=3, cooldown_s=5.0)))
    tickets = [g.admit().ticket for _ in range(4)]
    assert tickets == [1, 2, 3, 4]
    for t in tickets[1:]:
        outage, last, _ = g.settle(0.0, 0.0, healthy=False, error="503", ticket=t)
    assert outage and last == 0
    assert g.settle(0.0, 0.0, healthy=True, ticket=1)[:2] == (True, 0)  # the straggler
    assert g.breaker.state == "open"
    g.breaker.open_until = 0.0  # the cooldown is over: the next admission is the probe
    probe = g.admit().ticket
    assert g.settle(0.0, 0.0, healthy=True, ticket=probe)[:2] == (False, probe)
    assert g.breaker.state == "closed"


def test_one_calls_failures_neither_open_the_breaker_nor_excuse_themselves_for_long():
    """A streak of failures of a single call is that call's problem (its content, its follow-up):
    the breaker stays closed and, once the streak is older than the grace (other calls had time to
    fail too), the call is told to count them. A second call failing in the same streak makes it
    the pool's (an outage): the breaker opens and both are excused."""
    now = [100.0]
    g = Governor(GovernorConfig(breaker=BreakerConfig(failure_threshold=3, cooldown_s=5.0, lone_grace_s=2.0)))
    g.breaker.clock = lambda: now[0]
    first = g.admit().ticket
    excused = []
    for _ in range(5):
        excused.append(g.settle(0.0, 0.0, healthy=False, error="500", ticket=g.admit().ticket, call=first)[0])
        now[0] += 0.75
    assert excused == [True, True, True, False, False]  # 0, 0.75, 1.5 s into the streak; then 2.25, 3
    assert g.breaker.state == "closed" and g.breaker.opened == 0
    other = g.admit().ticket
    outage, last, _ = g.settle(0.0, 0.0, healthy=False, error="500", ticket=other, call=other)
    assert outage and last == 0 and g.breaker.state == "open"


def test_a_success_sent_before_a_failure_was_seen_does_not_count_against_it():
    """Two actors: call A is admitted first, call B second, but B reaches the endpoint first (before
    the outage) and A starts it. B's success settles after A's failure: it was admitted before A's
    failure was known, so it says nothing about the endpoint since, and A's retries, failing alone
    in the outage's first seconds, stay excused (they used to be held against A: a row lost to a
    3 s outage whenever the two actors' requests crossed)."""
    g = Governor(GovernorConfig(breaker=BreakerConfig(failure_threshold=3, lone_grace_s=3.0)))
    a, b = g.admit().ticket, g.admit().ticket
    failed = g.settle(0.0, 0.0, healthy=False, error="429", ticket=a, call=a)
    assert failed.pool  # alone, within the grace
    assert g.settle(0.0, 0.0, healthy=True, ticket=b).last_success < failed.seen_at  # a straggler
    retry = g.settle(0.0, 0.0, healthy=False, error="429", ticket=g.admit().ticket, call=a)
    assert retry.pool and retry.last_success < failed.seen_at  # still excused
    later = g.admit().ticket  # admitted after the failure was seen: its success is news
    assert g.settle(0.0, 0.0, healthy=True, ticket=later).last_success >= failed.seen_at
