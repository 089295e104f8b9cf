"""The transactional outbox: provider calls (calendar events, SMS) as ledger rows.

A booking change writes its effects in its own transaction (:func:`record_created`,
:func:`record_rescheduled`, :func:`record_status_change`, called by the ledger), so a committed booking
always has its effects and a refused one never does. Workers then :meth:`Outbox.claim` due rows with a
lease, run them, and :meth:`Outbox.complete` or :meth:`Outbox.fail` them. A worker that dies keeps its
lease only until it expires; the row then runs again, so handlers must be idempotent (each effect carries
an ``idempotency_key`` for the provider).

Effects of one booking run in id order within each integration: a row is claimable only once no earlier
row of its booking and integration is pending or running, so a cancellation never overtakes the creation
it undoes, while the calendar and the texts of one booking go out side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import Integer, Row, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import BindParameter

from booking.domain import Booking, BookingStatus, Customer, Interval, SmsConsent, ensure_utc
from booking.errors import EffectFailed
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.combined import CombinedWrite
from booking.ledger.database import Database
from booking.trace_context import current_traceparent

Clock = Callable[[], datetime]
Notify = Callable[[], Awaitable[None]]

REMINDER_LEAD = timedelta(hours=24)
"""A reminder SMS goes out this long before the start, for bookings made earlier than that."""

MAX_ERROR_LENGTH = 2000
SERIES = "series"
"""Payload key of an effect of a recurring booking: ``id`` and, on the first occurrence's creation,
``rrule`` and ``count``; on a later change of one occurrence, its ``original_start``."""
SCHEDULED_FOR = "scheduled_for"
REWRITE_DETAILS = "rewrite_details"
"""In a ``calendar.update`` payload: rewrite the event's title, description and attendees from the booking
too, not only its times (a privacy erasure leaves the anonymised booking's)."""
"""Payload key of a delayed effect (a reminder): the time it was enqueued to run at."""

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
    # A call's effects (``call_sid`` set, no booking): the report at hang-up, then what it causes.
    REPORT_BUILD = "report.build"
    CRM_CALL = "crm.call"  # the contact, the call and the bookings it touched, into the CRM
    TRIGGER_FOLLOW_UP = "trigger.follow_up"
    TRIGGER_WEBHOOK = "trigger.webhook"
    TRIGGER_SMS = "trigger.sms"
    TRIGGER_REVIEW = "trigger.review"  # a trigger held for an operator's approval
    # Housekeeping (neither booking nor call): scheduled by the workers.
    CRM_PUSH = "crm.push"  # bookings changed since the last push (made online, by text, by staff)
    CRM_PULL = "crm.pull"  # changes people made in the CRM (two-way sync)
    CRM_ERASE = "crm.erase"  # a person's rows removed from the CRM (a privacy erasure)
    RETENTION_SWEEP = "retention.sweep"


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
    # Building a report is local work; its failures are the ledger or the analyser's provider.
    "report": RetryPolicy(base=timedelta(seconds=1), cap=timedelta(minutes=5), max_attempts=10),
    # Airtable's 429 comes with a 30 s penalty (honoured through retry_after); outages last minutes.
    "crm": RetryPolicy(base=timedelta(seconds=5), cap=timedelta(minutes=15), max_attempts=15),
    # Receivers of webhooks and staff texts: outages of minutes to an hour.
    "trigger": RetryPolicy(base=timedelta(seconds=5), cap=timedelta(minutes=30), max_attempts=10),
}
FALLBACK_POLICY = RetryPolicy(base=timedelta(seconds=5), cap=timedelta(minutes=15), max_attempts=10)


def scaled_policies(scale: float, policies: Mapping[str, RetryPolicy] = DEFAULT_POLICIES) -> dict[str, RetryPolicy]:
    """``policies`` with every base and cap multiplied by ``scale`` (attempts unchanged); a provider's
    ``Retry-After`` is still honoured in full."""
    if scale <= 0:
        raise ValueError(f"backoff scale must be positive, not {scale}")
    return {
        name: RetryPolicy(base=policy.base * scale, cap=policy.cap * scale, max_attempts=policy.max_attempts)
        for name, policy in policies.items()
    }


def policy_for(kind: str, policies: Mapping[str, RetryPolicy] = DEFAULT_POLICIES) -> RetryPolicy:
    return policies.get(integration_of(kind), FALLBACK_POLICY)


@dataclass(frozen=True, slots=True)
class Effect:
    id: int
    booking_id: str | None
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
    call_sid: str | None = None
    traceparent: str | None = None
    """The W3C trace context of the span that enqueued it, when that span was sampled."""

    @property
    def subject(self) -> str:
        """What the effect is about, for logs and the dead-letter list: its booking, call or kind."""
        if self.booking_id is not None:
            return self.booking_id
        return f"call:{self.call_sid}" if self.call_sid is not None else self.kind

    @property
    def integration(self) -> str:
        return integration_of(self.kind)

    @property
    def wanted_at(self) -> datetime:
        """When the effect was meant to happen: its booking change, or the time a delayed one was set for."""
        scheduled = self.payload.get(SCHEDULED_FOR)
        return datetime.fromisoformat(scheduled) if isinstance(scheduled, str) else ensure_utc(self.created_at)


def seal_payload(row: Mapping[str, Any]) -> dict[str, Any]:
    """An effect row with its payload sealed to its idempotency key: payloads carry the customer's
    number, name and the text of the message."""
    key = row["idempotency_key"]
    return {**row, "payload": pii.cipher().encrypt_json(row["payload"], table="effects", column="payload", row=key)}


def effect_from_row(row: Row[Any]) -> Effect:
    m = row._mapping
    return Effect(
        id=int(m["id"]),
        booking_id=m["booking_id"],
        kind=m["kind"],
        payload=pii.cipher().decrypt_json(m["payload"], table="effects", column="payload", row=m["idempotency_key"]),
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
        call_sid=m["call_sid"],
        traceparent=m["traceparent"],
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
        "sms_consent": booking.sms_consent.value,
        "line_number": booking.line_number,
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
        # Effects enqueued before consent was recorded carry none: those bookings were texted as implied.
        sms_consent=SmsConsent(payload.get("sms_consent", SmsConsent.IMPLIED.value)),
        line_number=payload.get("line_number"),  # absent from effects enqueued before lines were kept
    )


def _pending_row(
    kind: EffectKind,
    now: datetime,
    payload: dict[str, Any],
    *,
    key: str,
    booking_id: str | None,
    call_sid: str | None,
    due_at: datetime | None,
    policies: Mapping[str, RetryPolicy],
) -> dict[str, Any]:
    if due_at is not None:
        payload[SCHEDULED_FOR] = _iso(due_at)  # retries move due_at; this keeps when it was meant to run
    return {
        "booking_id": booking_id,
        "call_sid": call_sid,
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
        "idempotency_key": key,
        # Read in the enqueuing caller's context (a ledger write runs in it): the tool call of a call.
        "traceparent": current_traceparent(),
    }


def effect_row(
    booking: Booking,
    kind: EffectKind,
    now: datetime,
    *,
    due_at: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
    policies: Mapping[str, RetryPolicy] = DEFAULT_POLICIES,
) -> dict[str, Any]:
    payload = booking_payload(booking) | dict(extra or {})
    key = f"{booking.id}:{kind.value}:v{booking.version}"
    return _pending_row(
        kind, now, payload, key=key, booking_id=booking.id, call_sid=None, due_at=due_at, policies=policies
    )


def reminder_rows(booking: Booking, now: datetime) -> list[dict[str, Any]]:
    due = booking.start - REMINDER_LEAD
    return [effect_row(booking, EffectKind.SMS_REMINDER, now, due_at=due)] if due > now else []


def _cancel_pending_reminders(conn: Connection, booking_id: str, now: datetime) -> None:
    e = t.effects.c
    conn.execute(
        update(t.effects)
        .where(e.booking_id == booking_id, e.kind == EffectKind.SMS_REMINDER.value, e.status == EffectStatus.PENDING)
        .values(status=EffectStatus.CANCELLED.value, updated_at=now, last_error="superseded by a later change")
    )


def insert_effects(conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
    writes = CombinedWrite()
    count = effect_inserts(writes, rows)
    writes.send(conn)
    return count


def effect_inserts(writes: CombinedWrite, rows: Sequence[dict[str, Any]]) -> int:
    """:func:`insert_effects` as part of a caller's :class:`CombinedWrite`."""
    # One statement, rows in list order: their ids give the order in which the booking's effects run.
    writes.insert(t.effects, [seal_payload(row) for row in rows])
    return len(rows)


def standalone_effect_row(
    kind: EffectKind,
    now: datetime,
    payload: Mapping[str, Any],
    *,
    key: str,
    call_sid: str | None = None,
    due_at: datetime | None = None,
    policies: Mapping[str, RetryPolicy] = DEFAULT_POLICIES,
) -> dict[str, Any]:
    """An effect of a call (``call_sid``) or of nothing in particular (housekeeping). ``key`` is its
    idempotency key: whatever enqueues it again (a retried hang-up, a second scheduler) enqueues nothing."""
    return _pending_row(
        kind, now, dict(payload), key=key, booking_id=None, call_sid=call_sid, due_at=due_at, policies=policies
    )


def insert_effects_once(conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
    """Insert the rows whose idempotency key is new; returns how many were."""
    if not rows:
        return 0
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(t.effects).on_conflict_do_nothing(index_elements=["idempotency_key"])
    return sum(conn.execute(statement, [seal_payload(row)]).rowcount for row in rows)


def report_effect_row(call_sid: str, now: datetime, latencies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report of a call that has just ended: enqueued with the call's transcript, so a crash after
    hang-up loses neither. ``latencies`` are the turns' measured parts (only the live session knew them)."""
    payload = {"call_sid": call_sid, "latencies": [dict(item) for item in latencies]}
    return standalone_effect_row(
        EffectKind.REPORT_BUILD, now, payload, key=f"call:{call_sid}:report.build", call_sid=call_sid
    )


def record_created(
    writes: CombinedWrite, bookings: Sequence[Booking], now: datetime, *, series_rule: str | None = None
) -> int:
    """Enqueue the calendar event, the confirmation and (if there is time) the reminder of each booking.

    The occurrences of a recurring booking (``series_rule`` given) share one recurring calendar event and
    one confirmation, both enqueued with the first occurrence; each occurrence keeps its own reminder.
    The rows go with the rest of ``writes``, in the bookings' transaction."""
    rows: list[dict[str, Any]] = []
    if series_rule is not None and bookings:
        first = min(bookings, key=lambda booking: booking.start)
        series = {SERIES: {"id": first.series_id, "rrule": series_rule, "count": len(bookings)}}
        rows.append(effect_row(first, EffectKind.CALENDAR_CREATE, now, extra=series))
        rows.append(effect_row(first, EffectKind.SMS_CONFIRMATION, now, extra=series))
        for booking in sorted(bookings, key=lambda booking: booking.start):
            rows.extend(reminder_rows(booking, now))
        return effect_inserts(writes, rows)
    for booking in bookings:
        rows.append(effect_row(booking, EffectKind.CALENDAR_CREATE, now))
        rows.append(effect_row(booking, EffectKind.SMS_CONFIRMATION, now))
        rows.extend(reminder_rows(booking, now))
    return effect_inserts(writes, rows)


def occurrence_extra(conn: Connection, booking: Booking) -> dict[str, Any]:
    """For an occurrence of a recurring booking: its series and the start it was created with, which
    names its instance of the series' calendar event however often it has moved since."""
    if booking.series_id is None:
        return {}
    created = conn.execute(
        select(t.booking_events.c.details)
        .where(t.booking_events.c.booking_id == booking.id, t.booking_events.c.kind == "created")
        .order_by(t.booking_events.c.id)
        .limit(1)
    ).scalar_one()
    return {SERIES: {"id": booking.series_id, "original_start": created["start"]}}


def record_rescheduled(conn: Connection, before: Booking, after: Booking, now: datetime) -> int:
    """Enqueue the calendar update and the SMS for a move; the pending reminder moves with the booking
    (cancelled, and enqueued anew after the others so it never holds up this booking's later effects)."""
    _cancel_pending_reminders(conn, after.id, now)
    previous = {"previous": {"resource_id": before.resource_id, "start": _iso(before.start), "end": _iso(before.end)}}
    rows = [
        effect_row(after, EffectKind.CALENDAR_UPDATE, now, extra=previous | occurrence_extra(conn, after)),
        effect_row(after, EffectKind.SMS_RESCHEDULE, now, extra=previous),
        *reminder_rows(after, now),
    ]
    return insert_effects(conn, rows)


def record_status_change(conn: Connection, after: Booking, now: datetime, *, reason: str | None = None) -> int:
    """A booking that is no longer confirmed gets no reminder; a cancelled one loses its calendar event
    and the customer is told."""
    _cancel_pending_reminders(conn, after.id, now)
    if after.status is not BookingStatus.CANCELLED:
        return 0
    extra = {"reason": reason}
    rows = [
        effect_row(after, EffectKind.CALENDAR_DELETE, now, extra=extra | occurrence_extra(conn, after)),
        effect_row(after, EffectKind.SMS_CANCELLATION, now, extra=extra),
    ]
    return insert_effects(conn, rows)


class RedisNotifier:
    """Wakes idle workers after a commit. Best effort: a lost notification only delays an effect until
    the workers' next poll, so a Redis failure here must not fail the booking that was committed.

    With ``background`` a call returns at once and the notification is published on a task of its own,
    so a booking does not wait a Redis round trip for it after its commit. Calls made before that task
    has sent its notification share it; calls made while it is on its way share one more after it (a
    worker woken by the first may have looked before their commits). :meth:`aclose` waits for the last.
    Without it (short-lived commands, which may exit right after) each call publishes and waits."""

    def __init__(self, redis: aioredis.Redis, channel: str = EFFECTS_CHANNEL, *, background: bool = False) -> None:
        self._redis = redis
        self._channel = channel
        self._background = background
        self._publishing: asyncio.Task[None] | None = None
        self._again = False

    async def __call__(self) -> None:
        if not self._background:
            await self._publish()
            return
        if self._publishing is not None and not self._publishing.done():
            self._again = True
            return
        self._publishing = asyncio.get_running_loop().create_task(self._publish_until_current())

    async def aclose(self) -> None:
        """Wait for the notification being published, if any."""
        if self._publishing is not None:
            await self._publishing

    async def _publish_until_current(self) -> None:
        while True:
            self._again = False
            await self._publish()
            if not self._again:
                return

    async def _publish(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._redis.publish(self._channel, b"1")


# -- the worker side -----------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:MAX_ERROR_LENGTH]


EXHAUSTED_SWEEP_INTERVAL = timedelta(seconds=5)
"""How often a claiming worker also moves poison effects (every attempt's lease lost) to the dead letters."""


@dataclass(frozen=True, slots=True)
class _ClaimStatements:
    exhausted: Any
    pick: Any
    lease: Any
    waiting: Any  # whether any effect of these kinds is due (what a claim would lease), as an EXISTS


@functools.cache
def _claim_statements(kinds: tuple[str, ...], postgres: bool) -> _ClaimStatements:
    """The claim's statements for one set of kinds, built once: their values are bound per call
    (``claim_now``, ``claim_limit``, ``claim_owner``, ``claim_expires``; ``claim_ids`` on PostgreSQL)."""
    now: BindParameter[datetime] = bindparam("claim_now", type_=t.UTCDateTime())
    candidate = t.effects.alias("candidate")
    earlier = t.effects.alias("earlier")
    c = candidate.c
    # Order matters within one integration (an event is created before it is deleted, a booking is
    # confirmed before it is cancelled) but not across them: a text does not wait for a calendar outage.
    same_integration = or_(
        *(
            and_(c.kind.like(f"{integration}.%"), earlier.c.kind.like(f"{integration}.%"))
            for integration in sorted({integration_of(kind) for kind in kinds})
        )
    )
    blocked = exists().where(
        earlier.c.booking_id == c.booking_id,
        earlier.c.id < c.id,
        earlier.c.status.in_((EffectStatus.PENDING.value, EffectStatus.RUNNING.value)),
        same_integration,
    )
    claimable = (
        c.kind.in_(kinds),
        or_(
            and_(c.status == EffectStatus.PENDING.value, c.due_at <= now),
            and_(c.status == EffectStatus.RUNNING.value, c.lease_expires_at <= now),
        ),
        ~blocked,
    )
    due = select(c.id).where(*claimable).order_by(c.due_at, c.id).limit(bindparam("claim_limit", type_=Integer))
    e = t.effects.c
    lease_values = {
        "status": EffectStatus.RUNNING.value,
        "lease_owner": bindparam("claim_owner"),
        "lease_expires_at": bindparam("claim_expires", type_=t.UTCDateTime()),
        "attempts": e.attempts + 1,
        "updated_at": now,
    }
    # An effect whose every attempt ended in a lost lease is presumed to kill its worker (a poison
    # effect): it goes to the dead letters instead of taking down worker after worker.
    exhausted = (
        update(t.effects)
        .where(
            e.status == EffectStatus.RUNNING.value,
            e.lease_expires_at <= now,
            e.attempts >= e.max_attempts,
            e.kind.in_(kinds),
        )
        .values(
            status=EffectStatus.DEAD.value,
            last_error=func.coalesce(e.last_error + "\n", "") + "lease expired on the last attempt",
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    if postgres:
        pick = due.with_for_update(skip_locked=True, of=candidate)
        target = e.id.in_(bindparam("claim_ids", expanding=True))
    else:
        pick = due
        target = e.id.in_(due.scalar_subquery())
    lease = update(t.effects).where(target).values(lease_values).returning(t.effects)
    return _ClaimStatements(exhausted=exhausted, pick=pick, lease=lease, waiting=exists().where(*claimable))


@dataclass(frozen=True, slots=True)
class OutboxStats:
    now: datetime
    due: dict[str, int]
    oldest_due: dict[str, datetime]
    dead: dict[str, int]

    def by_integration(self, counts: Mapping[str, int]) -> dict[str, int]:
        totals: dict[str, int] = {}
        for kind, count in counts.items():
            totals[integration_of(kind)] = totals.get(integration_of(kind), 0) + count
        return totals

    def longest_wait(self) -> dict[str, float]:
        """Seconds the longest-waiting due effect of each integration has waited."""
        waits: dict[str, float] = {}
        for kind, due_at in self.oldest_due.items():
            wait = max((self.now - due_at).total_seconds(), 0.0)
            waits[integration_of(kind)] = max(waits.get(integration_of(kind), 0.0), wait)
        return waits


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
        self._last_sweep: datetime | None = None

    def now(self) -> datetime:
        return self._clock()

    async def claim(self, owner: str, kinds: Sequence[str], *, limit: int, lease: timedelta) -> list[Effect]:
        """Lease up to ``limit`` due effects of ``kinds`` to ``owner`` (oldest due first). A running effect
        whose lease has expired counts as due: its worker is presumed dead."""
        [claimed] = await self.claim_many(owner, [(kinds, limit)], lease=lease)
        return claimed

    async def claim_many(
        self, owner: str, wanted: Sequence[tuple[Sequence[str], int]], *, lease: timedelta
    ) -> list[list[Effect]]:
        """:meth:`claim` for several groups of kinds (a worker's integrations, each with its own free
        slots) in one write transaction; one list of effects per group, in order. On SQLite every write
        transaction takes the one write lock that the bookings also need, so a worker looking for work
        takes it once, not once per integration."""
        now = self._clock()
        postgres = self._db.dialect == "postgresql"
        groups = [
            (_claim_statements(tuple(sorted(kinds)), postgres), limit) for kinds, limit in wanted if kinds and limit > 0
        ]
        if not groups:
            return [[] for _ in wanted]
        base = {"claim_now": now, "claim_owner": owner, "claim_expires": now + lease}
        sweep = self._last_sweep is None or now - self._last_sweep >= EXHAUSTED_SWEEP_INTERVAL
        if sweep:
            self._last_sweep = now
        elif not postgres and not await self._any_waiting([statements for statements, _ in groups], now):
            # Most looks find nothing (a worker looks again whenever an effect finishes). On SQLite a read
            # sees the last commit without the write lock, so an empty look no longer delays a booking.
            return [[] for _ in wanted]

        def lease_group(conn: Connection, statements: _ClaimStatements, limit: int) -> list[Effect]:
            params = base | {"claim_limit": limit}
            if postgres:
                # Rows another worker is claiming right now are skipped, not waited for; a row it has
                # just claimed fails the re-check of the WHERE clause once its lock is released.
                ids = conn.execute(statements.pick, params).scalars().all()
                if not ids:
                    return []
                rows = conn.execute(statements.lease, params | {"claim_ids": list(ids)}).all()
            else:
                # SQLite has one writer at a time (ours, BEGIN IMMEDIATE): select and update in one
                # statement and no other claim can interleave.
                rows = conn.execute(statements.lease, params).all()
            return sorted((effect_from_row(row) for row in rows), key=lambda effect: effect.id)

        def work(conn: Connection) -> list[list[Effect]]:
            if sweep:  # every group's kinds, so no integration waits a sweep interval for its turn
                for statements, _ in groups:
                    conn.execute(statements.exhausted, {"claim_now": now})
            return [lease_group(conn, statements, limit) for statements, limit in groups]

        claimed = iter(await self._db.write(work))
        return [next(claimed) if kinds and limit > 0 else [] for kinds, limit in wanted]

    async def _any_waiting(self, groups: list[_ClaimStatements], now: datetime) -> bool:
        query = select(or_(*(group.waiting for group in groups)))
        return bool(await self._db.read(lambda conn: conn.execute(query, {"claim_now": now}).scalar()))

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
        return effect_from_row(row) if row is not None else None

    async def for_booking(self, booking_id: str) -> list[Effect]:
        query = select(t.effects).where(t.effects.c.booking_id == booking_id).order_by(t.effects.c.id)
        async with self._db.reader.connect() as conn:
            return [effect_from_row(row) for row in await conn.execute(query)]

    async def for_call(self, call_sid: str) -> list[Effect]:
        query = select(t.effects).where(t.effects.c.call_sid == call_sid).order_by(t.effects.c.id)
        async with self._db.reader.connect() as conn:
            return [effect_from_row(row) for row in await conn.execute(query)]

    async def queue_depth(self) -> dict[str, int]:
        """Pending effects that are due now, per kind (what a metrics gauge reports)."""
        return (await self.stats()).due

    async def stats(self) -> OutboxStats:
        """What the outbox holds now, for metrics: due effects per kind, when the longest-waiting one of
        each kind became due, and dead letters per kind."""
        e = t.effects.c
        now = self._clock()
        due = (
            select(e.kind, func.count(), func.min(e.due_at))
            .where(e.status == EffectStatus.PENDING.value, e.due_at <= now)
            .group_by(e.kind)
        )
        dead = select(e.kind, func.count()).where(e.status == EffectStatus.DEAD.value).group_by(e.kind)
        async with self._db.reader.connect() as conn:
            due_rows = (await conn.execute(due)).all()
            dead_rows = (await conn.execute(dead)).all()
        return OutboxStats(
            now=now,
            due={kind: int(count) for kind, count, _ in due_rows},
            oldest_due={kind: ensure_utc(oldest) for kind, _, oldest in due_rows if oldest is not None},
            dead={kind: int(count) for kind, count in dead_rows},
        )

    # -- dead letters ----------------------------------------------------------------------------
    async def dead_letters(self, *, limit: int = 100, newest_first: bool = False) -> list[Effect]:
        """Dead effects in the order they died (``newest_first`` reverses it: what an operator looks at)."""
        e = t.effects.c
        order = (e.updated_at.desc(), e.id.desc()) if newest_first else (e.updated_at, e.id)
        query = select(t.effects).where(e.status == EffectStatus.DEAD.value).order_by(*order).limit(limit)
        async with self._db.reader.connect() as conn:
            return [effect_from_row(row) for row in await conn.execute(query)]

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
            return effect_from_row(row) if row is not None else None

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
