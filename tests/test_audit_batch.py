"""Audit entries are written once per transaction: a group-commit batch of bookings costs one head
reservation, one insert and one head update however many entries it holds (on PostgreSQL the insert
and the update are one statement), with consecutive ids that verify; a batch rolled back and re-run one
write at a time leaves nothing of the failed attempt; writers on two ``Database`` objects (two
processes) still make one chain; and no transaction can commit entries it appended without writing
them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select
from sqlalchemy.engine import Connection

from booking.business import Business
from booking.domain import Interval
from booking.ledger import schema as t
from booking.ledger.audit import (
    AuditAction,
    UnflushedAuditError,
    append_audit,
    pending_entries,
    verify_audit,
)
from booking.ledger.database import Database
from booking.ledger.repository import Created, CustomerDetails, Ledger, NewBooking, Overlap

AT = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
RESOURCES = ("dr-lee", "dr-patel")


def entry(conn: Connection, subject: str, *, actor: str = "tester") -> None:
    append_audit(conn, at=AT, actor=actor, action=AuditAction.READ, subject_kind="call", subject_id=subject)


async def chain(database: Database) -> list[tuple[int, str]]:
    """(id, subject) of every entry, in id order."""
    a = t.audit_events.c
    async with database.reader.connect() as conn:
        return [(row.id, row.subject_id) for row in await conn.execute(select(a.id, a.subject_id).order_by(a.id))]


def slot(n: int) -> NewBooking:
    """The n-th of a run of free, non-overlapping 30-minute slots over the two resources."""
    start = T0 + timedelta(hours=n // len(RESOURCES))
    end = start + timedelta(minutes=30)
    return NewBooking(RESOURCES[n % len(RESOURCES)], "checkup", start, end, Interval(start, end))


@pytest.fixture
async def synced(ledger: Ledger, business: Business) -> Ledger:
    await ledger.sync_catalog(business)
    return ledger


@dataclass
class Transaction:
    statements: list[tuple[str, bool]] = field(default_factory=list)

    def on(self, table: str) -> list[tuple[str, bool]]:
        return [(sql, many) for sql, many in self.statements if table in sql]


@pytest.fixture
def committed() -> Iterator[list[Transaction]]:
    """The statements of every transaction committed while the test runs, on every engine."""
    done: list[Transaction] = []
    open_: dict[int, Transaction] = {}

    def executed(conn: Connection, _cursor: Any, sql: str, _params: Any, _context: Any, many: bool) -> None:
        open_.setdefault(id(conn.connection.dbapi_connection), Transaction()).statements.append((sql, many))

    def commit(conn: Connection) -> None:
        done.append(open_.pop(id(conn.connection.dbapi_connection), Transaction()))

    def rollback(conn: Connection) -> None:
        open_.pop(id(conn.connection.dbapi_connection), None)

    hooks = (("before_cursor_execute", executed), ("commit", commit), ("rollback", rollback))
    for name, hook in hooks:
        event.listen(Engine, name, hook)
    try:
        yield done
    finally:
        for name, hook in hooks:
            event.remove(Engine, name, hook)


async def test_a_batch_of_bookings_writes_its_entries_with_one_head_update_and_one_insert(
    synced: Ledger, database: Database, committed: list[Transaction]
) -> None:
    n = 12
    # A first entry: a truncated ledger has no head row yet, and seeding it is not what is counted here.
    await database.write(lambda conn: entry(conn, "CA-first"))
    committed.clear()
    batches_before = database.group_commit.batches
    customer = CustomerDetails(phone="+12125550142", name="Alice")
    # Submitted in one event-loop step, so group commit takes them as one batch.
    outcomes = await asyncio.gather(*(synced.create_bookings(customer, [slot(i)], actor=f"a{i}") for i in range(n)))
    assert all(isinstance(o, Created) for o in outcomes)
    assert database.group_commit.batches == batches_before + 1
    booking_ids = [o.bookings[0].id for o in outcomes if isinstance(o, Created)]
    assert await chain(database) == [(1, "CA-first"), *enumerate(booking_ids, start=2)]  # in batch order
    result = await verify_audit(database)
    assert result.ok and result.entries == n + 1, result.detail

    audited = [tx for tx in committed if tx.on("audit_events")]
    assert len(audited) == 1
    [tx] = audited
    head, entries = tx.on("audit_chain_head"), tx.on("audit_events")
    assert len(head) == 2 and head[0][0].lstrip().upper().startswith("UPDATE")  # the ids reserved
    assert len(entries) == 1  # all n entries in one statement
    if database.dialect == "postgresql":
        # The entries and the head's new hash go in one statement (one round trip).
        assert entries == head[1:] and entries[0][0].lstrip().upper().startswith("WITH")
    else:
        assert head[1][0].lstrip().upper().startswith("UPDATE")
    # The head is taken after every booking insert: its lock (PostgreSQL) is held only up to COMMIT.
    last_booking = max(i for i, (sql, _) in enumerate(tx.statements) if "INSERT INTO bookings" in sql)
    first_head = min(i for i, (sql, _) in enumerate(tx.statements) if "audit_chain_head" in sql)
    assert first_head > last_booking


async def test_a_failed_batch_rerun_one_by_one_keeps_no_entry_of_the_attempt(
    synced: Ledger, database: Database
) -> None:
    """Two bookings of one slot in one batch: the database refuses the overlap, the batch is rolled back
    and each booking runs again alone. The chain holds one entry per booking made, ids without a gap."""
    customer = CustomerDetails(phone="+12125550142", name="Alice")
    requests = [slot(0), slot(1), slot(0), slot(2)]  # the third overlaps the first
    retried_before = database.group_commit.retried_batches
    outcomes = await asyncio.gather(*(synced.create_bookings(customer, [b]) for b in requests))
    assert database.group_commit.retried_batches == retried_before + 1
    assert [type(o) for o in outcomes] == [Created, Created, Overlap, Created]
    made = [o.bookings[0].id for o in outcomes if isinstance(o, Created)]
    assert await chain(database) == list(enumerate(made, start=1))
    result = await verify_audit(database)
    assert result.ok and result.entries == 3, result.detail


async def test_a_write_that_fails_after_appending_leaves_nothing_pending(database: Database) -> None:
    """The entries of a write that raised go with its rollback, from the batch attempt and from its own
    re-run: the next transaction on the same connection does not write them."""

    def fails(conn: Connection) -> None:
        entry(conn, "CA-failed")
        raise RuntimeError("refused after appending")

    writes = [database.write(functools.partial(entry, subject=f"CA{i}")) for i in range(4)]
    writes.insert(2, database.write(fails))
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert [type(o) for o in outcomes] == [type(None)] * 2 + [RuntimeError] + [type(None)] * 2
    await database.write(lambda conn: entry(conn, "CA-after"))
    assert await chain(database) == [(1, "CA0"), (2, "CA1"), (3, "CA2"), (4, "CA3"), (5, "CA-after")]
    assert (await verify_audit(database)).ok


async def test_several_entries_of_one_write_keep_their_order(database: Database) -> None:
    def three(conn: Connection) -> int:
        for subject in ("CA-x", "CA-y", "CA-z"):
            entry(conn, subject)
        return len(pending_entries(conn))  # none written yet: the flush comes after the last write

    assert await database.write(three) == 3
    assert await chain(database) == [(1, "CA-x"), (2, "CA-y"), (3, "CA-z")]
    assert (await verify_audit(database)).ok


async def test_writers_of_two_databases_make_one_chain(database_url: str) -> None:
    """Two ``Database`` objects, as two server processes: each commits batches of several entries at once,
    and the head hands every batch its own run of ids."""
    databases = [Database.connect(database_url) for _ in range(2)]
    rounds, per_round = 5, 6
    try:

        def two_entries(prefix: str, conn: Connection) -> None:
            entry(conn, f"{prefix}-0")
            entry(conn, f"{prefix}-1")

        async def writer(database: Database, which: int) -> None:
            for r in range(rounds):
                await asyncio.gather(
                    *(database.write(functools.partial(two_entries, f"W{which}-{r}-{k}")) for k in range(per_round))
                )

        await asyncio.gather(*(writer(db, which) for which, db in enumerate(databases)))
        stored = await chain(databases[0])
        total = 2 * rounds * per_round * 2
        assert [entry_id for entry_id, _ in stored] == list(range(1, total + 1))
        # Each write's two entries are neighbours: a batch's entries are hashed and inserted together.
        subjects = [subject for _, subject in stored]
        for first, second in zip(subjects[::2], subjects[1::2], strict=True):
            assert first.endswith("-0") and second == first[:-1] + "1"
        result = await verify_audit(databases[1])
        assert result.ok and result.entries == total, result.detail
    finally:
        for database in databases:
            await database.dispose()


async def test_a_commit_with_unwritten_entries_is_refused(database: Database) -> None:
    """A transaction that appends entries but does not run through ``Database.write`` (so nothing flushes
    them) cannot commit: it raises and rolls back, its other writes with it."""

    def sneaky(conn: Connection) -> None:
        conn.execute(insert(t.resources).values(id="room-x", name="Room X", kind="room", active=True, synced_at=AT))
        entry(conn, "CA-unwritten")

    with pytest.raises(UnflushedAuditError, match="CA-unwritten"):
        async with database.reader.begin() as conn:
            await conn.run_sync(sneaky)
    async with database.reader.connect() as conn:
        rooms = (await conn.execute(select(func.count()).select_from(t.resources))).scalar_one()
    assert rooms == 0
    await database.write(lambda conn: entry(conn, "CA-written"))
    assert await chain(database) == [(1, "CA-written")]
    assert (await verify_audit(database)).ok


async def test_a_rolled_back_savepoint_takes_its_entries_with_it(database: Database) -> None:
    def work(conn: Connection) -> None:
        entry(conn, "CA-kept")
        dropped = conn.begin_nested()
        entry(conn, "CA-dropped")
        dropped.rollback()
        with conn.begin_nested():
            entry(conn, "CA-released")
        entry(conn, "CA-last")

    await database.write(work)
    assert await chain(database) == [(1, "CA-kept"), (2, "CA-released"), (3, "CA-last")]
    assert (await verify_audit(database)).ok
