"""Twilio's SMS webhooks: delivery receipts for the texts we send, and texts customers send us.

Both are signed exactly like the voice webhooks (see :mod:`voice_server.twilio_webhooks`); the receipt's
URL carries ``?effect=<idempotency key>``, which is part of what Twilio signs. Opt-out keywords change
the suppression list the SMS effect consults before every send. On numbers with Twilio's Advanced
Opt-Out, Twilio itself answers STOP and START, so we answer those with an empty ``<Response/>`` rather
than a second confirmation.
"""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from twilio.twiml.messaging_response import MessagingResponse

from booking.business import Business
from booking.ledger.sms_repository import SmsLedger, SuppressionSource
from booking.messages import Keyword, classify_inbound
from booking.phone import region_of
from voice_server.components import Components
from voice_server.twilio_webhooks import TwilioXMLResponse, components_of, form_field, normalised_number, verified_form
from voice_server.webhook_dedupe import claim

log = structlog.get_logger("voicebook.sms")

OPTED_OUT_ERROR = 21610
EFFECT_PARAM = "effect"  # the same name integrations.twilio_sms puts in the callback URL


def help_text(business: Business) -> str:
    """The answer to HELP: who is texting, how to reach them, how to stop. Pure."""
    contact = f" Call {business.phone}." if business.phone else ""
    return f"{business.name}: appointment texts.{contact} Reply STOP to opt out, START to opt back in."


def messaging_twiml(message: str | None = None) -> str:
    """A TwiML reply to an inbound text: one ``<Message>``, or nothing (an empty ``<Response/>``). Pure."""
    response = MessagingResponse()
    if message is not None:
        response.message(message)
    return str(response.to_xml())


def sms_ledger(components: Components) -> SmsLedger:
    # A repository is a thin, stateless view over the database: built per request rather than held in
    # Components, which other work owns.
    return SmsLedger(components.database)


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
    ledger = sms_ledger(components)
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
    sender = normalised_number(form_field(form, "From"), region_of(components.business.phone))
    if not sender:
        return PlainTextResponse("From is required", status_code=400)
    body = form_field(form, "Body")
    keyword = classify_inbound(body)
    message_sid = form_field(form, "MessageSid")
    if keyword is Keyword.HELP:
        log.info("sms_help", message_sid=message_sid)
        return TwilioXMLResponse(messaging_twiml(help_text(components.business)))
    if keyword is Keyword.OPT_OUT or keyword is Keyword.OPT_IN:
        opted_out = keyword is Keyword.OPT_OUT
        # A replayed STOP or START gets the same (empty) reply and changes nothing: a START sent after a
        # STOP must not be undone by a late replay of the STOP.
        delivery = await claim(components, request, form, "sms")
        if delivery.replay:
            return TwilioXMLResponse(messaging_twiml())
        async with delivery.applying():
            await sms_ledger(components).set_opted_out(
                sender, opted_out, keyword=body.strip().upper(), source=SuppressionSource.INBOUND
            )
        log.info("sms_opt_out" if opted_out else "sms_opt_in", message_sid=message_sid, keyword=body.strip().upper())
        return TwilioXMLResponse(messaging_twiml())
    # Ordinary replies are not read by anyone yet: log that one came (not what it said) and stay silent.
    log.info("sms_inbound_ignored", message_sid=message_sid, characters=len(body))
    return TwilioXMLResponse(messaging_twiml())


routes = [
    Route("/twilio/message-status", message_status, methods=["POST"]),
    Route("/twilio/sms", inbound_sms, methods=["POST"]),
]
