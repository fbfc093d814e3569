"""The decoding engine of a Serve replica: one thread runs a :class:`~serve.generation.BatchDecoder`.

Requests are queued from the event loop (:class:`RequestStream`) and join the running batch between
decoding steps, as long as the batch has room for their ``n`` rows (``max_rows``); finished, failed
and cancelled rows leave it at once. So a short request that arrives while a long one decodes starts
at the next step instead of waiting for the whole batch (no head-of-line blocking).

When the engine is idle it waits up to ``wait_s`` for company before the first prefill, so requests
sent together share one. All model work happens in the engine thread: the event loop stays free for
``/health``, request parsing and streaming, and never touches the model.

Admission (how many requests may wait, who goes first) is :mod:`serve.admission`'s, in the event
loop: a request reaches the engine only with its rows granted, so the engine's own queue stays short.
If the thread dies on an unexpected error, every request in it fails with a 503, new ones are refused
and :attr:`Engine.alive` turns False (``/health`` answers 503, Serve's health check restarts the replica).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from subq.serve.generation import BatchDecoder, Completion, Delta, Event, Failed, Finished, Request
from subq.serve.sampling import SamplingParams

if TYPE_CHECKING:
    from subq.serve.admission import Ticket
    from subq.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineStats(dict):
    """Counters of one replica (``GET /stats``): they let tests and benchmarks check batching without timing."""

    def __init__(self) -> None:
        super().__init__(requests=0, prompt_tokens=0, completion_tokens=0, admitted_requests=0, rows=0,
                         prefills=0, steps=0, row_steps=0, forward_passes=0, max_batch_rows=0, max_batch_requests=0,
                         failed_requests=0, cancelled_requests=0, running_rows=0, queued_requests=0,
                         decode_seconds=0.0)

    def request(self, prompt_tokens: int, completion_tokens: int) -> None:
        """A request answered in full (what usage billed)."""
        self["requests"] += 1
        self["prompt_tokens"] += prompt_tokens
        self["completion_tokens"] += completion_tokens


class Engine:
    """A decoding thread and its queue; ``submit`` is safe from any thread."""

    def __init__(self, decoder: BatchDecoder, *, max_rows: int, wait_s: float, stats: EngineStats | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.decoder, self.max_rows, self.wait_s = decoder, max_rows, wait_s
        self.stats = stats if stats is not None else EngineStats()
        self.metrics = metrics
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.error: str | None = None  # why the thread died, if it did
        self._admitting: list[Request] = []  # taken from the queue, not yet rows: failed too if the thread dies
        self._thread = threading.Thread(target=self._run, name="subq-decode", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        if request.params.n > self.max_rows:
            raise ValueError(f"n={request.params.n} is more than this engine's {self.max_rows} rows")
        with self._cv:
            if self._closed or self.error is not None:
                raise RuntimeError(f"the engine is not running ({self.error or 'shut down'})")
            self._queue.append(request)
            self.stats["queued_requests"] = len(self._queue)
            self._cv.notify()

    def wake(self) -> None:
        """Let the thread notice a cancellation of a queued request promptly."""
        with self._cv:
            self._cv.notify()

    @property
    def alive(self) -> bool:
        """The decoding thread runs and takes requests (what ``/health`` reports)."""
        return self._thread.is_alive() and not self._closed and self.error is None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug, not a request's fault: fail everything rather than hang it
            logger.exception("the decoding engine died")
            with self._cv:
                self.error = f"the decoding engine died ({type(e).__name__})"
                try:
                    self.decoder.cancel_all(self.error)
                finally:
                    while self._queue:
                        self._admitting.append(self._queue.popleft())
                    for r in self._admitting:  # those being admitted (not in a row yet) and those queued
                        if not r.done:
                            r.done = r.failed = True
                            r.send(Failed(self.error, 503))

    def _loop(self) -> None:
        while True:
            admit = self._next_admissions()
            if admit is None:
                return
            start = time.perf_counter()
            passes = self.decoder.forward_passes
            before = len(self.decoder.rows)  # rows that get their next token in this iteration's step
            self._admitting = admit
            if admit:
                self.decoder.admit(admit)
                self.stats["prefills"] += 1
                self.stats["admitted_requests"] += len(admit)
                self.stats["rows"] += sum(r.params.n for r in admit)
                if self.metrics is not None:
                    now = time.monotonic()
                    for r in admit:
                        if not r.failed and not r.cancelled:  # its first tokens were chosen in the prefill
                            self.metrics.ttft.observe(now - r.arrival)
            stepped = time.perf_counter()
            if self.decoder.rows:
                self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(self.decoder.rows))
                self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], self.decoder.live_requests)
                self.stats["row_steps"] += len(self.decoder.rows)  # / steps: the mean batch of a step
                new = max(0, len(self.decoder.rows) - before)
                self.decoder.step()
                self.stats["steps"] += 1
                if self.metrics is not None:  # old rows waited for the prefill too; new ones only for the step
                    end = time.perf_counter()
                    self.metrics.token_intervals(end - start, before)
                    self.metrics.token_intervals(end - stepped, new)
            self.stats["forward_passes"] += self.decoder.forward_passes - passes
            self.stats["decode_seconds"] += time.perf_counter() - start
            self.stats["running_rows"] = len(self.decoder.rows)

    def _next_admissions(self) -> list[Request] | None:
        """The queued requests that fit the batch now (FIFO), waiting while there is no work; None: shut down."""
        with self._cv:
            while not self._queue and not self.decoder.rows and not self._closed:
                self._cv.wait()
            if self._closed:
                self._shutdown()
                return None
            if not self.decoder.rows and self.wait_s > 0:  # idle: let simultaneous requests arrive together
                deadline = time.monotonic() + self.wait_s
                while sum(r.params.n for r in self._queue) < self.max_rows and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            room = self.max_rows - len(self.decoder.rows)
            admit: list[Request] = []
            while self._queue and self._queue[0].params.n <= room:
                request = self._queue.popleft()
                if request.cancelled:  # its client left while it queued (counted by RequestStream.cancel)
                    continue
                admit.append(request)
                room -= request.params.n
            self.stats["queued_requests"] = len(self._queue)
            return admit

    def _shutdown(self) -> None:
        self.decoder.cancel_all("the server is shutting down")
        while self._queue:
            self._queue.popleft().send(Failed("the server is shutting down", 503))


class RequestError(Exception):
    """A request the engine could not answer: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class RequestStream:
    """The event-loop side of one request: submit it, then read its events or its result.

    Cancelling (or leaving :meth:`events` early, e.g. when the client disconnects) frees its rows
    at the engine's next step.
    """

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, *, stream: bool = False,
                 ticket: Ticket | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.engine = engine
        self.request = Request(prompt, params, lambda e: loop.call_soon_threadsafe(self._events.put_nowait, e),
                               stream=stream)
        if ticket is not None:  # TTFT and end-to-end latency count from arrival, queueing included
            self.request.arrival = ticket.arrival
            ticket.handed_off = True
        self.ticket = ticket
        self._open = params.n
        self._finished: list[Completion] = []
        try:
            engine.submit(self.request)
        except RuntimeError as e:  # the engine is gone: the replica cannot serve (it reports unhealthy)
            self._release()
            raise RequestError(503, str(e)) from None

    async def events(self) -> AsyncIterator[Delta | Finished | Failed]:
        """Every event until the last sample finished or the request failed."""
        try:
            while self._open > 0:
                event = await self._events.get()
                if isinstance(event, Finished):
                    self._open -= 1
                    self._finished.append(event.completion)
                    if self._open == 0:
                        self._record()
                elif isinstance(event, Failed):
                    self._open = 0
                    self.engine.stats["failed_requests"] += 1
                yield event
        finally:
            self.cancel()

    async def result(self) -> list[Completion]:
        """The ``n`` completions in order; raises :class:`RequestError` for a failed request."""
        found: dict[int, Completion] = {}
        async for event in self.events():
            if isinstance(event, Failed):
                raise RequestError(event.status, event.message)
            if isinstance(event, Finished):
                found[event.index] = event.completion
        return [found[k] for k in sorted(found)]

    def cancel(self) -> None:
        if not self.request.done and not self.request.cancelled:
            self.request.cancelled = True
            self.engine.stats["cancelled_requests"] += 1
            self.engine.wake()
        self._release()

    def _release(self) -> None:
        if self.ticket is not None:
            self.ticket.release()

    def _record(self) -> None:
        self._release()  # its rows are free in the engine already
        if self.engine.metrics is not None:
            self.engine.metrics.finished(time.monotonic() - self.request.arrival, len(self.request.prompt),
                                         (c.generated_tokens for c in self._finished),
                                         (c.finish_reason for c in self._finished))
