"""The ledger's record of text messages: each message's furthest delivery status, every receipt once,
and the opt-out (suppression) list consulted before every send.

Usage::

    sms = SmsLedger(database, clock=clock)
    await sms.set_opted_out("+12125550142", True, keyword="STOP", source=SuppressionSource.INBOUND)
    await sms.is_suppressed("+12125550142")          # True
    await sms.delivery_rate(hours=24)                 # delivered / (delivered + undelivered + failed)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from booking import writes
from booking.consent import Channel, ConsentKind, Decision, wording_version
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.consent_repository import NewConsent, insert_consents
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now

# How far along its life a status is. A receipt for a lower rank than the message already shows is
# recorded but does not move the message: callbacks race, and "sent" may arrive after "delivered". The
# final statuses share a rank so the first one heard stands; "read" (WhatsApp, RCS) comes after delivery.
_RANKS: dict[str, int] = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "receiving": 3,
    "received": 4,
    "delivered": 5,
    "undelivered": 5,
    "failed": 5,
    "canceled": 5,
    "read": 6,
}
DELIVERED = "delivered"
NOT_DELIVERED = ("undelivered", "failed")


def status_rank(status: str) -> int:
    """The rank of a Twilio message status; an unknown status ranks lowest, so it never overrides."""
    return _RANKS.get(status, -1)


class SuppressionSource(enum.StrEnum):
    INBOUND = "inbound_sms"
    """The customer texted a keyword (STOP, START)."""
    SEND_REFUSED = "send_refused"
    """Twilio refused a send with 21610: the carrier or Twilio already holds the opt-out."""
    RECEIPT = "status_callback"
    """A delivery receipt carried 21610."""
    OPERATOR = "operator"
    """An operator recorded the customer's wish (``voicebook consent revoke --kind sms``)."""


_CONSENT_CHANNEL = {
    SuppressionSource.INBOUND: Channel.SMS_KEYWORD,
    SuppressionSource.SEND_REFUSED: Channel.CARRIER,
    SuppressionSource.RECEIPT: Channel.CARRIER,
    SuppressionSource.OPERATOR: Channel.OPERATOR,
}


@dataclass(frozen=True, slots=True)
class SmsMessage:
    message_sid: str
    effect_key: str | None
    booking_id: str | None
    to_number: str
    status: str
    error_code: int | None
    segments: int | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Suppression:
    phone: str
    opted_out: bool
    keyword: str | None
    changed_at: datetime
    source: str


def _sealed_to(message_sid: str, to_number: str) -> dict[str, str | None]:
    vault = pii.cipher()
    return {
        "to_number": vault.encrypt(to_number, table="sms_messages", column="to_number", row=message_sid),
        "to_index": vault.blind_index(to_number),
    }


def _message(row: Row[Any]) -> SmsMessage:
    m = row._mapping
    to_number = pii.cipher().decrypt(m["to_number"], table="sms_messages", column="to_number", row=m["message_sid"])
    return SmsMessage(
        message_sid=m["message_sid"],
        effect_key=m["effect_key"],
        booking_id=m["booking_id"],
        to_number=to_number or "",
        status=m["status"],
        error_code=m["error_code"],
        segments=m["segments"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )


class SmsLedger:
    def __init__(self, database: Database, *, clock: Clock = utc_now, via: writes.BookingWriter | None = None) -> None:
        self._db = database
        self._clock = clock
        self._via = via
        """Where delivery receipts are applied instead of here: the booking process (``booking.writes``
        says why). Everything else stays here."""
        self._insert: Callable[..., Any] = postgresql.insert if database.dialect == "postgresql" else sqlite.insert

    # -- messages -----------------------------------------------------------------------------------

    async def record_sent(
        self,
        *,
        message_sid: str,
        to_number: str,
        status: str,
        segments: int,
        effect_key: str,
        booking_id: str | None,
    ) -> None:
        """Record a message Twilio accepted. Its receipts may already have been recorded (they can beat
        the send's answer here): then only what the send knows is filled in, and the status stays."""
        now = self._clock()
        stmt = self._insert(t.sms_messages).values(
            message_sid=message_sid,
            effect_key=effect_key,
            booking_id=booking_id,
            **_sealed_to(message_sid, to_number),
            status=status,
            segments=segments,
            created_at=now,
            updated_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["message_sid"],
            set_={"effect_key": effect_key, "booking_id": booking_id, "segments": segments},
        )

        def work(conn: Connection) -> None:
            conn.execute(stmt)

        await self._db.write(work)

    async def apply_status(
        self,
        *,
        message_sid: str,
        status: str,
        error_code: int | None,
        to_number: str,
        effect_key: str | None,
    ) -> tuple[SmsMessage, bool]:
        """Apply one delivery receipt. Returns the message and whether the receipt was new. A replay
        changes nothing; an older status is kept as an event but does not move the message back. A
        receipt for a message we have no row for (the send's answer was lost) creates it, named after
        the effect in its callback URL."""
        if self._via is not None:
            return await self._via.write(
                writes.apply_sms_status(
                    message_sid=message_sid,
                    status=status,
                    error_code=error_code,
                    to_number=to_number,
                    effect_key=effect_key,
                )
            )
        now = self._clock()
        booking_id = (
            select(t.effects.c.booking_id).where(t.effects.c.idempotency_key == effect_key).scalar_subquery()
            if effect_key
            else None
        )
        insert_message = (
            self._insert(t.sms_messages)
            .values(
                message_sid=message_sid,
                effect_key=effect_key,
                booking_id=booking_id,
                **_sealed_to(message_sid, to_number),
                status=status,
                error_code=error_code,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["message_sid"])
        )
        insert_event = (
            self._insert(t.sms_status_events)
            .values(message_sid=message_sid, status=status, error_code=error_code, received_at=now)
            .on_conflict_do_nothing(index_elements=["message_sid", "status"])
        )

        def work(conn: Connection) -> bool:
            conn.execute(insert_message)
            if conn.execute(insert_event).rowcount == 0:
                return False
            query = select(t.sms_messages.c.status, t.sms_messages.c.effect_key).where(
                t.sms_messages.c.message_sid == message_sid
            )
            if self._db.dialect == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).one()
            values: dict[str, Any] = {}
            if status_rank(status) > status_rank(row.status):
                values |= {"status": status, "error_code": error_code}
            if row.effect_key is None and effect_key:
                values["effect_key"] = effect_key
            # updated_at is when the message last changed (the delivery rate's window reads it), not
            # when a stale receipt last arrived.
            if values:
                conn.execute(
                    update(t.sms_messages)
                    .where(t.sms_messages.c.message_sid == message_sid)
                    .values(**values, updated_at=now)
                )
            return True

        applied = await self._db.write(work)
        message = await self.get_message(message_sid)
        assert message is not None  # written above in a committed transaction
        return message, applied

    async def get_message(self, message_sid: str) -> SmsMessage | None:
        query = select(t.sms_messages).where(t.sms_messages.c.message_sid == message_sid)
        row = await self._db.read(lambda conn: conn.execute(query).first())
        return _message(row) if row is not None else None

    async def begin_send(self, effect_key: str, to_number: str) -> bool:
        """Mark the effect's text as on its way. Returns whether an earlier attempt had already marked it
        (and so may have sent it): then the caller must look for that text before sending again."""
        now = self._clock()
        stmt = (
            self._insert(t.sms_sends)
            .values(
                effect_key=effect_key,
                to_number=pii.cipher().encrypt(to_number, table="sms_sends", column="to_number", row=effect_key),
                started_at=now,
            )
            .on_conflict_do_nothing(index_elements=["effect_key"])
        )
        inserted = await self._db.write(lambda conn: conn.execute(stmt).rowcount)
        return inserted == 0

    async def abandon_send(self, effect_key: str) -> None:
        """Twilio refused the text (an error answer, or no connection at all): nothing was sent, so the
        next attempt may send without looking first."""
        statement = delete(t.sms_sends).where(t.sms_sends.c.effect_key == effect_key)
        await self._db.write(lambda conn: conn.execute(statement))

    async def message_for_effect(self, effect_key: str) -> SmsMessage | None:
        """The message an effect sent, known from the send's answer or from a delivery receipt naming the
        effect in its callback URL; None when neither reached us."""
        query = select(t.sms_messages).where(t.sms_messages.c.effect_key == effect_key).limit(1)
        row = await self._db.read(lambda conn: conn.execute(query).first())
        return _message(row) if row is not None else None

    async def messages_to(self, phone: str) -> list[SmsMessage]:
        m = t.sms_messages.c
        query = select(t.sms_messages).where(m.to_index == pii.cipher().blind_index(phone)).order_by(m.created_at)
        async with self._db.reader.connect() as conn:
            return [_message(row) for row in await conn.execute(query)]

    async def status_events(self, message_sid: str) -> list[tuple[str, int | None]]:
        query = (
            select(t.sms_status_events.c.status, t.sms_status_events.c.error_code)
            .where(t.sms_status_events.c.message_sid == message_sid)
            .order_by(t.sms_status_events.c.received_at, t.sms_status_events.c.status)
        )
        async with self._db.reader.connect() as conn:
            return [(row.status, row.error_code) for row in await conn.execute(query)]

    async def delivery_rate(self, *, hours: float) -> float | None:
        """delivered / (delivered + undelivered + failed) among messages that reached a final status in
        the last ``hours``; None when none did (no rate, rather than a misleading 0 or 1)."""
        since = self._clock() - timedelta(hours=hours)
        query = (
            select(t.sms_messages.c.status, func.count())
            .where(
                t.sms_messages.c.updated_at >= since,
                t.sms_messages.c.status.in_((DELIVERED, *NOT_DELIVERED)),
            )
            .group_by(t.sms_messages.c.status)
        )
        async with self._db.reader.connect() as conn:
            counts = {row[0]: int(row[1]) for row in await conn.execute(query)}
        total = sum(counts.values())
        return counts.get(DELIVERED, 0) / total if total else None

    # -- suppressions -------------------------------------------------------------------------------

    async def set_opted_out(
        self,
        phone: str,
        opted_out: bool,
        *,
        keyword: str | None,
        source: SuppressionSource,
        wording: str | None = None,
        actor: str | None = None,
    ) -> Suppression:
        """Opt ``phone`` out (or back in). The latest change wins, whatever it was before. ``wording`` is
        what the person agreed to when an operator records a consent given elsewhere (a signed form);
        ``actor`` (an operator's change) is audited."""
        now = self._clock()
        values = {"opted_out": opted_out, "keyword": keyword, "changed_at": now, "source": source.value}
        vault = pii.cipher()
        index = vault.blind_index(phone)
        sealed = vault.encrypt(phone, table="sms_suppressions", column="phone", row=index)
        stmt = (
            self._insert(t.sms_suppressions)
            .values(phone_index=index, phone=sealed, **values)
            .on_conflict_do_update(index_elements=["phone_index"], set_=values)
        )

        # The consent history gets the change too, in the same transaction: the suppression row holds only
        # the latest state, the history holds every decision and how it was made.
        decision = NewConsent(
            ConsentKind.SMS,
            Decision.REVOKED if opted_out else Decision.GRANTED,
            _CONSENT_CHANNEL[source],
            wording_version(wording) if wording else f"keyword:{keyword}" if keyword else source.value,
            wording=wording,
        )

        def work(conn: Connection) -> None:
            conn.execute(stmt)
            insert_consents(conn, index, [decision], now)
            if actor is not None:
                append_audit(
                    conn,
                    at=now,
                    actor=actor,
                    action=AuditAction.CONSENT_CHANGED,
                    subject_kind="person",
                    subject_id=index,
                    details={"kind": ConsentKind.SMS.value, "decision": decision.decision.value},
                )

        await self._db.write(work)
        return Suppression(phone=phone, keyword=keyword, changed_at=now, source=source.value, opted_out=opted_out)

    async def suppression(self, phone: str) -> Suppression | None:
        query = select(t.sms_suppressions).where(t.sms_suppressions.c.phone_index == pii.cipher().blind_index(phone))
        row = await self._db.read(lambda conn: conn.execute(query).first())
        if row is None:
            return None
        m = row._mapping
        return Suppression(
            phone=phone,
            opted_out=m["opted_out"],
            keyword=m["keyword"],
            changed_at=m["changed_at"],
            source=m["source"],
        )

    async def is_suppressed(self, phone: str) -> bool:
        found = await self.suppression(phone)
        return found is not None and found.opted_out
