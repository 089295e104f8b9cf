"""The ledger's side of the two-way CRM sync: a booking's notes written from the CRM, how far the pull has
read (its watermark), and the CRM edits the ledger did not take (conflicts).

Usage::

    crm = CrmLedger(database, clock=clock)
    await crm.watermark("airtable.appointments")                       # None before the first pull
    recorded = await crm.finish_pull("airtable.appointments", new_conflicts, watermark=latest)
    await crm.set_notes(booking_id, "wheelchair access", expected_version=3, actor="airtable")
    await crm.conflicts()                                               # unresolved, oldest first
    await crm.resolve(conflict_id)
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from booking.domain import Booking
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import BOOKING_COLUMNS, Clock, booking_from_row, seal_notes, utc_now


class Winner(enum.StrEnum):
    LEDGER = "ledger"
    """The ledger's value stands; the next push writes it over the CRM's."""
    NEITHER = "neither"
    """Nothing in the ledger to compare with (a row for no booking the ledger knows)."""


class ConflictReason(enum.StrEnum):
    BOTH_CHANGED = "both_changed"
    """The CRM's value changed, and the ledger's booking changed later."""
    CHANGED_MEANWHILE = "changed_meanwhile"
    """The ledger's booking changed while the CRM's edit was being applied."""
    UNSUPPORTED_STATUS = "unsupported_status"
    """A status the ledger does not have."""
    TRANSITION_NOT_ALLOWED = "transition_not_allowed"
    """A status the booking cannot move to from its own (a cancelled booking confirmed again)."""
    UNKNOWN_BOOKING = "unknown_booking"
    NO_BOOKING_ID = "no_booking_id"
    """A row someone added in the CRM by hand."""


@dataclass(frozen=True, slots=True)
class NewConflict:
    booking_id: str | None
    record_id: str
    field: str
    """``status``, ``notes``, or ``booking`` (the row as a whole)."""
    ledger_value: str | None
    airtable_value: str | None
    ledger_at: datetime | None
    airtable_at: datetime
    winner: Winner
    reason: ConflictReason


@dataclass(frozen=True, slots=True)
class Conflict(NewConflict):
    """A conflict as recorded: what was found, with its id and when it was found and resolved."""

    id: int
    detected_at: datetime
    resolved_at: datetime | None


def _conflict_row(record_id: str, field: str) -> str:
    """The associated-data row of a conflict's values (booking notes may hold personal data): its CRM
    row and field, known before the insert assigns an id."""
    return f"{record_id}:{field}"


def _conflict(row: Row[Any]) -> Conflict:
    m = row._mapping
    vault, where = pii.cipher(), {"table": "crm_conflicts", "row": _conflict_row(m["record_id"], m["field"])}
    return Conflict(
        id=int(m["id"]),
        booking_id=m["booking_id"],
        record_id=m["record_id"],
        field=m["field"],
        ledger_value=vault.decrypt(m["ledger_value"], column="ledger_value", **where),
        airtable_value=vault.decrypt(m["airtable_value"], column="airtable_value", **where),
        ledger_at=m["ledger_at"],
        airtable_at=m["airtable_at"],
        winner=Winner(m["winner"]),
        reason=ConflictReason(m["reason"]),
        detected_at=m["detected_at"],
        resolved_at=m["resolved_at"],
    )


class CrmLedger:
    def __init__(self, database: Database, *, clock: Clock = utc_now) -> None:
        self._db = database
        self._clock = clock
        self._insert: Any = postgresql.insert if database.dialect == "postgresql" else sqlite.insert

    async def watermark(self, name: str) -> datetime | None:
        """The latest CRM modification time the pull ``name`` has finished with."""
        query = select(t.crm_sync_state.c.watermark).where(t.crm_sync_state.c.name == name)
        async with self._db.reader.connect() as conn:
            value: datetime | None = (await conn.execute(query)).scalar_one_or_none()
        return value

    async def finish_pull(
        self, name: str, conflicts: Sequence[NewConflict], *, watermark: datetime | None
    ) -> list[Conflict]:
        """In one transaction: record ``conflicts`` (one already recorded for the same row, field and CRM
        time is not recorded again) and move the watermark forward to ``watermark`` (never back).
        Returns the conflicts recorded now."""
        now = self._clock()
        c = t.crm_conflicts.c

        def work(conn: Connection) -> list[Conflict]:
            recorded = []
            for conflict in conflicts:
                statement = (
                    self._insert(t.crm_conflicts)
                    .values(
                        booking_id=conflict.booking_id,
                        record_id=conflict.record_id,
                        field=conflict.field,
                        ledger_value=pii.cipher().encrypt(
                            conflict.ledger_value,
                            table="crm_conflicts",
                            column="ledger_value",
                            row=_conflict_row(conflict.record_id, conflict.field),
                        ),
                        airtable_value=pii.cipher().encrypt(
                            conflict.airtable_value,
                            table="crm_conflicts",
                            column="airtable_value",
                            row=_conflict_row(conflict.record_id, conflict.field),
                        ),
                        ledger_at=conflict.ledger_at,
                        airtable_at=conflict.airtable_at,
                        winner=conflict.winner.value,
                        reason=conflict.reason.value,
                        detected_at=now,
                        resolved_at=None,
                    )
                    .on_conflict_do_nothing(index_elements=[c.record_id, c.field, c.airtable_at])
                    .returning(t.crm_conflicts)
                )
                row = conn.execute(statement).first()
                if row is not None:
                    recorded.append(_conflict(row))
            if watermark is not None:
                state = t.crm_sync_state
                upsert = self._insert(state).values(name=name, watermark=watermark, updated_at=now)
                conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=[state.c.name],
                        set_={"watermark": upsert.excluded.watermark, "updated_at": upsert.excluded.updated_at},
                        where=state.c.watermark < upsert.excluded.watermark,
                    )
                )
            return recorded

        return await self._db.write(work)

    async def conflicts(self, *, unresolved_only: bool = True, booking_id: str | None = None) -> list[Conflict]:
        """Conflicts in the order they were found."""
        c = t.crm_conflicts.c
        query = select(t.crm_conflicts).order_by(c.id)
        if unresolved_only:
            query = query.where(c.resolved_at.is_(None))
        if booking_id is not None:
            query = query.where(c.booking_id == booking_id)
        async with self._db.reader.connect() as conn:
            return [_conflict(row) for row in await conn.execute(query)]

    async def resolve(self, conflict_id: int) -> Conflict | None:
        """Mark a conflict handled (it stays, with when); None when there is no such conflict. Resolving
        twice keeps the first time."""
        now = self._clock()
        c = t.crm_conflicts.c

        def work(conn: Connection) -> Conflict | None:
            conn.execute(
                update(t.crm_conflicts).where(c.id == conflict_id, c.resolved_at.is_(None)).values(resolved_at=now)
            )
            row = conn.execute(select(t.crm_conflicts).where(c.id == conflict_id)).first()
            return _conflict(row) if row is not None else None

        return await self._db.write(work)

    async def set_notes(
        self, booking_id: str, notes: str | None, *, expected_version: int, actor: str
    ) -> Booking | None:
        """Write a booking's notes if it is still at ``expected_version`` (the version the caller decided
        on); returns the booking as changed, or None when it has changed since (or does not exist). A new
        version and ``updated_at``, so the change is seen as the booking's latest; no effects (nothing a
        customer or calendar is told) and no history event (the history records status and time only)."""
        now = self._clock()
        b = t.bookings.c

        def work(conn: Connection) -> Booking | None:
            changed = conn.execute(
                update(t.bookings)
                .where(b.id == booking_id, b.version == expected_version)
                .values(
                    notes=seal_notes(booking_id, notes),
                    version=b.version + 1,
                    updated_at=now,
                    changed_by=actor,
                    change_reason=None,
                )
            )
            if changed.rowcount != 1:
                return None
            row = conn.execute(select(*BOOKING_COLUMNS).join(t.customers).where(b.id == booking_id)).one()
            return booking_from_row(row)

        return await self._db.write(work)


__all__ = ["Conflict", "ConflictReason", "CrmLedger", "NewConflict", "Winner"]
