"""Batching for a model that runs in this process on a few lanes (threads), with one queue for all of them.

BentoML's adaptive batching gives a free worker whatever is queued the moment it is free. With a closed loop of
clients on a CPU that means many batches of 1 or 2 images: the clients of the batch just answered have not sent their
next request yet, and each worker process keeps a queue of its own (BENCHMARKS.md, P1). Here one process runs the
model on ``lanes`` threads (torch releases the GIL inside its ops, so single-threaded forwards on two lanes run about
as fast as two processes), and a free lane takes its fair share of the work in the system: the queued and running items
divided by the lanes. Optionally (``max_hold_s`` > 0), while another lane is busy (the service is under load) a free
lane may hold briefly for that share to arrive; an idle service never holds, so a lone request starts at once. On one
lane (a GPU) it never holds: the lane takes everything queued, up to ``max_batch``.

Requests are numpy arrays batched along axis 0; a request larger than ``max_batch`` is split across batches and its
rows come back in order.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

BatchFn = Callable[[np.ndarray], np.ndarray]


class Overloaded(RuntimeError):
    """A request could not be answered within the batcher's ``max_wait_s``; it was not run."""


@dataclass
class _Request:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float
    deadline: float  # by the batcher's clock: when the answer is due (its arrival upstream + max_wait_s)
    out: np.ndarray | None = None
    pending: int = 0  # rows not yet computed


@dataclass
class _Piece:
    req: _Request
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    held: int = 0  # times a free lane waited for its share
    shed: int = 0
    sizes: list[int] = field(default_factory=list)  # the last few batch sizes, for tests and logs


class LaneBatcher:
    """``await submit(rows)`` -> ``fn(batch)`` rows, with ``fn`` run on ``lanes`` threads over batches of queued rows.

    ``max_hold_s`` caps how long a free lane waits for its share while another lane is busy; the hold is also at most
    ``hold_fraction`` of a recent batch's run time, so a fast model (a GPU, a small tower) holds for correspondingly
    less. ``max_wait_s`` bounds a request's latency: a request is shed (``Overloaded``) as soon as it cannot be
    answered within that bound, counting the time it spent before it got here (``submit(..., spent_s)``) and the
    expected run time of a batch, so every answer, result or refusal, comes within the bound plus about one batch.
    ``clock`` is read for every time the batcher measures (queueing, deadlines, holds, batch run times; tests drive it
    by hand); timeouts of its waits are still the event loop's. Create and use it from one event loop.
    """

    def __init__(
        self,
        fn: BatchFn,
        lanes: int,
        max_batch: int,
        max_hold_s: float = 0.0,
        hold_fraction: float = 0.25,
        max_wait_s: float = 60.0,
        name: str = "batcher",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lanes < 1 or max_batch < 1:
            raise ValueError("lanes and max_batch must be >= 1")
        self.fn = fn
        self.lanes = lanes
        self.max_batch = max_batch
        self.max_hold_s = max(0.0, max_hold_s)
        self.hold_fraction = hold_fraction
        self.max_wait_s = max_wait_s
        self._clock = clock
        self.stats = BatcherStats()
        self._pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix=f"{name}-lane")
        self._queue: deque[_Piece] = deque()
        self._queued = 0  # rows in the queue
        self._running = 0  # rows in batches being computed
        self._free = lanes
        self._batch_s: float | None = None  # moving average of a batch's run time (for holds)
        self._row_s: float | None = None  # moving average of a batch's run time per row (for deadlines)
        self._wake = asyncio.Event()  # set on every arrival and every finished batch
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- public ---------------------------------------------------------------------------------------------------
    async def submit(self, rows: np.ndarray, spent_s: float = 0.0) -> np.ndarray:
        """The rows' results; ``spent_s``: how long the request already took before it reached the batcher."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        n = int(rows.shape[0])
        loop = asyncio.get_running_loop()
        if n == 0:
            return await loop.run_in_executor(self._pool, self.fn, rows)
        now = self._clock()
        deadline = now - max(0.0, spent_s) + self.max_wait_s
        req = _Request(rows=rows, future=loop.create_future(), enqueued=now, deadline=deadline, pending=n)
        if self._hopeless(req, now):
            self.stats.shed += 1
            raise Overloaded(self._late_message())
        self._queue.append(_Piece(req, 0, n))  # _take splits it when it is larger than a batch
        self._queued += n
        self._ensure_started()
        self._poke()
        return await req.future

    def warm_up(self, rows: np.ndarray, sizes: tuple[int, ...], fn: BatchFn | None = None) -> float:
        """Run ``fn`` (default: the batch function) on every lane's own thread at once, once per size in ``sizes``
        (on ``rows[:size]``), before the first request: a runtime's per-thread state (an OpenVINO infer request per
        lane, its stream's buffers, torch's thread pools) is then made before the service reports ready, not in its
        first requests. The last round's time per row seeds the cost estimate that deadlines use. Returns seconds."""
        import threading

        t_all = self._clock()
        for size in sizes:
            part = rows[: max(1, min(size, self.max_batch))]
            # Every lane thread runs one call: each waits at the barrier until all lanes hold one.
            barrier = threading.Barrier(self.lanes)

            def one(part: np.ndarray = part, barrier: threading.Barrier = barrier) -> float:
                barrier.wait(timeout=600)
                t = self._clock()
                (fn or self.fn)(part)
                return self._clock() - t

            times = [f.result() for f in [self._pool.submit(one) for _ in range(self.lanes)]]
            self._batch_s = sum(times) / len(times)
            self._row_s = self._batch_s / len(part)
        return self._clock() - t_all

    def hold_s(self) -> float:
        """How long a free lane may wait for its share right now."""
        if self._batch_s is None:
            return self.max_hold_s
        return min(self.max_hold_s, self.hold_fraction * self._batch_s)

    def _cost(self, rows: int) -> float:
        """Expected run time of a batch of ``rows``: a batch's time grows with its rows on a CPU (BENCHMARKS.md,
        overload: batches of 32 took 9 s where batches of 1 took 0.5 s, so a per-batch average misjudged both)."""
        return (self._row_s or 0.0) * rows

    def close(self) -> None:
        """Stop dispatching; queued requests fail. Batches already running finish on their threads."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        while self._queue:
            piece = self._queue.popleft()
            if not piece.req.future.done():
                piece.req.future.set_exception(RuntimeError("batcher closed"))
        self._queued = 0
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- dispatch -------------------------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._dispatch())

    def _poke(self) -> None:
        self._wake.set()

    async def _sleep_until_poked(self, timeout: float | None) -> None:
        self._wake.clear()
        if timeout is None:
            await self._wake.wait()
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    def _hopeless(self, req: _Request, now: float) -> bool:
        """Past its deadline, or it would be even if a lane ran its rows alone now.

        Only the request's own rows are counted, not its place in the queue: counting every row ahead sheds so many
        requests under a closed loop of clients that their immediate retries (each decoded by the API before it is
        refused) took the CPU from the model, and throughput fell by two thirds (BENCHMARKS.md, overload). The API
        keeps the queue short instead (engine/admission.py), and a lane takes no more rows than fit before the
        deadline of the oldest (``_fit``)."""
        return now + self._cost(min(req.pending, self.max_batch)) > req.deadline

    def _fit(self, now: float) -> int:
        """How many rows a batch may take so that it ends before the head of the queue is due (at least 1)."""
        if not self._row_s:
            return self.max_batch
        left = self._queue[0].req.deadline - now
        return max(1, int(left / self._row_s))

    def _until_next_shed(self) -> float | None:
        """Seconds until the first queued request becomes hopeless (None: nothing queued), so a refusal is not held
        back until a lane frees up."""
        if not self._queue:
            return None
        soonest = min(p.req.deadline - self._cost(min(p.req.pending, self.max_batch)) for p in self._queue)
        return max(0.0, soonest - self._clock()) + 1e-3

    def _late_message(self) -> str:
        return f"it cannot be answered within {self.max_wait_s:.1f} s"

    def _drop_dead(self) -> None:
        """Drop pieces whose client is gone (cancelled) and shed every queued request that can no longer be answered
        within its bound (anywhere in the queue, so a refusal comes as early as it is certain)."""
        if not self._queue:
            return
        now = self._clock()
        kept: deque[_Piece] = deque()
        for piece in self._queue:
            req = piece.req
            if req.future.done():
                self._queued -= piece.n
            elif self._hopeless(req, now):
                self._queued -= piece.n
                self.stats.shed += 1
                req.future.set_exception(Overloaded(self._late_message()))
            else:
                kept.append(piece)
        self._queue = kept

    async def _dispatch(self) -> None:
        while True:
            self._drop_dead()
            if not self._queue or self._free == 0:
                await self._sleep_until_poked(self._until_next_shed())
                continue
            share = math.ceil((self._queued + self._running) / self.lanes)
            target = min(self.max_batch, share, self._fit(self._clock()))
            if self._queued < target and self._free < self.lanes:
                left = self.hold_s() - (self._clock() - self._queue[0].req.enqueued)
                if left > 0:
                    self.stats.held += 1
                    await self._sleep_until_poked(left)
                    continue
            batch = self._take(target)
            if batch:
                self._free -= 1
                n = sum(p.n for p in batch)
                self._running += n
                asyncio.get_running_loop().create_task(self._run(batch, n))

    def _take(self, limit: int) -> list[_Piece]:
        batch: list[_Piece] = []
        room = limit
        while self._queue and room > 0:
            piece = self._queue[0]
            if piece.req.future.done():  # cancelled while queued
                self._queue.popleft()
                self._queued -= piece.n
                continue
            if piece.n <= room:
                self._queue.popleft()
                batch.append(piece)
            else:  # split: the rest stays at the head of the queue
                batch.append(_Piece(piece.req, piece.start, piece.start + room))
                piece.start += room
            self._queued -= batch[-1].n
            room -= batch[-1].n
        return batch

    async def _run(self, batch: list[_Piece], n: int) -> None:
        rows = (
            batch[0].req.rows[batch[0].start : batch[0].stop]
            if len(batch) == 1
            else np.concatenate([p.req.rows[p.start : p.stop] for p in batch])
        )
        t0 = self._clock()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, self.fn, rows)
            if len(out) != n:
                raise RuntimeError(f"batch function returned {len(out)} rows for {n}")
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of the failure
            for p in batch:
                if not p.req.future.done():
                    p.req.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            if not isinstance(exc, Exception):
                raise
        else:
            self._deliver(batch, out)
        finally:
            dt = self._clock() - t0
            self._batch_s = dt if self._batch_s is None else 0.8 * self._batch_s + 0.2 * dt
            row_s = dt / n
            self._row_s = row_s if self._row_s is None else 0.8 * self._row_s + 0.2 * row_s
            self._free += 1
            self._running -= n
            self.stats.batches += 1
            self.stats.items += n
            self.stats.sizes = [*self.stats.sizes[-99:], n]
            self._poke()

    @staticmethod
    def _deliver(batch: list[_Piece], out: np.ndarray) -> None:
        at = 0
        for p in batch:
            req = p.req
            part = out[at : at + p.n]
            at += p.n
            if req.future.done():
                continue
            if req.out is None:
                req.out = np.empty((req.rows.shape[0], *part.shape[1:]), dtype=part.dtype)
            req.out[p.start : p.stop] = part
            req.pending -= p.n
            if req.pending == 0:
                req.future.set_result(req.out)
