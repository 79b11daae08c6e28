"""Refusing image requests at the door (issue 18, item 2): when the images already waiting for the image encoder would
take longer than the latency bound, a new request is answered 503 with Retry-After before it is read and decoded.

The image encoder sheds what cannot finish in time (runners/batcher.py), but only once a request has reached it: the
API has by then read and decoded it, time that pushed p99 past the bound. Here the API estimates the wait from what it
sees itself: images in flight to the encoder divided by the rate at which the encoder has been answering them (over
the last few seconds). No rate measured yet, or nothing in flight: admit (the encoder's own shedding still holds).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from errors import Unavailable


class Overloaded(Unavailable):
    """503 with a Retry-After (seconds) header."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, bound_s: float, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.bound_s = bound_s
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._inflight = 0
        self._done: deque[tuple[float, int]] = deque()  # (finished at, images)

    def _rate(self, now: float) -> float | None:
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()
        if not self._done:
            return None
        span = max(now - self._done[0][0], 0.5)
        return sum(n for _, n in self._done) / span

    def expected_wait_s(self) -> float:
        with self._lock:
            rate = self._rate(self.clock())
            return 0.0 if rate is None or self._inflight == 0 else self._inflight / rate

    def enter(self, images: int) -> None:
        """Count ``images`` in, or raise :class:`Overloaded` when the wait ahead of them is over the bound."""
        with self._lock:
            rate = self._rate(self.clock())
            if rate is not None and self._inflight and (wait := self._inflight / rate) > self.bound_s:
                retry = max(1, math.ceil(wait - self.bound_s))
                raise Overloaded(
                    f"The image encoder is overloaded (about {wait:.1f} s of images queued); retry later.", retry
                )
            self._inflight += images

    def leave(self, images: int, answered: bool) -> None:
        """Count ``images`` out; ``answered``: the encoder answered them (they count towards its rate)."""
        with self._lock:
            self._inflight -= images
            if answered:
                self._done.append((self.clock(), images))
