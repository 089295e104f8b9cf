"""Reports in the ledger: immutable versions numbered per call, the newest is the report, and every
generation, edit and read is in the audit trail (real SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, update

from booking.calls import CallStatus
from booking.ledger import schema as t
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from booking.ledger.reports_repository import AuditAction, ReportLedger, open_report
from tests.conftest import FrozenClock

CALL = "CA" + "5" * 32


@pytest.fixture
async def reports(database: Database, clock: FrozenClock) -> ReportLedger:
    await CallLedger(database, clock=clock).record_call(
        call_sid=CALL,
        account_sid="AC" + "0" * 32,
        from_number="+12125550142",
        to_number="+12125550100",
        direction="inbound",
        status=CallStatus.IN_PROGRESS,
    )
    return ReportLedger(database, clock=clock)


async def test_each_generation_is_a_new_version_and_the_newest_is_the_report(reports: ReportLedger) -> None:
    first = await reports.add_version(
        CALL, {"summary": "booked"}, schema_version=1, produced_by="builder/1", reason="hang-up", actor="worker"
    )
    second = await reports.add_version(
        CALL,
        {"summary": "booked a check-up"},
        schema_version=1,
        produced_by="builder/1",
        reason="regenerated",
        actor="admin",
        action=AuditAction.EDITED,
    )
    assert (first, second) == (1, 2)
    current = await reports.latest(CALL, actor="admin-api")
    assert current is not None and current.version == 2 and current.body == {"summary": "booked a check-up"}
    assert [(v.version, v.reason, v.body["summary"]) for v in await reports.versions(CALL)] == [
        (1, "hang-up", "booked"),
        (2, "regenerated", "booked a check-up"),
    ]
    trail = await reports.audit_trail("call", CALL)
    assert [(e.action, e.actor, e.details.get("version")) for e in trail] == [
        (AuditAction.GENERATED, "worker", 1),
        (AuditAction.EDITED, "admin", 2),
        (AuditAction.READ, "admin-api", 2),
    ]


async def test_versions_are_immutable_rows_not_updates(reports: ReportLedger, database: Database) -> None:
    await reports.add_version(CALL, {"a": 1}, schema_version=1, produced_by="b", reason="r", actor="w")
    await reports.add_version(CALL, {"a": 2}, schema_version=1, produced_by="b", reason="r", actor="w")
    async with database.reader.connect() as conn:
        rows = (await conn.execute(select(t.call_reports.c.version, t.call_reports.c.body))).all()
    opened = [(version, open_report(CALL, version, body)["a"]) for version, body in rows]  # stored sealed
    assert sorted(opened) == [(1, 1), (2, 2)]


async def test_concurrent_generations_get_distinct_versions(reports: ReportLedger) -> None:
    versions = await asyncio.gather(
        *(
            reports.add_version(CALL, {"n": n}, schema_version=1, produced_by="b", reason="r", actor="w")
            for n in range(6)
        )
    )
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]


async def test_a_call_without_a_report_reads_none_and_leaves_no_read_in_the_trail(reports: ReportLedger) -> None:
    assert await reports.latest(CALL, actor="admin-api") is None
    assert await reports.audit_trail("call", CALL) == []


async def test_exports_and_deletions_are_audited(reports: ReportLedger, database: Database) -> None:
    await reports.record(AuditAction.EXPORTED, "call", CALL, "crm-sync", {"to": "airtable"})
    await reports.record(AuditAction.DELETED, "transcript", CALL, "retention", {"older_than_days": 90})
    assert [e.action for e in await reports.audit_trail("call", CALL)] == [AuditAction.EXPORTED]
    [deleted] = await reports.audit_trail("transcript", CALL)
    assert deleted.details == {"older_than_days": 90}
    # The trail is append-only in use: nothing here updates it, and a row edited by hand is visible as such.
    await database.write(lambda conn: conn.execute(update(t.audit_events).values(actor="someone")))
    assert {e.actor for e in await reports.audit_trail("call", CALL)} == {"someone"}
