"""Admission of image requests (engine/admission.py): wait while the encoder cannot answer in time, refuse at the last
moment with Retry-After, never lose track of a place.

The admission runs on a clock the tests move by hand; its measurements come from answers the tests make take a known
time on that clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from engine.admission import Admission, Refused

DEADLINE_S = 10.0  # real seconds: a condition not met by then fails the test


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


async def settle() -> None:
    """Let the tasks that were woken run up to their next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def answered(adm: Admission, clock: FakeClock, took_s: float) -> None:
    """One image admitted now and answered ``took_s`` later on the clock."""
    async with adm.admit(1, clock()):
        clock.advance(took_s)


class Holder:
    """A request admitted (or waiting) that stays in flight until ``finish()``; ``fail()`` ends it with an error."""

    def __init__(self, adm: Admission, arrived: float, n: int = 1) -> None:
        self.admitted = asyncio.Event()
        self._end = asyncio.Event()
        self._error = False

        async def go() -> None:
            async with adm.admit(n, arrived):
                self.admitted.set()
                await self._end.wait()
                if self._error:
                    raise RuntimeError("the encoder failed")

        self.task = asyncio.ensure_future(go())

    async def finish(self) -> None:
        self._end.set()
        await within_deadline(self.task)

    async def fail(self) -> None:
        self._error = True
        self._end.set()
        with pytest.raises(RuntimeError):
            await within_deadline(self.task)


async def within_deadline(aw: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> Any:
    try:
        return await asyncio.wait_for(aw, DEADLINE_S)
    except TimeoutError:
        pytest.fail("the admission did not answer")


async def measured(bound_s: float = 3.0) -> tuple[Admission, FakeClock]:
    """An admission that has seen two answers of 1 s each, one after the other: rate 1 image/s, fastest 1 s."""
    clock = FakeClock()
    adm = Admission(bound_s, window_s=30.0, clock=clock)
    await answered(adm, clock, 1.0)
    await answered(adm, clock, 1.0)
    assert adm.rate() == pytest.approx(1.0) and adm.fastest() == pytest.approx(1.0)
    return adm, clock


async def occupied(adm: Admission, clock: FakeClock, n: int) -> list[Holder]:
    holders = [Holder(adm, clock()) for _ in range(n)]
    await settle()
    assert all(h.admitted.is_set() for h in holders)
    return holders


def test_a_fresh_worker_admits_and_measures_busy_time_not_wall_time() -> None:
    async def main() -> None:
        clock = FakeClock()
        adm = Admission(3.0, window_s=30.0, clock=clock)
        await answered(adm, clock, 0.5)
        assert adm.rate() is None  # one answer: the busy time behind it is unknown
        clock.advance(10.0)  # idle: no image in flight
        await answered(adm, clock, 0.5)
        # 1 image answered in 0.5 busy seconds since the first answer: 2/s (the idle 10 s do not count).
        assert adm.rate() == pytest.approx(2.0)
        assert adm.fastest() == pytest.approx(0.5) and adm.in_flight == 0

    asyncio.run(main())


def test_a_request_waits_while_it_cannot_be_answered_in_time_and_goes_once_it_can() -> None:
    async def main() -> None:
        adm, clock = await measured()
        a, b, c = await occupied(adm, clock, 3)  # now + 1 s + 2 in flight / (1/s) = 3 s: the third still fits
        d = Holder(adm, clock())  # 1 s + 3 s > 3 s: waits, undecoded
        await settle()
        assert not d.admitted.is_set() and adm.waiting() == 1 and adm.in_flight == 3
        clock.advance(1.0)
        await a.finish()  # 2 in flight: 1 s + 2 s > 2 s left
        await settle()
        assert not d.admitted.is_set()
        await b.finish()  # 1 in flight, and the rate is now 3 answers / 2 busy s: 1 s + 0.67 s <= 2 s left
        await settle()
        assert d.admitted.is_set() and adm.waiting() == 0 and adm.in_flight == 2
        await c.finish()
        await d.finish()
        assert adm.in_flight == 0

    asyncio.run(main())


def test_a_waiting_request_is_refused_when_it_can_no_longer_make_it_not_before() -> None:
    async def main() -> None:
        adm, clock = await measured()
        held = await occupied(adm, clock, 3)
        d = Holder(adm, clock())  # deadline in 3 s; hopeless once fewer than 1 s (the fastest answer) are left
        await settle()
        clock.advance(1.9)
        adm.recheck()
        await settle()
        assert not d.task.done()  # 1.1 s left: it could still be answered
        clock.advance(0.2)
        adm.recheck()
        with pytest.raises(Refused) as exc:
            await within_deadline(d.task)
        assert exc.value.status_code == 503 and "within 3 s" in exc.value.message
        assert exc.value.headers == {"Retry-After": "4"}  # (3 in flight + its own) / (1 image/s)
        assert adm.refused == 1 and adm.waiting() == 0 and adm.in_flight == 3
        for h in held:
            await h.finish()

    asyncio.run(main())


def test_the_refusal_comes_on_time_without_any_answer_or_arrival() -> None:
    async def main() -> None:
        adm, clock = await measured()
        held = await occupied(adm, clock, 3)
        d = Holder(adm, clock())
        await settle()
        clock.advance(1.95)  # due in 0.05 s (on this clock): the check arms a timer for then
        adm.recheck()
        clock.advance(0.2)  # nothing else happens: only the timer can refuse it
        with pytest.raises(Refused):
            await within_deadline(d.task)
        for h in held:
            await h.finish()

    asyncio.run(main())


def test_a_newer_request_that_fits_goes_before_an_older_one_that_does_not() -> None:
    async def main() -> None:
        adm, clock = await measured()
        held = await occupied(adm, clock, 2)
        old = Holder(adm, clock() - 1.5)  # 1.5 s left: 1 s + 2 s does not fit
        await settle()
        new = Holder(adm, clock())  # 3 s left: fits, although an older request waits
        await settle()
        assert new.admitted.is_set() and not old.admitted.is_set()
        clock.advance(0.6)  # the old one has 0.9 s left, less than the fastest answer
        adm.recheck()
        with pytest.raises(Refused):
            await within_deadline(old.task)
        for h in [*held, new]:
            await h.finish()

    asyncio.run(main())


def test_a_client_that_goes_away_while_waiting_leaves_nothing_behind() -> None:
    async def main() -> None:
        adm, clock = await measured()
        held = await occupied(adm, clock, 3)
        d = Holder(adm, clock())
        await settle()
        assert adm.waiting() == 1
        d.task.cancel()
        await settle()
        assert d.task.cancelled() and adm.waiting() == 0 and adm.in_flight == 3
        for h in held:
            await h.finish()
        assert adm.in_flight == 0

    asyncio.run(main())


def test_with_nothing_in_flight_a_request_goes_even_when_it_looks_late() -> None:
    """Nothing to wait for: the encoder's own bound decides, and the measurements stay fresh."""

    async def main() -> None:
        adm, clock = await measured()
        late = Holder(adm, clock() - 2.5)  # 0.5 s left, less than the fastest answer
        await settle()
        assert late.admitted.is_set()
        await late.finish()

    asyncio.run(main())


def test_a_failed_request_frees_its_place_and_is_not_an_answer() -> None:
    async def main() -> None:
        adm, clock = await measured()
        (h,) = await occupied(adm, clock, 1)
        clock.advance(0.1)
        await h.fail()
        assert adm.in_flight == 0
        assert adm.fastest() == pytest.approx(1.0)  # the 0.1 s failure is not the fastest answer
        await answered(adm, clock, 1.0)
        # Its busy time counts (from the next answer on), its image does not: 2 answers in 2.1 busy seconds.
        assert adm.rate() == pytest.approx(2 / 2.1)

    asyncio.run(main())


def test_the_fastest_answer_and_the_rate_follow_the_window() -> None:
    async def main() -> None:
        clock = FakeClock()
        adm = Admission(3.0, window_s=5.0, clock=clock)
        for took in (0.2, 1.0, 1.0):
            await answered(adm, clock, took)
        assert adm.fastest() == pytest.approx(0.2) and adm.rate() == pytest.approx(1.0)  # 2 answers in 2 busy s
        clock.advance(10.0)
        await answered(adm, clock, 0.5)
        # The 0.2-s answer has left the window (its baseline is the last answer before it: the third, 1.0 s).
        assert adm.fastest() == pytest.approx(0.5) and adm.rate() == pytest.approx(2.0)

    asyncio.run(main())
