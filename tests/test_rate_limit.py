"""The shared limiter's schedule and budget, and the price table (pure Python, no Ray)."""

from __future__ import annotations

import pytest

from actors.prices import PriceTable
from actors.rate_limit import RateLimiter
from actors.teacher import redact


def test_requests_per_minute_spaces_reservations_after_the_burst():
    lim = RateLimiter(requests_per_minute=600, burst_s=0.0)  # one request per 100 ms
    waits = [lim.reserve().wait_s for _ in range(5)]
    # back-to-back reservations are pushed 0.1 s apart on the limiter's clock
    assert waits[0] == 0.0
    assert [round(b - a, 2) for a, b in zip(waits, waits[1:], strict=False)] == [0.1] * 4


def test_burst_allows_a_second_of_capacity_without_waiting():
    lim = RateLimiter(requests_per_minute=600, burst_s=1.0)
    waits = [lim.reserve().wait_s for _ in range(12)]
    assert all(w == 0 for w in waits[:10])
    assert waits[-1] == pytest.approx(0.1, abs=0.02)


def test_tokens_per_minute_limits_big_requests():
    lim = RateLimiter(tokens_per_minute=6000, burst_s=0.0)  # 100 tokens/s
    assert lim.reserve(est_tokens=200).wait_s == 0.0
    assert lim.reserve(est_tokens=100).wait_s == pytest.approx(2.0, abs=0.05)


def test_budget_stops_new_reservations_once_spent():
    lim = RateLimiter(budget_usd=0.01)
    assert lim.reserve().allowed
    lim.record(1000, 0.006)
    assert lim.reserve().allowed
    lim.record(1000, 0.006)
    assert not lim.reserve().allowed
    assert lim.budget_left() == 0.0


def test_unknown_price_is_none_not_zero():
    prices = PriceTable()
    assert prices.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert prices.cost("some-unlisted-model", 10, 10) is None
    assert prices.with_price("local", 0, 0).cost("local", 10, 10) == 0.0


def test_price_table_file_overrides(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"version": "mine-1", "prices": {"my-model": [1.0, 2.0]}}')
    table = PriceTable.from_json(str(path))
    assert table.version == "mine-1"
    assert table.cost("my-model", 1_000_000, 0) == 1.0
    assert table.knows("gpt-4o")


def test_redact_removes_the_key_and_key_like_strings():
    key = "sk-test-ABCDEFGHIJKLMNOP1234"
    msg = f"AuthenticationError: Incorrect API key provided: {key} and sk-abc***wxyz"
    out = redact(msg, [key])
    assert key not in out and "sk-abc" not in out
    assert out.count("[redacted]") == 2
