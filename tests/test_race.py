"""Races for one slot through separate connections: exactly one booking, whatever Redis does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from booking.business import Business
from booking.domain import Interval
from booking.freebusy import FreeBusyIndex
from booking.ledger.database import Database
from booking.ledger.repository import CreateResult, CustomerDetails, Ledger
from booking.service import Booked, BookingService, BookRequest, SlotUnavailable
from tests.conftest import FrozenClock

ATTEMPTS = 200
LEDGER_CONNECTIONS = 10  # "processes" sharing the ledger; PostgreSQL allows 100 connections here
SLOT = datetime(2026, 12, 1, 10, tzinfo=ZoneInfo("America/New_York")).astimezone(UTC)


@pytest.fixture
async def contenders(
    business: Business, database_url: str, redis_url: str, clock: FrozenClock, index: FreeBusyIndex
) -> AsyncIterator[list[BookingService]]:
    """ATTEMPTS booking services, each with its own Redis connection, spread over LEDGER_CONNECTIONS
    separate database engines: as many independent clients as a fleet of servers would be."""
    databases = [Database.connect(database_url, pool_size=4) for _ in range(LEDGER_CONNECTIONS)]
    clients = [aioredis.Redis.from_url(redis_url, max_connections=1) for _ in range(ATTEMPTS)]
    services = [
        BookingService(
            business,
            Ledger(databases[i % LEDGER_CONNECTIONS], clock=clock),
            FreeBusyIndex(client, prefix=index.keys("dr-lee").prefix),
            clock=clock,
        )
        for i, client in enumerate(clients)
    ]
    await services[0].start()
    try:
        yield services
    finally:
        for client in clients:
            await client.aclose()
        for database in databases:
            await database.dispose()


def attempt(number: int) -> BookRequest:
    return BookRequest(
        service_id="checkup",
        start=SLOT,
        resource_id="dr-lee",
        customer=CustomerDetails(phone=f"+1212555{number:04d}", name=f"Caller {number}"),
        idempotency_key=f"race-{number}",
    )


async def test_two_hundred_callers_one_slot_one_booking(contenders: list[BookingService]) -> None:
    outcomes = await asyncio.gather(*(service.book(attempt(n)) for n, service in enumerate(contenders)))
    winners = [o for o in outcomes if isinstance(o, Booked)]
    assert len(winners) == 1
    assert sum(isinstance(o, SlotUnavailable) for o in outcomes) == ATTEMPTS - 1
    ledger = contenders[0].ledger
    assert await ledger.count_bookings() == 1
    assert await ledger.count_overlaps() == 0


class FlushingLedger(Ledger):
    """The real ledger, except that the first booking transaction to start wipes Redis just before it
    runs: the moment when the winner holds the slot in Redis and has not yet committed."""

    def __init__(self, ledger: Ledger, clock: FrozenClock, redis: aioredis.Redis, flushed: list[int]) -> None:
        super().__init__(ledger.database, clock=clock)
        self._redis, self._flushed = redis, flushed

    async def create_bookings(self, *args: Any, **kwargs: Any) -> CreateResult:
        if not self._flushed:
            self._flushed.append(len(await self._redis.keys("*:hold:*")))
            await self._redis.flushdb()
        return await super().create_bookings(*args, **kwargs)


async def test_flushing_redis_mid_race_still_yields_one_booking(
    contenders: list[BookingService], redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    flushed: list[int] = []
    for service in contenders:
        service.ledger = FlushingLedger(service.ledger, clock, redis_client, flushed)
    outcomes = await asyncio.gather(*(service.book(attempt(n)) for n, service in enumerate(contenders)))
    assert flushed and flushed[0] >= 1, "the flush must land while a hold is live"
    assert sum(isinstance(o, Booked) for o in outcomes) == 1
    ledger = contenders[0].ledger
    assert await ledger.count_bookings() == 1
    assert await ledger.count_overlaps() == 0
    index = contenders[0].index
    assert await index.is_ready("dr-lee"), "the index was rebuilt after the flush"
    booking = next(o for o in outcomes if isinstance(o, Booked)).booking
    day = Interval(SLOT.replace(hour=0), SLOT.replace(hour=23))
    assert booking.block in (await index.snapshot("dr-lee", day)).busy
    # After the dust settles the index alone turns the next caller away.
    late = await contenders[1].book(attempt(ATTEMPTS + 1))
    assert isinstance(late, SlotUnavailable)
