"""What each outbox effect does, given the configured providers.

With Google credentials, calendar effects write the resource's Google Calendar; without them the ledger
is the calendar and the effect is recorded as done. With a Twilio sender (a Messaging Service or a From
number), SMS effects text the customer; without one the message is rendered and logged (phone masked)
instead, so a local run shows what would have been sent.

Every SMS effect first consults the ledger's suppression list (when the handlers are given the ledger's
database): a number that texted STOP is not texted. That is an expected outcome, so the effect finishes
as done, without a send, and the log says ``sms_suppressed``. Twilio refusing a send with 21610 (opted
out at the carrier or at Twilio) adds the number to the list and the effect goes to the dead letters.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

import structlog

from booking.business import Business
from booking.errors import EffectFailed
from booking.ledger.database import Database
from booking.ledger.sms_repository import SmsLedger, SuppressionSource
from booking.messages import BookingView, MessageKind, render
from booking.outbox import Effect, EffectKind, booking_from_payload
from voice_server.settings import Settings

log = structlog.get_logger("voicebook.effects")

Handler = Callable[[Effect], Awaitable[None]]

_SMS_KINDS: Mapping[str, MessageKind] = {
    EffectKind.SMS_CONFIRMATION: MessageKind.CONFIRMATION,
    EffectKind.SMS_RESCHEDULE: MessageKind.RESCHEDULE,
    EffectKind.SMS_CANCELLATION: MessageKind.CANCELLATION,
    EffectKind.SMS_REMINDER: MessageKind.REMINDER,
}


def masked_phone(phone: str) -> str:
    return phone[:-4].translate(str.maketrans("0123456789", "•" * 10)) + phone[-4:] if len(phone) > 4 else "••••"


def sms_body(effect: Effect, business: Business, locale: str) -> tuple[str, str]:
    """The recipient and the text of an SMS effect."""
    booking = booking_from_payload(effect.payload)
    previous = effect.payload.get("previous")
    previous_start = datetime.fromisoformat(previous["start"]) if isinstance(previous, Mapping) else None
    view = BookingView.of(booking, business, previous_start=previous_start)
    return booking.customer.phone, render(_SMS_KINDS[effect.kind], locale, view)


MESSAGE_STATUS_PATH = "/twilio/message-status"


def build_handlers(settings: Settings, business: Business, *, database: Database) -> dict[str, Handler]:
    """The handler of every effect kind; ``database`` holds the opt-out list consulted before every text
    and the record of what was sent."""
    handlers: dict[str, Handler] = {}
    sms_ledger = SmsLedger(database)

    async def suppressed(effect: Effect, to: str) -> bool:
        if not await sms_ledger.is_suppressed(to):
            return False
        log.info("sms_suppressed", kind=effect.kind, booking_id=effect.booking_id, to=masked_phone(to))
        return True

    if settings.google_service_account_file is not None:
        from integrations.google_calendar import GoogleCalendar

        info = json.loads(settings.google_service_account_file.read_text(encoding="utf-8"))
        calendar = GoogleCalendar.from_service_account(
            info, subject=settings.google_delegated_subject, api_endpoint=settings.google_calendar_api_url
        )

        async def create(effect: Effect) -> None:
            await calendar.create(booking_from_payload(effect.payload), business)

        async def update(effect: Effect) -> None:
            await calendar.update(booking_from_payload(effect.payload), business)

        async def delete(effect: Effect) -> None:
            await calendar.delete(booking_from_payload(effect.payload), business)

        handlers |= {EffectKind.CALENDAR_CREATE: create, EffectKind.CALENDAR_UPDATE: update}
        handlers[EffectKind.CALENDAR_DELETE] = delete
    else:

        async def ledger_is_the_calendar(effect: Effect) -> None:
            log.info("calendar_in_ledger", kind=effect.kind, booking_id=effect.booking_id)

        for kind in (EffectKind.CALENDAR_CREATE, EffectKind.CALENDAR_UPDATE, EffectKind.CALENDAR_DELETE):
            handlers[kind] = ledger_is_the_calendar

    sender = settings.twilio_messaging_service_sid or settings.twilio_sms_from
    if sender and settings.twilio_account_sid and settings.twilio_auth_token:
        from integrations.twilio_sms import TwilioSMS

        sms = TwilioSMS(
            settings.twilio_account_sid,
            settings.twilio_auth_token,
            messaging_service_sid=settings.twilio_messaging_service_sid,
            from_number=None if settings.twilio_messaging_service_sid else settings.twilio_sms_from,
            api_base_url=settings.twilio_api_base_url,
            status_callback_url=settings.effective_public_url + MESSAGE_STATUS_PATH,
        )

        async def text(effect: Effect) -> None:
            to, body = sms_body(effect, business, settings.sms_locale)
            if await suppressed(effect, to):
                return
            try:
                sent = await sms.send(to, body, idempotency_key=effect.idempotency_key)
            except EffectFailed as error:
                if error.code == "opted_out":
                    await sms_ledger.set_opted_out(to, True, keyword=None, source=SuppressionSource.SEND_REFUSED)
                    log.info("sms_recipient_opted_out", booking_id=effect.booking_id, to=masked_phone(to))
                raise
            await sms_ledger.record_sent(
                message_sid=sent.sid,
                to_number=to,
                status=sent.status,
                segments=sent.segments,
                effect_key=effect.idempotency_key,
                booking_id=effect.booking_id,
            )
            log.info("sms_sent", kind=effect.kind, booking_id=effect.booking_id, message_sid=sent.sid)

    else:

        async def text(effect: Effect) -> None:
            to, body = sms_body(effect, business, settings.sms_locale)
            if await suppressed(effect, to):
                return
            log.info(
                "sms_not_sent", reason="no Twilio sender configured", to=masked_phone(to), kind=effect.kind, body=body
            )

    for sms_kind in _SMS_KINDS:
        handlers[sms_kind] = text
    return handlers
