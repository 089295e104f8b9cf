"""Group commit: writes that arrive while a transaction is running are committed together in the next.

Under load most of a small transaction's cost is its BEGIN and COMMIT (a pool checkout, a round trip or a
thread hop, a WAL append), not its statements. Writers that queue up behind a running transaction are
taken as one batch: one BEGIN, their statements in arrival order, one COMMIT, and each caller gets its
own result only after that commit. Batches are optimistic: the Redis holds already keep concurrent
bookings apart, so a batch almost never fails. When one does (the database refused an overlap, a
booking moved meanwhile), it is rolled back whole and its writes run again one transaction each, so one
write's failure never becomes another's.

A write is a plain function over a synchronous SQLAlchemy ``Connection`` with no effect outside the
database, so running it a second time after a rollback is safe.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from booking import metrics

T = TypeVar("T")
Work = Callable[[Connection], Any]
Transaction = Callable[[list[Work]], Awaitable[list[Any]]]

MAX_BATCH = 64


class GroupCommit:
    """Queues writes and runs them in shared transactions on up to ``lanes`` concurrent connections."""

    def __init__(self, transaction: Transaction, *, lanes: int, max_batch: int = MAX_BATCH) -> None:
        if lanes < 1 or max_batch < 1:
            raise ValueError("lanes and max_batch must be at least 1")
        self._transaction = transaction
        self._max_lanes = lanes
        self._max_batch = max_batch
        self._queue: deque[tuple[Work, asyncio.Future[Any], float]] = deque()  # (work, its result, queued at)
        self._lanes: set[asyncio.Task[None]] = set()
        # Lanes still taking work. Decremented by the lane itself in the same step in which it finds the
        # queue empty, so a write queued a moment later always gets a lane (a finished task lingers in
        # ``_lanes`` until its done-callback runs, which is too late to count it out).
        self._working = 0
        self.batches = 0
        self.retried_batches = 0

    async def submit(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction; returns its result once that transaction has committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((work, future, time.perf_counter()))
        if self._working < self._max_lanes:
            self._working += 1
            lane = asyncio.get_running_loop().create_task(self._lane())
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)
        return await future

    async def drain(self) -> None:
        """Wait until every queued write has run (called before the engines are disposed)."""
        while self._lanes:
            await asyncio.gather(*self._lanes, return_exceptions=True)

    async def _lane(self) -> None:
        try:
            while self._queue:
                taken = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
                started = time.perf_counter()
                batch: list[tuple[Work, asyncio.Future[Any]]] = []
                for work, future, queued in taken:
                    # A caller that gave up before its write started does not get it run behind its back.
                    if not future.cancelled():
                        metrics.LEDGER_WRITE_WAIT_SECONDS.observe(started - queued)
                        batch.append((work, future))
                if batch:
                    await self._run(batch)
        finally:
            self._working -= 1

    async def _run(self, batch: list[tuple[Work, asyncio.Future[Any]]]) -> None:
        self.batches += 1
        try:
            try:
                results = await self._measured([work for work, _ in batch])
            except Exception as error:
                if len(batch) == 1:
                    _settle(batch[0][1], error=error)
                    return
                self.retried_batches += 1
                for work, future in batch:
                    try:
                        [result] = await self._measured([work])
                    except Exception as single_error:
                        _settle(future, error=single_error)
                    else:
                        _settle(future, result=result)
                return
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result=result)
        except BaseException as stopped:  # cancelled at shutdown: nobody may wait forever
            for _, future in batch:
                _settle(future, error=RuntimeError(f"ledger write abandoned: {stopped!r}"))
            raise


    async def _measured(self, works: list[Work]) -> list[Any]:
        """One transaction of ``works``, its size and time measured (a batch, or one write run again alone)."""
        metrics.LEDGER_BATCH_WRITES.observe(len(works))
        started = time.perf_counter()
        try:
            return await self._transaction(works)
        finally:
            metrics.LEDGER_TRANSACTION_SECONDS.observe(time.perf_counter() - started)


def _settle(future: asyncio.Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
