"""Waiting on a condition, with a deadline that only catches a hang: tests wait for what they need to see, never for
a fixed time, so they pass on a machine of any speed and fail with a message instead of hanging."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Generous: a deadline here means "it will never happen", not "it was slow" (a busy 2-core machine is ~5x slower).
DEFAULT_DEADLINE_S = 120.0


def wait_for(probe: Callable[[], T], what: str, deadline_s: float = DEFAULT_DEADLINE_S, every_s: float = 0.05) -> T:
    """Call ``probe()`` until it returns something truthy and return that; fail naming ``what`` after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline_s:g} s (last seen: {value!r})")
        time.sleep(every_s)
