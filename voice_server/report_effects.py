"""The handlers of a call's effects and the housekeeping ones: ``report.build`` at hang-up, ``crm.call``
(the contact, the call and the appointments it touched into Airtable), ``crm.push`` (bookings changed
outside calls), ``crm.pull`` (two-way sync), the triggers' ``trigger.*`` and ``retention.sweep``.

Every CRM write is a keyed upsert of the ledger's current state (not of a snapshot taken when the effect
was enqueued), so effects that overlap or run twice converge on the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select

from booking.business import Business
from booking.crm_pull import CrmPull
from booking.domain import Booking, ensure_utc
from booking.errors import EffectFailed
from booking.ledger import schema as t
from booking.ledger.crm_repository import CrmLedger
from booking.ledger.database import Database
from booking.ledger.reports_repository import AuditAction, ReportLedger
from booking.ledger.repository import Clock, Ledger, utc_now
from booking.outbox import Effect, EffectKind, standalone_effect_row
from booking.reports.pipeline import ReportPipeline
from booking.reports.schema import CallReport, ParticipantRole
from booking.retention import Purgeable, sweep
from booking.worker import Handler

if TYPE_CHECKING:
    from integrations.airtable import AirtableCRM, AppointmentRow, ContactRow

log = structlog.get_logger("voicebook.report_effects")


def appointment_row(booking: Booking, business: Business) -> AppointmentRow:
    from integrations.airtable import AppointmentRow

    service = next((s.name for s in business.services if s.id == booking.service_id), booking.service_id)
    return AppointmentRow(
        booking_id=booking.id,
        contact_phone=booking.customer.phone,
        service=service,
        start=booking.start,
        end=booking.end,
        status=booking.status.value,
        notes=booking.notes,
    )


def contact_row(booking: Booking) -> ContactRow:
    from integrations.airtable import ContactRow

    return ContactRow(phone=booking.customer.phone, name=booking.customer.name, email=booking.customer.email)


@dataclass(frozen=True, slots=True)
class CrmErase:
    """``crm.erase``: a person's contact, appointments, calls and activities deleted from the CRM (a
    privacy erasure, booking/privacy.py); once done, the effect's own payload, which held the number, is
    replaced too."""

    database: Database
    crm: AirtableCRM

    async def __call__(self, effect: Effect) -> None:
        from booking.privacy import scrub_payload

        payload = effect.payload
        if payload.get("erased"):
            return  # a repeat after the payload was scrubbed: nothing left to do
        deleted = await self.crm.erase(
            phone=str(payload["phone"]),
            booking_ids=[str(b) for b in payload.get("booking_ids", [])],
            call_sids=[str(c) for c in payload.get("call_sids", [])],
            activity_ids=[str(a) for a in payload.get("activity_ids", [])],
        )
        log.info("crm_erased", rows=deleted, effect_id=effect.id)
        await scrub_payload(self.database, effect.id, effect.idempotency_key)


@dataclass(frozen=True, slots=True)
class CrmCallSync:
    """``crm.call``: the call's newest report version, its caller and the bookings it touched."""

    database: Database
    business: Business
    crm: AirtableCRM
    clock: Clock = utc_now

    async def __call__(self, effect: Effect) -> None:
        from integrations.airtable import CallRow, ContactRow

        call_sid = _call_of(effect)
        reports = ReportLedger(self.database, clock=self.clock)
        versions = await reports.versions(call_sid)
        if not versions:
            raise EffectFailed(f"call {call_sid} has no report yet", permanent=False, code="not_ready")
        stored = versions[-1]
        report = CallReport.model_validate(stored.body)
        touched = [item.booking_id for item in report.bookings_touched]
        bookings = await Ledger(self.database, clock=self.clock).get_bookings(touched)
        caller = report.caller_number or None
        named = next((p.name for p in report.participants if p.role is ParticipantRole.CALLER and p.name), None)
        contacts = [contact_row(booking) for booking in bookings]
        if caller is not None:
            contacts.append(
                ContactRow(
                    phone=caller,
                    name=named,
                    lifecycle=report.lifecycle.value.stage.value,
                    lead_score=float(report.lead_score.value.points),
                    last_contacted=report.ended_at or report.started_at,
                )
            )
        await self.crm.sync(
            contacts=contacts,
            appointments=[appointment_row(booking, self.business) for booking in bookings],
            calls=[
                CallRow(
                    call_sid=call_sid,
                    contact_phone=caller,
                    booking_ids=tuple(booking.id for booking in bookings),
                    started=report.started_at,
                    duration_seconds=report.duration_seconds,
                    outcome=report.outcome.value.value,
                    summary=report.summary.value,
                    sentiment=report.sentiment.value.compound,
                    lead_score=float(report.lead_score.value.points),
                    report_version=stored.version,
                )
            ],
        )
        # The report left the ledger (no transcript goes to the CRM): an export, audited.
        await reports.record(
            AuditAction.EXPORTED, "call", call_sid, "worker", {"version": stored.version, "to": "airtable"}
        )


PUSH_NAME = "airtable.push"
PUSH_OVERLAP = timedelta(seconds=5)
"""Bookings changed this long before the last push's newest are pushed again: a transaction that
committed late with an earlier ``updated_at`` is not skipped (repeating an upsert is harmless)."""
PUSH_BATCH = 200


@dataclass(frozen=True, slots=True)
class CrmBookingPush:
    """``crm.push``: bookings changed since the last push outside calls (made online, by text, moved by
    staff, pulled from Airtable) upserted with their contacts, up to :data:`PUSH_BATCH` a run; the watermark (the
    newest ``updated_at`` pushed) moves only after Airtable took them."""

    database: Database
    business: Business
    crm: AirtableCRM
    clock: Clock = utc_now

    async def __call__(self, effect: Effect) -> None:
        store = CrmLedger(self.database, clock=self.clock)
        previous = await store.watermark(PUSH_NAME)
        b = t.bookings.c
        # A booking a call changed last goes with that call's own sync (crm.call, after its report).
        query = (
            select(b.id, b.updated_at)
            .where(b.changed_by.not_like("call:%"))
            .order_by(b.updated_at, b.id)
            .limit(PUSH_BATCH)
        )
        if previous is not None:
            query = query.where(b.updated_at > previous - PUSH_OVERLAP)
        async with self.database.reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return
        bookings = await Ledger(self.database, clock=self.clock).get_bookings([row.id for row in rows])
        await self.crm.sync(
            contacts=[contact_row(booking) for booking in bookings],
            appointments=[appointment_row(booking, self.business) for booking in bookings],
        )
        await store.finish_pull(PUSH_NAME, [], watermark=max(ensure_utc(row.updated_at) for row in rows))
        log.info("crm_pushed", bookings=len(bookings))


def crm_pull_handler(pull: CrmPull) -> Handler:
    async def run(effect: Effect) -> None:
        result = await pull.pull_once()
        if result.applied or result.conflicts:
            log.info(
                "crm_pulled",
                fetched=result.fetched,
                applied=len(result.applied),
                conflicts=len(result.conflicts),
            )
        for conflict in result.conflicts:  # surfaced, never dropped: each is also kept in crm_conflicts
            log.warning(
                "crm_conflict",
                booking_id=conflict.booking_id,
                field=conflict.field,
                winner=conflict.winner.value,
                reason=conflict.reason.value,
            )

    return run


def _call_of(effect: Effect) -> str:
    if effect.call_sid is None:
        raise EffectFailed(f"effect {effect.id} ({effect.kind}) names no call", permanent=True, code="malformed")
    return effect.call_sid


def report_handler(pipeline: ReportPipeline) -> Handler:
    async def build(effect: Effect) -> None:
        latencies = effect.payload.get("latencies") or []
        await pipeline.build(_call_of(effect), latencies=latencies if isinstance(latencies, list) else [])

    return build


def retention_handler(database: Database, storage: Purgeable, *, days: int, clock: Clock = utc_now) -> Handler:
    async def run(effect: Effect) -> None:
        now = clock()
        await sweep(database, storage, now - timedelta(days=days), now=now)

    return run


def retention_effect_row(now: datetime) -> dict[str, Any]:
    """Today's sweep: one per UTC day however many workers schedule it."""
    return standalone_effect_row(EffectKind.RETENTION_SWEEP, now, {}, key=f"retention.sweep:{now.date().isoformat()}")


def bucketed(kind: EffectKind, seconds: int) -> Callable[[datetime], dict[str, Any]]:
    """The effect of ``kind`` for the ``seconds``-long time bucket ``now`` falls in (one per bucket)."""

    def row(now: datetime) -> dict[str, Any]:
        bucket = int(now.timestamp()) // seconds
        return standalone_effect_row(kind, now, {"bucket": bucket}, key=f"{kind.value}:{seconds}:{bucket}")

    return row


def crm_call_row(report: CallReport, version: int, now: datetime) -> dict[str, Any]:
    return standalone_effect_row(
        EffectKind.CRM_CALL,
        now,
        {"call_sid": report.call_sid, "version": version},
        key=f"call:{report.call_sid}:crm.call:v{version}",
        call_sid=report.call_sid,
    )
