"""Writes that need no answer back go to PostgreSQL as one statement (``booking/ledger/combined.py``),
and to SQLite one after the other, with the same rows, the same order and the same refusals: a phone
booking's transaction is four statements on PostgreSQL instead of eight, a refused booking leaves none of
its other rows, serial ids follow the rows' order, a conflict is skipped where asked, and the statement
is compiled once per shape whatever the number of rows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, event, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from booking.business import Business
from booking.domain import Interval, SmsConsent
from booking.ledger import schema as t
from booking.ledger.audit import verify_audit
from booking.ledger.combined import CombinedWrite
from booking.ledger.database import Database
from booking.ledger.repository import Created, CustomerDetails, Ledger, NewBooking, Overlap
from booking.outbox import EffectKind

AT = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
START = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)  # more than a day after the test clock: a reminder is due
_RENAME_WORDING = (
    update(t.consent_wordings).where(t.consent_wordings.c.version == bindparam("old")).values(text=bindparam("new"))
)


def visit(start: datetime, resource: str = "dr-lee") -> NewBooking:
    end = start + timedelta(minutes=30)
    return NewBooking(resource, "checkup", start, end, Interval(start, end))


@pytest.fixture
async def synced(ledger: Ledger, business: Business) -> Ledger:
    await ledger.sync_catalog(business)
    return ledger


@pytest.fixture
def statements(database: Database) -> Iterator[list[tuple[str, Any]]]:
    """(SQL, SQLAlchemy's cache outcome) of every write the ledger's writer runs during the test."""
    seen: list[tuple[str, Any]] = []

    def executed(_conn: Connection, _cursor: Any, sql: str, _params: Any, context: Any, _many: bool) -> None:
        if not sql.startswith(("BEGIN", "SELECT")):  # SQLite's BEGIN IMMEDIATE; the tests' own reads
            seen.append((sql, context.cache_hit))

    engine: Engine = database.write_engine
    event.listen(engine, "before_cursor_execute", executed)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", executed)


async def count(database: Database, table: Any) -> int:
    async with database.reader.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_a_phone_booking_is_four_statements_on_postgresql_and_all_its_rows_land(
    synced: Ledger, database: Database, statements: list[tuple[str, Any]]
) -> None:
    # A first booking: on a truncated ledger it also seeds the audit chain's head, not counted here.
    assert isinstance(await synced.create_bookings(CustomerDetails(phone="+12125550100"), [visit(AT)]), Created)
    statements.clear()
    outcome = await synced.create_bookings(
        CustomerDetails(phone="+12125550142", name="Alice"),
        [visit(START)],
        idempotency=("call-1", "0" * 64),
        source="phone",
        sms_consent=SmsConsent.GIVEN,
        sms_consent_wording="Can we text you about this visit?",
        actor="call",
    )
    assert isinstance(outcome, Created)
    [booking] = outcome.bookings
    # The customer (its stored row comes back), the rest, the audit ids reserved, the entry and the head.
    assert len(statements) == (4 if database.dialect == "postgresql" else 8), [sql[:60] for sql, _ in statements]

    e, c = t.effects.c, t.consents.c
    async with database.reader.connect() as conn:
        effects = (await conn.execute(select(e.kind).where(e.booking_id == booking.id).order_by(e.id))).scalars().all()
        consent = (await conn.execute(select(c.booking_id, c.decision))).one()
        wording = (await conn.execute(select(t.consent_wordings.c.text))).scalar_one()
        stored = (await conn.execute(select(t.bookings.c.customer_id).where(t.bookings.c.id == booking.id))).one()
    # Serial ids follow the rows' order: the order in which the booking's effects run.
    assert effects == [EffectKind.CALENDAR_CREATE, EffectKind.SMS_CONFIRMATION, EffectKind.SMS_REMINDER]
    assert consent.booking_id == booking.id and consent.decision == "granted"
    assert wording == "Can we text you about this visit?"
    assert stored.customer_id == booking.customer.id
    result = await verify_audit(database)
    assert result.ok and result.entries == 2, result.detail


async def test_a_refused_booking_leaves_none_of_its_other_rows(synced: Ledger, database: Database) -> None:
    first = await synced.create_bookings(CustomerDetails(phone="+12125550142", name="Alice"), [visit(START)])
    assert isinstance(first, Created)
    before = {table.name: await count(database, table) for table in (t.effects, t.consents, t.customers)}

    refused = await synced.create_bookings(
        CustomerDetails(phone="+12125550199", name="Bob"),
        [visit(START + timedelta(minutes=15))],
        source="phone",
        sms_consent=SmsConsent.GIVEN,
    )
    assert isinstance(refused, Overlap) and [b.id for b in refused.conflicts] == [first.bookings[0].id]
    after = {table.name: await count(database, table) for table in (t.effects, t.consents, t.customers)}
    assert after == before  # not Bob, not his effects, not his yes to texts
    result = await verify_audit(database)
    assert result.ok and result.entries == 1, result.detail


async def test_inserts_keep_their_order_skip_conflicts_where_asked_and_run_updates(
    database: Database, statements: list[tuple[str, Any]]
) -> None:
    await database.write(lambda conn: conn.execute(t.consent_wordings.insert(), [wording("v1", "first")]))
    statements.clear()

    def work(conn: Connection) -> None:
        writes = CombinedWrite()
        both = [wording("v1", "again"), wording("v2", "second")]
        writes.insert(t.consent_wordings, both, skip_conflicts_on=["version"])
        writes.insert(t.consents, [consent(f"s{n}") for n in range(3)])
        writes.update(_RENAME_WORDING, {"old": "v1", "new": "renamed"})
        assert len(writes) == 3
        writes.send(conn)
        assert len(writes) == 0

    await database.write(work)
    assert len(statements) == (1 if database.dialect == "postgresql" else 3)
    c, w = t.consents.c, t.consent_wordings.c
    async with database.reader.connect() as conn:
        subjects = (await conn.execute(select(c.subject_index).order_by(c.id))).scalars().all()
        wordings = (await conn.execute(select(w.version, w.text).order_by(w.version))).all()
    assert subjects == ["s0", "s1", "s2"]
    # v1 was there: its second insert is skipped, and the update (which on PostgreSQL saw the
    # statement's starting snapshot, where v1 already was) renamed it.
    assert [tuple(row) for row in wordings] == [("v1", "renamed"), ("v2", "second")]


async def test_a_refused_row_fails_the_whole_write(database: Database) -> None:
    await database.write(lambda conn: conn.execute(t.consent_wordings.insert(), [wording("v1", "first")]))

    def work(conn: Connection) -> None:
        writes = CombinedWrite()
        writes.insert(t.consents, [consent("s0")])
        writes.insert(t.consent_wordings, [wording("v1", "clash")])  # no conflict skipping: the key is taken
        writes.send(conn)

    with pytest.raises(IntegrityError):
        await database.write(work)
    assert await count(database, t.consents) == 0


async def test_the_statement_is_compiled_once_whatever_the_number_of_rows(
    database: Database, statements: list[tuple[str, Any]]
) -> None:
    def work(rows: int) -> Any:
        def write(conn: Connection) -> None:
            writes = CombinedWrite()
            writes.insert(t.consents, [consent(f"s{rows}-{n}") for n in range(rows)])
            writes.insert(t.consent_wordings, [wording(f"v{rows}-{n}", "text") for n in range(rows)])
            writes.send(conn)

        return write

    for rows in (1, 5, 40):
        await database.write(work(rows))
    assert await count(database, t.consents) == 46
    if database.dialect == "postgresql":
        texts = {sql for sql, _ in statements}
        assert len(texts) == 1  # one text for every number of rows: prepared once per connection
        assert [str(hit) for _, hit in statements[1:]] == ["CacheStats.CACHE_HIT"] * 2


async def test_rows_of_one_insert_must_have_the_same_columns_and_no_rows_is_nothing(
    database: Database, statements: list[tuple[str, Any]]
) -> None:
    writes = CombinedWrite()
    with pytest.raises(ValueError, match="same columns"):
        writes.insert(t.consent_wordings, [wording("v1", "a"), {"version": "v2", "text": "b"}])
    writes.insert(t.consents, [])
    assert len(writes) == 0

    def work(conn: Connection) -> None:
        writes.send(conn)

    await database.write(work)
    assert statements == []


def wording(version: str, text: str) -> dict[str, Any]:
    return {"version": version, "text": text, "first_used_at": AT}


def consent(subject: str) -> dict[str, Any]:
    return {
        "subject_index": subject,
        "kind": "sms",
        "decision": "granted",
        "channel": "booking",
        "wording_version": "v1",
        "at": AT,
        "call_sid": None,
        "booking_id": None,
    }
