"""A versioned price table: USD per million tokens, input and output, per model.

The version is stored with every sample so old $ figures stay interpretable when prices change.
A model missing from the table has an *unknown* price: its cost is ``None``, never 0, and a
``--budget-usd`` cap cannot be enforced for it (collection refuses to start in that case).
Locally served models (our own embedded server) cost 0: that is a known price, not a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

PRICE_TABLE_VERSION = "2026-11-01"

# (USD per 1M input tokens, USD per 1M output tokens), list prices on PRICE_TABLE_VERSION.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-3.5-turbo-0125": (0.50, 1.50),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}


@dataclass
class PriceTable:
    prices: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    version: str = PRICE_TABLE_VERSION

    def with_price(self, model: str, usd_in_per_m: float, usd_out_per_m: float) -> PriceTable:
        return PriceTable({**self.prices, model: (usd_in_per_m, usd_out_per_m)}, self.version)

    def knows(self, model: str) -> bool:
        return model in self.prices

    def cost(self, model: str, tokens_in: int, tokens_out: int) -> float | None:
        """Dollar cost of one call, or None when the model's price is unknown."""
        if model not in self.prices:
            return None
        usd_in, usd_out = self.prices[model]
        return (tokens_in * usd_in + tokens_out * usd_out) / 1e6

    @classmethod
    def from_json(cls, path: str) -> PriceTable:
        """Extra or overriding prices: ``{"version": "...", "prices": {"model": [in, out]}}``."""
        with open(path) as f:
            data = json.load(f)
        prices = {m: (float(p[0]), float(p[1])) for m, p in data.get("prices", {}).items()}
        return cls({**DEFAULT_PRICES, **prices}, str(data.get("version", f"{PRICE_TABLE_VERSION}+{path}")))
