"""The booking lane (``booking.lane``): a BookingService on a loop of its own, reached from the call loop.
Real Redis and ledger; the lane's service has its own client and engines, as in ``voicebook serve``."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from booking.domain import Interval
from booking.errors import InvalidRequest
from booking.freebusy import FreeBusyIndex
from booking.lane import BookingLane, CallLoopCalendar
from booking.ledger.database import Database
from booking.ledger.repository import CustomerDetails, Ledger
from booking.service import Booked, BookingService, BookRequest, Held
from tests.conftest import TEST_NOW, FrozenClock

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


@pytest.fixture
async def lane(
    service: BookingService, index: FreeBusyIndex, clock: FrozenClock, database_url: str, redis_url: str
) -> AsyncIterator[BookingLane]:
    async def build(stack: contextlib.AsyncExitStack) -> BookingService:
        redis = aioredis.Redis.from_url(redis_url)
        stack.push_async_callback(redis.aclose)
        database = Database.connect(database_url)
        stack.push_async_callback(database.dispose)
        return BookingService(
            service.business, Ledger(database, clock=clock), FreeBusyIndex(redis, prefix=index.prefix), clock=clock
        )

    booking_lane = BookingLane(build)
    await booking_lane.start()
    try:
        yield booking_lane
    finally:
        await booking_lane.stop()


def _request(service: BookingService, start: datetime, key: str) -> BookRequest:
    first = service.business.services[0]
    return BookRequest(first.id, start, CustomerDetails(phone="+12125550142", name="Alice"), idempotency_key=key)


async def test_work_runs_on_the_lane_thread_in_a_copy_of_the_callers_context(lane: BookingLane) -> None:
    REQUEST_ID.set("call-42")
    seen: dict[str, object] = {}

    async def work(service: BookingService) -> str:
        seen["thread"] = threading.current_thread().name
        seen["context"] = REQUEST_ID.get()
        REQUEST_ID.set("changed on the lane")
        return "done"

    assert await lane.run(work) == "done"
    assert seen == {"thread": "booking-lane", "context": "call-42"}
    assert REQUEST_ID.get() == "call-42"  # the lane's changes stay on the lane


async def test_a_booking_made_on_the_lane_is_seen_by_the_call_loops_service(
    lane: BookingLane, service: BookingService
) -> None:
    start = datetime(2026, 12, 1, 15, 0, tzinfo=TEST_NOW.tzinfo)
    outcome = await lane.run(lambda s: s.book(_request(s, start, "lane-1")))
    assert isinstance(outcome, Booked)
    booking = outcome.booking
    assert (await service.get_booking(booking.id)).id == booking.id
    # The index is shared too: the call loop's service cannot hold the slot the lane booked.
    held = await service.hold(booking.service_id, start, resource_id=booking.resource_id)
    assert not isinstance(held, Held)


async def test_errors_come_back_to_the_caller(lane: BookingLane) -> None:
    async def bad(service: BookingService) -> None:
        service._service("no-such-service")  # raises the service's own validation error

    with pytest.raises(InvalidRequest):
        await lane.run(bad)


async def test_cancelling_the_caller_cancels_the_work_on_the_lane(lane: BookingLane) -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def slow(service: BookingService) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.create_task(lane.run(slow))
    await asyncio.to_thread(started.wait, 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await asyncio.to_thread(cancelled.wait, 5)


async def test_stop_lets_a_booking_in_flight_commit(lane: BookingLane, service: BookingService) -> None:
    start = datetime(2026, 12, 1, 16, 0, tzinfo=TEST_NOW.tzinfo)
    caller = asyncio.create_task(lane.run(lambda s: s.book(_request(s, start, "lane-stop"))))
    await asyncio.sleep(0)
    await lane.stop()
    outcome = await caller
    assert isinstance(outcome, Booked)
    booking = outcome.booking
    assert (await service.get_booking(booking.id)).start == start


async def test_a_build_that_fails_fails_start() -> None:
    async def build(stack: contextlib.AsyncExitStack) -> BookingService:
        raise RuntimeError("no database")

    with pytest.raises(RuntimeError, match="no database"):
        await BookingLane(build).start()


class _Refresher:
    """Stands in for ExternalBusyRefresher (no calendar here): records which thread refreshed."""

    def __init__(self) -> None:
        self.refreshed_on: list[str] = []

    def tracks(self, resource_id: str) -> bool:
        return resource_id == "dr-lee"

    def outdated(self, fetched_at: datetime | None) -> bool:
        return fetched_at is None

    def is_stale(self, resource_id: str, window: Interval, fetched_at: dict[date, datetime]) -> bool:
        return not fetched_at

    async def try_ensure_fresh(self, resource_id: str, window: Interval, *, wait: timedelta | None = None) -> bool:
        self.refreshed_on.append(threading.current_thread().name)
        return True


async def test_the_lane_refreshes_the_calendar_on_the_call_loop(lane: BookingLane) -> None:
    refresher = _Refresher()
    calendar = CallLoopCalendar(refresher, asyncio.get_running_loop())  # type: ignore[arg-type]
    window = Interval(TEST_NOW, TEST_NOW + timedelta(hours=1))

    async def refresh(service: BookingService) -> tuple[bool, bool, bool]:
        return calendar.tracks("dr-lee"), calendar.outdated(None), await calendar.try_ensure_fresh("dr-lee", window)

    assert await lane.run(refresh) == (True, True, True)
    assert refresher.refreshed_on == [threading.current_thread().name]
