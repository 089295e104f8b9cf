"""Twilio's SMS webhooks: delivery receipts for the texts we send, and texts customers send us.

Both are signed exactly like the voice webhooks (see :mod:`voice_server.twilio_webhooks`); the receipt's
URL carries ``?effect=<idempotency key>``, which is part of what Twilio signs. Opt-out keywords change
the suppression list the SMS effect consults before every send. On numbers with Twilio's Advanced
Opt-Out, Twilio itself answers STOP and START, so we answer those with an empty ``<Response/>`` rather
than a second confirmation.

A text to a number that is not the business's (:func:`voice_server.lines.is_our_texting_number`) still
has its STOP or START honoured, so an opt-out is never lost, but is otherwise not answered. HELP names
the number the customer texted when it takes calls, else the business's phone.
"""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from twilio.twiml.messaging_response import MessagingResponse

from booking.business import Business
from booking.ledger.numbers_repository import NumberRegistry
from booking.ledger.sms_repository import SuppressionSource
from booking.messages import Keyword, classify_inbound
from booking.phone import format_national, region_of
from voice_server.components import Components
from voice_server.lines import is_our_texting_number, normalised_number
from voice_server.twilio_webhooks import TwilioXMLResponse, components_of, form_field, verified_form
from voice_server.webhook_dedupe import claim

log = structlog.get_logger("voicebook.sms")

OPTED_OUT_ERROR = 21610
EFFECT_PARAM = "effect"  # the same name integrations.twilio_sms puts in the callback URL


def help_text(business: Business, line: str | None, *, reader_region: str) -> str:
    """The answer to HELP: who is texting, the number to call (``line``, E.164, as a reader in
    ``reader_region`` writes it: with its country code only from abroad), how to stop. Pure."""
    contact = f" Call {format_national(line, home_region=reader_region)}." if line else ""
    return f"{business.name}: appointment texts.{contact} Reply STOP to opt out, START to opt back in."


async def line_to_call(components: Components, texted: str, region: str) -> str | None:
    """The number a HELP reply names: the one the customer texted when it takes calls (the business's
    phone, or a registered number with voice), else the business's phone. A text-only number, a short
    code or a pool number Twilio picked would leave the customer calling a number nobody answers."""
    phone = components.business.phone
    business_phone = normalised_number(phone, region) if phone else None
    if texted and texted != business_phone:
        registered = await NumberRegistry(components.database).get(texted)
        if registered is not None and registered.voice:
            return texted
    return business_phone


def messaging_twiml(message: str | None = None) -> str:
    """A TwiML reply to an inbound text: one ``<Message>``, or nothing (an empty ``<Response/>``). Pure."""
    response = MessagingResponse()
    if message is not None:
        response.message(message)
    return str(response.to_xml())


async def message_status(request: Request) -> Response:
    components = components_of(request)
    form = await verified_form(request, components)
    if isinstance(form, Response):
        return form
    message_sid = form_field(form, "MessageSid") or form_field(form, "SmsSid")
    status = form_field(form, "MessageStatus") or form_field(form, "SmsStatus")
    if not message_sid or not status:
        return PlainTextResponse("MessageSid and MessageStatus are required", status_code=400)
    code_text = form_field(form, "ErrorCode")
    error_code = int(code_text) if code_text.isdigit() else None
    to_number = normalised_number(form_field(form, "To"), region_of(components.business.phone))
    effect_key = request.query_params.get(EFFECT_PARAM) or None
    delivery = await claim(components, request, form, "message-status")
    if delivery.replay:  # applied already (the ledger would say so too, one round trip later)
        return Response(status_code=204)
    ledger = components.sms
    async with delivery.applying():
        message, applied = await ledger.apply_status(
            message_sid=message_sid, status=status, error_code=error_code, to_number=to_number, effect_key=effect_key
        )
        if error_code == OPTED_OUT_ERROR and to_number:
            await ledger.set_opted_out(to_number, True, keyword=None, source=SuppressionSource.RECEIPT)
            log.info("sms_recipient_opted_out", message_sid=message_sid, source=SuppressionSource.RECEIPT.value)
    log.info(
        "sms_status",
        message_sid=message_sid,
        status=status,
        error_code=error_code,
        applied=applied,
        now=message.status,
        effect=effect_key,
    )
    return Response(status_code=204)


async def inbound_sms(request: Request) -> Response:
    components = components_of(request)
    form = await verified_form(request, components)
    if isinstance(form, Response):
        return form
    region = region_of(components.business.phone)
    sender = normalised_number(form_field(form, "From"), region)
    if not sender:
        return PlainTextResponse("From is required", status_code=400)
    texted = normalised_number(form_field(form, "To"), region)
    body = form_field(form, "Body")
    keyword = classify_inbound(body)
    message_sid = form_field(form, "MessageSid")
    service = form_field(form, "MessagingServiceSid") or None
    ours = await is_our_texting_number(components, texted, region, messaging_service_sid=service)
    if not ours:
        log.warning("sms_to_unknown_number", to=texted, message_sid=message_sid, keyword=keyword)
    if keyword is Keyword.HELP and ours:
        log.info("sms_help", message_sid=message_sid)
        line = await line_to_call(components, texted, region)
        reply = help_text(components.business, line, reader_region=region_of(sender, fallback=region))
        return TwilioXMLResponse(messaging_twiml(reply))
    if keyword is Keyword.OPT_OUT or keyword is Keyword.OPT_IN:
        opted_out = keyword is Keyword.OPT_OUT
        # A replayed STOP or START gets the same (empty) reply and changes nothing: a START sent after a
        # STOP must not be undone by a late replay of the STOP.
        delivery = await claim(components, request, form, "sms")
        if delivery.replay:
            return TwilioXMLResponse(messaging_twiml())
        async with delivery.applying():
            await components.sms.set_opted_out(
                sender, opted_out, keyword=body.strip().upper(), source=SuppressionSource.INBOUND
            )
        log.info("sms_opt_out" if opted_out else "sms_opt_in", message_sid=message_sid, keyword=body.strip().upper())
        return TwilioXMLResponse(messaging_twiml())
    if not ours:  # logged above; nothing but an opt-out or opt-in is taken from a number not ours
        return TwilioXMLResponse(messaging_twiml())
    # Ordinary replies are not read by anyone yet: log that one came (not what it said) and stay silent.
    log.info("sms_inbound_ignored", message_sid=message_sid, characters=len(body))
    return TwilioXMLResponse(messaging_twiml())


routes = [
    Route("/twilio/message-status", message_status, methods=["POST"]),
    Route("/twilio/sms", inbound_sms, methods=["POST"]),
]
