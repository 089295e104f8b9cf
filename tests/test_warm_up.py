"""``BookingService.warm_up``: the booking path readied before the first caller, against a real Redis and
a real ledger (SQLite or PostgreSQL by backend). Whether the first booking is cheaper is counted, not
timed: its statements are SQLAlchemy compiled-cache hits, and Redis already has the index's scripts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine.default import CACHE_MISS
from structlog.testing import capture_logs

from booking.business import Business
from booking.domain import SmsConsent
from booking.freebusy import FreeBusyIndex
from booking.ledger import schema as t
from booking.ledger.audit import verify_audit
from booking.ledger.database import Database
from booking.ledger.repository import REHEARSAL_PHONE, CustomerDetails, Ledger
from booking.service import Booked, BookingService, BookRequest
from tests.conftest import FrozenClock
from tests.test_booking_service import ny

# Every table a booking made on the phone writes, and the audit chain's head.
WRITTEN = (t.customers, t.bookings, t.booking_events, t.effects, t.consents, t.audit_events)


def request(hour: int) -> BookRequest:
    """A booking as a call makes it: an idempotency key, and the caller's yes to texts."""
    return BookRequest(
        service_id="checkup",
        start=ny(2026, 12, 1, hour),
        resource_id="dr-lee",
        customer=CustomerDetails(phone="+12125550142", name="Alice Rivera"),
        idempotency_key=f"call-1:tool-{hour}",
        source="phone",
        sms_consent=SmsConsent.GIVEN,
    )


async def contents(database: Database) -> dict[str, Any]:
    async with database.reader.connect() as connection:
        counts = {
            table.name: (await connection.execute(select(func.count()).select_from(table))).scalar_one()
            for table in WRITTEN
        }
        head = (await connection.execute(select(t.audit_chain_head.c.last_id, t.audit_chain_head.c.entry_hash))).all()
        catalog = (await connection.execute(select(t.resources.c.id, t.resources.c.active))).all()
    return {"counts": counts, "head": head, "catalog": sorted(catalog)}


@contextmanager
def compiled(engine: Engine) -> Iterator[list[str]]:
    """The statements ``engine`` had to compile (not found in its compiled cache) while in the block."""
    misses: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if context is not None and context.cache_hit is CACHE_MISS:
            misses.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield misses
    finally:
        event.remove(engine, "before_cursor_execute", seen)


async def test_the_rehearsal_leaves_nothing_behind(service: BookingService, database: Database) -> None:
    await service.book(request(10))  # a chain and a customer already there, as in a running ledger
    before = await contents(database)
    await service.warm_up()
    assert await contents(database) == before
    assert (await verify_audit(database)).ok
    after = await service.book(request(11))
    assert isinstance(after, Booked)
    assert (await verify_audit(database)).entries == before["counts"]["audit_events"] + 1
    assert await service.ledger.bookings_for_phone(REHEARSAL_PHONE) == []


async def test_the_first_booking_after_a_warm_up_compiles_nothing(
    service: BookingService, database: Database, database_url: str, business: Business, clock: FrozenClock
) -> None:
    # Without a warm-up (the fixture's service): its first booking compiles its statements.
    with compiled(database.write_engine) as cold:
        assert isinstance(await service.book(request(10)), Booked)
    assert cold, "a new engine compiles a booking's statements on its first booking"

    # A second process's engine on the same ledger, warmed up first.
    other = Database.connect(database_url)
    try:
        warmed = BookingService(business, Ledger(other, clock=clock), service.index, clock=clock)
        await warmed.warm_up()
        with compiled(other.write_engine) as after_warm_up:
            assert isinstance(await warmed.book(request(11)), Booked)
        assert after_warm_up == []
    finally:
        await other.dispose()


async def test_the_warm_up_loads_the_index_scripts(service: BookingService, redis_client: aioredis.Redis) -> None:
    await redis_client.script_flush()
    shas = [script.sha for script in service.index._scripts.values()]
    assert not any(await redis_client.script_exists(*shas))
    await service.warm_up()
    assert all(await redis_client.script_exists(*shas))


async def test_a_failed_warm_up_is_logged_and_the_service_still_books(
    service: BookingService, business: Business, clock: FrozenClock
) -> None:
    # Nothing listens on port 1; no retries, so the warm-up gives up at the first refusal.
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    broken = BookingService(business, service.ledger, FreeBusyIndex(unreachable, prefix="warm"), clock=clock)
    try:
        with capture_logs() as logs:
            await broken.warm_up()
    finally:
        await unreachable.aclose()
    [failed] = [entry for entry in logs if entry["event"] == "booking_warm_up_failed"]
    assert "ConnectionError" in failed["error"]
    assert isinstance(await service.book(request(10)), Booked)


async def test_writes_run_on_the_connection_the_warm_up_prepared(service: BookingService, database: Database) -> None:
    """The ledger's writes keep one connection (on PostgreSQL its statements stay prepared there, so the
    warm-up's work is not lost on a connection the next write never uses), however many the readers use."""
    connections: set[int] = set()

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        connections.add(id(conn.connection.driver_connection))

    async def read(hold: asyncio.Event) -> None:
        async with database.reader.connect() as connection:
            await connection.execute(select(1))
            await hold.wait()

    # Readers holding several connections at once: a pool shared with them would hand writes any of them.
    hold = asyncio.Event()
    readers = [asyncio.create_task(read(hold)) for _ in range(4)]
    await asyncio.sleep(0.05)
    hold.set()
    await asyncio.gather(*readers)

    event.listen(database.write_engine, "before_cursor_execute", seen)
    try:
        await service.warm_up()
        for hour in (9, 10, 11):
            assert isinstance(await service.book(request(hour)), Booked)
            await asyncio.gather(*(service.ledger.bookings_for_phone("+12125550142") for _ in range(3)))
    finally:
        event.remove(database.write_engine, "before_cursor_execute", seen)
    assert len(connections) == 1
