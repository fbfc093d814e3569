"""A versioned price table: USD per million tokens (input, output, cached input) per model.

The version is stored with every sample so old $ figures stay interpretable when prices change.
A dated snapshot (``gpt-4o-2024-08-06``, ``gpt-3.5-turbo-0125``) is priced as its family
(``gpt-4o``) unless the table lists the snapshot itself (some old snapshots cost more). A model
missing from the table has an *unknown* price: its cost is ``None``, never 0, and a
``--budget-usd`` cap cannot be enforced for it (collection refuses to start in that case). A
response without ``usage`` is priced unknown too. Locally served models (our own embedded
server) cost 0: that is a known price, not a guess.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

PRICE_TABLE_VERSION = "2026-11-01"
# The Batch API bills every token at this share of the standard price (OpenAI: 50%, answers
# within 24 h). The one source of truth: ``PriceTable.for_batch`` applies it to every entry.
BATCH_PRICE_FACTOR = 0.5

# model -> (USD per 1M input tokens, per 1M output tokens, per 1M cached input tokens or None
# when the model has no cache discount), list prices of the standard tier on PRICE_TABLE_VERSION.
# Reasoning tokens are output tokens.
DEFAULT_PRICES: dict[str, tuple[float, float, float | None]] = {
    "gpt-3.5-turbo": (0.50, 1.50, None),
    "gpt-4": (30.00, 60.00, None),
    "gpt-4-turbo": (10.00, 30.00, None),
    "gpt-4o": (2.50, 10.00, 1.25),
    "gpt-4o-2024-05-13": (5.00, 15.00, None),  # the first gpt-4o snapshot kept its launch price
    "gpt-4o-mini": (0.15, 0.60, 0.075),
    "gpt-4.1": (2.00, 8.00, 0.50),
    "gpt-4.1-mini": (0.40, 1.60, 0.10),
    "gpt-4.1-nano": (0.10, 0.40, 0.025),
    "gpt-5": (1.25, 10.00, 0.125),
    "gpt-5-mini": (0.25, 2.00, 0.025),
    "gpt-5-nano": (0.05, 0.40, 0.005),
    "gpt-5-chat-latest": (1.25, 10.00, 0.125),
    "o1": (15.00, 60.00, 7.50),
    "o1-mini": (1.10, 4.40, 0.55),
    "o3": (2.00, 8.00, 0.50),
    "o3-mini": (1.10, 4.40, 0.55),
    "o4-mini": (1.10, 4.40, 0.275),
}

# "-2024-08-06" (OpenAI dated snapshots) or "-0125" / "-0613" (the older MMDD form)
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


def model_family(model: str) -> str:
    """``openai/gpt-4o-2024-08-06`` -> ``gpt-4o``: no provider prefix, no snapshot date."""
    return _SNAPSHOT.sub("", model.rsplit("/", 1)[-1])


@dataclass
class PriceTable:
    prices: dict[str, tuple[float, float, float | None]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    version: str = PRICE_TABLE_VERSION

    def for_batch(self) -> PriceTable:
        """The same table at Batch API prices (``BATCH_PRICE_FACTOR`` of every rate); its version
        says so, and is stored with every sample priced by it."""
        f = BATCH_PRICE_FACTOR
        prices = {m: (i * f, o * f, None if c is None else c * f) for m, (i, o, c) in self.prices.items()}
        return PriceTable(prices, f"{self.version}+batch")

    def with_price(self, model: str, usd_in_per_m: float, usd_out_per_m: float,
                   usd_cached_in_per_m: float | None = None) -> PriceTable:
        return PriceTable({**self.prices, model: (usd_in_per_m, usd_out_per_m, usd_cached_in_per_m)}, self.version)

    def price(self, model: str) -> tuple[float, float, float | None] | None:
        """The model's own entry, else its family's (a dated snapshot), else None (unknown)."""
        if model in self.prices:
            return self.prices[model]
        bare = model.rsplit("/", 1)[-1]
        return self.prices.get(bare) or self.prices.get(model_family(model))

    def knows(self, model: str) -> bool:
        return self.price(model) is not None

    def cost(self, model: str, tokens_in: int | None, tokens_out: int | None, cached_in: int = 0) -> float | None:
        """Dollar cost of one call, or None when the price or the usage is unknown.

        ``cached_in`` of the ``tokens_in`` were served from the prompt cache (cheaper when the
        model has a cached-input price).
        """
        p = self.price(model)
        if p is None or tokens_in is None or tokens_out is None:
            return None
        usd_in, usd_out, usd_cached = p
        cached = min(max(cached_in, 0), tokens_in)
        cached_rate = usd_in if usd_cached is None else usd_cached
        return ((tokens_in - cached) * usd_in + cached * cached_rate + tokens_out * usd_out) / 1e6

    def worst_case(self, model: str, max_tokens_in: int, max_tokens_out: int) -> float | None:
        """The most one call can cost: every input token uncached, every output token used."""
        return self.cost(model, max_tokens_in, max_tokens_out)

    @classmethod
    def from_json(cls, path: str) -> PriceTable:
        """Extra or overriding prices: ``{"version": "...", "prices": {"model": [in, out] or
        [in, out, cached_in]}}`` (USD per million tokens)."""
        with open(path) as f:
            data = json.load(f)
        prices: dict[str, tuple[float, float, float | None]] = {}
        for m, p in data.get("prices", {}).items():
            if not isinstance(p, list | tuple) or len(p) not in (2, 3):
                raise ValueError(f"{path}: the price of {m!r} must be [in, out] or [in, out, cached_in]")
            prices[m] = (float(p[0]), float(p[1]), float(p[2]) if len(p) == 3 and p[2] is not None else None)
        return cls({**DEFAULT_PRICES, **prices}, str(data.get("version", f"{PRICE_TABLE_VERSION}+{path}")))
