"""The reconciler: finds bookings whose effects are missing or out of date, and effects that are stuck.

The outbox writes effects in the booking's own transaction, so in normal running nothing is missing.
The reconciler is the net under that promise, for what the transaction cannot cover: bookings written
before the outbox existed or imported straight into the ledger, rows an operator deleted by hand, and a
bug in a future change. For every booking that still matters (confirmed and not over, or cancelled
within the last week and not over) it compares what the booking is with what its effects say:

* the calendar: a confirmed booking has a create (for a series: the series has one), and the newest
  calendar effect describes its current time and resource, or an update is enqueued; a cancelled one
  whose newest calendar effect is not a delete gets the delete;
* the texts: a confirmed future booking has its confirmation (once per series), and its reminder for its
  current start when there is still time; a cancelled one that was confirmed to the customer was told.

Any effect row counts as "there", whatever its status: a dead letter waits for an operator and a
discarded one was given up on purpose; the reconciler never doubles either. Each repair re-reads the
booking and its effects inside the transaction that enqueues it, so a booking changed meanwhile is
judged as it is now. Effects pending or running long past their time are counted as stuck and the
workers are woken; nothing else can be done for them from here.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from prometheus_client import Counter as MetricCounter
from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Connection

from booking.domain import Booking, BookingStatus
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import BOOKING_COLUMNS, booking_from_row, utc_now
from booking.outbox import (
    REMINDER_LEAD,
    SERIES,
    Effect,
    EffectKind,
    EffectStatus,
    booking_payload,
    effect_from_row,
    effect_row,
    insert_effects,
    occurrence_extra,
)
from booking.periodic import Periodic

log = structlog.get_logger("voicebook.reconciler")

Clock = Callable[[], datetime]
Notify = Callable[[], Awaitable[None]]

CANCELLED_LOOKBACK = timedelta(days=7)
"""Cancelled bookings changed this recently are checked for their calendar delete and their text."""

REPAIRS = MetricCounter(
    "voicebook_reconciler_repairs_total", "Effects the reconciler enqueued because they were missing.", ["kind"]
)


@dataclass
class ReconcileReport:
    checked: int = 0
    enqueued: Counter[str] = field(default_factory=Counter)
    repaired_bookings: list[str] = field(default_factory=list)
    stuck: Counter[str] = field(default_factory=Counter)


def _times(payload: dict[str, Any]) -> tuple[str, str, str]:
    return (str(payload.get("resource_id")), str(payload.get("start")), str(payload.get("end")))


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _current_times(booking: Booking) -> tuple[str, str, str]:
    payload = booking_payload(booking)
    return (booking.resource_id, payload["start"], payload["end"])


@dataclass(frozen=True, slots=True)
class _Series:
    rrule: str
    first_booking_id: str
    count: int
    has_create: bool
    has_confirmation: bool


def missing_effects(
    booking: Booking, effects: Sequence[Effect], series: _Series | None, now: datetime
) -> list[tuple[EffectKind, dict[str, Any] | None]]:
    """What ``booking`` lacks, as (kind, extra payload) pairs; ``effects`` are all of its rows, in id order.
    Pure: the caller reads and writes."""
    calendar = [e for e in effects if e.integration == "calendar"]
    kinds = {e.kind for e in effects}
    wanted: list[tuple[EffectKind, dict[str, Any] | None]] = []
    if booking.status is BookingStatus.CONFIRMED:
        if series is None and not calendar:
            wanted.append((EffectKind.CALENDAR_CREATE, None))
        elif series is not None and not series.has_create and booking.id == series.first_booking_id:
            extra = {SERIES: {"id": booking.series_id, "rrule": series.rrule, "count": series.count}}
            wanted.append((EffectKind.CALENDAR_CREATE, extra))
        elif calendar and _times(calendar[-1].payload) != _current_times(booking):
            previous = calendar[-1].payload
            extra = {"previous": {"resource_id": previous.get("resource_id"), "start": previous.get("start")}}
            wanted.append((EffectKind.CALENDAR_UPDATE, extra))
        if booking.start > now:
            if series is None and EffectKind.SMS_CONFIRMATION not in kinds:
                wanted.append((EffectKind.SMS_CONFIRMATION, None))
            elif series is not None and not series.has_confirmation and booking.id == series.first_booking_id:
                extra = {SERIES: {"id": booking.series_id, "rrule": series.rrule, "count": series.count}}
                wanted.append((EffectKind.SMS_CONFIRMATION, extra))
        start = _iso(booking.start)
        reminded = any(
            e.kind == EffectKind.SMS_REMINDER and e.status is not EffectStatus.CANCELLED and e.payload["start"] == start
            for e in effects
        )
        if not reminded and booking.start - REMINDER_LEAD > now:
            wanted.append((EffectKind.SMS_REMINDER, None))
    elif booking.status is BookingStatus.CANCELLED:
        has_event = bool(calendar) or (series is not None and series.has_create)
        if has_event and not (calendar and calendar[-1].kind == EffectKind.CALENDAR_DELETE):
            wanted.append((EffectKind.CALENDAR_DELETE, {"reason": "reconciled"}))
        confirmed = EffectKind.SMS_CONFIRMATION in kinds or (series is not None and series.has_confirmation)
        if confirmed and EffectKind.SMS_CANCELLATION not in kinds:
            wanted.append((EffectKind.SMS_CANCELLATION, {"reason": "reconciled"}))
    return wanted


class Reconciler:
    def __init__(
        self,
        database: Database,
        *,
        clock: Clock = utc_now,
        notify: Notify | None = None,
        stuck_after: timedelta = timedelta(minutes=15),
        interval: float = 300.0,
    ) -> None:
        self._db = database
        self._clock = clock
        self._notify = notify
        self._stuck_after = stuck_after
        self._loop = Periodic(self.run_once, interval, name="reconcile")

    async def run_once(self) -> ReconcileReport:
        now = self._clock()
        report = ReconcileReport()
        candidates = await self._candidates(now)
        report.checked = len(candidates)
        for booking_id in candidates:
            enqueued = await self._db.write(functools.partial(self._repair, booking_id=booking_id, now=now))
            if enqueued:
                report.enqueued.update(enqueued)
                report.repaired_bookings.append(booking_id)
                for kind in enqueued:
                    REPAIRS.labels(kind).inc()
        report.stuck = await self._stuck(now)
        if report.enqueued:
            log.warning(
                "reconciler_repaired",
                enqueued=dict(report.enqueued),
                bookings=report.repaired_bookings[:20],
                checked=report.checked,
            )
        if report.stuck:
            log.warning("effects_stuck", stuck=dict(report.stuck), hint="are workers running for these kinds?")
        if (report.enqueued or report.stuck) and self._notify is not None:
            await self._notify()
        return report

    def stop(self) -> None:
        self._loop.stop()

    async def run(self) -> None:
        """Reconcile every ``interval`` seconds until :meth:`stop`; a failed pass is logged, not fatal."""
        await self._loop.run()

    async def _candidates(self, now: datetime) -> list[str]:
        b = t.bookings.c
        query = (
            select(b.id)
            .where(
                b.end_at > now,
                or_(
                    b.status == BookingStatus.CONFIRMED.value,
                    and_(b.status == BookingStatus.CANCELLED.value, b.updated_at >= now - CANCELLED_LOOKBACK),
                ),
            )
            .order_by(b.start_at)
        )
        async with self._db.reader.connect() as conn:
            return list((await conn.execute(query)).scalars())

    def _repair(self, conn: Connection, *, booking_id: str, now: datetime) -> Counter[str]:
        query = select(*BOOKING_COLUMNS).join(t.customers).where(t.bookings.c.id == booking_id)
        if self._db.dialect == "postgresql":
            query = query.with_for_update(of=t.bookings)  # a booking change waits for this repair, or it for it
        row = conn.execute(query).first()
        if row is None:
            return Counter()
        booking = booking_from_row(row)
        e = t.effects.c
        rows_of_booking = conn.execute(select(t.effects).where(e.booking_id == booking_id).order_by(e.id))
        effects = [effect_from_row(r) for r in rows_of_booking]
        series = self._series(conn, booking) if booking.series_id is not None else None
        wanted = missing_effects(booking, effects, series, now)
        rows = []
        for kind, extra in wanted:
            if kind in (EffectKind.CALENDAR_UPDATE, EffectKind.CALENDAR_DELETE) and booking.series_id is not None:
                extra = (extra or {}) | occurrence_extra(conn, booking)
            due_at = booking.start - REMINDER_LEAD if kind is EffectKind.SMS_REMINDER else None
            row_values = effect_row(booking, kind, now, due_at=due_at, extra=extra)
            # A repair is a new effect, not a retry of one that may exist under the booking's version.
            row_values["idempotency_key"] += f":r{int(now.timestamp())}"
            rows.append(row_values)
        insert_effects(conn, rows)
        return Counter(str(kind) for kind, _ in wanted)

    def _series(self, conn: Connection, booking: Booking) -> _Series:
        b, e, s = t.bookings.c, t.effects.c, t.booking_series.c
        rule = conn.execute(select(s.rrule).where(s.id == booking.series_id)).scalar_one()
        members = select(b.id).where(b.series_id == booking.series_id)
        first = conn.execute(members.order_by(b.start_at).limit(1)).scalar_one()
        count = conn.execute(select(func.count()).select_from(members.subquery())).scalar_one()
        kinds = set(
            conn.execute(
                select(e.kind).where(
                    e.booking_id.in_(members),
                    e.kind.in_((EffectKind.CALENDAR_CREATE.value, EffectKind.SMS_CONFIRMATION.value)),
                )
            ).scalars()
        )
        return _Series(
            rrule=rule,
            first_booking_id=first,
            count=int(count),
            has_create=EffectKind.CALENDAR_CREATE.value in kinds,
            has_confirmation=EffectKind.SMS_CONFIRMATION.value in kinds,
        )

    async def _stuck(self, now: datetime) -> Counter[str]:
        e = t.effects.c
        late = now - self._stuck_after
        query = (
            select(e.kind, func.count())
            .where(
                or_(
                    and_(e.status == EffectStatus.PENDING.value, e.due_at <= late),
                    and_(e.status == EffectStatus.RUNNING.value, e.lease_expires_at <= late),
                )
            )
            .group_by(e.kind)
        )
        async with self._db.reader.connect() as conn:
            return Counter({kind: int(count) for kind, count in await conn.execute(query)})
