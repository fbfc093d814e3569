"""Admission control of a serving replica: rows, a bounded queue, and a 429 at once beyond it.

Why the replica admits, not Serve: Serve's ``max_ongoing_requests`` is counted by the router before
a request reaches the replica, for every route alike, so with it near the batch size ``/health`` and
``/v1/models`` waited behind generations (11-30 s under 16 clients). Serve's ``max_queued_requests``
bounds that router queue but answers 503 (429 only through an alpha ``BackpressureConfig``), counts
requests rather than rows (``n=8`` needs 8), and still queues the cheap routes with the expensive
ones. So the deployments set a high ``max_ongoing_requests`` (every route reaches the replica at
once) and generation routes pass through an :class:`Admission` after validation: invalid requests
are refused before they queue, and a request beyond the free rows plus ``max_queued`` waiting ones
gets a 429 with ``Retry-After`` in OpenAI's error shape immediately.

Policy: FIFO with bounded bypass. Requests are granted rows in arrival order. When the oldest
waiting request needs more rows than are free (``n=8`` while 2 are free), later requests that fit
may go first, but only ``max_bypass`` of them (default: one batch of rows' worth); after that nobody
passes it and rows drain until it fits. So a large request waits at most for the running rows plus
``max_bypass`` small requests (no starvation of large ones), and small ones are not held behind a
large one while rows sit idle (no head-of-line blocking). Plain FIFO would idle rows; smallest-first
would starve large requests under steady small traffic.

Sizing the queue: a queued request waits about ``ceil(queued / rows)`` request durations; choose
``max_queued`` so that stays under your clients' timeout (no request is admitted only to time out).
``Retry-After`` is that estimate from the mean time a request held its rows, rounded up to seconds.

Usage in a route (the event loop of one replica; not thread-safe)::

    async with self.admission.rows(params.n) as ticket:
        stream = RequestStream(self.engine, prompt, params, ticket=ticket)   # the stream frees them
        ...
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from subq.serve.fields import ApiError

RETRY_AFTER_MAX_S = 60  # never tell a client to stay away longer than this


class Overloaded(ApiError):
    """429: every row is busy and the queue is full; come back after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(429, message, type="rate_limit_error", code="rate_limit_exceeded")
        self.retry_after_s = retry_after_s


class Ticket:
    """Rows granted to one request; :meth:`release` (idempotent) gives them back."""

    def __init__(self, admission: Admission, rows: int, arrival: float) -> None:
        self.admission, self.rows, self.arrival = admission, rows, arrival
        self.granted_at = time.monotonic()
        self.handed_off = False  # a RequestStream owns it now and releases it when the request ends
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.admission._release(self)


@dataclass(eq=False)
class _Waiter:
    rows: int
    arrival: float
    future: asyncio.Future = field(repr=False)
    bypassed: int = 0  # later requests granted before this one while it was the oldest


class Admission:
    """Grants rows to requests of one replica (see the module docstring for the policy)."""

    def __init__(self, max_rows: int, max_queued: int | None, *, max_bypass: int | None = None) -> None:
        if max_rows < 1 or (max_queued is not None and max_queued < 0):
            raise ValueError("max_rows must be >= 1 and max_queued >= 0 (or None: unbounded)")
        self.max_rows, self.max_queued = max_rows, max_queued
        self.max_bypass = max_rows if max_bypass is None else max_bypass
        self.running_rows = 0
        self.running_requests = 0
        self.rejected = 0  # 429s sent
        self._waiting: deque[_Waiter] = deque()
        self._hold_s = 0.0  # moving average of how long a request holds its rows (for Retry-After)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_rows(self) -> int:
        return self.max_rows - self.running_rows

    @asynccontextmanager
    async def rows(self, n: int) -> AsyncIterator[Ticket]:
        """Hold ``n`` rows for the block (or until a RequestStream given the ticket ends); raises
        :class:`Overloaded` at once when the queue is full."""
        ticket = await self.acquire(n)
        try:
            yield ticket
        except BaseException:
            ticket.release()
            raise
        if not ticket.handed_off:
            ticket.release()

    async def acquire(self, n: int) -> Ticket:
        if not 1 <= n <= self.max_rows:
            raise ApiError(400, f"n={n} needs more rows than this server's {self.max_rows}", param="n")
        arrival = time.monotonic()
        waiter = _Waiter(n, arrival, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._dispatch()
        if not waiter.future.done() and self.max_queued is not None and len(self._waiting) > self.max_queued:
            self._waiting.remove(waiter)  # it may not even queue: the caller gets a 429 now
            self.rejected += 1
            raise Overloaded(f"the server is at capacity ({self.running_rows} rows busy, {len(self._waiting)} "
                             f"requests queued); retry after {self.retry_after_s()} s", self.retry_after_s())
        try:
            return await waiter.future
        except asyncio.CancelledError:  # the client left while it queued (or just as it was granted)
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
                self._dispatch()  # it may have been the oldest, holding others back
            raise

    def retry_after_s(self) -> int:
        """Seconds until a retry likely finds room: the queue ahead, in request durations."""
        rounds = 1 + len(self._waiting) / self.max_rows
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(self._hold_s * rounds)))

    # ------------------------------------------------------------------------------ internals

    def _grant(self, waiter: _Waiter) -> None:
        self.running_rows += waiter.rows
        self.running_requests += 1
        waiter.future.set_result(Ticket(self, waiter.rows, waiter.arrival))

    def _release(self, ticket: Ticket) -> None:
        self.running_rows -= ticket.rows
        self.running_requests -= 1
        held = time.monotonic() - ticket.granted_at
        self._hold_s = held if self._hold_s == 0 else 0.8 * self._hold_s + 0.2 * held
        self._dispatch()

    def _dispatch(self) -> None:
        """FIFO with bounded bypass (module docstring)."""
        while self._waiting:
            head = self._waiting[0]
            if head.future.done():  # cancelled by its caller
                self._waiting.popleft()
                continue
            if head.rows <= self.free_rows:
                self._waiting.popleft()
                self._grant(head)
                continue
            for waiter in list(self._waiting)[1:]:
                if head.bypassed >= self.max_bypass or self.free_rows == 0:
                    break
                if waiter.rows <= self.free_rows and not waiter.future.done():
                    self._waiting.remove(waiter)
                    self._grant(waiter)
                    head.bypassed += 1
            return
