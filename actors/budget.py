"""A $ budget that is a cap: reserve each call's worst case before sending, settle after.

``spent + reserved <= limit`` holds at every moment, so however many calls are in flight the
money spent never exceeds the budget by more than what was reserved, and the reservations never
exceed the budget. A call is settled with what it cost: its priced usage, or its worst case when
the cost is unknown (no usage in the response, or a timeout after which the API may still bill).
``spent_before`` is the spend already in the store, so a resumed run continues the same budget.
"""

from __future__ import annotations


class Budget:
    def __init__(self, limit_usd: float, spent_before_usd: float = 0.0):
        if limit_usd < 0:
            raise ValueError(f"the budget must be >= 0, got {limit_usd}")
        self.limit = limit_usd
        self.spent = spent_before_usd  # settled spend, the store's earlier spend included
        self.reserved = 0.0  # worst cases of the calls in flight

    def reserve(self, worst_usd: float) -> bool:
        """Hold ``worst_usd`` for one call; False (and nothing held) if it does not fit."""
        if self.spent + self.reserved + worst_usd > self.limit + 1e-12:
            return False
        self.reserved += worst_usd
        return True

    def settle(self, worst_usd: float, charged_usd: float) -> None:
        """Release a reservation and count what the call cost (0 for an unbilled failure)."""
        self.reserved = max(0.0, self.reserved - worst_usd)
        self.spent += charged_usd

    def left(self) -> float:
        return max(0.0, self.limit - self.spent - self.reserved)
