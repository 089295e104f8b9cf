"""A call's recording: every Twilio message in and out with its time, and the session's turns, as JSON
lines. Kept in memory during the call and written once when it ends, off the event loop.

The format, one JSON object per line, ``t`` in seconds since the ``start`` message arrived:

- ``{"dir": "in", "msg": <the Twilio message as received>, "t": ...}`` (a binary frame: ``"binary": <length>``)
- ``{"dir": "out", "msg": <the message we sent>, "t": ...}``
- ``{"event": "turn", "role": ..., "text": ..., "truncated": ..., "tool": ..., "t": ...}`` when the call ends
- ``{"event": "end", "reason": ..., "t": ...}`` last

The file holds what the caller said and their number, so it is sealed at rest like the ledger's
personal data: a plain header line naming the call, then each of those lines sealed on its own to the
call, its position and the line count (``seal_spool`` in booking/reports/pipeline.py says why per line).
A line moved from another call's file, reordered or cut off does not open. Files written before the
spool was sealed are plain lines, and still read.

``read_call`` turns a file, sealed or plain, into a ``RecordedCall``; replay (voice_server/replay.py) and
the WAV rendering (voice_server/wav.py) work from that. Reading a sealed file takes the process's PII
keys (``booking.ledger.pii.install``), as the server and the report worker have.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from booking.reports.pipeline import SpoolError, open_spool, seal_spool


class CallRecording:
    """One call's recording, written sealed to ``path`` by :meth:`save`. ``call_sid`` is what its lines are
    sealed to; by default the file's name without ``.jsonl``, which the server names after the call."""

    def __init__(self, path: Path, *, call_sid: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.call_sid = call_sid if call_sid is not None else path.stem
        self._clock = clock
        self._started = clock()
        self._lines: list[bytes] = []

    def _add(self, entry: dict[str, Any]) -> None:
        entry["t"] = round(self._clock() - self._started, 4)
        self._lines.append(orjson.dumps(entry))

    def inbound(self, raw: str | bytes) -> None:
        """A message from Twilio, as it arrived (text as is; a binary frame as its length)."""
        self._add({"dir": "in", "msg": raw} if isinstance(raw, str) else {"dir": "in", "binary": len(raw)})

    def outbound(self, text: str) -> None:
        self._add({"dir": "out", "msg": text})

    def event(self, kind: str, **fields: Any) -> None:
        """A session event (a turn, the end of the call)."""
        self._add({"event": kind, **fields})

    async def save(self) -> Path:
        lines, path, call_sid = list(self._lines), self.path, self.call_sid

        def write() -> None:
            data = seal_spool(call_sid, lines)  # thousands of lines: sealed off the event loop too
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(write)
        return path


def load_recording(path: Path) -> list[dict[str, Any]]:
    """The entries of a recording file, sealed or plain. Raises ``OSError``, ``SpoolError`` (a sealed line
    that does not open) or ``orjson.JSONDecodeError``."""
    _, lines = open_spool(path.read_bytes())
    return [orjson.loads(line) for line in lines]


class RecordingError(ValueError):
    """A recording file that cannot be read as a call (names the file and the line)."""


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    t: float
    direction: Literal["in", "out"]
    text: str | None
    """The message as it crossed the socket; None for a binary frame."""
    binary: int = 0
    """The length of a binary frame (its content is not kept)."""

    def json(self) -> dict[str, Any] | None:
        """The message as a JSON object, or None when it is not one (a malformed frame, a binary one)."""
        if self.text is None:
            return None
        try:
            parsed = orjson.loads(self.text)
        except orjson.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None

    @property
    def event(self) -> str | None:
        parsed = self.json()
        event = parsed.get("event") if parsed is not None else None
        return event if isinstance(event, str) else None


@dataclass(frozen=True, slots=True)
class RecordedTurn:
    role: str
    text: str
    truncated: bool = False
    tool: str | None = None


@dataclass(frozen=True, slots=True)
class RecordedCall:
    messages: tuple[RecordedMessage, ...]
    turns: tuple[RecordedTurn, ...]
    end_reason: str | None
    duration: float
    """Seconds from the ``start`` message to the last entry (the call's end)."""

    @property
    def inbound(self) -> list[RecordedMessage]:
        return [message for message in self.messages if message.direction == "in"]

    @property
    def outbound(self) -> list[RecordedMessage]:
        return [message for message in self.messages if message.direction == "out"]

    @property
    def start(self) -> dict[str, Any]:
        """The body of the ``start`` message (callSid, streamSid, customParameters, ...)."""
        for message in self.inbound:
            parsed = message.json()
            if parsed is not None and parsed.get("event") == "start" and isinstance(parsed.get("start"), dict):
                body: dict[str, Any] = parsed["start"]
                return body
        raise RecordingError("the recording has no start message")

    @property
    def call_sid(self) -> str:
        return str(self.start.get("callSid", ""))

    @property
    def stream_sid(self) -> str:
        return str(self.start.get("streamSid", ""))


def parse_call(entries: Sequence[Mapping[str, Any]], *, source: str = "recording") -> RecordedCall:
    messages: list[RecordedMessage] = []
    turns: list[RecordedTurn] = []
    end_reason: str | None = None
    duration = 0.0
    for number, entry in enumerate(entries, start=1):
        t = entry.get("t")
        if not isinstance(t, int | float):
            raise RecordingError(f"{source}: entry {number} has no time")
        duration = max(duration, float(t))
        direction = entry.get("dir")
        if direction in ("in", "out"):
            text = entry.get("msg")
            if text is not None and not isinstance(text, str):
                raise RecordingError(f"{source}: entry {number}: msg must be the message's text")
            messages.append(RecordedMessage(float(t), direction, text, int(entry.get("binary", 0))))
        elif entry.get("event") == "turn":
            turns.append(
                RecordedTurn(str(entry["role"]), str(entry["text"]), bool(entry.get("truncated")), entry.get("tool"))
            )
        elif entry.get("event") == "end":
            end_reason = entry.get("reason")
    return RecordedCall(tuple(messages), tuple(turns), end_reason, duration)


def read_call(path: Path) -> RecordedCall:
    try:
        entries = load_recording(path)
    except (OSError, SpoolError, orjson.JSONDecodeError) as exc:
        raise RecordingError(f"{path}: {exc}") from None
    return parse_call(entries, source=str(path))
