"""The booking writes of calls on an event loop of their own.

A server process paces the audio of every call on one event loop: at 100 calls that loop wakes thousands
of times a second, and each hop of a booking (the Redis hold, the ledger transaction, the index update)
waits its turn behind all of that. Measured under 100 locust callers, a single Redis call inside the
booking tool took 75 to 130 ms at the median although Redis answered in a fraction of a millisecond: the
time was the loop's queue, not the work.

:class:`BookingLane` runs a second :class:`~booking.service.BookingService` on a thread with its own loop,
Redis client and ledger engines, against the same Redis and database, so holds, bookings, reschedules and
cancellations of calls wait only for each other. The interpreter is still shared: the lane's thread runs
whenever the call loop gives up the GIL (at every pause of the loop, and by the interpreter's switch
interval when it is busy), which is what bounds a booking's hops now.

Each request runs in a copy of the caller's context (``contextvars``), so its spans are children of the
tool call's and its log lines carry the call's ids. Cancelling the caller cancels the request on the
lane; the service itself shields a commit once it has started, as it does on the call loop.

The lane's service shares the process's external-calendar refresher, which belongs to the call loop:
:class:`CallLoopCalendar` gives the lane its read-only checks directly and runs its refreshes on the call
loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

import structlog

from booking.domain import Interval
from booking.external_busy import ExternalBusyRefresher
from booking.service import BookingService
from booking.writes import WriteOp, Writers

T = TypeVar("T")

log = structlog.get_logger("voicebook.booking_lane")

BuildService = Callable[[contextlib.AsyncExitStack], Awaitable[BookingService]]


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the server's own loop is uvloop), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class BookingLane:
    """A thread with an event loop and a :class:`BookingService` of its own (see module doc).

    ``build`` runs on the lane's loop and returns the service; what it registers on the exit stack (its
    Redis client, its database engines) is closed on the lane's loop by :meth:`stop`."""

    def __init__(self, build: BuildService, *, name: str = "booking-lane") -> None:
        self._build = build
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: BookingService | None = None
        self._thread: threading.Thread | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[Any]] = set()  # work begun on the lane and not yet finished
        self._stopping = False

    @property
    def service(self) -> BookingService:
        """The lane's service (to be used on the lane only, through :meth:`run`)."""
        if self._service is None:
            raise RuntimeError("the booking lane is not running")
        return self._service

    async def start(self) -> None:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name=self._name, daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)
        log.info("booking_lane_started", thread=self._name)

    def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        loop = _new_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._service = loop.run_until_complete(self._build(self._stack))
        except BaseException as error:  # the server cannot start without it: say why on the caller's side
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._stack.aclose())
            loop.close()
            self._loop = None
            ready.set_exception(error)
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def run(self, work: Callable[[BookingService], Coroutine[Any, Any, T]]) -> T:
        """``work(service)`` on the lane, in a copy of the caller's context; its result or its error."""
        loop, service = self._loop, self.service
        if loop is None or self._stopping:
            raise RuntimeError("the booking lane is not running")
        context = contextvars.copy_context()
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
        started: list[asyncio.Task[T]] = []

        def settle(task: asyncio.Task[T]) -> None:
            if task.cancelled():
                outcome.cancel()
            elif (error := task.exception()) is not None:
                outcome.set_exception(error)
            else:
                outcome.set_result(task.result())

        def begin() -> None:
            if outcome.cancelled():  # the caller gave up before the lane got to it
                return
            task = loop.create_task(work(service), context=context)
            started.append(task)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(settle)

        loop.call_soon_threadsafe(begin)
        try:
            return await asyncio.wrap_future(outcome)
        except asyncio.CancelledError:

            def cancel() -> None:
                for task in started:
                    task.cancel()

            with contextlib.suppress(RuntimeError):  # the lane's loop already closed at shutdown
                loop.call_soon_threadsafe(cancel)
            raise

    async def write(self, op: WriteOp[T]) -> T:
        """A call's booking write (:class:`~booking.writes.WriteOp`) on the lane (booking writes only: the
        call records stay with the call's process, whose interpreter the lane shares)."""
        return await self.run(lambda service: op.apply(Writers(service)))

    async def stop(self) -> None:
        """Finish the work in flight (new work is refused from now on), close what the build opened, and
        end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        self._stopping = True

        async def close() -> None:
            # Work handed over before the stop began: its start was queued on the lane's loop before
            # this coroutine was, so its task exists by now.
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._service is not None:
                await self._service.drain()
            await self._stack.aclose()

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close(), loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        self._loop = self._service = None
        log.info("booking_lane_stopped", thread=self._name)


class CallLoopCalendar:
    """The external-calendar refresher as seen from the lane: its freshness checks are plain reads and
    answer here; a refresh runs on the call loop that owns the refresher (its fetch tasks and their
    futures belong to that loop, and concurrent refreshes of one resource share one fetch there)."""

    def __init__(self, refresher: ExternalBusyRefresher, loop: asyncio.AbstractEventLoop) -> None:
        self._refresher = refresher
        self._loop = loop

    def tracks(self, resource_id: str) -> bool:
        return self._refresher.tracks(resource_id)

    def outdated(self, fetched_at: datetime | None) -> bool:
        return self._refresher.outdated(fetched_at)

    def is_stale(self, resource_id: str, window: Interval, fetched_at: Mapping[date, datetime]) -> bool:
        return self._refresher.is_stale(resource_id, window, fetched_at)

    async def try_ensure_fresh(self, resource_id: str, window: Interval, *, wait: timedelta | None = None) -> bool:
        refresh = self._refresher.try_ensure_fresh(resource_id, window, wait=wait)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(refresh, self._loop))
