"""What each outbox effect does, given the configured providers.

With Google credentials, calendar effects write the resource's Google Calendar; without them the ledger
is the calendar and the effect is recorded as done. With a Twilio sender (a Messaging Service or a From
number), SMS effects text the customer; without one the message is rendered and logged (phone masked)
instead, so a local run shows what would have been sent.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

import structlog

from booking.business import Business
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


def _masked(phone: str) -> str:
    return phone[:-4].translate(str.maketrans("0123456789", "•" * 10)) + phone[-4:] if len(phone) > 4 else "••••"


def sms_body(effect: Effect, business: Business, locale: str) -> tuple[str, str]:
    """The recipient and the text of an SMS effect."""
    booking = booking_from_payload(effect.payload)
    previous = effect.payload.get("previous")
    previous_start = datetime.fromisoformat(previous["start"]) if isinstance(previous, Mapping) else None
    view = BookingView.of(booking, business, previous_start=previous_start)
    return booking.customer.phone, render(_SMS_KINDS[effect.kind], locale, view)


def build_handlers(settings: Settings, business: Business) -> dict[str, Handler]:
    handlers: dict[str, Handler] = {}

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
        )

        async def text(effect: Effect) -> None:
            to, body = sms_body(effect, business, settings.sms_locale)
            sent = await sms.send(to, body, idempotency_key=effect.idempotency_key)
            log.info("sms_sent", kind=effect.kind, booking_id=effect.booking_id, message_sid=sent.sid)

    else:

        async def text(effect: Effect) -> None:
            to, body = sms_body(effect, business, settings.sms_locale)
            log.info("sms_not_sent", reason="no Twilio sender configured", to=_masked(to), kind=effect.kind, body=body)

    for sms_kind in _SMS_KINDS:
        handlers[sms_kind] = text
    return handlers
