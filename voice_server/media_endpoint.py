"""The Twilio Media Streams WebSocket: one connection is one call.

The upgrade is signature-checked over the ``wss://`` URL Twilio was given (the public URL from
configuration) and refused with 403 before it is accepted. After that nothing a caller's network sends
can end a healthy call: malformed or out-of-order frames are counted and logged with the call SID, and
only a stream that never says ``start``, or that keeps sending garbage, is closed with a
policy-violation code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from booking.calls import CallTurn
from booking.consent import CALL_KINDS, Channel, ConsentKind, Decision
from booking.ledger.consent_repository import NewConsent
from booking.ledger.repository import utc_now
from voice_server import metrics, tracing, twiml
from voice_server.caller_id import transfer_caller_id
from voice_server.components import Components
from voice_server.correlation import new_correlation_id
from voice_server.lines import line_scope
from voice_server.media_streams import Dtmf, Mark, Media, MediaStreamCodec, Rejected, Start, Stop, StreamTracker
from voice_server.playout import Playout
from voice_server.ports import CallInfo
from voice_server.recording import CallRecording
from voice_server.session import CallSession, SessionPolicy
from voice_server.tools import BookingTools
from voice_server.twilio_signature import matching_token

log = structlog.get_logger("voicebook.media")

PATH = "/twilio/media"
START_TIMEOUT_SECONDS = 10.0
MAX_REJECTED = 200  # a stream this broken is not a call any more
POLICY_VIOLATION = 1008
WITHDRAWAL_WORDING = "spoken-withdrawal"
"""The wording version of a withdrawal the caller said during the call (their words are not kept)."""
_STREAM_ENDINGS = frozenset({"stop", "dropped", "no_start", "protocol_errors", "server_shutdown"})


def _signed(websocket: WebSocket, components: Components) -> bool:
    settings = components.settings
    if settings.skip_twilio_signature:
        log.warning("twilio_signature_not_checked", path=PATH)
        return True
    if settings.twilio_auth_token is None:
        log.error("media_stream_refused", reason="TWILIO_AUTH_TOKEN is not configured")
        return False
    url = twiml.media_stream_url(settings.effective_public_url, websocket.url.path)
    if websocket.url.query:
        url += f"?{websocket.url.query}"
    signature = websocket.headers.get("x-twilio-signature", "")
    return matching_token(settings, url, {}, signature) is not None  # either token during a rotation


async def media_stream(websocket: WebSocket) -> None:
    components: Components = websocket.app.state.components
    if not _signed(websocket, components):
        log.warning("media_stream_refused", reason="bad signature")
        await websocket.close(code=POLICY_VIOLATION)  # before accept: the client sees HTTP 403
        return
    await websocket.accept()
    tracker = StreamTracker()
    session: CallSession | None = None
    recording: CallRecording | None = None
    keep = _Keeping()
    call_span: tracing.CallSpan | None = None
    reason = "dropped"
    loop = asyncio.get_running_loop()
    start_deadline = loop.time() + START_TIMEOUT_SECONDS
    try:
        while True:
            try:
                if session is None:
                    async with asyncio.timeout_at(start_deadline):
                        message = await websocket.receive()
                else:
                    message = await websocket.receive()
            except TimeoutError:
                log.warning("media_stream_without_start", rejected=sum(tracker.rejected.values()))
                reason = "no_start"
                await websocket.close(code=POLICY_VIOLATION, reason="no start message")
                return
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            frame = raw if raw is not None else message.get("bytes", b"")
            if keep.recording is not None:
                keep.recording.inbound(frame)
            parsed = MediaStreamCodec.parse(frame)
            rejected = tracker.accept(parsed)
            if rejected is not None:
                _log_rejection(rejected, session)
                if sum(tracker.rejected.values()) > MAX_REJECTED:
                    reason = "protocol_errors"
                    await websocket.close(code=POLICY_VIOLATION, reason="too many malformed messages")
                    return
                continue
            if isinstance(parsed, Start):
                if await _may_record(components, parsed.call_sid):
                    recording = CallRecording(components.settings.data_dir / "recordings" / f"{parsed.call_sid}.jsonl")
                    recording.inbound(frame)
                    keep.recording = recording
                # Current from here on: the session's tasks, turns and provider requests are its children.
                call_span = tracing.start_call(
                    parsed.custom_parameters, call_sid=parsed.call_sid, stream_sid=parsed.stream_sid
                )
                session = await _start_session(websocket, components, parsed, keep)
                metrics.call_started()
            elif session is None:
                continue  # `connected` before `start`
            elif isinstance(parsed, Media):
                if parsed.track == "inbound":
                    await session.on_audio(parsed.payload)
            elif isinstance(parsed, Mark):
                session.on_mark(parsed.name)
            elif isinstance(parsed, Dtmf):
                metrics.DTMF_DIGITS.inc()
                await session.on_dtmf(parsed.digit)
            elif isinstance(parsed, Stop):
                reason = "stop"
                return
    except WebSocketDisconnect:
        reason = "dropped"
    finally:
        if session is not None:
            components.sessions.discard(session)
            try:
                await session.end(reason)
            finally:  # the first reason stands: the agent may have ended the call before the stream closed
                metrics.call_ended(session.end_reason or reason)
            if recording is not None:
                if keep.recording is not None:
                    for turn in session.transcript:
                        recording.event(
                            "turn", role=turn.role, text=turn.text, truncated=turn.truncated, tool=turn.tool
                        )
                    recording.event("end", reason=session.end_reason)
                else:  # withdrawn mid-call: what came before it is kept, nothing after it
                    for turn in session.transcript:
                        if session.consent_withdrawn_at is None or turn.at < session.consent_withdrawn_at:
                            recording.event(
                                "turn", role=turn.role, text=turn.text, truncated=turn.truncated, tool=turn.tool
                            )
                    recording.event("consent_withdrawn")
                await recording.save()
            log.info(
                "media_stream_ended",
                call_sid=session.info.call_sid,
                reason=reason,
                sequence_gaps=tracker.sequence_gaps,
                rejected=dict(tracker.rejected),
                inbound_audio_ms=tracker.inbound_audio_ms,
                barge_ins=session.barge_ins,
            )
        if call_span is not None:
            call_span.finish(end_reason=(session.end_reason if session is not None else None) or reason)
        if reason == "stop":
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # the caller may be gone already
                await websocket.close()


class _Keeping:
    """The recording still being added to: None before the call may be recorded, and again once the
    caller withdraws their consent (what came before is saved; nothing after it is added)."""

    recording: CallRecording | None = None


async def _may_record(components: Components, call_sid: str) -> bool:
    """Record this call? Only when configured, with a notice, and (where consent is required) with the
    call's consent to recording, as the ledger has it now."""
    settings = components.settings
    if not (settings.record_calls and settings.consent_notice):
        return False
    allowed = await components.consents.permission(settings.consent_mode, ConsentKind.RECORDING, call_sid)
    if not allowed.allowed:
        log.info("recording_not_kept", call_sid=call_sid, reason=allowed.reason)
    return allowed.allowed


def _log_rejection(rejected: Rejected, session: CallSession | None) -> None:
    metrics.MEDIA_FRAMES_REJECTED.labels(rejected.error.value).inc()
    log.warning(
        "media_frame_rejected",
        error=rejected.error.value,
        detail=rejected.detail,
        call_sid=session.info.call_sid if session else None,
    )


async def _start_session(websocket: WebSocket, components: Components, start: Start, keep: _Keeping) -> CallSession:
    parameters = dict(start.custom_parameters)
    called = parameters.get("to", "")
    info = CallInfo(
        call_sid=start.call_sid,
        stream_sid=start.stream_sid,
        caller=parameters.get("from", ""),
        called=called,
        parameters=parameters,
        serves=await line_scope(components, called),
    )
    # The call's own correlation id, for its life: the session's tasks copy this context when created.
    upgrade_id = structlog.contextvars.get_contextvars().get("correlation_id")
    structlog.contextvars.bind_contextvars(
        call_sid=info.call_sid, stream_sid=info.stream_sid, correlation_id=new_correlation_id()
    )

    async def persist(session: CallSession) -> None:
        turns = [
            CallTurn(role=t.role, text=t.text, at=t.at, truncated=t.truncated, tool=t.tool) for t in session.transcript
        ]
        latencies = [{"trigger": timing.trigger, "parts": dict(timing.parts())} for timing in session.turn_timings]
        await components.calls.finish_call(
            info.call_sid,
            stream_sid=info.stream_sid,
            end_reason=session.end_reason or "unknown",
            turns=turns,
            latencies=latencies,
        )
        if isinstance(components.voice.tools, BookingTools):
            components.voice.tools.forget(info.call_sid)
        if session.end_reason not in _STREAM_ENDINGS:
            # The agent hung up: closing the stream makes Twilio run the TwiML after <Connect>, and
            # there is none, so the call ends.
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.close()

    async def withdraw(at: datetime) -> None:
        keep.recording = None
        decisions = [
            NewConsent(kind, Decision.REVOKED, Channel.VOICE_SPEECH, WITHDRAWAL_WORDING, call_sid=info.call_sid)
            for kind in CALL_KINDS
        ]
        await components.consents.record(info.caller or None, decisions, at=at)

    session = CallSession(
        info,
        components.voice,
        Playout(_sender(websocket, keep), info.stream_sid),
        policy=SessionPolicy(
            greeting=components.settings.greeting
            or f"Thank you for calling {components.business.name}. How can I help you today?",
            silence_seconds=components.settings.silence_seconds,
            reprompts=components.settings.silence_reprompts,
            max_call_seconds=components.settings.max_call_seconds,
            transfer_number=components.settings.transfer_number,
            caller_id=transfer_caller_id(  # what staff see: voice_server/caller_id.py
                components.settings.transfer_caller_id,
                mask_caller_number=components.settings.mask_caller_number,
                business_number=components.business.phone,
                called_number=info.called,
                caller_number=info.caller,
                transfer_number=components.settings.transfer_number,
            ),
        ),
        clock=utc_now,
        on_end=persist,
        on_consent_withdrawn=withdraw if components.settings.consent_mode.required else None,
    )
    components.sessions.add(session)
    await session.start()
    log.info("media_stream_started", tracks=list(start.tracks), upgrade_correlation_id=upgrade_id)
    return session


def _sender(websocket: WebSocket, keep: _Keeping) -> Callable[[str], Awaitable[None]]:
    async def send(text: str) -> None:
        if keep.recording is not None:
            keep.recording.outbound(text)
        await websocket.send_text(text)

    return send


routes = [WebSocketRoute(PATH, media_stream)]
