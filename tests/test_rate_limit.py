"""The shared limiter's schedule, the price table and key redaction (pure Python, no Ray)."""

from __future__ import annotations

import pytest
from subq.actors.prices import PriceTable
from subq.actors.rate_limit import RateLimiter
from subq.actors.teacher import redact


def test_requests_per_minute_spaces_reservations_after_the_burst():
    lim = RateLimiter(requests_per_minute=600, burst_s=0.0, headroom=1.0)  # one request per 100 ms
    waits = [lim.reserve().wait_s for _ in range(5)]
    # back-to-back reservations are pushed 0.1 s apart on the limiter's clock
    assert waits[0] == 0.0
    assert [round(b - a, 2) for a, b in zip(waits, waits[1:], strict=False)] == [0.1] * 4


def test_burst_allows_a_second_of_capacity_without_waiting():
    lim = RateLimiter(requests_per_minute=600, burst_s=1.0, headroom=1.0)
    waits = [lim.reserve().wait_s for _ in range(12)]
    assert all(w == 0 for w in waits[:10])
    assert waits[-1] == pytest.approx(0.1, abs=0.02)


def test_tokens_per_minute_limits_big_requests():
    lim = RateLimiter(tokens_per_minute=6000, burst_s=0.0, headroom=1.0)  # 100 tokens/s
    assert lim.reserve(est_tokens=200).wait_s == 0.0
    assert lim.reserve(est_tokens=100).wait_s == pytest.approx(2.0, abs=0.05)


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


def test_dated_snapshots_resolve_to_their_family_unless_listed():
    prices = PriceTable()
    assert prices.cost("gpt-4o-2024-08-06", 1_000_000, 0) == prices.cost("gpt-4o", 1_000_000, 0) == 2.5
    assert prices.cost("gpt-4o-2024-05-13", 1_000_000, 0) == 5.0  # listed: its own launch price
    assert prices.cost("gpt-3.5-turbo-0125", 0, 1_000_000) == 1.5
    assert prices.cost("openai/gpt-4o-mini-2024-07-18", 1_000_000, 0) == 0.15
    assert prices.knows("o3-2025-04-16") and prices.knows("gpt-5-mini-2025-08-07")
    assert not prices.knows("gpt-4o-mini-tts")  # a different product, not a snapshot


def test_cached_input_is_priced_at_the_cached_rate_and_missing_usage_is_unknown():
    prices = PriceTable()
    full = prices.cost("gpt-4.1", 1_000_000, 0)
    half_cached = prices.cost("gpt-4.1", 1_000_000, 0, cached_in=500_000)
    assert full == 2.0 and half_cached == pytest.approx(0.5 * 2.0 + 0.5 * 0.5)
    assert prices.cost("gpt-3.5-turbo", 1_000_000, 0, cached_in=1_000_000) == 0.5  # no cache discount
    assert prices.cost("gpt-4.1", None, None) is None
    assert prices.worst_case("gpt-4.1", 1000, 500) == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1e6)


def test_price_file_with_a_cached_rate_and_a_bad_entry(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"prices": {"m": [1.0, 2.0, 0.1]}}')
    assert PriceTable.from_json(str(good)).cost("m", 1_000_000, 0, cached_in=1_000_000) == pytest.approx(0.1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"prices": {"m": 3}}')
    with pytest.raises(ValueError, match="must be"):
        PriceTable.from_json(str(bad))


def test_requests_are_scheduled_with_headroom_below_the_limit():
    lim = RateLimiter(requests_per_minute=600, burst_s=0.0)  # 95% of 10/s
    waits = [lim.reserve().wait_s for _ in range(20)]
    assert waits[-1] == pytest.approx(19 / 9.5, abs=0.01)
