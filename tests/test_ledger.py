"""The ledger itself, below the service: the database refuses overlaps however a row gets there."""

from __future__ import annotations

import contextvars
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import patch

import aiosqlite.core
import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from booking.business import Business
from booking.domain import BookingStatus, Interval
from booking.errors import InvalidTransition, NotFound, VersionConflict
from booking.ledger import schema as t
from booking.ledger.database import Database, head_revision
from booking.ledger.repository import Created, CustomerDetails, KeyTaken, Ledger, NewBooking, Overlap

T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
ALICE = CustomerDetails(phone="+12125550142", name="Alice")


def new(start: datetime, minutes: int = 30, resource: str = "dr-lee", buffer_after: int = 10) -> NewBooking:
    end = start + timedelta(minutes=minutes)
    return NewBooking(resource, "checkup", start, end, Interval(start, end + timedelta(minutes=buffer_after)))


@pytest.fixture
async def synced(ledger: Ledger, business: Business) -> Ledger:
    await ledger.sync_catalog(business)
    return ledger


async def created(ledger: Ledger, *bookings: NewBooking, key: str | None = None) -> Created:
    result = await ledger.create_bookings(ALICE, list(bookings), idempotency=(key, "hash") if key else None)
    assert isinstance(result, Created), result
    return result


async def test_schema_is_at_head(database: Database) -> None:
    assert await database.schema_revision() == head_revision()


async def test_overlapping_insert_is_refused_by_the_database(synced: Ledger) -> None:
    first = (await created(synced, new(T0))).bookings[0]
    outcome = await synced.create_bookings(ALICE, [new(T0 + timedelta(minutes=35))])  # inside the buffer
    assert isinstance(outcome, Overlap) and [b.id for b in outcome.conflicts] == [first.id]
    touching = await synced.create_bookings(ALICE, [new(T0 + timedelta(minutes=40))])  # half-open blocks
    assert isinstance(touching, Created)
    other_resource = await synced.create_bookings(ALICE, [new(T0, resource="dr-patel")])
    assert isinstance(other_resource, Created)
    assert await synced.count_overlaps() == 0


async def test_raw_sql_cannot_sneak_an_overlap_in(synced: Ledger, database: Database) -> None:
    """The guarantee lives in the database (exclusion constraint or trigger), not in our Python."""
    booking = (await created(synced, new(T0))).bookings[0]

    def raw_insert(connection: Connection) -> None:
        connection.execute(
            insert(t.bookings).values(
                id="intruder",
                resource_id="dr-lee",
                service_id="checkup",
                customer_id=booking.customer.id,
                status="confirmed",
                start_at=T0 + timedelta(minutes=5),
                end_at=T0 + timedelta(minutes=20),
                block_start=T0 + timedelta(minutes=5),
                block_end=T0 + timedelta(minutes=20),
                source="sql",
                version=1,
                created_at=T0,
                updated_at=T0,
                changed_by="psql",
            )
        )

    with pytest.raises(IntegrityError, match="bookings_no_overlap"):
        await database.write(raw_insert)

    second = (await created(synced, new(T0 + timedelta(hours=2)))).bookings[0]

    def raw_move(connection: Connection) -> None:
        connection.execute(
            update(t.bookings)
            .where(t.bookings.c.id == second.id)
            .values(
                start_at=T0, end_at=T0 + timedelta(minutes=30), block_start=T0, block_end=T0 + timedelta(minutes=40)
            )
        )

    with pytest.raises(IntegrityError, match="bookings_no_overlap"):
        await database.write(raw_move)
    assert await synced.count_overlaps() == 0


async def test_cancelled_bookings_do_not_block(synced: Ledger) -> None:
    booking = (await created(synced, new(T0))).bookings[0]
    await synced.change_status(booking.id, BookingStatus.CANCELLED, reason="changed plans")
    assert isinstance(await synced.create_bookings(ALICE, [new(T0)]), Created)
    history = await synced.history(booking.id)
    assert [(e.kind, e.from_status, e.to_status) for e in history] == [
        ("created", None, BookingStatus.CONFIRMED),
        ("cancelled", BookingStatus.CONFIRMED, BookingStatus.CANCELLED),
    ]
    assert history[1].details == {"reason": "changed plans"}
    # ...and a cancelled booking cannot come back by a status change that would overlap.
    with pytest.raises(InvalidTransition):
        await synced.change_status(booking.id, BookingStatus.CONFIRMED)


async def test_a_series_is_all_or_nothing(synced: Ledger) -> None:
    await created(synced, new(T0 + timedelta(days=14)))
    weekly = [new(T0 + timedelta(days=7 * week)) for week in range(4)]
    outcome = await synced.create_bookings(ALICE, weekly)
    assert isinstance(outcome, Overlap)
    assert await synced.count_bookings() == 1


async def test_idempotency_key_is_unique(synced: Ledger) -> None:
    first = await created(synced, new(T0), key="k1")
    again = await synced.create_bookings(ALICE, [new(T0 + timedelta(hours=3))], idempotency=("k1", "hash"))
    assert isinstance(again, KeyTaken) and again.record.booking_ids == (first.bookings[0].id,)
    assert await synced.count_bookings() == 1


async def test_customer_details_merge_by_phone(synced: Ledger) -> None:
    await created(synced, new(T0))
    later = await synced.create_bookings(
        CustomerDetails(phone=ALICE.phone, email="alice@example.com"), [new(T0 + timedelta(hours=2))]
    )
    assert isinstance(later, Created)
    customer = later.bookings[0].customer
    assert (customer.name, customer.email) == ("Alice", "alice@example.com"), "a detail left out is kept"
    assert len(await synced.bookings_for_phone(ALICE.phone)) == 2


async def test_reschedule_checks_version_and_overlap(synced: Ledger) -> None:
    a = (await created(synced, new(T0))).bookings[0]
    b = (await created(synced, new(T0 + timedelta(hours=1)))).bookings[0]
    target = new(T0 + timedelta(hours=1))
    outcome = await synced.reschedule(
        a.id, resource_id="dr-lee", start=target.start, end=target.end, block=target.block
    )
    assert isinstance(outcome, Overlap) and [c.id for c in outcome.conflicts] == [b.id]
    with pytest.raises(VersionConflict):
        await synced.reschedule(
            a.id,
            resource_id="dr-lee",
            start=T0 + timedelta(hours=3),
            end=T0 + timedelta(hours=3, minutes=30),
            block=Interval(T0 + timedelta(hours=3), T0 + timedelta(hours=3, minutes=40)),
            expected_version=7,
        )
    with pytest.raises(NotFound):
        await synced.change_status("missing", BookingStatus.CANCELLED)
    assert (await synced.require_booking(a.id)).start == T0


async def test_catalog_mirror_keeps_removed_entries_inactive(
    synced: Ledger, business: Business, database: Database
) -> None:
    smaller = business.model_copy(update={"services": business.services[:1]})
    await synced.sync_catalog(smaller)
    from sqlalchemy import select

    async with database.reader.connect() as connection:
        rows = dict((await connection.execute(select(t.services.c.id, t.services.c.active))).all())
    assert rows["checkup"] is True and rows["vaccination"] is False


async def test_a_block_longer_than_three_days_is_refused(synced: Ledger) -> None:
    """The bound that keeps overlap checks to a few days of index is itself enforced."""
    with pytest.raises(IntegrityError, match="block_length"):
        await synced.create_bookings(ALICE, [new(T0, minutes=3 * 24 * 60)])
    assert isinstance(await synced.create_bookings(ALICE, [new(T0, minutes=2 * 24 * 60)]), Created)


async def _count_customers(database: Database) -> int:
    return await database.read(lambda conn: conn.execute(select(func.count()).select_from(t.customers)).scalar_one())


async def test_a_read_sees_committed_writes_in_the_callers_context(synced: Ledger, database: Database) -> None:
    assert await _count_customers(database) == 0
    await created(synced, new(T0))
    assert await _count_customers(database) == 1
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker")
    marker.set("call CA1")  # a bound log field or a span, say
    assert await database.read(lambda conn: marker.get()) == "call CA1"
    with pytest.raises(ZeroDivisionError):  # the work's own error reaches the caller
        await database.read(lambda conn: 1 // 0)
    await created(synced, new(T0 + timedelta(hours=2)))  # no read held the writer up
    bookings = select(func.count()).select_from(t.bookings)
    assert await database.read(lambda conn: conn.execute(bookings).scalar_one()) == 2


async def test_a_sqlite_read_is_one_snapshot_and_one_hop(synced: Ledger, database: Database) -> None:
    if database.dialect != "sqlite":
        pytest.skip("PostgreSQL reads at read committed, a snapshot per statement, like its async reader")
    await created(synced, new(T0))
    path = str(database.url.database)

    def read_twice_around_a_write(conn: Connection) -> tuple[int, int]:
        count = select(func.count()).select_from(t.customers)
        before = conn.execute(count).scalar_one()
        other = sqlite3.connect(path)  # another writer commits between the two statements
        other.execute(
            "INSERT INTO customers (id, phone, phone_index, name, created_at, updated_at) "
            "SELECT 'c-other', phone, 'other-index', name, created_at, updated_at FROM customers"
        )
        other.commit()
        other.close()
        return before, conn.execute(count).scalar_one()

    assert await database.read(read_twice_around_a_write) == (1, 1)
    assert await _count_customers(database) == 2  # committed, and seen by the next read

    # Through aiosqlite a read is a hop to its thread per DBAPI call; Database.read makes none of those.
    hops = 0
    original: Any = aiosqlite.core.Connection._execute

    async def counted(self: aiosqlite.core.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await original(self, fn, *args, **kwargs)

    with patch.object(aiosqlite.core.Connection, "_execute", counted):
        await _count_customers(database)
        assert hops == 0
        async with database.reader.connect() as conn:
            await conn.execute(select(func.count()).select_from(t.customers))
        assert hops >= 4
