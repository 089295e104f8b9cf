"""The transactional outbox: provider calls (calendar events, SMS) as ledger rows.

A booking change writes its effects in its own transaction (:func:`record_created`,
:func:`record_rescheduled`, :func:`record_status_change`, called by the ledger), so a committed booking
always has its effects and a refused one never does. Workers then :meth:`Outbox.claim` due rows with a
lease, run them, and :meth:`Outbox.complete` or :meth:`Outbox.fail` them. A worker that dies keeps its
lease only until it expires; the row then runs again, so handlers must be idempotent (each effect carries
an ``idempotency_key`` for the provider).

Effects of one booking run in id order: a row is claimable only once no earlier row of its booking is
pending or running, so a cancellation never overtakes the creation it undoes.
"""

from __future__ import annotations

import contextlib
import enum
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import Row, and_, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from booking.domain import Booking, BookingStatus, Customer, Interval
from booking.errors import EffectFailed
from booking.ledger import schema as t
from booking.ledger.database import Database

Clock = Callable[[], datetime]
Notify = Callable[[], Awaitable[None]]

REMINDER_LEAD = timedelta(hours=24)
"""A reminder SMS goes out this long before the start, for bookings made earlier than that."""

MAX_ERROR_LENGTH = 2000

EFFECTS_CHANNEL = "voicebook:effects"
"""Redis channel PUBLISHed to after a commit that enqueued effects; idle workers SUBSCRIBE to it."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class EffectStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its due time (and for the earlier effects of its booking)
    RUNNING = "running"  # leased by a worker until lease_expires_at
    DONE = "done"
    DEAD = "dead"  # failed permanently or ran out of attempts: waits for an operator
    CANCELLED = "cancelled"  # superseded (a moved reminder) or discarded by an operator


class EffectKind(enum.StrEnum):
    """The kinds of effect a booking change enqueues; the prefix before the dot is the integration."""

    CALENDAR_CREATE = "calendar.create"
    CALENDAR_UPDATE = "calendar.update"
    CALENDAR_DELETE = "calendar.delete"
    SMS_CONFIRMATION = "sms.confirmation"
    SMS_REMINDER = "sms.reminder"
    SMS_RESCHEDULE = "sms.reschedule"
    SMS_CANCELLATION = "sms.cancellation"


def integration_of(kind: str) -> str:
    """``"calendar.create"`` -> ``"calendar"``: retry policy and worker concurrency are per integration."""
    return kind.partition(".")[0]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: the n-th retry waits a uniformly random time between 0 and
    ``min(cap, base * 2**(n-1))``, but never less than the provider's ``Retry-After``."""

    base: timedelta
    cap: timedelta
    max_attempts: int

    def delay(self, attempts: int, rng: random.Random, retry_after: float | None = None) -> timedelta:
        ceiling = min(self.cap.total_seconds(), self.base.total_seconds() * 2 ** max(attempts - 1, 0))
        seconds = rng.uniform(0.0, ceiling)
        if retry_after is not None:
            seconds = max(seconds, retry_after)
        return timedelta(seconds=seconds)


DEFAULT_POLICIES: Mapping[str, RetryPolicy] = {
    # Google Calendar rate-limits per user in bursts: short first waits, a long tail over about an hour.
    "calendar": RetryPolicy(base=timedelta(seconds=2), cap=timedelta(minutes=10), max_attempts=12),
    # Twilio queues messages itself; our failures are outages, so wait longer between fewer attempts.
    "sms": RetryPolicy(base=timedelta(seconds=5), cap=timedelta(minutes=30), max_attempts=8),
}
FALLBACK_POLICY = RetryPolicy(base=timedelta(seconds=5), cap=timedelta(minutes=15), max_attempts=10)


def policy_for(kind: str, policies: Mapping[str, RetryPolicy] = DEFAULT_POLICIES) -> RetryPolicy:
    return policies.get(integration_of(kind), FALLBACK_POLICY)


@dataclass(frozen=True, slots=True)
class Effect:
    id: int
    booking_id: str
    kind: str
    payload: dict[str, Any]
    status: EffectStatus
    attempts: int
    max_attempts: int
    due_at: datetime
    idempotency_key: str
    created_at: datetime
    updated_at: datetime
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    last_error: str | None = None
    done_at: datetime | None = None

    @property
    def integration(self) -> str:
        return integration_of(self.kind)


def _effect_from_row(row: Row[Any]) -> Effect:
    m = row._mapping
    return Effect(
        id=int(m["id"]),
        booking_id=m["booking_id"],
        kind=m["kind"],
        payload=dict(m["payload"]),
        status=EffectStatus(m["status"]),
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        due_at=m["due_at"],
        idempotency_key=m["idempotency_key"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        last_error=m["last_error"],
        done_at=m["done_at"],
    )


# -- enqueueing (inside the booking change's own transaction) ----------------------------------------


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def booking_payload(booking: Booking) -> dict[str, Any]:
    """The booking as it is after the change (JSON-ready): an effect acts on this snapshot, not on the
    booking's current row, which may have moved on by the time the effect runs."""
    return {
        "booking_id": booking.id,
        "version": booking.version,
        "status": booking.status.value,
        "resource_id": booking.resource_id,
        "service_id": booking.service_id,
        "start": _iso(booking.start),
        "end": _iso(booking.end),
        "block_start": _iso(booking.block.start),
        "block_end": _iso(booking.block.end),
        "created_at": _iso(booking.created_at),
        "updated_at": _iso(booking.updated_at),
        "series_id": booking.series_id,
        "source": booking.source,
        "notes": booking.notes,
        "customer": {
            "id": booking.customer.id,
            "phone": booking.customer.phone,
            "name": booking.customer.name,
            "email": booking.customer.email,
            "time_zone": booking.customer.time_zone,
        },
    }


def booking_from_payload(payload: Mapping[str, Any]) -> Booking:
    """The :class:`Booking` an effect's payload describes, for handlers that call adapters taking one."""
    customer = payload["customer"]
    return Booking(
        id=payload["booking_id"],
        resource_id=payload["resource_id"],
        service_id=payload["service_id"],
        customer=Customer(
            id=customer["id"],
            phone=customer["phone"],
            name=customer["name"],
            email=customer["email"],
            time_zone=customer["time_zone"],
        ),
        start=datetime.fromisoformat(payload["start"]),
        end=datetime.fromisoformat(payload["end"]),
        block=Interval(datetime.fromisoformat(payload["block_start"]), datetime.fromisoformat(payload["block_end"])),
        status=BookingStatus(payload["status"]),
        version=payload["version"],
        created_at=datetime.fromisoformat(payload["created_at"]),
        updated_at=datetime.fromisoformat(payload["updated_at"]),
        series_id=payload["series_id"],
        source=payload["source"],
        notes=payload["notes"],
    )


def _row(
    booking: Booking,
    kind: EffectKind,
    now: datetime,
    *,
    due_at: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
    policies: Mapping[str, RetryPolicy] = DEFAULT_POLICIES,
) -> dict[str, Any]:
    payload = booking_payload(booking)
    if extra:
        payload.update(extra)
    return {
        "booking_id": booking.id,
        "kind": kind.value,
        "payload": payload,
        "status": EffectStatus.PENDING.value,
        "attempts": 0,
        "max_attempts": policy_for(kind.value, policies).max_attempts,
        "due_at": due_at or now,
        "lease_owner": None,
        "lease_expires_at": None,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
        "done_at": None,
        "idempotency_key": f"{booking.id}:{kind.value}:v{booking.version}",
    }


def _reminder(booking: Booking, now: datetime) -> list[dict[str, Any]]:
    due = booking.start - REMINDER_LEAD
    return [_row(booking, EffectKind.SMS_REMINDER, now, due_at=due)] if due > now else []


def _cancel_pending_reminders(conn: Connection, booking_id: str, now: datetime) -> None:
    e = t.effects.c
    conn.execute(
        update(t.effects)
        .where(e.booking_id == booking_id, e.kind == EffectKind.SMS_REMINDER.value, e.status == EffectStatus.PENDING)
        .values(status=EffectStatus.CANCELLED.value, updated_at=now, last_error="superseded by a later change")
    )


def _insert(conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
    # One statement, rows in list order: their ids give the order in which the booking's effects run.
    if rows:
        conn.execute(insert(t.effects), list(rows))
    return len(rows)


def record_created(conn: Connection, bookings: Sequence[Booking], now: datetime) -> int:
    """Enqueue the calendar event, the confirmation and (if there is time) the reminder of each booking."""
    rows: list[dict[str, Any]] = []
    for booking in bookings:
        rows.append(_row(booking, EffectKind.CALENDAR_CREATE, now))
        rows.append(_row(booking, EffectKind.SMS_CONFIRMATION, now))
        rows.extend(_reminder(booking, now))
    return _insert(conn, rows)


def record_rescheduled(conn: Connection, before: Booking, after: Booking, now: datetime) -> int:
    """Enqueue the calendar update and the SMS for a move; the pending reminder moves with the booking
    (cancelled, and enqueued anew after the others so it never holds up this booking's later effects)."""
    _cancel_pending_reminders(conn, after.id, now)
    previous = {"previous": {"resource_id": before.resource_id, "start": _iso(before.start), "end": _iso(before.end)}}
    rows = [
        _row(after, EffectKind.CALENDAR_UPDATE, now, extra=previous),
        _row(after, EffectKind.SMS_RESCHEDULE, now, extra=previous),
        *_reminder(after, now),
    ]
    return _insert(conn, rows)


def record_status_change(conn: Connection, after: Booking, now: datetime, *, reason: str | None = None) -> int:
    """A booking that is no longer confirmed gets no reminder; a cancelled one loses its calendar event
    and the customer is told."""
    _cancel_pending_reminders(conn, after.id, now)
    if after.status is not BookingStatus.CANCELLED:
        return 0
    extra = {"reason": reason}
    rows = [
        _row(after, EffectKind.CALENDAR_DELETE, now, extra=extra),
        _row(after, EffectKind.SMS_CANCELLATION, now, extra=extra),
    ]
    return _insert(conn, rows)


class RedisNotifier:
    """Wakes idle workers after a commit. Best effort: a lost notification only delays an effect until
    the workers' next poll, so a Redis failure here must not fail the booking that was committed."""

    def __init__(self, redis: aioredis.Redis, channel: str = EFFECTS_CHANNEL) -> None:
        self._redis = redis
        self._channel = channel

    async def __call__(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._redis.publish(self._channel, b"1")


# -- the worker side -----------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:MAX_ERROR_LENGTH]


class Outbox:
    """Claims, outcomes, metrics and dead letters of the effects table."""

    def __init__(
        self,
        database: Database,
        *,
        clock: Clock | None = None,
        policies: Mapping[str, RetryPolicy] = DEFAULT_POLICIES,
        rng: random.Random | None = None,
        notify: Notify | None = None,
    ) -> None:
        self._db = database
        self._clock = clock or _utc_now
        self._policies = policies
        self._rng = rng or random.Random()
        self._notify = notify

    async def claim(self, owner: str, kinds: Sequence[str], *, limit: int, lease: timedelta) -> list[Effect]:
        """Lease up to ``limit`` due effects of ``kinds`` to ``owner`` (oldest due first). A running effect
        whose lease has expired counts as due: its worker is presumed dead."""
        if limit < 1 or not kinds:
            return []
        now = self._clock()
        candidate = t.effects.alias("candidate")
        earlier = t.effects.alias("earlier")
        c = candidate.c
        blocked = exists().where(
            earlier.c.booking_id == c.booking_id,
            earlier.c.id < c.id,
            earlier.c.status.in_((EffectStatus.PENDING.value, EffectStatus.RUNNING.value)),
        )
        due = select(c.id).where(
            c.kind.in_(list(kinds)),
            or_(
                and_(c.status == EffectStatus.PENDING.value, c.due_at <= now),
                and_(c.status == EffectStatus.RUNNING.value, c.lease_expires_at <= now),
            ),
            ~blocked,
        )
        due = due.order_by(c.due_at, c.id).limit(limit)
        e = t.effects.c
        lease_values = {
            "status": EffectStatus.RUNNING.value,
            "lease_owner": owner,
            "lease_expires_at": now + lease,
            "attempts": e.attempts + 1,
            "updated_at": now,
        }
        postgres = self._db.dialect == "postgresql"
        # An effect whose every attempt ended in a lost lease is presumed to kill its worker (a poison
        # effect): it goes to the dead letters instead of taking down worker after worker.
        exhausted = (
            update(t.effects)
            .where(
                e.status == EffectStatus.RUNNING.value,
                e.lease_expires_at <= now,
                e.attempts >= e.max_attempts,
                e.kind.in_(list(kinds)),
            )
            .values(
                status=EffectStatus.DEAD.value,
                last_error=func.coalesce(e.last_error + "\n", "") + "lease expired on the last attempt",
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
        )

        def work(conn: Connection) -> list[Effect]:
            conn.execute(exhausted)
            if postgres:
                # Rows another worker is claiming right now are skipped, not waited for; a row it has
                # just claimed fails the re-check of the WHERE clause once its lock is released.
                ids = conn.execute(due.with_for_update(skip_locked=True, of=candidate)).scalars().all()
                if not ids:
                    return []
                target = e.id.in_(ids)
            else:
                # SQLite has one writer at a time (ours, BEGIN IMMEDIATE): select and update in one
                # statement and no other claim can interleave.
                target = e.id.in_(due.scalar_subquery())
            rows = conn.execute(update(t.effects).where(target).values(lease_values).returning(t.effects)).all()
            return sorted((_effect_from_row(row) for row in rows), key=lambda effect: effect.id)

        return await self._db.write(work)

    def _held(self, effect: Effect) -> Any:
        # The lease this worker was given: a row re-claimed after expiry has another owner or attempt.
        e = t.effects.c
        return and_(
            e.id == effect.id,
            e.status == EffectStatus.RUNNING.value,
            e.lease_owner == effect.lease_owner,
            e.attempts == effect.attempts,
        )

    async def complete(self, effect: Effect) -> bool:
        """Record success; False when the lease had been lost (the effect was, or will be, run again)."""
        now = self._clock()
        statement = (
            update(t.effects)
            .where(self._held(effect))
            .values(
                status=EffectStatus.DONE.value,
                done_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        return bool(await self._db.write(lambda conn: conn.execute(statement).rowcount))

    async def fail(self, effect: Effect, error: BaseException) -> EffectStatus | None:
        """Record a failure: a permanent one, or the last allowed attempt, goes to the dead letters; any
        other is retried after a backoff. Returns the new status, or None when the lease had been lost."""
        now = self._clock()
        permanent = isinstance(error, EffectFailed) and error.permanent
        retry_after = error.retry_after if isinstance(error, EffectFailed) else None
        if permanent or effect.attempts >= effect.max_attempts:
            status, due_at = EffectStatus.DEAD, effect.due_at
        else:
            policy = policy_for(effect.kind, self._policies)
            status, due_at = EffectStatus.PENDING, now + policy.delay(effect.attempts, self._rng, retry_after)
        statement = (
            update(t.effects)
            .where(self._held(effect))
            .values(
                status=status.value,
                due_at=due_at,
                last_error=_describe(error),
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        changed = await self._db.write(lambda conn: conn.execute(statement).rowcount)
        return status if changed else None

    # -- reads -----------------------------------------------------------------------------------
    async def get(self, effect_id: int) -> Effect | None:
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(select(t.effects).where(t.effects.c.id == effect_id))).first()
        return _effect_from_row(row) if row is not None else None

    async def for_booking(self, booking_id: str) -> list[Effect]:
        query = select(t.effects).where(t.effects.c.booking_id == booking_id).order_by(t.effects.c.id)
        async with self._db.reader.connect() as conn:
            return [_effect_from_row(row) for row in await conn.execute(query)]

    async def queue_depth(self) -> dict[str, int]:
        """Pending effects that are due now, per kind (what a metrics gauge reports)."""
        e = t.effects.c
        query = (
            select(e.kind, func.count())
            .where(e.status == EffectStatus.PENDING.value, e.due_at <= self._clock())
            .group_by(e.kind)
        )
        async with self._db.reader.connect() as conn:
            return {kind: int(count) for kind, count in await conn.execute(query)}

    # -- dead letters ----------------------------------------------------------------------------
    async def dead_letters(self, *, limit: int = 100) -> list[Effect]:
        e = t.effects.c
        query = select(t.effects).where(e.status == EffectStatus.DEAD.value).order_by(e.updated_at, e.id).limit(limit)
        async with self._db.reader.connect() as conn:
            return [_effect_from_row(row) for row in await conn.execute(query)]

    async def _settle_dead(self, effect_id: int, values: dict[str, Any]) -> Effect | None:
        e = t.effects.c
        statement = (
            update(t.effects)
            .where(e.id == effect_id, e.status == EffectStatus.DEAD.value)
            .values(values)
            .returning(t.effects)
        )

        def work(conn: Connection) -> Effect | None:
            row = conn.execute(statement).first()
            return _effect_from_row(row) if row is not None else None

        return await self._db.write(work)

    async def retry(self, effect_id: int) -> Effect | None:
        """Send a dead effect back to the queue with a fresh set of attempts; None if it is not dead."""
        now = self._clock()
        values = {"status": EffectStatus.PENDING.value, "attempts": 0, "due_at": now, "updated_at": now}
        effect = await self._settle_dead(effect_id, values)
        if effect is not None and self._notify is not None:
            await self._notify()
        return effect

    async def discard(self, effect_id: int, note: str) -> Effect | None:
        """Give up on a dead effect for good (status cancelled), keeping why; None if it is not dead."""
        now = self._clock()
        e = t.effects.c
        annotated = func.coalesce(e.last_error, "") + f"\ndiscarded: {note}"
        return await self._settle_dead(
            effect_id, {"status": EffectStatus.CANCELLED.value, "updated_at": now, "last_error": annotated}
        )
