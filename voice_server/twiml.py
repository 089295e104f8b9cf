"""TwiML documents voicebook answers Twilio with. Pure: building a document does no I/O."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import Connect, VoiceResponse

VOICE = "Polly.Joanna"  # a neural voice Twilio speaks <Say> with; the agent's own voice comes later over the stream


def media_stream_url(public_url: str, path: str = "/twilio/media") -> str:
    """The WebSocket URL for ``<Stream>``: the public base URL with ws/wss for http/https."""
    if public_url.startswith("https://"):
        return "wss://" + public_url.removeprefix("https://").rstrip("/") + path
    if public_url.startswith("http://"):
        return "ws://" + public_url.removeprefix("http://").rstrip("/") + path
    raise ValueError(f"public URL must be http(s), not {public_url!r}")


def connect_stream(stream_url: str, parameters: Mapping[str, str], *, notice: str | None = None) -> str:
    """Answer a call: an optional spoken notice (recording consent), then a bidirectional media stream
    (``<Connect><Stream>``) carrying ``parameters`` to the WebSocket's ``start`` message."""
    response = VoiceResponse()
    if notice:
        response.say(notice, voice=VOICE)
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response.to_xml())


CONSENT_QUESTION = "Press 1 or say yes if you agree. Press 2 or say no to continue without it."
"""Said after the notice when consent is asked for explicitly (``VOICEBOOK_CONSENT_MODE=explicit``)."""
CONSENT_WAIT_SECONDS = 6


def consent_prompt(notice: str) -> str:
    """What a caller hears when asked explicitly: the notice, then how to answer. Its wording version is
    taken over this whole text, since it is what the caller agreed to."""
    return f"{notice.rstrip()} {CONSENT_QUESTION}"


def ask_consent(notice: str, action_url: str) -> str:
    """Ask for consent before the call connects: one key (1 yes, 2 no) or a spoken answer, posted to
    ``action_url``; no answer within the wait is posted too (``actionOnEmptyResult``), as a refusal."""
    response = VoiceResponse()
    gather = response.gather(
        input="dtmf speech",
        num_digits=1,
        action=action_url,
        method="POST",
        timeout=CONSENT_WAIT_SECONDS,
        speech_timeout="auto",
        hints="yes, no, I agree, I don't agree",
        action_on_empty_result=True,
    )
    gather.say(consent_prompt(notice), voice=VOICE)
    return str(response.to_xml())


def refuse(message: str) -> str:
    """Decline a call politely: say why, then hang up."""
    response = VoiceResponse()
    response.say(message, voice=VOICE)
    response.hangup()
    return str(response.to_xml())
