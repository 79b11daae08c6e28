"""LaneBatcher: rows come back to their own request, lanes share the work, a free lane holds only under load.

No test here measures wall time or sleeps to let something happen: the batcher runs on a ``FakeClock`` the test moves
by hand, and the tests wait on conditions (a batch started, a hold recorded, a request queued) with a generous deadline
that only fails a test that would otherwise hang.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from runners.batcher import LaneBatcher, Overloaded

DEADLINE_S = 10.0  # a condition not met by then fails the test; a passing test never gets near it


class FakeClock:
    """The batcher's clock: frozen unless a test (or a fake model's batch) moves it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.t

    def advance(self, dt: float) -> None:
        with self._lock:
            self.t += dt


class Gate:
    """A batch function whose first batch blocks until ``release()``: it keeps one lane busy on demand. Every other
    batch "takes" ``batch_s`` on ``clock`` (the clock moves while the batch runs)."""

    def __init__(self, clock: FakeClock | None = None, batch_s: float = 0.0) -> None:
        self.first = threading.Event()
        self.started = threading.Event()
        self.sizes: list[int] = []
        self.clock = clock
        self.batch_s = batch_s
        self._lock = threading.Lock()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        with self._lock:
            self.sizes.append(len(rows))
            first = len(self.sizes) == 1
        if first:
            self.started.set()
            if not self.first.wait(DEADLINE_S):  # fail loudly rather than let a stuck test pass late
                raise RuntimeError("the gate was never released")
        elif self.clock is not None:
            self.clock.advance(self.batch_s)
        return rows * 2

    def release(self) -> None:
        self.first.set()


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)


async def until(cond: Callable[[], bool], what: str) -> None:
    """Wait for ``cond`` (checked every millisecond); fail the test if it is not met within the deadline."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        await asyncio.sleep(0.001)


async def within_deadline(aw: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> Any:
    try:
        return await asyncio.wait_for(aw, DEADLINE_S)
    except TimeoutError:
        pytest.fail("the batcher did not answer (a hold or a queue that never ends)")


class Submitter:
    """Submits requests as tasks and knows when each is in the batcher's queue: ``submit`` queues the request before
    its first await, so once a task has entered it, the request is queued."""

    def __init__(self, b: LaneBatcher) -> None:
        self.b = b
        self.entered = 0

    def __call__(self, r: np.ndarray) -> asyncio.Task[np.ndarray]:
        async def go() -> np.ndarray:
            self.entered += 1
            return await self.b.submit(r)  # no await between the count and the enqueue

        return asyncio.ensure_future(go())

    async def queued(self, n: int) -> None:
        await until(lambda: self.entered >= n, f"{n} requests queued")


async def _lane_busy(b: LaneBatcher, gate: Gate) -> asyncio.Future[np.ndarray]:
    """One row on an idle batcher; the gate holds it, so its lane stays busy until ``gate.release()``."""
    busy = asyncio.ensure_future(b.submit(rows(1)))
    await until(gate.started.is_set, "the gated batch started")
    return busy


async def _one_lane_busy(b: LaneBatcher, gate: Gate) -> asyncio.Future[np.ndarray]:
    """8 rows on two idle lanes split 4 + 4; the gate holds the first half, so lane 1 stays busy with 4 rows."""
    busy = asyncio.ensure_future(b.submit(rows(8)))
    await until(gate.started.is_set, "the gated batch started")
    await until(lambda: b.stats.batches == 1, "the second half's batch finished")
    assert gate.sizes == [4, 4] and not busy.done()
    return busy


def test_each_request_gets_its_own_rows_back_in_order_even_when_split() -> None:
    async def main() -> None:
        b = LaneBatcher(lambda x: x * 2, lanes=2, max_batch=4)
        try:
            reqs = [rows(n, 100 * i) for i, n in enumerate([1, 10, 3, 4, 0, 7])]
            outs = await within_deadline(asyncio.gather(*(b.submit(r) for r in reqs)))
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
            await within_deadline(b.submit(r))
            np.testing.assert_array_equal(r, before)
        finally:
            b.close()

    asyncio.run(main())


def test_idle_service_runs_a_lone_request_at_once() -> None:
    async def main() -> None:
        # The clock never moves: a hold could never end, so the answer proves the idle batcher did not hold at all.
        b = LaneBatcher(lambda x: x, lanes=2, max_batch=64, max_hold_s=5.0, clock=FakeClock())
        try:
            np.testing.assert_array_equal(await within_deadline(b.submit(rows(1))), rows(1))
            assert b.stats.held == 0
            assert b.stats.sizes == [1]
        finally:
            b.close()

    asyncio.run(main())


def test_free_lane_holds_for_its_share_while_the_other_lane_is_busy() -> None:
    async def main() -> None:
        clock = FakeClock()
        gate = Gate(clock, batch_s=1.0)
        # hold_fraction out of the way (the hold is max_hold_s), and the clock never passes it: the hold can only end
        # because the lane's share arrived.
        b = LaneBatcher(gate, lanes=2, max_batch=64, max_hold_s=5.0, hold_fraction=1e6, clock=clock)
        submit = Submitter(b)
        try:
            busy = await _one_lane_busy(b, gate)
            assert b.hold_s() == 5.0
            first = submit(rows(1, 100))
            await until(lambda: b.stats.held >= 1, "lane 2 decided to hold")
            assert gate.sizes == [4, 4]  # lane 2 holds instead of running a batch of 1
            # Lane 2's share is ceil((4 running + q queued) / 2): reached at q = 4.
            rest = [submit(rows(1, 101 + i)) for i in range(3)]
            outs = await within_deadline(asyncio.gather(first, *rest))
            assert gate.sizes == [4, 4, 4]
            for i, o in enumerate(outs):
                np.testing.assert_array_equal(o, rows(1, 100 + i) * 2)
            assert not busy.done()
        finally:
            gate.release()
            b.close()
        np.testing.assert_array_equal(await within_deadline(busy), rows(8) * 2)

    asyncio.run(main())


def test_hold_is_bounded() -> None:
    async def main() -> None:
        clock = FakeClock()
        gate = Gate(clock, batch_s=1.0)
        b = LaneBatcher(gate, lanes=2, max_batch=64, max_hold_s=0.05, hold_fraction=1e6, clock=clock)
        try:
            busy = await _one_lane_busy(b, gate)
            assert b.hold_s() == 0.05
            late = asyncio.ensure_future(b.submit(rows(1, 50)))  # share ceil(5 / 2) = 3, never reached
            await until(lambda: b.stats.held >= 1, "lane 2 decided to hold")
            clock.advance(0.04)  # 40 ms of the 50 ms hold have passed: the lane goes on holding
            held = b.stats.held
            await until(lambda: b.stats.held > held, "lane 2 held again after 40 ms")
            assert gate.sizes == [4, 4] and not late.done()
            clock.advance(0.02)  # 60 ms: the hold is over, the lane runs what is queued
            np.testing.assert_array_equal(await within_deadline(late), rows(1, 50) * 2)
            assert gate.sizes == [4, 4, 1]
            assert not busy.done()  # it ran while lane 1 was still blocked
        finally:
            gate.release()
            b.close()
        await within_deadline(busy)

    asyncio.run(main())


def test_hold_is_a_fraction_of_a_recent_batch() -> None:
    async def main() -> None:
        clock = FakeClock()
        gate = Gate(clock, batch_s=0.4)  # each ungated batch takes 400 ms on the batcher's clock
        b = LaneBatcher(gate, lanes=2, max_batch=64, max_hold_s=5.0, clock=clock)
        try:
            assert b.hold_s() == 5.0  # nothing measured yet
            busy = await _one_lane_busy(b, gate)
            assert b.hold_s() == pytest.approx(0.1)  # a quarter of the 400 ms batch, not the 5 s cap
            late = asyncio.ensure_future(b.submit(rows(1, 50)))
            await until(lambda: b.stats.held >= 1, "lane 2 decided to hold")
            clock.advance(0.09)
            held = b.stats.held
            await until(lambda: b.stats.held > held, "lane 2 held again after 90 ms")
            assert gate.sizes == [4, 4] and not late.done()
            clock.advance(0.02)  # 110 ms: past a quarter of the batch, far below max_hold_s
            await within_deadline(late)
            assert gate.sizes == [4, 4, 1]
            # The recent batch time is a moving average: 0.8 * 400 ms + 0.2 * 400 ms, then one batch of 900 ms.
            assert b.hold_s() == pytest.approx(0.1)
            gate.batch_s = 0.9
            held = b.stats.held
            nxt = asyncio.ensure_future(b.submit(rows(1, 60)))
            await until(lambda: b.stats.held > held, "lane 2 held for the next request")
            clock.advance(0.11)
            await within_deadline(nxt)
            assert gate.sizes == [4, 4, 1, 1] and not busy.done()
            assert b.hold_s() == pytest.approx(0.125)  # a quarter of 0.8 * 400 ms + 0.2 * 900 ms = 500 ms
        finally:
            gate.release()
            b.close()
        await within_deadline(busy)

    asyncio.run(main())


def test_two_lanes_split_a_queue_fairly_instead_of_one_taking_everything() -> None:
    async def main() -> None:
        both_running = threading.Barrier(2)

        def together(x: np.ndarray) -> np.ndarray:
            both_running.wait(DEADLINE_S)  # breaks (and fails the requests) unless both lanes run at once
            return x

        b = LaneBatcher(together, lanes=2, max_batch=64, max_hold_s=0.5, clock=FakeClock())
        try:
            await within_deadline(asyncio.gather(*(b.submit(rows(1, i)) for i in range(16))))
            # 16 queued at once on two idle lanes: 8 each, not 16 on one lane and none on the other.
            assert sorted(b.stats.sizes) == [8, 8]
        finally:
            b.close()

    asyncio.run(main())


def test_one_lane_takes_everything_queued_without_holding() -> None:
    async def main() -> None:
        gate = Gate()
        b = LaneBatcher(gate, lanes=1, max_batch=64, max_hold_s=5.0, clock=FakeClock())
        submit = Submitter(b)
        try:
            busy = await _lane_busy(b, gate)
            later = [submit(rows(1, i)) for i in range(5)]
            await submit.queued(5)
            gate.release()
            await within_deadline(asyncio.gather(busy, *later))
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
                await within_deadline(b.submit(rows(2)))
            np.testing.assert_array_equal(await within_deadline(b.submit(rows(2))), rows(2))
        finally:
            b.close()

    asyncio.run(main())


def test_wrong_row_count_from_the_model_is_an_error_not_a_misdelivery() -> None:
    async def main() -> None:
        b = LaneBatcher(lambda x: x[:1], lanes=1, max_batch=8)
        try:
            with pytest.raises(RuntimeError, match="returned 1 rows for 3"):
                await within_deadline(b.submit(rows(3)))
        finally:
            b.close()

    asyncio.run(main())


def test_cancelled_request_is_never_run() -> None:
    async def main() -> None:
        gate = Gate()
        b = LaneBatcher(gate, lanes=1, max_batch=8, clock=FakeClock())
        submit = Submitter(b)
        try:
            busy = await _lane_busy(b, gate)
            gone = submit(rows(3, 10))
            kept = submit(rows(2, 20))
            await submit.queued(2)  # both in the queue behind the busy lane
            gone.cancel()
            gate.release()
            await within_deadline(busy)
            np.testing.assert_array_equal(await within_deadline(kept), rows(2, 20) * 2)
            assert gone.cancelled()
            assert gate.sizes == [1, 2]
        finally:
            gate.release()
            b.close()

    asyncio.run(main())


def test_requests_that_cannot_finish_in_time_are_shed_counting_the_expected_batch() -> None:
    async def main() -> None:
        clock = FakeClock()
        gate = Gate()
        b = LaneBatcher(gate, lanes=1, max_batch=8, max_wait_s=1.0, clock=clock)
        submit = Submitter(b)
        try:
            busy = await _lane_busy(b, gate)
            late = submit(rows(1, 30))
            await submit.queued(1)
            clock.advance(0.3)
            recent = submit(rows(1, 40))
            await submit.queued(2)
            clock.advance(0.3)  # the gated batch took 0.6 s: the next batch is expected to take as long
            gate.release()
            await within_deadline(busy)
            # late: 0.6 s spent + 0.6 s expected > 1.0 s -> shed; recent: 0.3 + 0.6 <= 1.0 -> runs.
            with pytest.raises(Overloaded, match="within 1.0 s"):
                await within_deadline(late)
            np.testing.assert_array_equal(await within_deadline(recent), rows(1, 40) * 2)
            assert b.stats.shed == 1
            assert gate.sizes == [1, 1]  # the shed request never ran
        finally:
            gate.release()
            b.close()

    asyncio.run(main())


def test_time_spent_before_the_batcher_counts() -> None:
    async def main() -> None:
        clock = FakeClock()
        gate = Gate(clock, batch_s=0.5)
        b = LaneBatcher(gate, lanes=1, max_batch=8, max_wait_s=1.0, clock=clock)
        try:
            gate.release()
            await within_deadline(b.submit(rows(1)))  # the gated first batch (0 s on the clock)
            await within_deadline(b.submit(rows(1)))  # a batch of 0.5 s on the clock
            assert b._row_s == pytest.approx(0.1)  # moving average per row: 0.8 * 0 s + 0.2 * 0.5 s
            with pytest.raises(Overloaded):  # 0.95 s spent upstream + 0.1 s expected > 1.0 s: refused at once
                await within_deadline(b.submit(rows(1), spent_s=0.95))
            np.testing.assert_array_equal(await within_deadline(b.submit(rows(1, 9), spent_s=0.85)), rows(1, 9) * 2)
            assert b.stats.shed == 1 and len(gate.sizes) == 3
        finally:
            b.close()

    asyncio.run(main())


def test_a_hopeless_request_deep_in_the_queue_is_refused_while_the_lane_is_still_busy() -> None:
    async def main() -> None:
        clock = FakeClock()
        gate = Gate()
        b = LaneBatcher(gate, lanes=1, max_batch=8, max_wait_s=2.0, clock=clock)
        try:
            busy = await _lane_busy(b, gate)
            head = asyncio.ensure_future(b.submit(rows(1, 10)))
            deep = asyncio.ensure_future(b.submit(rows(1, 20), spent_s=1.5))  # due 0.5 s from now
            await until(lambda: b._queued == 2, "both requests queued")
            clock.advance(0.55)  # deep is past due; head (due in 2 s) is not, even after a 0.55-s batch
            # Nothing finishes and nothing arrives, yet the refusal comes: the batcher wakes for the due time.
            with pytest.raises(Overloaded):
                await within_deadline(deep)
            assert not head.done() and not busy.done()
            gate.release()
            np.testing.assert_array_equal(await within_deadline(head), rows(1, 10) * 2)
        finally:
            gate.release()
            b.close()

    asyncio.run(main())


def test_nothing_is_shed_while_the_clock_stands_still() -> None:
    """The shedding reads the batcher's clock, not the wall: the same queue with the clock frozen loses nothing."""

    async def main() -> None:
        gate = Gate()
        b = LaneBatcher(gate, lanes=1, max_batch=8, max_wait_s=0.0, clock=FakeClock())
        submit = Submitter(b)
        try:
            busy = await _lane_busy(b, gate)
            queued = [submit(rows(1, 30 + i)) for i in range(3)]
            await submit.queued(3)
            gate.release()
            await within_deadline(asyncio.gather(busy, *queued))
            assert b.stats.shed == 0
            assert gate.sizes == [1, 3]
        finally:
            gate.release()
            b.close()

    asyncio.run(main())


def test_invalid_layout_is_refused() -> None:
    with pytest.raises(ValueError):
        LaneBatcher(lambda x: x, lanes=0, max_batch=8)


def test_a_batch_takes_no_more_rows_than_fit_before_the_oldest_is_due() -> None:
    """A batch's run time grows with its rows: under a queue, a lane takes what it can finish before the head of the
    queue is due, not its whole share (which on a CPU ran for 9 s against a 3 s bound, BENCHMARKS.md overload)."""

    async def main() -> None:
        clock = FakeClock()
        gate = Gate()  # the first batch is held; later batches take no time on the clock
        b = LaneBatcher(gate, lanes=1, max_batch=8, max_wait_s=2.0, clock=clock)
        submit = Submitter(b)
        try:
            busy = await _lane_busy(b, gate)
            queued = [submit(rows(1, 10 + i)) for i in range(6)]
            await submit.queued(6)
            clock.advance(0.5)  # the held batch of 1 row took 0.5 s: 0.5 s a row
            gate.release()
            out = await within_deadline(asyncio.gather(busy, *queued))
            # 1.5 s left for the oldest at 0.5 s a row: batches of 3, not one batch of 6.
            assert gate.sizes == [1, 3, 3]
            for i, got in enumerate(out[1:]):
                np.testing.assert_array_equal(got, rows(1, 10 + i) * 2)
            assert b.stats.shed == 0
        finally:
            gate.release()
            b.close()

    asyncio.run(main())


def test_a_request_whose_own_rows_cannot_finish_in_time_is_shed() -> None:
    async def main() -> None:
        clock = FakeClock()
        gate = Gate(clock, batch_s=0.5)
        b = LaneBatcher(gate, lanes=1, max_batch=8, max_wait_s=2.0, clock=clock)
        try:
            gate.release()
            await within_deadline(b.submit(rows(1)))  # the gated first batch: 0 s
            await within_deadline(b.submit(rows(1)))  # 0.5 s for 1 row: 0.1 s a row on the moving average
            with pytest.raises(Overloaded):  # 1.3 s spent: 8 rows x 0.1 s do not fit in the 0.7 s left
                await within_deadline(b.submit(rows(8), spent_s=1.3))
            out = await within_deadline(b.submit(rows(4, 20), spent_s=1.3))  # 4 x 0.1 s do
            np.testing.assert_array_equal(out, rows(4, 20) * 2)
        finally:
            b.close()

    asyncio.run(main())


def test_warm_up_runs_every_lane_before_the_first_request_and_seeds_the_cost() -> None:
    """Each lane's own thread runs the model once per warm-up size (a runtime's per-thread state is made before
    ready), and the measured time per row judges the very first request: one that cannot finish in time is shed at
    once instead of being run blind."""
    calls: list[tuple[str, int]] = []
    lock = threading.Lock()
    spent = threading.local()  # each thread's own clock: the lanes run side by side, as on real cores

    def clock() -> float:
        return 1000.0 + getattr(spent, "t", 0.0)

    def model(x: np.ndarray) -> np.ndarray:
        with lock:
            calls.append((threading.current_thread().name, len(x)))
        spent.t = getattr(spent, "t", 0.0) + 0.1 * len(x)  # 0.1 s per row
        return x * 2

    async def main() -> None:
        b = LaneBatcher(model, lanes=2, max_batch=8, max_wait_s=1.0, clock=clock)
        try:
            b.warm_up(np.zeros((16, 3), np.float32), (1, 4, 32))  # 32 is cut to max_batch
            assert sorted(n for _, n in calls) == [1, 1, 4, 4, 8, 8]
            for size in (1, 4, 8):  # both lanes, each on its own thread, at every size
                assert len({name for name, n in calls if n == size}) == 2
            assert all(name.startswith("batcher-lane") for name, _ in calls)
            assert b.stats.batches == 0  # warm-up is not traffic
            assert b._row_s == pytest.approx(0.1)
            with pytest.raises(Overloaded):  # 0.95 s spent + 0.1 s expected > 1.0 s
                await within_deadline(b.submit(rows(1), spent_s=0.95))
            np.testing.assert_array_equal(await within_deadline(b.submit(rows(1, 5), spent_s=0.5)), rows(1, 5) * 2)
        finally:
            b.close()

    asyncio.run(main())
