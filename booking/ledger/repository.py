"""The ledger's queries: every write is one transaction, every expected outcome a return value.

The database, not this code, is what refuses overlapping bookings (see the first migration); this module
turns that refusal into :class:`Overlap` with the bookings that stood in the way.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Row, RowMapping, and_, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from booking import outbox
from booking.business import Business
from booking.domain import (
    ACTIVE_STATUSES,
    Booking,
    BookingEvent,
    BookingStatus,
    Customer,
    Interval,
    SmsConsent,
    new_id,
)
from booking.errors import InvalidTransition, NotFound, VersionConflict
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.combined import CombinedWrite
from booking.ledger.consent_repository import consent_inserts, sms_consent_decision
from booking.ledger.database import Database

Clock = Callable[[], datetime]

# The made-up caller of :meth:`Ledger.rehearse_booking` (Twilio's magic test number for a valid one).
REHEARSAL_PHONE = "+15005550006"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class CustomerDetails:
    phone: str  # E.164
    name: str | None = None
    email: str | None = None
    time_zone: str | None = None


@dataclass(frozen=True, slots=True)
class NewBooking:
    resource_id: str
    service_id: str
    start: datetime
    end: datetime
    block: Interval
    id: str = field(default_factory=new_id)


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    rrule: str
    time_zone: str
    first_start_local: str
    id: str = field(default_factory=new_id)


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    key: str
    request_hash: str
    booking_ids: tuple[str, ...]
    series_id: str | None


def request_fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of a request's meaningful parameters, to tell a retry from a reused key."""
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class Created:
    bookings: tuple[Booking, ...]
    series_id: str | None


@dataclass(frozen=True, slots=True)
class Overlap:
    """The database refused the write: these active bookings overlap what was asked."""

    conflicts: tuple[Booking, ...]


@dataclass(frozen=True, slots=True)
class KeyTaken:
    """The idempotency key was committed by another request in the meantime."""

    record: IdempotencyRecord


CreateResult = Created | Overlap | KeyTaken


def _is_overlap(error: IntegrityError) -> bool:
    return t.OVERLAP_CONSTRAINT in str(error.orig) or getattr(error.orig, "sqlstate", None) == "23P01"


def _is_idempotency_clash(error: IntegrityError) -> bool:
    message = str(error.orig)
    return any(
        name in message
        for name in (
            "uq_bookings_idempotency_key",
            "bookings.idempotency_key",
            "uq_booking_series_idempotency_key",
            "booking_series.idempotency_key",
        )
    )


BOOKING_COLUMNS = (
    t.bookings,
    t.customers.c.phone_index,
    t.customers.c.phone,
    t.customers.c.name.label("customer_name"),
    t.customers.c.email,
    t.customers.c.time_zone,
)


def seal_customer(customer: CustomerDetails) -> dict[str, str | None]:
    """The customer's columns as stored: ciphertext bound to the row's blind index (its unique key,
    known before the row exists, so the upsert stays one statement), and that index."""
    vault = pii.cipher()
    index = vault.blind_index(customer.phone)
    return {
        "phone_index": index,
        "phone": vault.encrypt(customer.phone, table="customers", column="phone", row=index),
        "name": vault.encrypt(customer.name, table="customers", column="name", row=index),
        "email": vault.encrypt(customer.email, table="customers", column="email", row=index),
    }


def open_customer(
    customer_id: str,
    m: Mapping[str, Any] | RowMapping,
    *,
    name_key: str = "name",
    just_sealed: Mapping[str, tuple[str | None, str | None]] | None = None,
) -> Customer:
    """A customer row (``phone_index``, ``phone``, name, ``email``, ``time_zone``) decrypted.

    ``just_sealed`` (column -> (ciphertext, plaintext)) is what this transaction has just written: a column
    that holds that very ciphertext (its nonce is fresh, so nothing else can) is that plaintext, and is
    not decrypted again. The upsert that stores a caller's details returns the row, so a new customer is
    opened without a single decryption."""
    vault = pii.cipher()
    index = m["phone_index"]
    known = just_sealed or {}

    def opened(column: str, key: str) -> str | None:
        stored = m[key]
        sealed, plain = known.get(column, (None, None))
        if stored is not None and stored == sealed:
            return plain
        return vault.decrypt(stored, table="customers", column=column, row=index)

    phone = opened("phone", "phone")
    assert phone is not None
    return Customer(
        id=customer_id,
        phone=phone,
        name=opened("name", name_key),
        email=opened("email", "email"),
        time_zone=m["time_zone"],
    )


def seal_notes(booking_id: str, notes: str | None) -> str | None:
    return pii.cipher().encrypt(notes, table="bookings", column="notes", row=booking_id)


def booking_from_row(row: Row[Any]) -> Booking:
    m = row._mapping
    return Booking(
        id=m["id"],
        resource_id=m["resource_id"],
        service_id=m["service_id"],
        customer=open_customer(m["customer_id"], m, name_key="customer_name"),
        start=m["start_at"],
        end=m["end_at"],
        block=Interval(m["block_start"], m["block_end"]),
        status=BookingStatus(m["status"]),
        version=m["version"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        series_id=m["series_id"],
        source=m["source"],
        notes=pii.cipher().decrypt(m["notes"], table="bookings", column="notes", row=m["id"]),
        sms_consent=SmsConsent(m["sms_consent"]),
        line_number=m["line_number"],
    )


def _when(booking: Booking) -> dict[str, str]:
    return {"start": booking.start.isoformat(), "end": booking.end.isoformat(), "resource_id": booking.resource_id}


def audit_booking_change(
    conn: Connection,
    now: datetime,
    actor: str,
    after: Sequence[Booking],
    *,
    before: Booking | None = None,
    series_id: str | None = None,
) -> None:
    """The audit entry of a booking change, written with the other entries of its transaction at its
    commit: the booking (or a new series), its status and time before and after. Never the customer's
    details nor the free-text reason: the audit log outlives an erasure."""
    first = after[0]
    details: dict[str, Any] = {
        "booking_ids": [b.id for b in after],
        "service_id": first.service_id,
        "from_status": before.status.value if before is not None else None,
        "to_status": first.status.value,
        "from": _when(before) if before is not None else None,
        "to": _when(first),
        "version": first.version,
    }
    subject_kind, subject_id = ("series", series_id) if series_id is not None else ("booking", first.id)
    append_audit(
        conn,
        at=now,
        actor=actor,
        action=AuditAction.BOOKING_CHANGED,
        subject_kind=subject_kind,
        subject_id=subject_id,
        details=details,
    )


class Ledger:
    """Reads and writes of the system of record."""

    def __init__(
        self, database: Database, *, clock: Clock = utc_now, notify_effects: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._db = database
        self._clock = clock
        # Called after a commit that enqueued effects (booking/outbox.py), to wake the workers at once.
        self._notify_effects = notify_effects
        dialect_insert = postgresql.insert if database.dialect == "postgresql" else sqlite.insert
        self._insert: Callable[..., Any] = dialect_insert
        c = t.customers.c
        upsert = dialect_insert(t.customers).values(
            {
                column: bindparam(column)
                for column in ("id", "phone", "phone_index", "name", "email", "time_zone", "created_at", "updated_at")
            }
        )
        # Built once: constructing an upsert per call cost more than running it.
        self._upsert_customer_stmt = upsert.on_conflict_do_update(
            index_elements=["phone_index"],
            set_={
                "name": func.coalesce(upsert.excluded.name, c.name),
                "email": func.coalesce(upsert.excluded.email, c.email),
                "time_zone": func.coalesce(upsert.excluded.time_zone, c.time_zone),
                "updated_at": upsert.excluded.updated_at,
            },
        ).returning(c.id, c.phone_index, c.phone, c.name, c.email, c.time_zone)

    @property
    def database(self) -> Database:
        return self._db

    # -- catalog ---------------------------------------------------------------------------------
    async def sync_catalog(self, business: Business) -> None:
        """Mirror resources and services from the configuration; ones no longer configured are kept
        (bookings refer to them) but marked inactive."""
        await self._db.write(self._catalog(business))

    def _catalog(self, business: Business) -> Callable[[Connection], None]:
        """The write of :meth:`sync_catalog`."""
        now = self._clock()
        upsert = self._insert

        def work(conn: Connection) -> None:
            conn.execute(update(t.resources).values(active=False))
            conn.execute(update(t.services).values(active=False))
            for resource in business.resources:
                values: dict[str, Any] = {
                    "name": resource.name,
                    "kind": resource.kind,
                    "calendar_id": resource.calendar_id,
                    "active": True,
                    "synced_at": now,
                }
                stmt = upsert(t.resources).values(id=resource.id, **values)
                conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=values))
            for service in business.services:
                values = {
                    "name": service.name,
                    "duration_minutes": service.duration_minutes,
                    "buffer_before_minutes": service.buffer_before_minutes,
                    "buffer_after_minutes": service.buffer_after_minutes,
                    "active": True,
                    "synced_at": now,
                }
                stmt = upsert(t.services).values(id=service.id, **values)
                conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=values))
            conn.execute(t.service_resources.delete())
            conn.execute(
                insert(t.service_resources),
                [{"service_id": s.id, "resource_id": r} for s in business.services for r in s.resources],
            )

        return work

    # -- idempotency -----------------------------------------------------------------------------
    async def find_idempotency(self, key: str) -> IdempotencyRecord | None:
        async with self._db.reader.connect() as conn:
            return await self._idempotency(conn, key)

    async def _idempotency(self, conn: AsyncConnection, key: str) -> IdempotencyRecord | None:
        b = t.bookings.c
        row = (await conn.execute(select(b.id, b.request_hash).where(b.idempotency_key == key))).first()
        if row is not None:
            return IdempotencyRecord(key, row.request_hash, (row.id,), None)
        series_c = t.booking_series.c
        series = (
            await conn.execute(select(series_c.id, series_c.request_hash).where(series_c.idempotency_key == key))
        ).first()
        if series is None:
            return None
        ids = (await conn.execute(select(b.id).where(b.series_id == series.id).order_by(b.start_at))).scalars().all()
        return IdempotencyRecord(key, series.request_hash, tuple(ids), series.id)

    # -- writes ----------------------------------------------------------------------------------
    async def create_bookings(
        self,
        customer: CustomerDetails,
        new: Sequence[NewBooking],
        *,
        idempotency: tuple[str, str] | None = None,
        series: SeriesSpec | None = None,
        source: str = "api",
        notes: str | None = None,
        sms_consent: SmsConsent = SmsConsent.IMPLIED,
        sms_consent_wording: str | None = None,
        line_number: str | None = None,
        actor: str = "api",
    ) -> CreateResult:
        """Insert one booking, or every occurrence of a series, in one transaction: all or nothing. An
        answer about texts (given or declined) is kept in the consent history too, with its wording."""
        work = self._creation(
            customer,
            new,
            idempotency=idempotency,
            series=series,
            source=source,
            notes=notes,
            sms_consent=sms_consent,
            sms_consent_wording=sms_consent_wording,
            line_number=line_number,
            actor=actor,
        )
        try:
            bookings = await self._db.write(work)
        except IntegrityError as error:
            if _is_overlap(error):
                conflicts: list[Booking] = []
                for b in new:
                    conflicts.extend(await self.overlapping(b.resource_id, b.block))
                unique = {c.id: c for c in conflicts}
                return Overlap(tuple(sorted(unique.values(), key=lambda c: c.start)))
            if idempotency is not None and _is_idempotency_clash(error):
                record = await self.find_idempotency(idempotency[0])
                if record is not None:
                    return KeyTaken(record)
            raise
        await self._effects_enqueued()
        return Created(bookings, series.id if series else None)

    async def rehearse_booking(self, business: Business) -> None:
        """Run the transaction of a booking made on the phone (a customer, the booking, its effects, the
        caller's yes to texts, its audit entry) and roll it back, so that the first real one does not pay
        for compiling its statements (:meth:`Database.rehearse`). The catalog is written first in the
        same transaction, since on a new ledger nobody may have written it yet. The made-up booking is
        for the first service's first resource on 3 January 2000, before any real booking, so it cannot
        meet one already there."""
        service = business.services[0]
        start = datetime(2000, 1, 3, 9, 0, tzinfo=UTC)
        block = Interval(start, start + timedelta(minutes=service.duration_minutes))
        work = self._creation(
            CustomerDetails(phone=REHEARSAL_PHONE, name="Rehearsal"),
            [NewBooking(service.resources[0], service.id, block.start, block.end, block)],
            idempotency=(f"rehearsal:{new_id()}", "0" * 64),
            series=None,
            source="phone",
            notes="rehearsal",
            sms_consent=SmsConsent.GIVEN,
            sms_consent_wording=None,
            line_number=None,
            actor="rehearsal",
        )
        await self._db.rehearse([self._catalog(business), work])

    def _creation(
        self,
        customer: CustomerDetails,
        new: Sequence[NewBooking],
        *,
        idempotency: tuple[str, str] | None,
        series: SeriesSpec | None,
        source: str,
        notes: str | None,
        sms_consent: SmsConsent,
        sms_consent_wording: str | None,
        line_number: str | None,
        actor: str,
    ) -> Callable[[Connection], tuple[Booking, ...]]:
        """The write of :meth:`create_bookings`."""
        if not new:
            raise ValueError("create_bookings needs at least one booking")
        now = self._clock()
        series_id = series.id if series else None
        texts = sms_consent_decision(sms_consent, source=source, actor=actor, wording=sms_consent_wording)

        key, request_hash = idempotency if idempotency is not None else (None, None)

        def work(conn: Connection) -> tuple[Booking, ...]:
            stored = self._upsert_customer(conn, customer, now)
            # The series, its bookings, their effects and the caller's answer about texts go to the
            # database together (one statement on PostgreSQL); the database writes each booking's
            # "created" history event.
            writes = CombinedWrite()
            if series is not None:
                writes.insert(
                    t.booking_series,
                    [
                        {
                            "id": series.id,
                            "rrule": series.rrule,
                            "time_zone": series.time_zone,
                            "first_start_local": series.first_start_local,
                            "created_at": now,
                            "idempotency_key": key,
                            "request_hash": request_hash,
                        }
                    ],
                )
            writes.insert(
                t.bookings,
                [
                    {
                        "id": b.id,
                        "resource_id": b.resource_id,
                        "service_id": b.service_id,
                        "customer_id": stored.id,
                        "series_id": series_id,
                        "status": BookingStatus.CONFIRMED.value,
                        "start_at": b.start,
                        "end_at": b.end,
                        "block_start": b.block.start,
                        "block_end": b.block.end,
                        "source": source,
                        "notes": seal_notes(b.id, notes),
                        "sms_consent": sms_consent.value,
                        "line_number": line_number,
                        "version": 1,
                        "created_at": now,
                        "updated_at": now,
                        "idempotency_key": None if series else key,
                        "request_hash": None if series else request_hash,
                        "changed_by": actor,
                        "change_reason": None,
                    }
                    for b in new
                ],
            )
            bookings = tuple(
                Booking(
                    id=b.id,
                    resource_id=b.resource_id,
                    service_id=b.service_id,
                    customer=stored,
                    start=b.start,
                    end=b.end,
                    block=b.block,
                    status=BookingStatus.CONFIRMED,
                    version=1,
                    created_at=now,
                    updated_at=now,
                    series_id=series_id,
                    source=source,
                    notes=notes,
                    sms_consent=sms_consent,
                    line_number=line_number,
                )
                for b in new
            )
            # The calendar event and SMS exist if and only if these bookings commit.
            outbox.record_created(writes, bookings, now, series_rule=series.rrule if series is not None else None)
            if texts is not None:
                decision = dataclasses.replace(texts, booking_id=bookings[0].id)
                consent_inserts(writes, pii.cipher().blind_index(customer.phone), [decision], now)
            writes.send(conn)
            audit_booking_change(conn, now, actor, bookings, series_id=series_id)
            return bookings

        return work

    def _upsert_customer(self, conn: Connection, customer: CustomerDetails, now: datetime) -> Customer:
        """Insert the customer or update the details given (a detail left out keeps its stored value);
        returns the stored customer."""
        sealed = seal_customer(customer)
        row = conn.execute(
            self._upsert_customer_stmt,
            {"id": new_id(), **sealed, "time_zone": customer.time_zone, "created_at": now, "updated_at": now},
        ).one()
        given = {"phone": customer.phone, "name": customer.name, "email": customer.email}
        return open_customer(
            row.id, row._mapping, just_sealed={column: (sealed[column], plain) for column, plain in given.items()}
        )

    async def reschedule(
        self,
        booking_id: str,
        *,
        resource_id: str,
        start: datetime,
        end: datetime,
        block: Interval,
        expected_version: int | None = None,
        actor: str = "api",
    ) -> Booking | Overlap:
        """Move a confirmed booking in one UPDATE: the new time is taken and the old one released in
        the same statement, so there is no moment when the booking holds neither or both."""
        now = self._clock()

        def work(conn: Connection) -> None:
            current = self._current(conn, booking_id)
            if not current.status.is_active:
                raise InvalidTransition(
                    f"a {current.status.value} booking cannot be rescheduled", booking_id=booking_id
                )
            if expected_version is not None and current.version != expected_version:
                raise VersionConflict(
                    f"booking is at version {current.version}, not {expected_version}", booking_id=booking_id
                )
            conn.execute(
                update(t.bookings)
                .where(t.bookings.c.id == booking_id)
                .values(
                    resource_id=resource_id,
                    start_at=start,
                    end_at=end,
                    block_start=block.start,
                    block_end=block.end,
                    version=t.bookings.c.version + 1,
                    updated_at=now,
                    changed_by=actor,
                    change_reason=None,
                )
            )
            moved = dataclasses.replace(
                current,
                resource_id=resource_id,
                start=start,
                end=end,
                block=block,
                version=current.version + 1,
                updated_at=now,
            )
            outbox.record_rescheduled(conn, current, moved, now)
            audit_booking_change(conn, now, actor, (moved,), before=current)

        try:
            await self._db.write(work)
        except IntegrityError as error:
            if _is_overlap(error):
                conflicts = [b for b in await self.overlapping(resource_id, block) if b.id != booking_id]
                return Overlap(tuple(conflicts))
            raise
        await self._effects_enqueued()
        return await self.require_booking(booking_id)

    async def change_status(
        self, booking_id: str, target: BookingStatus, *, actor: str = "api", reason: str | None = None
    ) -> Booking:
        now = self._clock()

        def work(conn: Connection) -> int:
            current = self._current(conn, booking_id)
            current.status.check_transition(target, booking_id=booking_id)
            conn.execute(
                update(t.bookings)
                .where(t.bookings.c.id == booking_id)
                .values(
                    status=target.value,
                    version=t.bookings.c.version + 1,
                    updated_at=now,
                    changed_by=actor,
                    change_reason=reason,
                )
            )
            changed = dataclasses.replace(current, status=target, version=current.version + 1, updated_at=now)
            enqueued = outbox.record_status_change(conn, changed, now, reason=reason)
            audit_booking_change(conn, now, actor, (changed,), before=current)
            return enqueued

        if await self._db.write(work):
            await self._effects_enqueued()
        return await self.require_booking(booking_id)

    async def _effects_enqueued(self) -> None:
        if self._notify_effects is not None:
            await self._notify_effects()

    def _current(self, conn: Connection, booking_id: str) -> Booking:
        query = select(*BOOKING_COLUMNS).join(t.customers).where(t.bookings.c.id == booking_id)
        if self._db.dialect == "postgresql":
            query = query.with_for_update(of=t.bookings)
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"no booking {booking_id}", booking_id=booking_id)
        return booking_from_row(row)

    # -- reads -----------------------------------------------------------------------------------
    async def get_booking(self, booking_id: str) -> Booking | None:
        found = await self.get_bookings([booking_id])
        return found[0] if found else None

    async def require_booking(self, booking_id: str) -> Booking:
        booking = await self.get_booking(booking_id)
        if booking is None:
            raise NotFound(f"no booking {booking_id}", booking_id=booking_id)
        return booking

    async def get_bookings(self, booking_ids: Sequence[str]) -> list[Booking]:
        query = (
            select(*BOOKING_COLUMNS)
            .join(t.customers)
            .where(t.bookings.c.id.in_(list(booking_ids)))
            .order_by(t.bookings.c.start_at)
        )
        return [booking_from_row(row) for row in await self._db.read(lambda conn: conn.execute(query).all())]

    async def bookings_for_phone(
        self, phone: str, *, since: datetime | None = None, active_only: bool = False
    ) -> list[Booking]:
        index = pii.cipher().blind_index(phone)
        query = select(*BOOKING_COLUMNS).join(t.customers).where(t.customers.c.phone_index == index)
        if since is not None:
            query = query.where(t.bookings.c.end_at > since)
        if active_only:
            query = query.where(t.bookings.c.status.in_(ACTIVE_STATUSES))
        ordered = query.order_by(t.bookings.c.start_at)
        return [booking_from_row(row) for row in await self._db.read(lambda conn: conn.execute(ordered).all())]

    async def overlapping(self, resource_id: str, block: Interval) -> list[Booking]:
        """Active bookings of ``resource_id`` whose blocks overlap ``block``."""
        query = (
            select(*BOOKING_COLUMNS)
            .join(t.customers)
            .where(
                t.bookings.c.resource_id == resource_id,
                t.bookings.c.status.in_(ACTIVE_STATUSES),
                t.bookings.c.block_start < block.end,
                t.bookings.c.block_end > block.start,
                t.bookings.c.block_start > block.start - t.MAX_BLOCK,
            )
            .order_by(t.bookings.c.start_at)
        )
        async with self._db.reader.connect() as conn:
            return [booking_from_row(row) for row in await conn.execute(query)]

    async def active_blocks(self, resource_id: str, window: Interval) -> list[tuple[str, Interval]]:
        """(booking id, block) of every active booking of a resource touching ``window``: what the Redis
        index is rebuilt from."""
        query = select(t.bookings.c.id, t.bookings.c.block_start, t.bookings.c.block_end).where(
            t.bookings.c.resource_id == resource_id,
            t.bookings.c.status.in_(ACTIVE_STATUSES),
            t.bookings.c.block_start < window.end,
            t.bookings.c.block_end > window.start,
            t.bookings.c.block_start > window.start - t.MAX_BLOCK,
        )
        async with self._db.reader.connect() as conn:
            return [(row.id, Interval(row.block_start, row.block_end)) for row in await conn.execute(query)]

    async def history(self, booking_id: str) -> list[BookingEvent]:
        query = (
            select(t.booking_events).where(t.booking_events.c.booking_id == booking_id).order_by(t.booking_events.c.id)
        )
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            BookingEvent(
                booking_id=row.booking_id,
                at=row.at,
                kind=row.kind,
                from_status=BookingStatus(row.from_status) if row.from_status else None,
                to_status=BookingStatus(row.to_status),
                actor=row.actor,
                details=dict(row.details),
            )
            for row in rows
        ]

    async def count_overlaps(self) -> int:
        """Pairs of active bookings of one resource whose blocks overlap. Always 0 unless the database
        guarantee has been bypassed; benchmarks and race tests check it."""
        a, b = t.bookings.alias("a"), t.bookings.alias("b")
        query = (
            select(func.count())
            .select_from(
                a.join(
                    b,
                    and_(
                        a.c.resource_id == b.c.resource_id,
                        a.c.id < b.c.id,
                        a.c.block_start < b.c.block_end,
                        b.c.block_start < a.c.block_end,
                    ),
                )
            )
            .where(a.c.status.in_(ACTIVE_STATUSES), b.c.status.in_(ACTIVE_STATUSES))
        )
        async with self._db.reader.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def count_bookings(self, *, resource_id: str | None = None, active_only: bool = True) -> int:
        query = select(func.count()).select_from(t.bookings)
        conditions = []
        if resource_id is not None:
            conditions.append(t.bookings.c.resource_id == resource_id)
        if active_only:
            conditions.append(t.bookings.c.status.in_(ACTIVE_STATUSES))
        if conditions:
            query = query.where(and_(*conditions))
        async with self._db.reader.connect() as conn:
            return int((await conn.execute(query)).scalar_one())


__all__ = [
    "CreateResult",
    "Created",
    "CustomerDetails",
    "IdempotencyRecord",
    "KeyTaken",
    "Ledger",
    "NewBooking",
    "Overlap",
    "SeriesSpec",
    "request_fingerprint",
    "utc_now",
]
