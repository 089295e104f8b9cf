"""Consent decisions in the ledger: appended, never updated; read per call and per person.

A person is their number's blind index (``pii.cipher().blind_index``), so the rows hold no plaintext and
the lookups never need it. Writes come in two shapes: :meth:`ConsentLedger.record` as a transaction of its
own, and :func:`insert_consents` inside a caller's transaction (an SMS keyword's opt-out and its
decision commit together). :func:`call_permission` is the check storage runs in the transaction that
would store a call's transcript, so what is stored and what was allowed cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, or_, select
from sqlalchemy.engine import Connection

from booking.consent import (
    SMS_QUESTION,
    UNRECORDED_WORDING,
    Channel,
    ConsentKind,
    ConsentMode,
    ConsentRecord,
    Decision,
    StoragePermission,
    permission,
    wording_version,
)
from booking.domain import SmsConsent
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.combined import CombinedWrite
from booking.ledger.database import Database

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class NewConsent:
    kind: ConsentKind
    decision: Decision
    channel: Channel
    wording_version: str
    wording: str | None = None
    """The words asked with; stored once per version (None: the version is already known, or a keyword)."""
    call_sid: str | None = None
    booking_id: str | None = None


def subject_of(phone: str | None) -> str | None:
    """The person's key in the consent history: their number's blind index (None for a withheld number)."""
    return pii.cipher().blind_index(phone) if phone else None


def _record(row: Row[Any]) -> ConsentRecord:
    m = row._mapping
    return ConsentRecord(
        kind=ConsentKind(m["kind"]),
        decision=Decision(m["decision"]),
        channel=Channel(m["channel"]),
        wording_version=m["wording_version"],
        at=m["at"],
        call_sid=m["call_sid"],
        booking_id=m["booking_id"],
        id=m["id"],
    )


def insert_consents(conn: Connection, subject: str | None, decisions: Sequence[NewConsent], at: datetime) -> None:
    """Append ``decisions`` for ``subject`` (a blind index) in the caller's transaction, with the wording
    of any version the ledger has not seen."""
    writes = CombinedWrite()
    consent_inserts(writes, subject, decisions, at)
    writes.send(conn)


def consent_inserts(writes: CombinedWrite, subject: str | None, decisions: Sequence[NewConsent], at: datetime) -> None:
    """:func:`insert_consents` as part of a caller's :class:`CombinedWrite`."""
    writes.insert(
        t.consents,
        [
            {
                "subject_index": subject,
                "kind": d.kind.value,
                "decision": d.decision.value,
                "channel": d.channel.value,
                "wording_version": d.wording_version,
                "at": at,
                "call_sid": d.call_sid,
                "booking_id": d.booking_id,
            }
            for d in decisions
        ],
    )
    wordings = {d.wording_version: d.wording for d in decisions if d.wording}
    writes.insert(
        t.consent_wordings,
        [{"version": version, "text": text, "first_used_at": at} for version, text in wordings.items()],
        skip_conflicts_on=["version"],
    )


def _call_subject(conn: Connection, call_sid: str) -> str | None:
    """The caller of ``call_sid``: the blind index its decisions carry, else the call's own."""
    found = conn.execute(
        select(t.consents.c.subject_index)
        .where(t.consents.c.call_sid == call_sid, t.consents.c.subject_index.is_not(None))
        .limit(1)
    ).scalar()
    if found is None:
        found = conn.execute(select(t.calls.c.from_index).where(t.calls.c.call_sid == call_sid)).scalar()
    return str(found) if found else None


def _history(conn: Connection, call_sid: str, subject: str | None, kind: ConsentKind) -> list[ConsentRecord]:
    where = t.consents.c.call_sid == call_sid
    if subject is not None:
        where = or_(where, t.consents.c.subject_index == subject)
    rows = conn.execute(select(t.consents).where(where, t.consents.c.kind == kind.value).order_by(t.consents.c.id))
    return [_record(row) for row in rows]


def call_permission(conn: Connection, mode: ConsentMode, kind: ConsentKind, call_sid: str) -> StoragePermission:
    """Whether ``kind`` of call ``call_sid`` may be stored (and up to when), read in the caller's
    transaction."""
    if not mode.required:
        return permission(mode, kind, call_sid, (), ())
    subject = _call_subject(conn, call_sid)
    history = _history(conn, call_sid, subject, kind)
    own = [r for r in history if r.call_sid == call_sid]
    return permission(mode, kind, call_sid, own, history)


class ConsentLedger:
    def __init__(self, database: Database, *, clock: Clock = _utc_now) -> None:
        self._db = database
        self._clock = clock

    async def record(
        self,
        phone: str | None,
        decisions: Sequence[NewConsent],
        *,
        at: datetime | None = None,
        actor: str | None = None,
    ) -> None:
        """Append ``decisions``; one an operator made for the person (``actor``) is audited with them."""
        subject, when = subject_of(phone), at or self._clock()

        def work(conn: Connection) -> None:
            insert_consents(conn, subject, decisions, when)
            if actor is not None:
                append_audit(
                    conn,
                    at=when,
                    actor=actor,
                    action=AuditAction.CONSENT_CHANGED,
                    subject_kind="person",
                    subject_id=subject or "unknown",
                    details={"changes": [f"{d.kind.value}:{d.decision.value}" for d in decisions]},
                )

        await self._db.write(work)

    async def for_call(self, call_sid: str) -> list[ConsentRecord]:
        query = select(t.consents).where(t.consents.c.call_sid == call_sid).order_by(t.consents.c.id)
        async with self._db.reader.connect() as conn:
            return [_record(row) for row in await conn.execute(query)]

    async def for_person(self, phone: str) -> list[ConsentRecord]:
        query = select(t.consents).where(t.consents.c.subject_index == subject_of(phone)).order_by(t.consents.c.id)
        async with self._db.reader.connect() as conn:
            return [_record(row) for row in await conn.execute(query)]

    async def permission(self, mode: ConsentMode, kind: ConsentKind, call_sid: str) -> StoragePermission:
        async with self._db.reader.connect() as conn:
            return await conn.run_sync(lambda sync: call_permission(sync, mode, kind, call_sid))

    async def wordings(self, versions: Sequence[str]) -> dict[str, str]:
        query = select(t.consent_wordings).where(t.consent_wordings.c.version.in_(list(versions)))
        async with self._db.reader.connect() as conn:
            return {row.version: row.text for row in await conn.execute(query)}


def sms_consent_decision(
    answer: SmsConsent, *, source: str, actor: str, wording: str | None = None
) -> NewConsent | None:
    """The consent decision a booking's answer about texts makes (None when it was not discussed: the
    number given for the booking implies texts about it, and the booking row records that). Asked on
    the phone, it was said during the call (``actor`` ``call:<CallSid>``), in the words of
    :data:`booking.consent.SMS_QUESTION` unless others are given; through the API, in the words the
    form showed (``wording``) or, when the client gave none, an unrecorded wording."""
    if answer is SmsConsent.IMPLIED:
        return None
    decision = Decision.GRANTED if answer is SmsConsent.GIVEN else Decision.DECLINED
    call_sid = actor.removeprefix("call:") if actor.startswith("call:") else None
    if source == "phone":
        words = wording or SMS_QUESTION
        return NewConsent(
            ConsentKind.SMS, decision, Channel.VOICE_SPEECH, wording_version(words), wording=words, call_sid=call_sid
        )
    version = wording_version(wording) if wording else UNRECORDED_WORDING
    return NewConsent(ConsentKind.SMS, decision, Channel.BOOKING, version, wording=wording, call_sid=call_sid)
