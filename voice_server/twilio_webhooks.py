"""Twilio's HTTP webhooks: the incoming-call webhook and call status callbacks.

Every request is checked against ``X-Twilio-Signature`` with twilio's own ``RequestValidator``, over the
URL Twilio was configured with: the public base URL from configuration plus the path and query, never
the URL a proxy in front of us reports; during a token rotation either token may have signed it
(:mod:`voice_server.twilio_signature`). Requests that fail are refused with 403 before anything is
recorded. A request Twilio sends again (a retry, a replay) is recognised by
:mod:`voice_server.webhook_dedupe` and not applied twice.
"""

from __future__ import annotations

from datetime import datetime
from email.utils import parsedate_to_datetime

import structlog
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from booking.calls import CallStatus, StatusUpdate
from booking.consent import CALL_KINDS, Channel, ConsentMode, Decision, wording_version
from booking.ledger.consent_repository import NewConsent
from booking.ledger.repository import utc_now
from booking.phone import region_of
from voice_server import tracing, twiml
from voice_server.components import Components
from voice_server.lines import is_our_number, normalised_number
from voice_server.twilio_signature import matching_token
from voice_server.webhook_dedupe import claim

log = structlog.get_logger("voicebook.twilio")

MAX_WEBHOOK_BYTES = 16 * 1024
REFUSAL_BLOCKED = "Sorry, we are unable to take your call. Goodbye."
REFUSAL_UNKNOWN_NUMBER = "Sorry, this number is not in service with us. Goodbye."
REFUSAL_DRAINING = "Sorry, we can't take your call at this moment. Please call back in a few minutes. Goodbye."


class TwilioXMLResponse(Response):
    media_type = "application/xml"


def components_of(request: Request) -> Components:
    components: Components = request.app.state.components
    return components


def signed_url(request: Request, public_url: str) -> str:
    """The URL Twilio signed: our configured public base, the path, and the query string if any."""
    url = public_url.rstrip("/") + request.url.path
    return f"{url}?{request.url.query}" if request.url.query else url


async def verified_form(request: Request, components: Components) -> FormData | Response:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_WEBHOOK_BYTES:
        return PlainTextResponse("webhook too large", status_code=413)
    form = await request.form()
    settings = components.settings
    if settings.skip_twilio_signature:
        log.warning(
            "twilio_signature_not_checked",
            path=request.url.path,
            reason="VOICEBOOK_INSECURE_SKIP_TWILIO_SIGNATURE is set (development only)",
        )
        return form
    if settings.twilio_auth_token is None:
        log.error("twilio_webhook_refused", path=request.url.path, reason="TWILIO_AUTH_TOKEN is not configured")
        return PlainTextResponse("signature cannot be verified", status_code=403)
    signature = request.headers.get("x-twilio-signature", "")
    params = {key: str(value) for key, value in form.multi_items()}
    url = signed_url(request, settings.effective_public_url)
    if matching_token(settings, url, params, signature) is None:
        log.warning(
            "twilio_webhook_refused", path=request.url.path, reason="bad signature", call_sid=params.get("CallSid")
        )
        return PlainTextResponse("invalid signature", status_code=403)
    return form


def form_field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


async def _signed_call(request: Request) -> tuple[Components, FormData, str] | Response:
    """The components, the verified form and its CallSid; or the response refusing the request."""
    components = components_of(request)
    verified = await verified_form(request, components)
    if isinstance(verified, Response):
        return verified
    call_sid = form_field(verified, "CallSid")
    if not call_sid:
        return PlainTextResponse("CallSid is required", status_code=400)
    return components, verified, call_sid


async def incoming_call(request: Request) -> Response:
    signed = await _signed_call(request)
    if isinstance(signed, Response):
        return signed
    components, form, call_sid = signed
    business = components.business
    region = region_of(business.phone)
    caller = normalised_number(form_field(form, "From"), region)
    called = normalised_number(form_field(form, "To"), region)
    refusal: str | None = None
    # Blocked numbers are typed by an operator, in any form: compared in E.164, read in the business's country.
    if caller in {normalised_number(number, region) for number in components.settings.blocked_numbers}:
        refusal = "blocked_caller"
    elif not await is_our_number(components, called, region):
        refusal = "unknown_number"
    elif components.draining.is_set():
        refusal = "draining"
    status_text = form_field(form, "CallStatus") or CallStatus.RINGING.value
    try:
        status = CallStatus(status_text)
    except ValueError:
        status = CallStatus.RINGING
    # A replay is answered with the same TwiML (Twilio needs a document) but not recorded again.
    delivery = await claim(components, request, form, "voice")
    if not delivery.replay:
        async with delivery.applying():
            await components.calls.record_call(
                call_sid=call_sid,
                account_sid=form_field(form, "AccountSid"),
                from_number=caller,
                to_number=called,
                direction=form_field(form, "Direction") or "inbound",
                status=status,
                refused_reason=refusal,
            )
    structlog.contextvars.bind_contextvars(call_sid=call_sid)
    if refusal is not None:
        log.info("call_refused", reason=refusal)
        message = {"blocked_caller": REFUSAL_BLOCKED, "unknown_number": REFUSAL_UNKNOWN_NUMBER}.get(
            refusal, REFUSAL_DRAINING
        )
        return TwilioXMLResponse(twiml.refuse(message))
    log.info("call_answered")
    settings = components.settings
    if settings.consent_mode is ConsentMode.EXPLICIT and settings.consent_notice:
        # Asked before the stream: the answer comes back to /twilio/voice/consent, which connects it.
        action = settings.effective_public_url.rstrip("/") + CONSENT_PATH
        return TwilioXMLResponse(twiml.ask_consent(settings.consent_notice, action))
    if settings.consent_mode is ConsentMode.NOTICE and settings.consent_notice and not delivery.replay:
        # The caller hears the notice and stays on the line: the notice's wording is what they accepted.
        notice = settings.consent_notice
        version = settings.consent_notice_version or wording_version(notice)
        decisions = [
            NewConsent(kind, Decision.GRANTED, Channel.VOICE_NOTICE, version, wording=notice, call_sid=call_sid)
            for kind in CALL_KINDS
        ]
        async with delivery.applying():
            await components.consents.record(caller or None, decisions)
    return TwilioXMLResponse(_connect(components, call_sid, caller, called, said_first=settings.consent_notice))


def _connect(components: Components, call_sid: str, caller: str, called: str, *, said_first: str | None) -> str:
    """The TwiML that connects the call's media stream, after ``said_first`` if any."""
    return twiml.connect_stream(
        twiml.media_stream_url(components.settings.effective_public_url),
        # The webhook span's traceparent: the stream's `start` brings it back, so the call joins this trace.
        {"call_sid": call_sid, "from": caller, "to": called, **tracing.stream_parameters()},
        notice=said_first,
    )


_YES = frozenset({"yes", "yeah", "yep", "sure", "okay", "ok", "agree", "agreed", "fine", "alright"})
_NO = frozenset({"no", "nope", "not", "don't", "dont", "disagree", "never", "refuse"})
CONSENT_THANKS = "Thank you."
CONSENT_REFUSED = "Understood. This call will not be recorded or transcribed."


def consent_answer(form: FormData) -> tuple[Decision, Channel]:
    """The caller's answer to the consent question, from Gather's ``Digits`` or ``SpeechResult``: 1 or a
    yes agrees; anything else (2, a no, words we cannot read as yes, silence) refuses. Pure."""
    digits = form_field(form, "Digits")
    if digits:
        return (Decision.GRANTED if digits == "1" else Decision.DECLINED), Channel.VOICE_KEYPAD
    speech = " ".join(form_field(form, "SpeechResult").lower().replace(",", " ").replace(".", " ").split())
    if speech:
        words = speech.split()
        # "Yes", "I agree", "sure, that's fine"; never when a word of refusal is anywhere in it.
        agreed = bool(_YES.intersection(words[:3])) and not _NO.intersection(words)
        return (Decision.GRANTED if agreed else Decision.DECLINED), Channel.VOICE_SPEECH
    return Decision.DECLINED, Channel.VOICE_SILENCE


async def consent_reply(request: Request) -> Response:
    """Gather's action in ``explicit`` mode: record the caller's answer for the recording and the
    transcription of this call, say so, and connect the stream. A refusal still connects: the caller is
    served, only nothing of the call is kept."""
    signed = await _signed_call(request)
    if isinstance(signed, Response):
        return signed
    components, form, call_sid = signed
    settings = components.settings
    region = region_of(components.business.phone)
    caller = normalised_number(form_field(form, "From"), region)
    called = normalised_number(form_field(form, "To"), region)
    decision, channel = consent_answer(form)
    delivery = await claim(components, request, form, "consent")
    if not delivery.replay and settings.consent_notice:
        prompt = twiml.consent_prompt(settings.consent_notice)
        version = settings.consent_notice_version or wording_version(prompt)
        async with delivery.applying():
            await components.consents.record(
                caller or None,
                [
                    NewConsent(kind, decision, channel, version, wording=prompt, call_sid=call_sid)
                    for kind in CALL_KINDS
                ],
            )
    log.info("call_consent", call_sid=call_sid, decision=decision.value, channel=channel.value)
    said = CONSENT_THANKS if decision.permits else CONSENT_REFUSED
    return TwilioXMLResponse(_connect(components, call_sid, caller, called, said_first=said))


def _callback_time(form: FormData) -> datetime:
    text = form_field(form, "Timestamp")
    if text:
        try:
            return parsedate_to_datetime(text)
        except (TypeError, ValueError):
            pass
    return utc_now()


async def call_status(request: Request) -> Response:
    signed = await _signed_call(request)
    if isinstance(signed, Response):
        return signed
    components, form, call_sid = signed
    try:
        status = CallStatus(form_field(form, "CallStatus"))
    except ValueError:
        return PlainTextResponse(f"unknown CallStatus {form_field(form, 'CallStatus')!r}", status_code=400)
    sequence = form_field(form, "SequenceNumber")
    duration = form_field(form, "CallDuration")
    region = region_of(components.business.phone)
    delivery = await claim(components, request, form, "call-status")
    if delivery.replay:
        return Response(status_code=204)
    async with delivery.applying():
        record, applied = await components.calls.apply_status(
            StatusUpdate(
                call_sid=call_sid,
                status=status,
                sequence=int(sequence) if sequence.isdigit() else None,
                duration_seconds=int(duration) if duration.isdigit() else None,
                at=_callback_time(form),
            ),
            account_sid=form_field(form, "AccountSid"),
            from_number=normalised_number(form_field(form, "From"), region),
            to_number=normalised_number(form_field(form, "To"), region),
            direction=form_field(form, "Direction") or "inbound",
        )
    log.info("call_status", call_sid=call_sid, status=status.value, applied=applied, now=record.status.value)
    return Response(status_code=204)


CONSENT_PATH = "/twilio/voice/consent"

routes = [
    Route("/twilio/voice", tracing.traced_webhook("POST /twilio/voice")(incoming_call), methods=["POST"]),
    Route(CONSENT_PATH, tracing.traced_webhook(f"POST {CONSENT_PATH}")(consent_reply), methods=["POST"]),
    Route("/twilio/call-status", tracing.traced_webhook("POST /twilio/call-status")(call_status), methods=["POST"]),
]
