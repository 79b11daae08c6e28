"""Admission of image requests in the API worker, before their images are decoded (issue 18, item 2).

A request waits here, undecoded and using no CPU, until the image encoder can be expected to answer it within
``ZSS_IMAGE_MAX_LATENCY_MS`` of its arrival; it is refused (503 + ``Retry-After``) once that can no longer happen.

Why not only the encoder's own shedding (runners/batcher.py): the encoder can refuse a request only after the API has
read and decoded its image. Under a closed loop of clients that retry at once those refusals came straight back, and
decoding the retries took the CPU from the model: with a 3 s bound the 200 answers took 7-10 s (BENCHMARKS.md,
overload). A refusal here comes when the request can no longer make its bound, not sooner: a refusal as soon as the
queue looks long invites an immediate retry and costs as much CPU as an answer. So every answer, 200 or 503, comes
within the bound plus about one batch, and a client that retries at once retries about once per bound.

The expected answer time of a request admitted now is ``now + fastest + in_flight / rate``: ``fastest`` is the
quickest admission-to-answer time over the last ``window_s`` (the call to the encoder and a batch, with nothing ahead),
``in_flight`` the images admitted before it and not answered yet, ``rate`` the images answered per second of *busy*
time (time with images in flight) over the window, as this worker sees them. Busy time, not wall time: a lightly
loaded server is not mistaken for a slow one. A waiting request is admitted as soon as it fits, and refused once even
``fastest`` would bring its answer after its deadline. Waiting requests are looked at oldest first, but a newer one
that fits goes before an older one that does not: under overload the oldest can no longer make their bound, and
serving them first would make every answer late. With nothing in flight, or nothing measured yet (a fresh worker), a
request is admitted (the encoder's own bound still applies), so the measurements never go stale.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from errors import Unavailable

WINDOW_S = 10.0  # how far back the encoder's rate is measured: long enough to span batches, short enough to follow load


class Refused(Unavailable):
    """A 503 with ``Retry-After``: the request cannot be answered within the latency bound now."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


@dataclass
class _Waiter:
    n: int
    deadline: float
    future: asyncio.Future[None]


class Admission:
    """Admits image requests while the encoder can be expected to answer them within ``bound_s`` (see the module).

    ``clock`` is read for every time it measures (tests drive it by hand); its waits use the event loop's timers.
    Use it from one event loop.
    """

    def __init__(self, bound_s: float, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.bound_s = bound_s
        self.window_s = window_s
        self._clock = clock
        self.in_flight = 0  # images admitted and not yet answered (decoding or encoding)
        self.refused = 0
        self._waiting: deque[_Waiter] = deque()
        self._answered = 0  # images answered, ever
        self._busy = 0.0  # seconds with images in flight, ever, up to _busy_since
        self._busy_since: float | None = None
        # (time, answered, busy) at each answer; the first entry is the baseline of the window
        self._history: deque[tuple[float, int, float]] = deque()
        # (time, latency) of the answers in the history whose latency no later answer beat: its head is the fastest
        # (a sliding-window minimum, so no request scans the window)
        self._fastest: deque[tuple[float, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    # -- public ---------------------------------------------------------------------------------------------------
    @asynccontextmanager
    async def admit(self, n: int, arrived: float) -> AsyncIterator[None]:
        """Wait until ``n`` images that arrived at ``arrived`` (this clock) may go on; ``Refused`` if they cannot be
        answered in time. The images count as answered when the block ends without an exception."""
        await self._enter(n, arrived + self.bound_s)
        started = self._clock()
        answered = False
        try:
            yield
            answered = True
        finally:
            self._leave(n, self._clock() - started if answered else None)

    def rate(self) -> float | None:
        """Images answered per busy second over the last ``window_s`` (None: not measured yet)."""
        self._trim()
        if len(self._history) < 2:  # a single answer: the busy time it took is not known
            return None
        _, answered0, busy0 = self._history[0]
        _, answered1, busy1 = self._history[-1]
        return (answered1 - answered0) / (busy1 - busy0) if busy1 > busy0 else None

    def fastest(self) -> float | None:
        """The quickest admission-to-answer time over the last ``window_s`` (None: not measured yet)."""
        self._trim()
        return self._fastest[0][1] if self._fastest else None

    def _trim(self) -> None:
        # The baseline is the last answer at or before the window's start, so the window always has a start.
        now = self._clock()
        while len(self._history) > 1 and self._history[1][0] <= now - self.window_s:
            self._history.popleft()
        while self._fastest and self._fastest[0][0] < self._history[0][0]:
            self._fastest.popleft()

    def waiting(self) -> int:
        return sum(1 for w in self._waiting if not w.future.done())

    def recheck(self) -> None:
        """Look at the waiting requests again now (a timer does it when the next one becomes hopeless; so can a test
        that moves the clock by hand)."""
        self._pump()

    # -- internals ------------------------------------------------------------------------------------------------
    async def _enter(self, n: int, deadline: float) -> None:
        if not self._waiting and self._fits(n, deadline, self._clock(), self.rate(), self.fastest()):
            self._start(n)
            return
        waiter = _Waiter(n, deadline, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._pump()
        try:
            await waiter.future
        except asyncio.CancelledError:  # the client went away while waiting: it holds no place any more
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._leave(n, None)  # admitted in the same instant: give the place back
            raise

    def _fits(self, n: int, deadline: float, now: float, rate: float | None, fastest: float | None) -> bool:
        if rate is None or fastest is None or self.in_flight == 0:
            return True  # nothing measured yet, or nothing to wait for: the encoder's own bound decides
        return now + fastest + self.in_flight / rate <= deadline

    @staticmethod
    def _due(w: _Waiter, rate: float | None, fastest: float | None) -> float | None:
        """When the waiter becomes hopeless: even the fastest recent answer, or its own images alone drained at the
        rate, would come after its deadline (None: nothing measured)."""
        if rate is None or fastest is None:
            return None
        return w.deadline - max(fastest, w.n / rate)

    def _start(self, n: int) -> None:
        if self.in_flight == 0:
            self._busy_since = self._clock()
        self.in_flight += n

    def _leave(self, n: int, latency: float | None) -> None:
        """``latency``: admission to answer; None when the images were not answered (refused by the encoder, bad)."""
        now = self._clock()
        self.in_flight -= n
        if self._busy_since is not None:
            self._busy += now - self._busy_since
            self._busy_since = now if self.in_flight > 0 else None
        if latency is not None:
            self._answered += n
            self._history.append((now, self._answered, self._busy))
            while self._fastest and self._fastest[-1][1] >= latency:
                self._fastest.pop()
            self._fastest.append((now, latency))
        self._pump()

    def _pump(self) -> None:
        """Refuse the waiters that can no longer make it, admit those that fit (oldest first), and wake up again when
        the next waiter would become hopeless (so its refusal is not late)."""
        now = self._clock()
        rate, fastest = self.rate(), self.fastest()  # once per check: they change only as answers come
        kept: deque[_Waiter] = deque()
        for w in self._waiting:
            if w.future.done():
                continue
            due = self._due(w, rate, fastest)
            if due is not None and now > due:
                self.refused += 1
                w.future.set_exception(
                    Refused(
                        f"The image encoder cannot answer within {self.bound_s:g} s now "
                        f"(ZSS_IMAGE_MAX_LATENCY_MS); retry later.",
                        (self.in_flight + w.n) / (rate or 1.0),
                    )
                )
            else:
                kept.append(w)
        self._waiting = kept
        for w in list(self._waiting):
            if not self._fits(w.n, w.deadline, now, rate, fastest):
                continue
            self._waiting.remove(w)
            self._start(w.n)
            w.future.set_result(None)
        self._arm(now, rate, fastest)

    def _arm(self, now: float, rate: float | None, fastest: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        dues = [d for w in self._waiting if (d := self._due(w, rate, fastest)) is not None]
        if not dues:
            return
        due = min(dues)
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - now) + 1e-3, self._pump)
