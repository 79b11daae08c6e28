"""How many pixels one worker decodes at once, and giving the memory back after a spike.

A decoded image costs far more than its file: a 111 KB WebP of 7900x7900 (62 MP) took about 0.7 GB of the API worker
while Pillow decoded and converted it, so 16 such requests at once would want 11 GB. Every decode therefore holds its
pixel count from a per-worker :class:`PixelBudget` (``ZSS_DECODE_BUDGET_MP``) from the moment its header is read to the
moment its RGB image is made; a decode that does not get its share within ``wait_s`` is refused with 503 and
``Retry-After`` (the client retries; nothing was lost). An image larger than the whole budget waits until it can run
alone. JPEGs are draft-decoded at a reduced DCT scale first (imaging/decode.py), so they hold only what they decode;
WebP and PNG cannot be decoded at a reduced scale by Pillow (libwebp's scaling is not exposed, and PNG rows must be
inflated in full), so the budget is their answer.

glibc keeps freed memory in its per-thread arenas: after a burst the worker stayed at twice its resting size. When
the last decode of a burst that decoded at least ``TRIM_AFTER_PIXELS`` ends, ``malloc_trim(0)`` hands the free pages
back to the system (a few milliseconds; glibc only, elsewhere a no-op).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import time
from collections.abc import Iterator

from errors import Unavailable

TRIM_AFTER_PIXELS = 16_000_000
BUSY = "The server is decoding too many image pixels at once; retry later."


class DecodeBusy(Unavailable):
    headers = {"Retry-After": "1"}  # noqa: RUF012 - a class default the handler reads, never mutated


M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD_BYTES = 4 * 2**20


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def large_blocks_to_the_system() -> bool:
    """Make glibc serve every allocation of 4 MiB or more with its own mapping, returned to the system when freed.

    Pillow holds pixels in 16 MiB blocks, under glibc's dynamic mmap threshold (it rises to 32 MiB after the first
    large free), so a decoded image's blocks came from the decoding thread's arena and stayed there once freed: with
    16 threads each arena kept its last image, and 16 concurrent 60 MP WebPs peaked at 7.6 GB although the budget let
    only two decode at once (BENCHMARKS.md). A fixed threshold ends that; True where it was set (glibc)."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
    except AttributeError:  # not glibc
        return False


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PixelBudget:
    """A counting budget of pixels decoded at once, shared by the threads of one worker."""

    def __init__(self, max_pixels: int, wait_s: float = 10.0) -> None:
        if max_pixels <= 0:
            raise ValueError("max_pixels must be > 0")
        self.max_pixels = int(max_pixels)
        self.wait_s = float(wait_s)
        self.in_use = 0
        self.peak = 0  # the most held at once (tests and benchmarks read it)
        self._since_trim = 0
        self._cond = threading.Condition()
        large_blocks_to_the_system()  # once per worker in practice: one budget per engine

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` (at most the whole budget) while the block runs; DecodeBusy (503) after ``wait_s``."""
        need = max(1, min(int(pixels), self.max_pixels))
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.in_use + need > self.max_pixels:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DecodeBusy(BUSY)
                self._cond.wait(left)
            self.in_use += need
            self.peak = max(self.peak, self.in_use)
        trim = False
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= need
                self._since_trim += need
                if self.in_use == 0 and self._since_trim >= TRIM_AFTER_PIXELS:
                    self._since_trim, trim = 0, True
                self._cond.notify_all()
            if trim:
                _malloc_trim()
