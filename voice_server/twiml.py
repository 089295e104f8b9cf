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


def refuse(message: str) -> str:
    """Decline a call politely: say why, then hang up."""
    response = VoiceResponse()
    response.say(message, voice=VOICE)
    response.hangup()
    return str(response.to_xml())
