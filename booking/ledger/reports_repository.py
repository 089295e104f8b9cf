"""End-of-call reports in the ledger, and the audit trail around them.

A report is never updated: each generation (the first at hang-up, any regeneration, an operator's edit)
is a new version of the call's report, numbered from 1, and the newest is the call's report. Every
generation, edit, export and read of a report or transcript is written to ``audit_events`` in the same
transaction as what it records, so the trail cannot miss an action that happened.

Usage::

    reports = ReportLedger(database)
    version = await reports.add_version(call_sid, body, schema_version=1, produced_by="report-builder/1",
                                        reason="hang-up", actor="worker")
    current = await reports.latest(call_sid, actor="admin-api")   # audited as a read
    trail = await reports.audit_trail("call", call_sid)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now

__all__ = ["AuditAction", "AuditEvent", "ReportLedger", "StoredReport", "pick_version"]


@dataclass(frozen=True, slots=True)
class StoredReport:
    call_sid: str
    version: int
    schema_version: int
    body: dict[str, Any]
    produced_by: str
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: datetime
    actor: str
    action: AuditAction
    subject_kind: str
    subject_id: str
    details: dict[str, Any]


def pick_version(versions: Sequence[StoredReport], number: int | None) -> StoredReport | None:
    """The version numbered ``number`` of ``versions`` (oldest first), the newest when ``number`` is None;
    None when there is no such version."""
    if number is None:
        return versions[-1] if versions else None
    return next((stored for stored in versions if stored.version == number), None)


def seal_report(call_sid: str, version: int, body: Mapping[str, Any]) -> dict[str, str]:
    """A report body as stored: the whole document sealed to its call and version (it holds the
    transcript, the summary and what the caller said about themselves)."""
    return pii.cipher().encrypt_json(body, table="call_reports", column="body", row=f"{call_sid}:{version}")


def open_report(call_sid: str, version: int, stored: Mapping[str, Any]) -> dict[str, Any]:
    return pii.cipher().decrypt_json(stored, table="call_reports", column="body", row=f"{call_sid}:{version}")


def _report(row: Row[Any]) -> StoredReport:
    m = row._mapping
    return StoredReport(
        call_sid=m["call_sid"],
        version=m["version"],
        schema_version=m["schema_version"],
        body=open_report(m["call_sid"], m["version"], m["body"]),
        produced_by=m["produced_by"],
        reason=m["reason"],
        created_at=m["created_at"],
    )


class ReportLedger:
    def __init__(self, database: Database, *, clock: Clock = utc_now) -> None:
        self._db = database
        self._clock = clock

    def _audit(
        self,
        conn: Connection,
        action: AuditAction,
        subject_kind: str,
        subject_id: str,
        actor: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        append_audit(
            conn,
            at=self._clock(),
            actor=actor,
            action=action,
            subject_kind=subject_kind,
            subject_id=subject_id,
            details=details,
        )

    async def add_version(
        self,
        call_sid: str,
        body: Mapping[str, Any],
        *,
        schema_version: int,
        produced_by: str,
        reason: str,
        actor: str,
        action: AuditAction = AuditAction.GENERATED,
        also: Callable[[Connection, int], None] | None = None,
        created_at: datetime | None = None,
    ) -> int:
        """Store ``body`` as the call's next report version and audit it; returns the version number.
        ``also`` runs in the same transaction with the new version (to enqueue what the report sets off).
        Two writers racing for the same number: the primary key refuses the second, which retries with
        the next number."""
        r = t.call_reports.c
        for _ in range(5):

            def work(conn: Connection) -> int:
                current = conn.execute(select(func.max(r.version)).where(r.call_sid == call_sid)).scalar_one()
                version = int(current or 0) + 1
                conn.execute(
                    insert(t.call_reports).values(
                        call_sid=call_sid,
                        version=version,
                        schema_version=schema_version,
                        body=seal_report(call_sid, version, body),
                        produced_by=produced_by,
                        reason=reason,
                        created_at=created_at or self._clock(),
                    )
                )
                self._audit(conn, action, "call", call_sid, actor, {"version": version, "reason": reason})
                if also is not None:
                    also(conn, version)
                return version

            try:
                return await self._db.write(work)
            except IntegrityError:
                continue  # another writer took this version number first
        raise RuntimeError(f"could not store a report version for {call_sid}: too many concurrent writers")

    async def latest(self, call_sid: str, *, actor: str) -> StoredReport | None:
        """The call's current report (its newest version); the read is audited."""
        r = t.call_reports.c
        query = select(t.call_reports).where(r.call_sid == call_sid).order_by(r.version.desc()).limit(1)
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        report = _report(row)
        await self.record(AuditAction.READ, "call", call_sid, actor, {"version": report.version})
        return report

    async def versions(self, call_sid: str) -> list[StoredReport]:
        """Every version of the call's report, oldest first (not audited: for the ledger's own use)."""
        r = t.call_reports.c
        query = select(t.call_reports).where(r.call_sid == call_sid).order_by(r.version)
        return [_report(row) for row in await self._db.read(lambda conn: conn.execute(query).all())]

    async def record(
        self,
        action: AuditAction,
        subject_kind: str,
        subject_id: str,
        actor: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Audit an action that writes nothing else here (a read, an export, a deletion elsewhere)."""
        await self._db.write(lambda conn: self._audit(conn, action, subject_kind, subject_id, actor, details))

    async def audit_trail(self, subject_kind: str, subject_id: str) -> list[AuditEvent]:
        a = t.audit_events.c
        query = select(t.audit_events).where(a.subject_kind == subject_kind, a.subject_id == subject_id).order_by(a.id)
        async with self._db.reader.connect() as conn:
            return [
                AuditEvent(
                    at=row.at,
                    actor=row.actor,
                    action=AuditAction(row.action),
                    subject_kind=row.subject_kind,
                    subject_id=row.subject_id,
                    details=dict(row.details),
                )
                for row in await conn.execute(query)
            ]
