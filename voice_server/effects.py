"""What each outbox effect does, given the configured providers.

With Google credentials, calendar effects write the resource's Google Calendar; without them the ledger
is the calendar and the effect is recorded as done. With a Twilio sender (a Messaging Service or a From
number), SMS effects text the customer; without one the message is rendered and logged (phone masked)
instead, so a local run shows what would have been sent.

A text about a booking made on one of the business's registered lines (the number the caller dialled)
goes from that line when the registry says it can text and carriers have cleared it; otherwise from the
configured sender, and the log says why (``sms_line_not_used``). The destination's rules
(booking/sms_rules.py) apply to whichever sender the text goes from.

Every SMS effect first consults the ledger's suppression list (when the handlers are given the ledger's
database): a number that texted STOP is not texted. That is an expected outcome, so the effect finishes
as done, without a send, and the log says ``sms_suppressed``. Twilio refusing a send with 21610 (opted
out at the carrier or at Twilio) adds the number to the list and the effect goes to the dead letters.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

import structlog

from booking.business import Business
from booking.errors import EffectFailed
from booking.ledger.database import Database
from booking.ledger.numbers_repository import NumberRegistry, RegisteredNumber
from booking.ledger.sms_repository import SmsLedger, SuppressionSource
from booking.messages import BookingView, MessageKind, render
from booking.outbox import REWRITE_DETAILS, SERIES, Effect, EffectKind, booking_from_payload
from booking.phone import format_national, region_of
from booking.sms_rules import NoSender, Senders, body_problem, choose_sender, opt_out_footer
from booking.worker import Handler
from voice_server import egress_policy
from voice_server.lines import why_not_text_from
from voice_server.settings import Settings

if TYPE_CHECKING:
    from integrations.google_calendar import GoogleCalendar
    from integrations.twilio_sms import TwilioSMS

log = structlog.get_logger("voicebook.effects")


_SMS_KINDS: Mapping[str, MessageKind] = {
    EffectKind.SMS_CONFIRMATION: MessageKind.CONFIRMATION,
    EffectKind.SMS_RESCHEDULE: MessageKind.RESCHEDULE,
    EffectKind.SMS_CANCELLATION: MessageKind.CANCELLATION,
    EffectKind.SMS_REMINDER: MessageKind.REMINDER,
}


def masked_phone(phone: str) -> str:
    return phone[:-4].translate(str.maketrans("0123456789", "•" * 10)) + phone[-4:] if len(phone) > 4 else "••••"


_WITH_OPT_OUT = frozenset({MessageKind.CONFIRMATION, MessageKind.REMINDER})
"""Texts that end with how to opt out: the first about a booking, and the reminder that may come weeks
later (CTIA asks for the instruction in the first message and periodically after)."""


def sms_body(effect: Effect, business: Business, locale: str, *, one_way: bool = False) -> tuple[str, str]:
    """The recipient and the text of an SMS effect. ``one_way``: it goes from a sender nobody can reply to
    (booking/sms_rules.py), so its opt-out names the business's number instead of a STOP reply."""
    booking = booking_from_payload(effect.payload)
    to = booking.customer.phone
    kind = _SMS_KINDS[effect.kind]
    footer = ""
    if kind in _WITH_OPT_OUT:
        contact = format_national(business.phone, home_region=region_of(to)) if business.phone else business.name
        footer = opt_out_footer(locale, two_way=not one_way, contact=contact)
    previous = effect.payload.get("previous")
    previous_start = datetime.fromisoformat(previous["start"]) if isinstance(previous, Mapping) else None
    series = effect.payload.get(SERIES)
    count = series.get("count", 1) if isinstance(series, Mapping) else 1
    view = BookingView.of(booking, business, previous_start=previous_start, occurrences=int(count))
    return to, render(kind, locale, view, footer=footer)


MESSAGE_STATUS_PATH = "/twilio/message-status"
_OUTCOME_UNKNOWN = frozenset({"outcome_unknown", "unreachable"})
"""Send failures after which the text may have gone out ("unreachable" includes a connection dropped
mid-request), so the send mark stays and the next attempt looks before sending."""


def build_twilio_sms(settings: Settings, *, threads: int) -> TwilioSMS | None:
    """The Twilio sender the settings describe (a Messaging Service or a From number), paced by the
    per-sender rate limit; None without one. ``threads`` bounds its requests in flight."""
    sender = settings.twilio_messaging_service_sid or settings.twilio_sms_from
    if not (sender and settings.twilio_account_sid and settings.twilio_auth_token):
        return None
    from integrations.twilio_sms import SenderRateLimiter, TwilioSMS

    return TwilioSMS(
        settings.twilio_account_sid,
        settings.twilio_auth_token,
        messaging_service_sid=settings.twilio_messaging_service_sid,
        from_number=None if settings.twilio_messaging_service_sid else settings.twilio_sms_from,
        api_base_url=settings.twilio_api_base_url,
        status_callback_url=settings.effective_public_url + MESSAGE_STATUS_PATH,
        rate_limiter=SenderRateLimiter(settings.sms_per_minute / 60, settings.sms_burst),
        warn_above_segments=settings.sms_warn_segments,
        threads=threads,
        egress=egress_policy.twilio(settings),
    )


def build_handlers(
    settings: Settings,
    business: Business,
    *,
    database: Database,
    google: GoogleCalendar | None = None,
    sms: TwilioSMS | None = None,
) -> dict[str, Handler]:
    """The handler of every effect kind; ``database`` holds the opt-out list consulted before every text
    and the record of what was sent. ``google`` and ``sms`` are the process's shared provider clients;
    without them the ledger is the calendar and texts are logged."""
    handlers: dict[str, Handler] = {}
    sms_ledger = SmsLedger(database)

    async def suppressed(effect: Effect, to: str) -> bool:
        """No text when the customer declined texts with this booking, or has opted out since."""
        consent = booking_from_payload(effect.payload).sms_consent
        if not consent.allows_texts:
            log.info("sms_not_consented", kind=effect.kind, booking_id=effect.booking_id, consent=consent.value)
            return True
        if not await sms_ledger.is_suppressed(to):
            return False
        log.info("sms_suppressed", kind=effect.kind, booking_id=effect.booking_id, to=masked_phone(to))
        return True

    calendar = google
    if calendar is not None:
        from integrations.google_calendar import Occurrence

        def occurrence_of(effect: Effect) -> Occurrence | None:
            series = effect.payload.get(SERIES)
            if not isinstance(series, Mapping) or "original_start" not in series:
                return None
            return Occurrence(str(series["id"]), datetime.fromisoformat(series["original_start"]))

        async def create(effect: Effect) -> None:
            series = effect.payload.get(SERIES)
            rule = series.get("rrule") if isinstance(series, Mapping) else None
            await calendar.create(booking_from_payload(effect.payload), business, recurrence=rule)

        async def update(effect: Effect) -> None:
            booking = booking_from_payload(effect.payload)
            previous = effect.payload.get("previous")
            moved_from = previous.get("resource_id") if isinstance(previous, Mapping) else None
            await calendar.update(
                booking,
                business,
                occurrence=occurrence_of(effect),
                previous_resource_id=moved_from,
                details=bool(effect.payload.get(REWRITE_DETAILS)),
            )

        async def delete(effect: Effect) -> None:
            booking = booking_from_payload(effect.payload)
            await calendar.delete(booking, business, occurrence=occurrence_of(effect))

        handlers |= {EffectKind.CALENDAR_CREATE: create, EffectKind.CALENDAR_UPDATE: update}
        handlers[EffectKind.CALENDAR_DELETE] = delete
    else:

        async def ledger_is_the_calendar(effect: Effect) -> None:
            log.info("calendar_in_ledger", kind=effect.kind, booking_id=effect.booking_id)

        for kind in (EffectKind.CALENDAR_CREATE, EffectKind.CALENDAR_UPDATE, EffectKind.CALENDAR_DELETE):
            handlers[kind] = ledger_is_the_calendar

    if sms is not None:
        from integrations.twilio_sms import SentMessage

        senders = Senders(
            from_number=settings.twilio_sms_from,
            messaging_service_sid=settings.twilio_messaging_service_sid,
            alpha_sender=settings.sms_alpha_sender,
        )
        home_region = region_of(business.phone)
        registry = NumberRegistry(database)

        async def line_of(effect: Effect, line_number: str | None, to: str) -> RegisteredNumber | None:
            """The booking's line when its text may go from it; None: the configured sender, with the
            reason logged when the booking has a line. Read from the registry on every text, so a number
            cleared, released or moved to another Messaging Service takes effect at once in every worker."""
            if line_number is None or line_number == settings.twilio_sms_from:
                return None  # no line, or the configured sender itself: nothing to look up or to say
            line = await registry.get(line_number)
            reason = why_not_text_from(line)
            detail = None
            if line is not None and reason is None:
                reach = choose_sender(to, Senders(from_number=line.number), home_region=home_region)
                if not isinstance(reach, NoSender):
                    return line
                # Carriers there do not deliver from it: the configured sender (an alphanumeric one, say) may.
                reason, detail = "not_for_destination", reach.reason
            log.info("sms_line_not_used", reason=reason, detail=detail, line=line_number, booking_id=effect.booking_id)
            return None

        def outgoing(effect: Effect, to: str, line: RegisteredNumber | None) -> str:
            """The text as it may go to ``to``'s country: a sender carriers there deliver from (``line``,
            else the configured one), the opt-out that sender allows, within the segment limit. Refused
            permanently otherwise (a retry cannot change the configuration), naming why."""
            sending = senders if line is None else Senders(from_number=line.number)
            choice = choose_sender(to, sending, home_region=home_region)
            if isinstance(choice, NoSender):
                raise EffectFailed(
                    f"no text to {masked_phone(to)}: {choice.reason}",
                    permanent=True,
                    code="no_sender",
                    idempotency_key=effect.idempotency_key,
                )
            _, body = sms_body(effect, business, settings.sms_locale, one_way=not choice.two_way)
            problem = body_problem(body, choice.rules)
            if problem is not None:
                raise EffectFailed(
                    f"no text to {masked_phone(to)}: {problem}",
                    permanent=True,
                    code="too_long",
                    idempotency_key=effect.idempotency_key,
                )
            return body

        async def already_sent(effect: Effect, to: str, body: str) -> bool:
            """Whether an earlier attempt of this effect got the text out although its outcome was lost
            (a timeout, a worker killed between Twilio's 201 and the outbox's record, a dead letter
            replayed after either). Twilio's list is read only when an earlier attempt's send mark is
            still there: a first attempt, or one after Twilio refused, costs one ledger read."""
            known = await sms_ledger.message_for_effect(effect.idempotency_key)
            if known is not None:
                log.info("sms_already_sent", booking_id=effect.booking_id, message_sid=known.message_sid, via="ledger")
                return True
            if not await sms_ledger.begin_send(effect.idempotency_key, to):
                return False
            found = await sms.find_sent(to, body, since=effect.created_at)
            if found is None:
                return False
            await record(effect, to, found)
            log.info("sms_already_sent", booking_id=effect.booking_id, message_sid=found.sid, via="twilio")
            return True

        async def record(effect: Effect, to: str, sent: SentMessage) -> None:
            await sms_ledger.record_sent(
                message_sid=sent.sid,
                to_number=to,
                status=sent.status,
                segments=sent.segments,
                effect_key=effect.idempotency_key,
                booking_id=effect.booking_id,
            )

        async def text(effect: Effect) -> None:
            booking = booking_from_payload(effect.payload)
            to = booking.customer.phone
            if await suppressed(effect, to):
                return
            line = await line_of(effect, booking.line_number, to)
            body = outgoing(effect, to, line)
            if await already_sent(effect, to, body):
                return
            try:
                sent = await sms.send(
                    to,
                    body,
                    idempotency_key=effect.idempotency_key,
                    from_number=None if line is None else line.number,
                    messaging_service_sid=None if line is None else line.messaging_service_sid,
                )
            except EffectFailed as error:
                if error.code not in _OUTCOME_UNKNOWN:
                    # Twilio answered with a refusal: nothing left, so the next attempt need not look.
                    await sms_ledger.abandon_send(effect.idempotency_key)
                if error.code == "opted_out":
                    await sms_ledger.set_opted_out(to, True, keyword=None, source=SuppressionSource.SEND_REFUSED)
                    log.info("sms_recipient_opted_out", booking_id=effect.booking_id, to=masked_phone(to))
                raise
            await record(effect, to, sent)
            sender = "configured" if line is None else line.number
            log.info("sms_sent", kind=effect.kind, booking_id=effect.booking_id, message_sid=sent.sid, sender=sender)

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
