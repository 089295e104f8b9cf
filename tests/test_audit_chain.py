"""The audit log's hash chain: appends link each entry to the one before; an entry edited, removed or
swapped with another in the database is found, with its id; concurrent appends from separate connections
never fork the chain; ``voicebook audit verify`` exits 0 or 1 accordingly; the migration chains entries
written before it; booking changes are audited in their own transaction, without personal data."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.engine import Connection

from booking.domain import BookingStatus
from booking.ledger import schema as t
from booking.ledger.audit import (
    GENESIS_HASH,
    AuditAction,
    AuditDetailsError,
    Breach,
    append_audit,
    verify_audit,
)
from booking.ledger.database import Database, migrate
from booking.ledger.repository import CustomerDetails
from booking.service import Booked, BookingService, BookRequest
from tests.conftest import BACKEND, PG_ADMIN_URL, FrozenClock, _pg_admin
from voice_server import audit_cli
from voice_server.settings import Settings

AT = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
CONTENT = ("at", "actor", "action", "subject_kind", "subject_id", "details")


async def newest_id(database: Database) -> int | None:
    async with database.reader.connect() as conn:
        newest = (await conn.execute(select(func.max(t.audit_events.c.id)))).scalar_one()
        return None if newest is None else int(newest)


async def append(database: Database, n: int, *, actor: str = "tester") -> list[int]:
    """Append ``n`` entries, one transaction each; the id each transaction's entry got."""
    ids: list[int] = []
    for i in range(n):
        await database.write(
            functools.partial(
                append_audit,
                at=AT + timedelta(seconds=i),
                actor=actor,
                action=AuditAction.READ,
                subject_kind="call",
                subject_id=f"CA{i:04d}",
                details={"what": "transcript", "n": i, "nested": {"b": [1, 2], "a": None}},
            )
        )
        newest = await newest_id(database)
        assert newest is not None
        ids.append(newest)
    return ids


async def rows(database: Database) -> list[dict[str, object]]:
    async with database.reader.connect() as conn:
        result = await conn.execute(select(t.audit_events).order_by(t.audit_events.c.id))
        return [dict(row._mapping) for row in result]


async def test_appends_chain_and_verify(database: Database) -> None:
    assert (await verify_audit(database)).ok  # an empty log holds
    assert await append(database, 5) == [1, 2, 3, 4, 5]
    stored = await rows(database)
    assert stored[0]["prev_hash"] == GENESIS_HASH
    assert [r["prev_hash"] for r in stored[1:]] == [r["entry_hash"] for r in stored[:-1]]
    result = await verify_audit(database, page=2)  # several pages
    assert result.ok and result.entries == 5 and result.head_id == 5
    assert result.head_hash == stored[-1]["entry_hash"]


async def test_details_that_cannot_be_hashed_reproducibly_are_refused(database: Database) -> None:
    with pytest.raises(AuditDetailsError, match=r"details\.ratio"):
        await database.write(
            lambda conn: append_audit(
                conn, at=AT, actor="x", action="read", subject_kind="call", subject_id="CA1", details={"ratio": 0.5}
            )
        )
    assert (await verify_audit(database)).entries == 0


async def test_an_edited_entry_is_found(database: Database) -> None:
    await append(database, 6)
    await database.write(
        lambda conn: conn.execute(
            update(t.audit_events).where(t.audit_events.c.id == 4).values(details={"what": "nothing"})
        )
    )
    result = await verify_audit(database, page=3)
    assert (result.broken_id, result.breach, result.entries) == (4, Breach.EDITED, 3)


async def test_an_edited_actor_with_its_hash_recomputed_breaks_the_next_link(database: Database) -> None:
    """Rewriting an entry and its own hash (but not the rest of the chain) is caught at the next entry."""
    from booking.ledger.audit import entry_hash

    await append(database, 4)
    row = (await rows(database))[1]
    forged = entry_hash(
        id=2,
        at=row["at"],  # type: ignore[arg-type]
        actor="somebody-else",
        action=str(row["action"]),
        subject_kind=str(row["subject_kind"]),
        subject_id=str(row["subject_id"]),
        details=row["details"],  # type: ignore[arg-type]
        prev_hash=str(row["prev_hash"]),
    )
    await database.write(
        lambda conn: conn.execute(
            update(t.audit_events).where(t.audit_events.c.id == 2).values(actor="somebody-else", entry_hash=forged)
        )
    )
    result = await verify_audit(database)
    assert (result.broken_id, result.breach) == (3, Breach.REMOVED)


async def test_a_removed_entry_is_found(database: Database) -> None:
    await append(database, 6)
    await database.write(lambda conn: conn.execute(delete(t.audit_events).where(t.audit_events.c.id == 3)))
    result = await verify_audit(database)
    assert (result.broken_id, result.breach) == (3, Breach.REMOVED)
    assert "jumps from 2 to 4" in result.detail


async def test_removing_the_newest_entries_is_found(database: Database) -> None:
    await append(database, 5)
    await database.write(lambda conn: conn.execute(delete(t.audit_events).where(t.audit_events.c.id >= 4)))
    result = await verify_audit(database)
    assert (result.broken_id, result.breach) == (4, Breach.REMOVED)


async def test_a_removal_with_the_rest_renumbered_is_found(database: Database) -> None:
    await append(database, 5)

    def renumber(conn: object) -> None:
        assert hasattr(conn, "execute")
        conn.execute(delete(t.audit_events).where(t.audit_events.c.id == 2))
        for old in (3, 4, 5):
            conn.execute(update(t.audit_events).where(t.audit_events.c.id == old).values(id=old - 1))
        conn.execute(update(t.audit_chain_head).values(last_id=4))

    await database.write(renumber)
    result = await verify_audit(database)
    assert result.broken_id == 2 and result.breach in (Breach.REORDERED, Breach.EDITED)


@pytest.mark.parametrize("with_hashes", [False, True], ids=["contents", "contents-and-hashes"])
async def test_two_swapped_entries_are_found_as_reordered(database: Database, with_hashes: bool) -> None:
    await append(database, 6)
    stored = {r["id"]: r for r in await rows(database)}
    columns = CONTENT + (("prev_hash", "entry_hash") if with_hashes else ())

    def swap(conn: object) -> None:
        assert hasattr(conn, "execute")
        a = t.audit_events.c
        for target, source in ((3, 4), (4, 3)):
            conn.execute(update(t.audit_events).where(a.id == target).values({c: stored[source][c] for c in columns}))

    await database.write(swap)
    result = await verify_audit(database)
    assert (result.broken_id, result.breach) == (3, Breach.REORDERED)
    assert "contents of entry 4" in result.detail


async def test_concurrent_appends_from_separate_connections_keep_one_chain(database_url: str) -> None:
    """Several engines (as several server processes would) append at once: every entry gets its own id
    and the chain verifies. Without the head row's lock two would chain onto the same entry."""
    engines = [Database.connect(database_url) for _ in range(4)]
    try:
        per_engine = 15

        async def writer(database: Database, which: int) -> None:
            await asyncio.gather(
                *(
                    database.write(
                        functools.partial(
                            append_audit,
                            at=AT,
                            actor=f"writer-{which}",
                            action=AuditAction.READ,
                            subject_kind="call",
                            subject_id=f"CA{which}-{n}",
                            details={"n": n},
                        )
                    )
                    for n in range(per_engine)
                )
            )

        await asyncio.gather(*(writer(db, k) for k, db in enumerate(engines)))
        stored = await rows(engines[0])
        assert [r["id"] for r in stored] == list(range(1, 4 * per_engine + 1))
        assert sorted(str(r["subject_id"]) for r in stored) == sorted(
            f"CA{k}-{n}" for k in range(4) for n in range(per_engine)
        )
        result = await verify_audit(engines[0])
        assert result.ok and result.entries == 4 * per_engine, result.detail
    finally:
        for database in engines:
            await database.dispose()


async def test_booking_changes_are_audited_without_personal_data(
    service: BookingService, database: Database, clock: FrozenClock
) -> None:
    booked = await service.book(
        BookRequest(
            service_id="checkup",
            start=datetime(2026, 12, 1, 15, 0, tzinfo=UTC),
            customer=CustomerDetails(phone="+12125550142", name="Alice Example", email="alice@example.com"),
            actor="call:CA1",
        )
    )
    assert isinstance(booked, Booked)
    booking_id = booked.booking.id
    moved = await service.reschedule(booking_id, datetime(2026, 12, 1, 16, 0, tzinfo=UTC), actor="call:CA1")
    assert isinstance(moved, Booked)
    await service.cancel(booking_id, reason="Alice Example is ill", actor="operator-7")
    entries = [r for r in await rows(database) if r["action"] == AuditAction.BOOKING_CHANGED]
    assert [(e["actor"], e["subject_id"]) for e in entries] == [
        ("call:CA1", booking_id),
        ("call:CA1", booking_id),
        ("operator-7", booking_id),
    ]
    created, rescheduled, cancelled = (e["details"] for e in entries)
    assert created["to_status"] == "confirmed" and created["from_status"] is None  # type: ignore[index]
    assert rescheduled["from"]["start"] == "2026-12-01T15:00:00+00:00"  # type: ignore[index]
    assert rescheduled["to"]["start"] == "2026-12-01T16:00:00+00:00"  # type: ignore[index]
    assert (cancelled["from_status"], cancelled["to_status"]) == ("confirmed", "cancelled")  # type: ignore[index]
    written = repr(entries)
    for personal in ("2125550142", "Alice", "alice@", "ill"):
        assert personal not in written
    assert (await verify_audit(database)).ok
    assert (await service.ledger.require_booking(booking_id)).status is BookingStatus.CANCELLED


async def test_cli_verify_exits_0_then_1_once_tampered(database: Database, database_url: str, tmp_path: Path) -> None:
    await append(database, 3)
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    out = io.StringIO()
    assert await audit_cli.audit_verify(settings, out=out) == 0
    assert "audit log ok: 3 entries" in out.getvalue()
    await database.write(
        lambda conn: conn.execute(update(t.audit_events).where(t.audit_events.c.id == 2).values(actor="mallory"))
    )
    out = io.StringIO()
    assert await audit_cli.audit_verify(settings, out=out) == 1
    assert "BROKEN at entry 2 (edited)" in out.getvalue()
    # The command itself, as an operator runs it.
    env = {**os.environ, "DATABASE_URL": database_url, "VOICEBOOK_DATA_DIR": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voice_server.cli",
        "audit",
        "verify",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode == 1, output.decode()
    assert b"BROKEN at entry 2 (edited)" in output


async def test_cli_verify_exits_2_on_an_unmigrated_ledger(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    err = io.StringIO()
    assert await audit_cli.audit_verify(settings, err=err) == 2
    assert "voicebook migrate" in err.getvalue()


async def _fresh_ledger_url(tmp_path: Path) -> tuple[str, str | None]:
    if BACKEND == "services":
        name = f"voicebook_audit_{uuid.uuid4().hex[:10]}"
        await _pg_admin(f'CREATE DATABASE "{name}"')
        return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}", name
    return f"sqlite:///{tmp_path / 'old.db'}", None


@pytest.mark.backend
async def test_the_migration_renumbers_and_chains_existing_entries(tmp_path: Path) -> None:
    url, created = await _fresh_ledger_url(tmp_path)
    try:
        database = Database.connect(url)
        try:
            await migrate(database, "0012")
            old = text(
                "INSERT INTO audit_events (id, at, actor, action, subject_kind, subject_id, details) "
                "VALUES (:id, :at, 'worker', 'generated', 'call', :sid, :details)"
            )
            at = "2026-11-30 12:00:00" if database.dialect == "sqlite" else AT
            for old_id in (3, 7, 8):  # a sequence's gaps
                row = {"id": old_id, "at": at, "sid": f"CA{old_id}", "details": '{"version": 1}'}
                await database.write(functools.partial(Connection.execute, statement=old, parameters=row))
            await migrate(database)
            stored = await rows(database)
            assert [(r["id"], r["subject_id"]) for r in stored] == [(1, "CA3"), (2, "CA7"), (3, "CA8")]
            assert (await verify_audit(database)).ok
            await database.write(
                lambda conn: append_audit(
                    conn, at=AT, actor="x", action=AuditAction.READ, subject_kind="call", subject_id="CA9"
                )
            )
            assert await newest_id(database) == 4
            assert (await verify_audit(database)).entries == 4
        finally:
            await database.dispose()
    finally:
        if created is not None:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{created}" WITH (FORCE)')


async def test_a_ledger_emptied_by_hand_starts_a_new_chain(database: Database) -> None:
    await append(database, 2)
    await database.write(lambda conn: conn.execute(delete(t.audit_events)))
    await database.write(lambda conn: conn.execute(delete(t.audit_chain_head)))
    assert await append(database, 2) == [1, 2]
    assert (await verify_audit(database)).ok
    # Entries without a head row: the head is seeded from the newest entry, the chain goes on.
    await database.write(lambda conn: conn.execute(delete(t.audit_chain_head)))
    missing = await verify_audit(database)
    assert missing.breach is Breach.REMOVED and "head row is missing" in missing.detail
    assert await append(database, 1) == [3]
    assert (await verify_audit(database)).ok
