"""A person's rights over their data: everything held about them (export), and its removal (erasure).

A person is known by their phone number; the ledger finds them through its blind index (never a
plaintext comparison), and so does this module.

Export gathers the customer record, their bookings and each booking's history, their calls with
transcripts and report versions, the texts sent to them and their SMS opt-out, the effects carrying
their data, their consent history with the words each decision answered, and the archived transcripts
and recordings of their calls, decrypted, as one JSON document.

Erasure, in one ledger transaction:
- the customer record keeps no name, email or number (its blind index is replaced by a random one, so
  the number no longer finds it); their bookings stay, anonymised, as the business's record that a slot
  was taken, without notes;
- their calls lose their numbers, transcripts and reports; their texts lose the number;
- the effects carrying their data lose their payload, and those still to run are cancelled;
- an SMS opt-out stays (a number that said STOP must never be texted again), as its keyed hash only;
  so do their refusals and withdrawals of consent (booking/consent.py); their grants are deleted;
- an audit entry says it happened, with counts and the person's blind index, no personal data;
- the calendar's events of their bookings are rewritten without their details (``calendar.update``
  effects of the anonymised bookings);
- the CRM's copy is removed by a ``crm.erase`` effect, retried like any other; the archived
  transcripts and recordings, and the server's local spool of their recordings, are deleted after the
  commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from sqlalchemy import delete, or_, select, update
from sqlalchemy.engine import Connection

from booking.calls import CallRecord
from booking.consent import Decision
from booking.domain import Booking, BookingStatus
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.calls_repository import CallLedger, call_from_row
from booking.ledger.consent_repository import ConsentLedger
from booking.ledger.database import Database
from booking.ledger.reports_repository import ReportLedger
from booking.ledger.repository import Ledger
from booking.ledger.sms_repository import SmsLedger
from booking.outbox import (
    REWRITE_DETAILS,
    EffectKind,
    EffectStatus,
    Outbox,
    effect_row,
    insert_effects_once,
    occurrence_extra,
    standalone_effect_row,
)
from booking.reports.pipeline import open_archived, recording_key, transcript_key

Clock = Callable[[], datetime]
ERASED = "[erased]"


class Archive(Protocol):
    async def get(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> bool: ...


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def _calls_of(database: Database, index: str) -> list[CallRecord]:
    query = select(t.calls).where(t.calls.c.from_index == index).order_by(t.calls.c.created_at)
    async with database.reader.connect() as conn:
        return [call_from_row(row) for row in await conn.execute(query)]


async def _booking_history(database: Database, booking_id: str) -> list[dict[str, Any]]:
    e = t.booking_events.c
    query = select(e.at, e.kind, e.from_status, e.to_status, e.actor).where(e.booking_id == booking_id).order_by(e.id)
    async with database.reader.connect() as conn:
        return [
            {"at": _iso(r.at), "kind": r.kind, "from": r.from_status, "to": r.to_status, "by": r.actor}
            for r in await conn.execute(query)
        ]


def _booking(booking: Booking) -> dict[str, Any]:
    return {
        "id": booking.id,
        "service_id": booking.service_id,
        "resource_id": booking.resource_id,
        "start": _iso(booking.start),
        "end": _iso(booking.end),
        "status": booking.status.value,
        "source": booking.source,
        "notes": booking.notes,
        "sms_consent": booking.sms_consent.value,
        "line_number": booking.line_number,
        "created_at": _iso(booking.created_at),
        "updated_at": _iso(booking.updated_at),
    }


async def export_person(
    database: Database, phone: str, *, archive: Archive | None = None, actor: str, clock: Clock = _now
) -> dict[str, Any]:
    """Everything held about the person at ``phone`` (E.164), as JSON-ready data; the export is audited."""
    index = pii.cipher().blind_index(phone)
    ledger = Ledger(database, clock=clock)
    bookings = await ledger.bookings_for_phone(phone)
    customer = bookings[0].customer if bookings else None
    calls_ledger, reports = CallLedger(database, clock=clock), ReportLedger(database, clock=clock)
    calls = await _calls_of(database, index)
    sms = SmsLedger(database, clock=clock)
    outbox = Outbox(database)
    effects = [effect for booking in bookings for effect in await outbox.for_booking(booking.id)]
    effects += [effect for call in calls for effect in await outbox.for_call(call.call_sid)]
    suppression = await sms.suppression(phone)
    document: dict[str, Any] = {
        "subject": {"phone": phone},
        "generated_at": _iso(clock()),
        "customer": (
            {"id": customer.id, "phone": customer.phone, "name": customer.name, "email": customer.email}
            | {"time_zone": customer.time_zone}
            if customer is not None
            else None
        ),
        "bookings": [_booking(b) | {"history": await _booking_history(database, b.id)} for b in bookings],
        "calls": [
            {
                "call_sid": call.call_sid,
                "from": call.from_number,
                "to": call.to_number,
                "direction": call.direction,
                "status": call.status.value,
                "started_at": _iso(call.created_at),
                "ended_at": _iso(call.ended_at),
                "duration_seconds": call.duration_seconds,
                "end_reason": call.end_reason,
                "transcript": [
                    {"role": turn.role, "text": turn.text, "at": _iso(turn.at)}
                    for turn in await calls_ledger.transcript(call.call_sid)
                ],
                "reports": [
                    {"version": stored.version, "created_at": _iso(stored.created_at), "body": stored.body}
                    for stored in await reports.versions(call.call_sid)
                ],
            }
            for call in calls
        ],
        "messages": [
            {"message_sid": m.message_sid, "to": m.to_number, "status": m.status, "sent_at": _iso(m.created_at)}
            for m in await sms.messages_to(phone)
        ],
        "sms_opt_out": (
            {"opted_out": suppression.opted_out, "keyword": suppression.keyword, "at": _iso(suppression.changed_at)}
            if suppression is not None
            else None
        ),
        "consents": await _consents(database, phone),
        "effects": [
            {"kind": e.kind, "status": e.status.value, "created_at": _iso(e.created_at), "payload": e.payload}
            for e in effects
        ],
        "archive": await _archived(archive, calls),
    }
    now = clock()
    await database.write(
        lambda conn: append_audit(
            conn,
            at=now,
            actor=actor,
            action=AuditAction.EXPORTED,
            subject_kind="person",
            subject_id=index,
            details={"bookings": len(bookings), "calls": len(calls), "effects": len(effects)},
        )
    )
    return document


async def _consents(database: Database, phone: str) -> list[dict[str, Any]]:
    """The person's consent history, each decision with the words it answered (when the ledger has them)."""
    ledger = ConsentLedger(database)
    history = await ledger.for_person(phone)
    words = await ledger.wordings(sorted({d.wording_version for d in history}))
    return [
        {
            "kind": d.kind.value,
            "decision": d.decision.value,
            "channel": d.channel.value,
            "at": _iso(d.at),
            "call_sid": d.call_sid,
            "booking_id": d.booking_id,
            "wording_version": d.wording_version,
            "wording": words.get(d.wording_version),
        }
        for d in history
    ]


async def _archived(archive: Archive | None, calls: list[CallRecord]) -> list[dict[str, Any]]:
    from integrations.storage import ObjectNotFound

    if archive is None:
        return []
    found: list[dict[str, Any]] = []
    for call in calls:
        for key in (transcript_key(call), recording_key(call)):
            try:
                data = open_archived(key, await archive.get(key))
            except ObjectNotFound:
                continue
            content: Any = orjson.loads(data) if key.endswith(".json") else data.decode("utf-8", "replace")
            found.append({"key": key, "content": content})
    return found


@dataclass(frozen=True, slots=True)
class Erasure:
    customers: int
    bookings: int
    calls: int
    messages: int
    effects: int
    objects_deleted: tuple[str, ...]
    crm_effect: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "customers": self.customers,
            "bookings": self.bookings,
            "calls": self.calls,
            "messages": self.messages,
            "effects": self.effects,
            "objects_deleted": list(self.objects_deleted),
            "crm_effect": self.crm_effect,
        }


async def erase_person(
    database: Database,
    phone: str,
    *,
    archive: Archive | None = None,
    crm: bool = False,
    actor: str,
    clock: Clock = _now,
    recordings_dir: Path | None = None,
) -> Erasure:
    """Remove or anonymise everything held about the person at ``phone`` (see the module doc). Safe to
    run again: a second run finds nothing left under the number."""
    vault = pii.cipher()
    index = vault.blind_index(phone)
    bookings = await Ledger(database, clock=clock).bookings_for_phone(phone)
    calls = await _calls_of(database, index)
    messages = await SmsLedger(database, clock=clock).messages_to(phone)
    now = clock()

    def work(conn: Connection) -> tuple[int, int]:
        customers = 0
        c = t.customers.c
        for customer_id in {booking.customer.id for booking in bookings} | _customer_ids(conn, index):
            anonymous = f"erased:{uuid.uuid4().hex}"
            conn.execute(
                update(t.customers)
                .where(c.id == customer_id)
                .values(
                    phone_index=anonymous,
                    phone=vault.encrypt(ERASED, table="customers", column="phone", row=anonymous),
                    name=None,
                    email=None,
                    updated_at=now,
                )
            )
            customers += 1
        booking_ids = [booking.id for booking in bookings]
        if booking_ids:
            conn.execute(update(t.bookings).where(t.bookings.c.id.in_(booking_ids)).values(notes=None))
        call_sids = [call.call_sid for call in calls]
        for sid in call_sids:
            conn.execute(delete(t.call_turns).where(t.call_turns.c.call_sid == sid))
            conn.execute(delete(t.call_reports).where(t.call_reports.c.call_sid == sid))
            conn.execute(
                update(t.calls)
                .where(t.calls.c.call_sid == sid)
                .values(
                    from_number=vault.encrypt(ERASED, table="calls", column="from_number", row=sid),
                    from_index=f"erased:{uuid.uuid4().hex}",
                    transcript_deleted_at=now,
                    updated_at=now,
                )
            )
        for message in messages:
            sid = message.message_sid
            conn.execute(
                update(t.sms_messages)
                .where(t.sms_messages.c.message_sid == sid)
                .values(
                    to_number=vault.encrypt(ERASED, table="sms_messages", column="to_number", row=sid),
                    to_index=f"erased:{uuid.uuid4().hex}",
                )
            )
        # Consent: the grants go; refusals and withdrawals stay (as the number's hash, like the opt-out),
        # since they must still be honoured if the person calls or is texted again.
        k = t.consents.c
        conn.execute(delete(t.consents).where(k.subject_index == index, k.decision == Decision.GRANTED.value))
        s = t.sms_suppressions.c  # kept, as its hash: the opt-out must outlive the number
        conn.execute(
            update(t.sms_suppressions)
            .where(s.phone_index == index)
            .values(phone=vault.encrypt(ERASED, table="sms_suppressions", column="phone", row=index))
        )
        effects = _scrub_effects(conn, booking_ids, call_sids, now)
        # The calendar's events carry the name, the masked number, the email (as attendee) and the notes:
        # each event still in the calendar (every booking but a cancelled one, whose event was deleted) is
        # rewritten from the anonymised booking, by an effect retried like any other.
        calendar_rows = [
            effect_row(
                anonymised(booking),
                EffectKind.CALENDAR_UPDATE,
                now,
                extra={REWRITE_DETAILS: True} | occurrence_extra(conn, booking),
            )
            | {"idempotency_key": f"{booking.id}:{EffectKind.CALENDAR_UPDATE.value}:erased"}
            for booking in bookings
            if booking.status is not BookingStatus.CANCELLED
        ]
        insert_effects_once(conn, calendar_rows)
        if crm:
            payload = {
                "phone": phone,
                "booking_ids": booking_ids,
                "call_sids": call_sids,
                "activity_ids": [m.message_sid for m in messages],
            }
            key = f"privacy:{index}:crm.erase:{int(now.timestamp())}"
            insert_effects_once(conn, [standalone_effect_row(EffectKind.CRM_ERASE, now, payload, key=key)])
        append_audit(
            conn,
            at=now,
            actor=actor,
            action=AuditAction.ERASED,
            subject_kind="person",
            subject_id=index,
            details={
                "customers": customers,
                "bookings": len(booking_ids),
                "calls": len(call_sids),
                "messages": len(messages),
                "effects": effects,
                "crm": crm,
            },
        )
        return customers, effects

    customers, effects = await database.write(work)
    deleted: list[str] = []
    if archive is not None:
        for call in calls:
            for key in (transcript_key(call), recording_key(call)):
                if await archive.delete(key):
                    deleted.append(key)
    if recordings_dir is not None:  # the server's local spool of recorded calls (voice_server/recording.py)
        for call in calls:
            spool = recordings_dir / f"{call.call_sid}.jsonl"
            if spool.is_file():
                await asyncio.to_thread(spool.unlink, missing_ok=True)
                deleted.append(str(spool))
    return Erasure(customers, len(bookings), len(calls), len(messages), effects, tuple(deleted), crm)


def anonymised(booking: Booking) -> Booking:
    """The booking as erasure leaves it: the slot and service, no one's name, number, email or notes."""
    customer = dataclasses.replace(booking.customer, phone=ERASED, name=None, email=None)
    return dataclasses.replace(booking, customer=customer, notes=None)


def _customer_ids(conn: Connection, index: str) -> set[str]:
    return set(conn.execute(select(t.customers.c.id).where(t.customers.c.phone_index == index)).scalars())


def _scrub_effects(conn: Connection, booking_ids: list[str], call_sids: list[str], now: datetime) -> int:
    """The payloads of the person's effects replaced; those still to run cancelled."""
    e = t.effects.c
    conditions = []
    if booking_ids:
        conditions.append(e.booking_id.in_(booking_ids))
    if call_sids:
        conditions.append(e.call_sid.in_(call_sids))
    if not conditions:
        return 0
    rows = conn.execute(select(e.id, e.idempotency_key, e.status).where(or_(*conditions))).all()
    vault = pii.cipher()
    for row in rows:
        values: dict[str, Any] = {
            "payload": vault.encrypt_json({"erased": True}, table="effects", column="payload", row=row.idempotency_key),
            "updated_at": now,
        }
        if row.status in (EffectStatus.PENDING.value, EffectStatus.RUNNING.value, EffectStatus.DEAD.value):
            values |= {"status": EffectStatus.CANCELLED.value, "last_error": "the person's data was erased"}
        conn.execute(update(t.effects).where(e.id == row.id).values(values))
    return len(rows)


async def scrub_payload(database: Database, effect_id: int, idempotency_key: str) -> None:
    """Replace one effect's payload (the CRM erasure's own, once done: it held the number)."""
    sealed = pii.cipher().encrypt_json({"erased": True}, table="effects", column="payload", row=idempotency_key)
    await database.write(
        lambda conn: conn.execute(update(t.effects).where(t.effects.c.id == effect_id).values(payload=sealed))
    )


def dumps(document: Mapping[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


__all__ = ["ERASED", "Erasure", "dumps", "erase_person", "export_person", "scrub_payload"]
