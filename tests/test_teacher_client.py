"""The teacher client against the fault-injecting test teacher, in-process (no Ray): fatal
account errors, parameters learned from 400s, a pool that waits out an outage, usage and $."""

from __future__ import annotations

import asyncio
import time

import pytest
from subq.actors.breaker import BreakerConfig
from subq.actors.governor import Governor, GovernorConfig
from subq.actors.prices import PriceTable
from subq.actors.teacher import TeacherClient, TeacherConfig, TeacherFatalError
from subq.protocol.prompts import decompose_messages

from tests.teacher_server import AccountFaults, FaultPlan, TeacherServer

MODEL = "test-teacher"


def client_for(srv: TeacherServer, governor: Governor | None = None, **kw) -> TeacherClient:
    cfg = TeacherConfig(base_url=srv.base_url, model=srv.model, timeout_s=2.0, max_attempts=3,
                        backoff_initial_s=0.01, backoff_max_s=0.05, **kw)
    return TeacherClient(cfg, PriceTable().with_price(srv.model, 1.0, 2.0), governor=governor)


def run(coro):
    return asyncio.run(coro)


def test_exhausted_quota_raises_at_once_and_refuses_every_later_call(monkeypatch):
    monkeypatch.setenv("SUBQ_TEST_KEY", "sk-test-SECRET-0123456789")
    with TeacherServer(model=MODEL, account=AccountFaults(quota_after_billed=0)) as srv:
        governor = Governor()
        client = client_for(srv, governor, api_key_env="SUBQ_TEST_KEY")

        async def go():
            with pytest.raises(TeacherFatalError) as e:
                await client.chat(decompose_messages("How many apples?"))
            later = await client.chat(decompose_messages("And pears?"))
            return str(e.value), later

        message, later = run(go())
        assert srv.stats()["by_outcome"]["quota"] == 1  # not retried
        assert srv.stats()["requests"] == 1  # the later call was never sent
    assert "insufficient_quota" in message and "$SUBQ_TEST_KEY" in message and "SECRET" not in message
    assert later.refused == "fatal" and not later.ok and later.attempts == 0


def test_parameters_the_model_refuses_are_learned_once():
    with TeacherServer(model="my-reasoner", account=AccountFaults(reject_params=("max_tokens", "temperature"))) as srv:
        client = client_for(srv)

        async def go():
            return (await client.chat(decompose_messages("How many apples?"), temperature=0.7),
                    await client.chat(decompose_messages("How many pears?"), temperature=0.7))

        first, second = run(go())
        assert first.ok and second.ok and first.attempts == 3 and second.attempts == 1
        assert srv.stats()["by_outcome"]["unsupported"] == 2


def test_the_pool_waits_out_an_outage_instead_of_failing_its_calls():
    with TeacherServer(model=MODEL, latency_s=0.05, account=AccountFaults()) as srv:
        governor = Governor(GovernorConfig(breaker=BreakerConfig(cooldown_s=0.5, patience_s=30.0)))
        client = client_for(srv, governor)
        srv.start_outage(2.0)
        start = time.monotonic()

        async def go():
            return await asyncio.gather(*(client.chat(decompose_messages(f"Problem {i}?")) for i in range(10)))

        results = run(go())
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert time.monotonic() - start >= 1.9
        assert srv.stats()["by_outcome"]["outage"] <= 20  # 10 first tries, then a few probes
        assert governor.breaker.opened >= 1


def test_the_first_call_to_meet_an_outage_is_not_charged_before_others_can_arrive():
    """At an outage's start one call can be alone for a moment: its quick retries all fail before a
    second call's first failure reaches the governor. Charged as a lone call, it would fail its row
    (it did, in a collection test with 20-100 ms backoff); the outage is the pool's."""
    with TeacherServer(model=MODEL, account=AccountFaults()) as srv:
        governor = Governor(GovernorConfig(breaker=BreakerConfig(cooldown_s=0.3, patience_s=30.0)))
        client = client_for(srv, governor)
        srv.start_outage(2.0)

        async def go():
            first = asyncio.create_task(client.chat(decompose_messages("Problem 0?")))
            await asyncio.sleep(0.6)  # several times the first call's whole retry budget (3 x <= 50 ms)
            later = [client.chat(decompose_messages(f"Problem {i}?")) for i in (1, 2)]
            return await asyncio.gather(first, *later)

        results = run(go())
    assert all(r.ok for r in results), [(r.attempts, r.error) for r in results]
    assert governor.breaker.opened >= 1


def test_a_lone_call_that_keeps_failing_is_its_own_fault_not_an_outage():
    """One call whose content always fails (a poisoned prompt, a follow-up the server refuses) and
    nothing else in flight: once the grace has passed (no other call failed), its failures are the
    call's, so it fails after max_attempts more, instead of opening the breaker and waiting out the
    whole patience as if the endpoint were down (which, at the end of a run, stalled collection for
    patience_s = 10 minutes)."""
    plan = FaultPlan(rate=1.0, kinds=("500",), persistent=("500",))
    with TeacherServer(model=MODEL, faults=plan) as srv:
        governor = Governor(GovernorConfig(breaker=BreakerConfig(cooldown_s=0.5, patience_s=30.0,
                                                                 lone_grace_s=1.0)))
        start = time.monotonic()
        r = run(client_for(srv, governor).chat(decompose_messages("How many apples?")))
        took = time.monotonic() - start
    assert not r.ok and r.refused is None and r.attempts > 3, (r.refused, r.attempts)
    assert 1.0 <= took < 10
    assert governor.breaker.opened == 0


def test_evaluation_keeps_max_attempts_exact_for_a_call_failing_alone():
    """Evaluation's clients have no lone grace: `--max-attempts 3` is 3 attempts, and the record is
    retried by the next run (tests/test_eval_faults.py) instead of by more attempts now."""
    from subq.evaluation.clients import eval_governor

    plan = FaultPlan(rate=1.0, kinds=("500",), persistent=("500",))
    with TeacherServer(model=MODEL, faults=plan) as srv:
        r = run(client_for(srv, eval_governor()).chat(decompose_messages("How many apples?")))
        assert not r.ok and r.attempts == 3 and srv.stats()["requests"] == 3


def test_an_outage_past_the_patience_refuses_calls_without_failing_them():
    with TeacherServer(model=MODEL, account=AccountFaults()) as srv:
        governor = Governor(GovernorConfig(breaker=BreakerConfig(cooldown_s=0.2, patience_s=1.0)))
        client = client_for(srv, governor)
        srv.start_outage(60.0)

        async def go():
            return await asyncio.gather(*(client.chat(decompose_messages(f"Problem {i}?")) for i in range(8)))

        results = run(go())
    assert all(r.refused == "outage" or (not r.ok and "InternalServerError" in r.error) for r in results)
    assert sum(r.refused == "outage" for r in results) >= 5


def test_usage_cost_finish_reason_and_missing_usage():
    with TeacherServer(model=MODEL) as srv:
        r = run(client_for(srv).chat(decompose_messages("How many apples?"), n=2, max_tokens=3))
        st = srv.stats()
    assert r.ok and r.finish_reasons == ["length", "length"] and r.tokens_out == 6
    assert r.cost_usd == pytest.approx((st["prompt_tokens"] * 1.0 + st["completion_tokens"] * 2.0) / 1e6)
    assert r.charged_usd == r.cost_usd
    with TeacherServer(model=MODEL, faults=FaultPlan(rate=1.0, kinds=("no_usage",))) as srv:
        r = run(client_for(srv).chat(decompose_messages("How many apples?")))
    assert r.ok and not r.usage_known and r.cost_usd is None
    assert r.charged_usd > 0  # the budget counts the worst case of a call it cannot price
