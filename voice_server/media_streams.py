"""Twilio Media Streams messages: a pure codec and a per-connection ordering tracker.

``MediaStreamCodec.parse`` turns one WebSocket frame from Twilio into a typed message or a ``Rejected``
value; it never raises on anything the network can send, so the endpoint decides what a bad frame
costs (count it, or close the socket). ``StreamTracker`` checks that the messages of one connection
arrive in a legal order for one stream and counts gaps. Neither does I/O.

Usage::

    tracker = StreamTracker()
    problem = tracker.accept(MediaStreamCodec.parse(frame))
    await websocket.send_text(MediaStreamCodec.media(stream_sid, mulaw_160_bytes))
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

_DIGITS = re.compile(r"[0-9]{1,18}")
"""Twilio's counters are decimal strings; 18 digits bounds int() and fits any real call."""
_DTMF_DIGITS = frozenset("0123456789*#ABCD")
_MEDIA_TRACKS = frozenset({"inbound", "outbound"})
_MULAW_BYTES_PER_MS = 8  # 8000 samples/s, one byte per sample


class FrameError(enum.StrEnum):
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_EVENT = "unknown_event"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    BAD_BASE64 = "bad_base64"
    OVERSIZED = "oversized"
    BINARY_FRAME = "binary_frame"
    OUT_OF_ORDER = "out_of_order"
    WRONG_STREAM = "wrong_stream"
    UNSUPPORTED_FORMAT = "unsupported_format"


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    sequence: int
    stream_sid: str
    account_sid: str
    call_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    encoding: str
    sample_rate: int
    channels: int


@dataclass(frozen=True, slots=True)
class Media:
    sequence: int
    stream_sid: str
    track: str
    chunk: int
    timestamp_ms: int
    payload: bytes
    """Decoded mu-law bytes (160 per 20 ms)."""


@dataclass(frozen=True, slots=True)
class Dtmf:
    sequence: int
    stream_sid: str
    track: str
    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    sequence: int
    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    sequence: int
    stream_sid: str
    account_sid: str
    call_sid: str


@dataclass(frozen=True, slots=True)
class Rejected:
    error: FrameError
    detail: str
    """Names the field or problem; never echoes the frame, which may carry caller audio."""


InboundMessage = Connected | Start | Media | Dtmf | Mark | Stop


class _Reject(Exception):
    """Internal short-cut out of nested field checks; never escapes ``parse``."""

    def __init__(self, error: FrameError, detail: str) -> None:
        super().__init__(detail)
        self.rejected = Rejected(error, detail)


def _get(obj: dict[str, Any], key: str, path: str) -> object:
    if key not in obj:
        raise _Reject(FrameError.MISSING_FIELD, f"{path}{key} is missing")
    return obj[key]


def _text(obj: dict[str, Any], key: str, path: str = "") -> str:
    value = _get(obj, key, path)
    if not isinstance(value, str) or not value:
        raise _Reject(FrameError.BAD_FIELD, f"{path}{key} must be a non-empty string")
    return value


def _counter(obj: dict[str, Any], key: str, path: str = "") -> int:
    value = _get(obj, key, path)
    if not isinstance(value, str) or not _DIGITS.fullmatch(value):
        raise _Reject(FrameError.BAD_FIELD, f"{path}{key} must be a string of decimal digits")
    return int(value)


def _integer(obj: dict[str, Any], key: str, path: str) -> int:
    value = _get(obj, key, path)
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass
        raise _Reject(FrameError.BAD_FIELD, f"{path}{key} must be an integer")
    return value


def _object(obj: dict[str, Any], key: str, path: str = "") -> dict[str, Any]:
    value = _get(obj, key, path)
    if not isinstance(value, dict):
        raise _Reject(FrameError.BAD_FIELD, f"{path}{key} must be an object")
    return value


def _envelope(frame: dict[str, Any]) -> tuple[int, str]:
    """The sequence number and stream SID every message after ``connected`` carries."""
    return _counter(frame, "sequenceNumber"), _text(frame, "streamSid")


def _connected(frame: dict[str, Any]) -> Connected:
    return Connected(protocol=_text(frame, "protocol"), version=_text(frame, "version"))


def _start(frame: dict[str, Any]) -> Start:
    stream_sid = _text(frame, "streamSid")
    body = _object(frame, "start")
    if "streamSid" in body and body["streamSid"] != stream_sid:
        raise _Reject(FrameError.WRONG_STREAM, "start.streamSid differs from streamSid")
    tracks = _get(body, "tracks", "start.")
    if not isinstance(tracks, list) or not all(isinstance(track, str) for track in tracks):
        raise _Reject(FrameError.BAD_FIELD, "start.tracks must be a list of strings")
    parameters: object = body.get("customParameters", {})
    if not isinstance(parameters, dict) or not all(isinstance(v, str) for v in parameters.values()):
        raise _Reject(FrameError.BAD_FIELD, "start.customParameters must map names to strings")
    media_format = _object(body, "mediaFormat", "start.")
    return Start(
        sequence=_counter(frame, "sequenceNumber"),
        stream_sid=stream_sid,
        account_sid=_text(body, "accountSid", "start."),
        call_sid=_text(body, "callSid", "start."),
        tracks=tuple(tracks),
        custom_parameters=dict(parameters),
        encoding=_text(media_format, "encoding", "start.mediaFormat."),
        sample_rate=_integer(media_format, "sampleRate", "start.mediaFormat."),
        channels=_integer(media_format, "channels", "start.mediaFormat."),
    )


def _media(frame: dict[str, Any]) -> Media:
    body = _object(frame, "media")
    track = _text(body, "track", "media.")
    if track not in _MEDIA_TRACKS:
        raise _Reject(FrameError.BAD_FIELD, "media.track must be inbound or outbound")
    encoded = _get(body, "payload", "media.")
    if not isinstance(encoded, str):
        raise _Reject(FrameError.BAD_FIELD, "media.payload must be a string")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise _Reject(FrameError.BAD_BASE64, "media.payload is not valid base64") from None
    chunk, timestamp_ms = _counter(body, "chunk", "media."), _counter(body, "timestamp", "media.")
    return Media(*_envelope(frame), track=track, chunk=chunk, timestamp_ms=timestamp_ms, payload=payload)


def _dtmf(frame: dict[str, Any]) -> Dtmf:
    body = _object(frame, "dtmf")
    digit = _text(body, "digit", "dtmf.")
    if digit not in _DTMF_DIGITS:
        raise _Reject(FrameError.BAD_FIELD, "dtmf.digit must be one of 0-9, *, #, A-D")
    return Dtmf(*_envelope(frame), track=_text(body, "track", "dtmf."), digit=digit)


def _mark(frame: dict[str, Any]) -> Mark:
    return Mark(*_envelope(frame), name=_text(_object(frame, "mark"), "name", "mark."))


def _stop(frame: dict[str, Any]) -> Stop:
    body = _object(frame, "stop")
    return Stop(
        *_envelope(frame), account_sid=_text(body, "accountSid", "stop."), call_sid=_text(body, "callSid", "stop.")
    )


_PARSERS: dict[str, Callable[[dict[str, Any]], InboundMessage]] = {
    "connected": _connected,
    "start": _start,
    "media": _media,
    "dtmf": _dtmf,
    "mark": _mark,
    "stop": _stop,
}


class MediaStreamCodec:
    """Parse Twilio's inbound messages and build our outbound ones (JSON text frames)."""

    MAX_MESSAGE_BYTES: ClassVar[int] = 64 * 1024
    """A 20 ms media message is about 300 bytes; anything near this limit is not Twilio."""

    @staticmethod
    def parse(raw: str | bytes) -> InboundMessage | Rejected:
        if isinstance(raw, bytes):
            return Rejected(FrameError.BINARY_FRAME, f"binary frame of {len(raw)} bytes; Twilio sends text")
        limit = MediaStreamCodec.MAX_MESSAGE_BYTES
        # No str has more characters than UTF-8 bytes, so the cheap length check spares encoding a huge frame.
        # surrogatepass: a lone surrogate (never in a real text frame) then fails below as invalid JSON.
        if len(raw) > limit or len(data := raw.encode(errors="surrogatepass")) > limit:
            return Rejected(FrameError.OVERSIZED, f"frame longer than {limit} bytes")
        try:
            frame: object = orjson.loads(data)
        except orjson.JSONDecodeError:
            return Rejected(FrameError.MALFORMED_JSON, "frame is not valid JSON")
        if not isinstance(frame, dict):
            return Rejected(FrameError.NOT_AN_OBJECT, f"frame is a JSON {type(frame).__name__}, not an object")
        try:
            event = _get(frame, "event", "")
            if not isinstance(event, str):
                raise _Reject(FrameError.BAD_FIELD, "event must be a string")
            parser = _PARSERS.get(event)
            if parser is None:
                raise _Reject(FrameError.UNKNOWN_EVENT, f"unknown event {event[:32]!r}")
            return parser(frame)
        except _Reject as reject:
            return reject.rejected

    @staticmethod
    def media(stream_sid: str, mulaw: bytes) -> str:
        payload = base64.b64encode(mulaw).decode("ascii")
        return orjson.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}).decode()

    @staticmethod
    def mark(stream_sid: str, name: str) -> str:
        return orjson.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}).decode()

    @staticmethod
    def clear(stream_sid: str) -> str:
        """Ask Twilio to drop the audio it has buffered but not yet played (barge-in)."""
        return orjson.dumps({"event": "clear", "streamSid": stream_sid}).decode()


class StreamState(enum.StrEnum):
    NEW = "new"
    CONNECTED = "connected"
    STARTED = "started"
    STOPPED = "stopped"


class StreamTracker:
    """Legal order and gap accounting for the messages of one WebSocket connection.

    NEW -connected-> CONNECTED -start-> STARTED -stop-> STOPPED. A start without a prior connected is
    accepted (the connected message carries nothing we need). ``accept`` returns ``None`` for a message
    in order, or the ``Rejected`` it counted. Gaps are counted, not refused: Twilio does not retransmit,
    so a missing sequence number or chunk is lost audio to report, not a reason to drop the call.
    """

    MEDIA_FRAME_MS: ClassVar[int] = 20
    TIMESTAMP_TOLERANCE_MS: ClassVar[int] = 20
    """Twilio's media timestamps jitter; a jump beyond one extra frame is a gap."""

    def __init__(self) -> None:
        self.state = StreamState.NEW
        self.start: Start | None = None
        self.sequence_gaps = 0  # sequence numbers skipped: a jump from 4 to 7 counts 2
        self.sequence_regressions = 0  # messages whose sequence number repeats or goes backwards
        self.chunk_gaps = 0  # media chunks skipped, per track
        self.timestamp_gaps = 0  # media whose timestamp advanced further than its chunk delta explains
        self.rejected: Counter[FrameError] = Counter()
        self.media_frames = 0
        self._inbound_audio_bytes = 0
        self._last_sequence: int | None = None
        self._last_media: dict[str, tuple[int, int]] = {}  # track -> (chunk, timestamp_ms)

    @property
    def inbound_audio_ms(self) -> int:
        return self._inbound_audio_bytes // _MULAW_BYTES_PER_MS

    def accept(self, message: InboundMessage | Rejected) -> Rejected | None:
        """Check and count one parsed message; a ``Rejected`` from ``parse`` is counted and returned."""
        problem = message if isinstance(message, Rejected) else self._check(message)
        if problem is not None:
            self.rejected[problem.error] += 1
        return problem

    def _check(self, message: InboundMessage) -> Rejected | None:
        if self.state is StreamState.STOPPED:
            return Rejected(FrameError.OUT_OF_ORDER, f"{_event(message)} after stop")
        if isinstance(message, Connected):
            if self.state is not StreamState.NEW:
                return Rejected(FrameError.OUT_OF_ORDER, f"connected in state {self.state}")
            self.state = StreamState.CONNECTED
            return None
        if isinstance(message, Start):
            return self._check_start(message)
        if self.start is None:
            return Rejected(FrameError.OUT_OF_ORDER, f"{_event(message)} before start")
        if message.stream_sid != self.start.stream_sid:
            return Rejected(FrameError.WRONG_STREAM, f"{_event(message)} for another stream than started")
        self._count_sequence(message.sequence)
        if isinstance(message, Media):
            self._count_media(message)
        elif isinstance(message, Stop):
            self.state = StreamState.STOPPED
        return None

    def _check_start(self, start: Start) -> Rejected | None:
        if self.state is StreamState.STARTED:
            return Rejected(FrameError.OUT_OF_ORDER, "second start on one connection")
        if (start.encoding, start.sample_rate, start.channels) != ("audio/x-mulaw", 8000, 1):
            return Rejected(
                FrameError.UNSUPPORTED_FORMAT,
                f"media format {start.encoding[:32]!r}/{start.sample_rate}/{start.channels}; want audio/x-mulaw/8000/1",
            )
        self.state = StreamState.STARTED
        self.start = start
        self._count_sequence(start.sequence)
        return None

    def _count_sequence(self, sequence: int) -> None:
        last = self._last_sequence
        if last is not None and sequence <= last:
            self.sequence_regressions += 1
            return
        if last is not None and sequence > last + 1:
            self.sequence_gaps += sequence - last - 1
        self._last_sequence = sequence

    def _count_media(self, media: Media) -> None:
        self.media_frames += 1
        if media.track == "inbound":
            self._inbound_audio_bytes += len(media.payload)
        previous = self._last_media.get(media.track)
        if previous is not None:
            chunk_delta = media.chunk - previous[0]
            if chunk_delta <= 0:
                return  # a repeat or reordering: nothing skipped, and the later chunk stays the reference
            self.chunk_gaps += chunk_delta - 1
            allowed = self.MEDIA_FRAME_MS * chunk_delta + self.TIMESTAMP_TOLERANCE_MS
            if media.timestamp_ms - previous[1] > allowed:
                self.timestamp_gaps += 1
        self._last_media[media.track] = (media.chunk, media.timestamp_ms)


def _event(message: InboundMessage) -> str:
    return type(message).__name__.lower()
