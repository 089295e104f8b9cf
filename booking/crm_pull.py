"""The CRM's half of the two-way sync: edits people make to appointments in the CRM (status, notes) come
back into the ledger, last writer wins.

Each pull asks the CRM for the rows modified since its watermark (less a small overlap, for edits the CRM
had not yet made visible last time) and compares every row with its booking, field by field:

* equal to the ledger: nothing to do. This is also what our own pushes look like once they have landed.
* modified in the CRM after the booking last changed in the ledger: the CRM wins and the edit is applied
  as any other change would be (a cancellation through :class:`BookingService`, with its calendar and SMS
  effects, by actor ``airtable``).
* the booking changed in the ledger later (ties go to the ledger, the system of record): the ledger wins
  and the next push overwrites the CRM. When the CRM's value is not simply what the ledger held at the
  time of the CRM's modification (the CRM behind, waiting for that push), both sides changed: that is
  recorded as a conflict.
* an edit that cannot be applied (an unknown booking, a status the ledger lacks, a transition the
  booking cannot make) is recorded as a conflict too. Nothing is dropped without a trace.

Times are compared across two clocks (the CRM's modification time, the ledger's ``updated_at``); skew
between them shifts who wins a near tie, and the loser of a real tie is recorded.

The watermark is the CRM's own latest modification time seen, and moves (with the conflicts found) only
once every change of the pull has been handled. A pull that fails is simply repeated: edits already
applied compare equal the second time, and a conflict is recorded once per row, field and CRM time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from booking.domain import Booking, BookingStatus
from booking.errors import InvalidTransition
from booking.ledger.crm_repository import Conflict, ConflictReason, CrmLedger, NewConflict, Winner
from booking.service import BookingService

PULL_NAME = "airtable.appointments"
ACTOR = "airtable"
DEFAULT_OVERLAP = timedelta(minutes=1)
"""How far before the watermark each pull reads again: edits the CRM made visible late are not missed,
and reading one twice is harmless."""
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STATUS_REASON = "changed in the CRM"
"""The reason a status change from the CRM carries (a cancellation's SMS and calendar effects see it)."""


class AppointmentChange(Protocol):
    """A CRM row as it stands after a change (``integrations.airtable.AppointmentChange``)."""

    @property
    def record_id(self) -> str: ...
    @property
    def booking_id(self) -> str | None: ...
    @property
    def status(self) -> str | None: ...
    @property
    def notes(self) -> str | None: ...
    @property
    def modified_at(self) -> datetime: ...


class ChangedAppointments(Protocol):
    async def changed_appointments(self, since: datetime) -> Sequence[AppointmentChange]: ...


@dataclass(frozen=True, slots=True)
class Applied:
    booking_id: str
    field: str
    before: str | None
    after: str | None


@dataclass(frozen=True, slots=True)
class PullResult:
    since: datetime
    """What the CRM was asked for: rows modified after this."""
    fetched: int
    applied: tuple[Applied, ...]
    conflicts: tuple[Conflict, ...]
    """Recorded by this pull; one already recorded by an earlier pull is not repeated."""
    watermark: datetime | None


@dataclass(frozen=True, slots=True)
class _Plan:
    status: BookingStatus | None = None
    notes: tuple[str | None] | None = None
    """``(new notes,)`` when the notes change (to None when they were cleared in the CRM)."""


class CrmPull:
    """Pulls the CRM's appointment edits into the ledger; see the module's docstring."""

    def __init__(
        self,
        crm: ChangedAppointments,
        service: BookingService,
        store: CrmLedger,
        *,
        name: str = PULL_NAME,
        overlap: timedelta = DEFAULT_OVERLAP,
        actor: str = ACTOR,
    ) -> None:
        self._crm = crm
        self._service = service
        self._store = store
        self._name = name
        self._overlap = overlap
        self._actor = actor
        self._lock = asyncio.Lock()

    async def pull_once(self) -> PullResult:
        async with self._lock:  # two pulls of one process would only race each other
            previous = await self._store.watermark(self._name)
            since = previous - self._overlap if previous is not None else EPOCH
            changes = await self._crm.changed_appointments(since)
            applied: list[Applied] = []
            found: list[NewConflict] = []
            for change in changes:
                done, conflicts = await self._reconcile(change)
                applied.extend(done)
                found.extend(conflicts)
            latest = max((change.modified_at for change in changes), default=None)
            recorded = await self._store.finish_pull(self._name, found, watermark=latest)
            watermark = max((w for w in (previous, latest) if w is not None), default=None)
            return PullResult(since, len(changes), tuple(applied), tuple(recorded), watermark)

    async def conflicts(self, *, unresolved_only: bool = True) -> list[Conflict]:
        return await self._store.conflicts(unresolved_only=unresolved_only)

    async def resolve(self, conflict_id: int) -> Conflict | None:
        return await self._store.resolve(conflict_id)

    # -- one row ---------------------------------------------------------------------------------
    async def _reconcile(self, change: AppointmentChange) -> tuple[list[Applied], list[NewConflict]]:
        if change.booking_id is None:
            return [], [_unmatched(change, ConflictReason.NO_BOOKING_ID)]
        booking = await self._service.ledger.get_booking(change.booking_id)
        if booking is None:
            return [], [_unmatched(change, ConflictReason.UNKNOWN_BOOKING)]
        plan, conflicts = await self._decide(change, booking)
        applied: list[Applied] = []
        version = booking.version
        if plan.status is not None:
            try:
                changed = await self._service.change_status(
                    booking.id, plan.status, reason=STATUS_REASON, actor=self._actor
                )
            except InvalidTransition:  # the booking left its status since it was read
                current = await self._service.ledger.require_booking(booking.id)
                conflicts.append(
                    _conflict(change, current, "status", ConflictReason.CHANGED_MEANWHILE, plan.status.value)
                )
                if plan.notes is not None:
                    conflicts.append(
                        _conflict(change, current, "notes", ConflictReason.CHANGED_MEANWHILE, plan.notes[0])
                    )
                return applied, conflicts
            applied.append(Applied(booking.id, "status", booking.status.value, plan.status.value))
            version = changed.version
        if plan.notes is not None:
            written = await self._store.set_notes(
                booking.id, plan.notes[0], expected_version=version, actor=self._actor
            )
            if written is None:
                current = await self._service.ledger.require_booking(booking.id)
                conflicts.append(_conflict(change, current, "notes", ConflictReason.CHANGED_MEANWHILE, plan.notes[0]))
            else:
                applied.append(Applied(booking.id, "notes", booking.notes, plan.notes[0]))
        return applied, conflicts

    async def _decide(self, change: AppointmentChange, booking: Booking) -> tuple[_Plan, list[NewConflict]]:
        """What to apply and what to record, both fields judged against the same reading of the booking
        (applying one moves ``updated_at``, which must not decide the other)."""
        crm_newer = change.modified_at > booking.updated_at
        conflicts: list[NewConflict] = []
        status: BookingStatus | None = None
        if change.status is not None and change.status != booking.status.value:
            if crm_newer:
                status, reason = self._status_target(booking, change.status)
                if reason is not None:
                    conflicts.append(_conflict(change, booking, "status", reason, change.status))
            elif await self._status_at(booking.id, change.modified_at) != change.status:
                conflicts.append(_conflict(change, booking, "status", ConflictReason.BOTH_CHANGED, change.status))
        notes: tuple[str | None] | None = None
        if (change.notes or None) != (booking.notes or None):
            # The ledger keeps no history of notes, so a differing older value counts as both changed.
            if crm_newer:
                notes = (change.notes or None,)
            else:
                conflicts.append(_conflict(change, booking, "notes", ConflictReason.BOTH_CHANGED, change.notes))
        return _Plan(status, notes), conflicts

    @staticmethod
    def _status_target(booking: Booking, value: str) -> tuple[BookingStatus | None, ConflictReason | None]:
        try:
            target = BookingStatus(value)
        except ValueError:
            return None, ConflictReason.UNSUPPORTED_STATUS
        try:
            booking.status.check_transition(target, booking_id=booking.id)
        except InvalidTransition:
            return None, ConflictReason.TRANSITION_NOT_ALLOWED
        return target, None

    async def _status_at(self, booking_id: str, at: datetime) -> str | None:
        """The booking's status in the ledger at ``at`` (None before it existed)."""
        status: str | None = None
        for event in await self._service.ledger.history(booking_id):
            if event.at > at:
                break
            status = event.to_status.value
        return status


def _conflict(
    change: AppointmentChange, booking: Booking, field: str, reason: ConflictReason, crm_value: str | None
) -> NewConflict:
    ledger_value = booking.status.value if field == "status" else booking.notes
    return NewConflict(
        booking_id=booking.id,
        record_id=change.record_id,
        field=field,
        ledger_value=ledger_value,
        airtable_value=crm_value,
        ledger_at=booking.updated_at,
        airtable_at=change.modified_at,
        winner=Winner.LEDGER,
        reason=reason,
    )


def _unmatched(change: AppointmentChange, reason: ConflictReason) -> NewConflict:
    return NewConflict(
        booking_id=change.booking_id,
        record_id=change.record_id,
        field="booking",
        ledger_value=None,
        airtable_value=change.booking_id,
        ledger_at=None,
        airtable_at=change.modified_at,
        winner=Winner.NEITHER,
        reason=reason,
    )


__all__ = [
    "ACTOR",
    "PULL_NAME",
    "Applied",
    "AppointmentChange",
    "ChangedAppointments",
    "Conflict",
    "ConflictReason",
    "CrmPull",
    "PullResult",
    "Winner",
]
