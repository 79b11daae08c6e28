"""LaneBatcher: rows come back to their own request, lanes share the work, a free lane holds only under load."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runners.batcher import LaneBatcher, Overloaded


class Gate:
    """A batch function whose first batch blocks until ``release()``: it keeps one lane busy on demand."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.started = threading.Event()
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        with self._lock:
            self.sizes.append(len(rows))
            first = len(self.sizes) == 1
        if first:
            self.started.set()
            self.first.wait(10)
        return rows * 2

    def release(self) -> None:
        self.first.set()


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)


async def _wait_started(gate: Gate) -> None:
    while not gate.started.is_set():
        await asyncio.sleep(0.001)


def test_each_request_gets_its_own_rows_back_in_order_even_when_split() -> None:
    async def main() -> None:
        b = LaneBatcher(lambda x: x * 2, lanes=2, max_batch=4)
        try:
            reqs = [rows(n, 100 * i) for i, n in enumerate([1, 10, 3, 4, 0, 7])]
            outs = await asyncio.gather(*(b.submit(r) for r in reqs))
            for r, o in zip(reqs, outs):
                np.testing.assert_array_equal(o, r * 2)
            assert max(b.stats.sizes) <= 4
            assert sum(b.stats.sizes) == 25
        finally:
            b.close()

    asyncio.run(main())


def test_callers_array_is_not_modified() -> None:
    async def main() -> None:
        b = LaneBatcher(lambda x: x * 2, lanes=1, max_batch=3)
        try:
            r = rows(5)
            before = r.copy()
            await b.submit(r)
            np.testing.assert_array_equal(r, before)
        finally:
            b.close()

    asyncio.run(main())


def test_idle_service_runs_a_lone_request_at_once() -> None:
    async def main() -> None:
        b = LaneBatcher(lambda x: x, lanes=2, max_batch=64, max_hold_s=5.0)
        try:
            t = time.monotonic()
            await b.submit(rows(1))
            assert time.monotonic() - t < 2.0  # far below the 5 s hold: an idle batcher does not hold
            assert b.stats.held == 0
        finally:
            b.close()

    asyncio.run(main())


async def _lane_busy(b: LaneBatcher, gate: Gate) -> asyncio.Future[np.ndarray]:
    """One row on an idle batcher; the gate holds it, so its lane stays busy until ``gate.release()``."""
    busy = asyncio.ensure_future(b.submit(rows(1)))
    await _wait_started(gate)
    return busy


async def _one_lane_busy(b: LaneBatcher, gate: Gate) -> asyncio.Future[np.ndarray]:
    """8 rows on two idle lanes split 4 + 4; the gate holds the first half, so lane 1 stays busy with 4 rows."""
    busy = asyncio.ensure_future(b.submit(rows(8)))
    await _wait_started(gate)
    while len(gate.sizes) < 2:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # let the second half's batch finish
    assert gate.sizes == [4, 4] and not busy.done()
    return busy


def test_free_lane_holds_for_its_share_while_the_other_lane_is_busy() -> None:
    async def main() -> None:
        gate = Gate()
        # hold_fraction out of the way: the gate's batches take no time, so a quarter of that would be no hold at all.
        b = LaneBatcher(gate, lanes=2, max_batch=64, max_hold_s=5.0, hold_fraction=1e6)
        try:
            busy = await _one_lane_busy(b, gate)
            t = time.monotonic()
            first = asyncio.ensure_future(b.submit(rows(1, 100)))
            await asyncio.sleep(0.05)
            assert gate.sizes == [4, 4]  # lane 2 holds instead of running a batch of 1
            # Lane 2's share is ceil((4 running + q queued) / 2): reached at q = 4, long before the 5 s hold ends.
            rest = [asyncio.ensure_future(b.submit(rows(1, 101 + i))) for i in range(3)]
            outs = await asyncio.gather(first, *rest)
            assert time.monotonic() - t < 2.0
            assert gate.sizes == [4, 4, 4]
            for i, o in enumerate(outs):
                np.testing.assert_array_equal(o, rows(1, 100 + i) * 2)
            assert not busy.done()
        finally:
            gate.release()
            b.close()
        np.testing.assert_array_equal(await busy, rows(8) * 2)

    asyncio.run(main())


def test_hold_is_bounded() -> None:
    async def main() -> None:
        gate = Gate()
        b = LaneBatcher(gate, lanes=2, max_batch=64, max_hold_s=0.05, hold_fraction=1e6)
        try:
            busy = await _one_lane_busy(b, gate)
            t = time.monotonic()
            out = await b.submit(rows(1, 50))  # share ceil(5 / 2) = 3, never reached: runs when the hold ends
            assert 0.04 < time.monotonic() - t < 3.0
            np.testing.assert_array_equal(out, rows(1, 50) * 2)
            assert gate.sizes == [4, 4, 1]
            assert not busy.done()  # it ran while lane 1 was still blocked
            assert b.stats.held >= 1
        finally:
            gate.release()
            b.close()
        await busy

    asyncio.run(main())


def test_hold_is_a_fraction_of_a_recent_batch() -> None:
    async def main() -> None:
        gate = Gate()
        b = LaneBatcher(gate, lanes=2, max_batch=64, max_hold_s=5.0)
        try:
            assert b.hold_s() == 5.0  # nothing measured yet
            busy = await _one_lane_busy(b, gate)
            assert b.hold_s() < 0.01  # the finished half took microseconds
            t = time.monotonic()
            await b.submit(rows(1, 50))
            assert time.monotonic() - t < 1.0
            assert gate.sizes == [4, 4, 1]
        finally:
            gate.release()
            b.close()
        await busy

    asyncio.run(main())


def test_two_lanes_split_a_queue_fairly_instead_of_one_taking_everything() -> None:
    async def main() -> None:
        def slow(x: np.ndarray) -> np.ndarray:
            time.sleep(0.05)
            return x

        b = LaneBatcher(slow, lanes=2, max_batch=64, max_hold_s=0.5)
        try:
            await asyncio.gather(*(b.submit(rows(1, i)) for i in range(16)))
            # 16 queued at once on two idle lanes: 8 each, not 16 on one lane and none on the other.
            assert sorted(b.stats.sizes) == [8, 8]
        finally:
            b.close()

    asyncio.run(main())


def test_one_lane_takes_everything_queued_without_holding() -> None:
    async def main() -> None:
        gate = Gate()
        b = LaneBatcher(gate, lanes=1, max_batch=64, max_hold_s=5.0)
        try:
            busy = await _lane_busy(b, gate)
            later = [asyncio.ensure_future(b.submit(rows(1, i))) for i in range(5)]
            await asyncio.sleep(0.02)
            gate.release()
            await asyncio.gather(busy, *later)
            assert gate.sizes == [1, 5]
            assert b.stats.held == 0
        finally:
            gate.release()
            b.close()

    asyncio.run(main())


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    async def main() -> None:
        calls = {"n": 0}

        def flaky(x: np.ndarray) -> np.ndarray:
            calls["n"] += 1
            if calls["n"] == 1:
                raise ValueError("boom")
            return x

        b = LaneBatcher(flaky, lanes=1, max_batch=8)
        try:
            with pytest.raises(ValueError, match="boom"):
                await b.submit(rows(2))
            np.testing.assert_array_equal(await b.submit(rows(2)), rows(2))
        finally:
            b.close()

    asyncio.run(main())


def test_wrong_row_count_from_the_model_is_an_error_not_a_misdelivery() -> None:
    async def main() -> None:
        b = LaneBatcher(lambda x: x[:1], lanes=1, max_batch=8)
        try:
            with pytest.raises(RuntimeError, match="returned 1 rows for 3"):
                await b.submit(rows(3))
        finally:
            b.close()

    asyncio.run(main())


def test_cancelled_request_is_never_run() -> None:
    async def main() -> None:
        gate = Gate()
        b = LaneBatcher(gate, lanes=1, max_batch=8)
        try:
            busy = await _lane_busy(b, gate)
            gone = asyncio.ensure_future(b.submit(rows(3, 10)))
            kept = asyncio.ensure_future(b.submit(rows(2, 20)))
            await asyncio.sleep(0.01)
            gone.cancel()
            gate.release()
            await busy
            np.testing.assert_array_equal(await kept, rows(2, 20) * 2)
            assert gate.sizes == [1, 2]
        finally:
            gate.release()
            b.close()

    asyncio.run(main())


def test_requests_queued_past_max_wait_are_shed_with_overloaded() -> None:
    async def main() -> None:
        gate = Gate()
        b = LaneBatcher(gate, lanes=1, max_batch=8, max_wait_s=0.05)
        try:
            busy = await _lane_busy(b, gate)
            late = asyncio.ensure_future(b.submit(rows(1)))
            await asyncio.sleep(0.15)
            gate.release()
            await busy
            with pytest.raises(Overloaded):
                await late
            assert b.stats.shed == 1
            assert gate.sizes == [1]
        finally:
            gate.release()
            b.close()

    asyncio.run(main())


def test_invalid_layout_is_refused() -> None:
    with pytest.raises(ValueError):
        LaneBatcher(lambda x: x, lanes=0, max_batch=8)
