"""Both legs of a recorded call as one stereo WAV: the caller on the left, the agent on the right,
16-bit 8 kHz, on the recording's clock (sample 0 is the ``start`` message, the last sample the call's end).

Each leg is laid down the way it was played. A frame starts when it arrived, or when the frame before it
has finished if it arrived early (our server sends agent audio a little ahead; a test caller may send its
frames in a burst). A ``clear`` drops the agent audio still buffered at that moment, as Twilio does, so
the right channel is what the caller heard. Audio that would have played after the call ended is cut.

Usage::

    voicebook replay var/recordings/CA....jsonl --wav call.wav
"""

from __future__ import annotations

import base64
import binascii
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from voice_server.audio import SAMPLE_RATE, mulaw_to_pcm16
from voice_server.recording import RecordedCall

CALLER, AGENT = 0, 1  # channels: left, right


def _payload(message: dict[str, object]) -> bytes | None:
    media = message.get("media")
    if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
        return None
    try:
        return base64.b64decode(media["payload"], validate=True)
    except (binascii.Error, ValueError):
        return None  # the server rejected it too; nothing was heard


def render(call: RecordedCall) -> npt.NDArray[np.int16]:
    """The call as ``(samples, 2)`` int16 PCM: caller left, agent right."""
    length = round(call.duration * SAMPLE_RATE)
    legs: list[list[tuple[int, npt.NDArray[np.int16]]]] = [[], []]
    cursor = [0, 0]  # where each leg's next frame may start (the previous one's end)
    for message in call.messages:
        parsed = message.json()
        if parsed is None:
            continue
        at = round(message.t * SAMPLE_RATE)
        event = parsed.get("event")
        if event == "clear" and message.direction == "out":
            # Everything laid down beyond this moment was still in Twilio's buffer: never heard.
            legs[AGENT] = [(start, pcm[: max(0, at - start)]) for start, pcm in legs[AGENT] if start < at]
            cursor[AGENT] = min(cursor[AGENT], at)
            continue
        if event != "media":
            continue
        if message.direction == "in":
            media = parsed.get("media")
            if not isinstance(media, dict) or media.get("track") != "inbound":
                continue
            channel = CALLER
        else:
            channel = AGENT
        payload = _payload(parsed)
        if not payload:
            continue
        start = max(cursor[channel], at)
        pcm = mulaw_to_pcm16(payload)
        legs[channel].append((start, pcm))
        cursor[channel] = start + len(pcm)
    out = np.zeros((length, 2), dtype=np.int16)
    for channel, leg in enumerate(legs):
        for start, pcm in leg:
            if start >= length:
                break  # later frames start later still
            piece = pcm[: length - start]
            out[start : start + len(piece), channel] = piece
    return out


def write_wav(call: RecordedCall, path: Path) -> int:
    """Write the call to ``path`` as a stereo WAV; returns its length in frames (samples per channel)."""
    samples = render(call)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.astype("<i2").tobytes())
    return len(samples)
