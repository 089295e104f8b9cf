"""Deepgram live transcription (``ws /v1/listen``) on loopback.

The recogniser works on the audio's own timeline: received mu-law is cut into 20 ms units, each unit is
voice or silence by its energy, and every time in a message (``start``, ``duration``, word times,
``timestamp``, ``last_word_end``) is seconds of audio since the stream began, as Deepgram reports them.
A segment of speech opens with ``SpeechStarted`` (``vad_events``), is reported by interim results every
``interim_interval_ms`` of audio (``interim_results``) and closes with a final result once ``endpointing``
ms of silence follow it (``speech_final``); ``UtteranceEnd`` follows ``utterance_end_ms`` after the last
word. Results tile the timeline: each covers the audio since the previous final.

Wire facts not confirmed against an official page (marked where used): the exact NET-0001 close reason
text, the body of a refused handshake, the answer to a Finalize with nothing pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from integrations.simulators.deepgram_wire import authorised, error_response, fault_response, validate_listen_message
from voice_server.audio import MULAW_FRAME_BYTES, SAMPLE_RATE, frame_levels_dbfs

if TYPE_CHECKING:
    from integrations.simulators.deepgram import DeepgramSimConfig, DeepgramSimState

UNIT_MS = 20
MODEL_INFO = {"name": "2-general-nova", "version": "2024-12-20.0", "arch": "nova-3"}
MODEL_UUID = "3b3aabe4-608a-46ac-9585-7960a25daf1a"
# Close frame for a stream that got neither audio nor a text message in time. Code and error id are in
# Deepgram's troubleshooting docs; the reason's wording is from reports of it (unverified).
NET_0001 = (
    1011,
    "Deepgram did not receive audio data or a text message within the timeout window. See https://dpgr.am/net0001",
)
# Every query parameter the simulator understands. Deepgram ignores more than this; the simulator
# refuses the rest so a misspelt option fails a test instead of silently doing nothing.
KNOWN_PARAMS = frozenset(
    {
        "model", "encoding", "sample_rate", "channels", "interim_results", "endpointing", "utterance_end_ms",
        "vad_events", "smart_format", "punctuate", "keyterm", "language", "tag", "mip_opt_out", "numerals",
    }
)  # fmt: skip
KNOWN_ENCODINGS = frozenset(
    {"linear16", "flac", "mulaw", "alaw", "amr-nb", "amr-wb", "opus", "ogg-opus", "speex", "g729"}
)


@dataclass(frozen=True, slots=True)
class ListenFaults:
    """Faults for ``/v1/listen``. ``refuse`` answers the first handshakes with these HTTP statuses, in
    order; the drop, malformed and error faults apply to the first ``faulty_connections`` accepted
    streams. Deepgram documents only the ``SchemaError`` variant of its ``Error`` message (a text message
    it could not parse); ``error_variant`` may name another to stand for a failure on its side."""

    refuse: tuple[int, ...] = ()
    retry_after_s: int = 1
    drop_after_s: float | None = None  # wall time after the stream opened
    drop_after_results: int | None = None  # right after sending the K-th Results
    malformed_after_results: int | None = None  # a Results without its ``channel`` after the K-th
    error_after_results: int | None = None  # an ``Error`` message right after the K-th Results
    error_variant: str = "SchemaError"
    faulty_connections: int = 1


# -- options -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenOptions:
    model: str
    interim_results: bool
    endpointing_ms: int | None  # None: endpointing=false
    utterance_end_ms: int | None
    vad_events: bool
    keyterms: tuple[str, ...]


def _flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    if value not in ("true", "false"):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value == "true"


def _positive_int(value: str, name: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{name} must be a whole number of milliseconds, not {value!r}")
    return int(value)


def parse_listen_options(params: list[tuple[str, str]]) -> ListenOptions:
    """The options of a ``/v1/listen`` handshake; ``ValueError`` names the first bad parameter."""
    single = dict(params)
    unknown = sorted(set(single) - KNOWN_PARAMS)
    if unknown:
        raise ValueError(f"unknown query parameter {unknown[0]!r}")
    encoding = single.get("encoding")
    if encoding is None:
        raise ValueError("the simulator needs encoding=mulaw (it cannot sniff containers)")
    if encoding not in KNOWN_ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}")
    if encoding != "mulaw":
        raise ValueError(f"the simulator transcribes encoding=mulaw only, not {encoding!r}")
    if single.get("sample_rate") != str(SAMPLE_RATE):
        raise ValueError(f"encoding=mulaw needs sample_rate={SAMPLE_RATE}")
    if single.get("channels", "1") != "1":
        raise ValueError("the simulator transcribes one channel only")
    interim = _flag(single.get("interim_results"), "interim_results")
    raw_endpointing = single.get("endpointing", "10")
    endpointing = None if raw_endpointing == "false" else _positive_int(raw_endpointing, "endpointing")
    utterance_end = single.get("utterance_end_ms")
    if utterance_end is not None and not interim:
        raise ValueError("utterance_end_ms needs interim_results=true")
    for name in ("smart_format", "punctuate", "mip_opt_out", "numerals"):
        _flag(single.get(name), name)
    return ListenOptions(
        model=single.get("model", "base"),
        interim_results=interim,
        endpointing_ms=endpointing,
        utterance_end_ms=None if utterance_end is None else _positive_int(utterance_end, "utterance_end_ms"),
        vad_events=_flag(single.get("vad_events"), "vad_events"),
        keyterms=tuple(value for key, value in params if key == "keyterm"),
    )


# -- the recogniser's timeline --------------------------------------------------------------------


Transcribe = Callable[[bytes], str]
Outgoing = tuple[dict[str, Any], float]  # a message and the wall-time delay before it goes out


class ListenTimeline:
    """Voice activity, endpointing and result windows over the received audio. ``push`` and the flush
    methods return the messages to send; the only outside call is ``transcribe`` (in a thread)."""

    def __init__(self, options: ListenOptions, config: DeepgramSimConfig, transcribe: Transcribe) -> None:
        self.options = options
        self.config = config
        self._transcribe = transcribe
        self.request_id = str(uuid.uuid4())
        self.position_ms = 0  # audio cut into units so far
        self.cursor_ms = 0  # start of the current result window (end of the previous final)
        self._window = bytearray()  # audio since cursor_ms
        self._partial = bytearray()  # bytes short of a whole unit
        self._in_speech = False
        self._voice_in_window = False
        self._speech_start_ms = 0
        self._voice_end_ms = 0
        self._silence_ms = 0
        self._next_interim_ms = 0
        self._last_text = ""
        self._last_word_end: float | None = None  # words not yet followed by an UtteranceEnd
        self.sha256 = hashlib.sha256()
        self.audio_bytes = 0

    async def push(self, audio: bytes) -> list[Outgoing]:
        self.sha256.update(audio)
        self.audio_bytes += len(audio)
        self._partial += audio
        out: list[Outgoing] = []
        whole = len(self._partial) - len(self._partial) % MULAW_FRAME_BYTES
        # The units' levels in one numpy pass: a chunk of 100 ms is five units, one call instead of five.
        levels = frame_levels_dbfs(self._partial, MULAW_FRAME_BYTES)
        for index, offset in enumerate(range(0, whole, MULAW_FRAME_BYTES)):
            unit = bytes(self._partial[offset : offset + MULAW_FRAME_BYTES])
            out += await self._unit(unit, voiced=bool(levels[index] > self.config.vad_threshold_dbfs))
        del self._partial[:whole]
        return out

    async def _unit(self, unit: bytes, *, voiced: bool) -> list[Outgoing]:
        out: list[Outgoing] = []
        start = self.position_ms
        self.position_ms += UNIT_MS
        self._window += unit
        if voiced:
            self._silence_ms = 0
            self._voice_end_ms = self.position_ms
            if not self._in_speech:  # a new segment (a final closed the previous one)
                self._in_speech = self._voice_in_window = True
                self._speech_start_ms = start
                self._next_interim_ms = start + self.config.interim_interval_ms
                if self.options.vad_events:
                    out.append(({"type": "SpeechStarted", "channel": [0, 1], "timestamp": start / 1000}, 0.0))
            if self.options.interim_results and self.position_ms >= self._next_interim_ms:
                self._next_interim_ms += self.config.interim_interval_ms
                if self.config.interim_transcription:
                    self._last_text = await self._recognise()
                out.append(self._results(self._last_text, is_final=False))
            return out
        if self._in_speech:
            self._silence_ms += UNIT_MS
            gap = self.options.endpointing_ms
            if gap is None:
                gap = self.config.no_endpointing_gap_ms
            if self._silence_ms >= max(gap, 1):
                out += await self._final(speech_final=self.options.endpointing_ms is not None, from_finalize=False)
            return out
        if not self._voice_in_window:
            # Nothing said since the last final: slide the window instead of holding silence forever.
            self.cursor_ms = self.position_ms
            self._window.clear()
        ending = self._last_word_end
        limit = self.options.utterance_end_ms
        if ending is not None and limit is not None and self.position_ms - ending * 1000 >= limit:
            self._last_word_end = None
            out.append(({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": ending}, 0.0))
        return out

    async def finalize(self) -> list[Outgoing]:
        """Finalize: flush what is pending as a final with ``from_finalize``. With nothing pending the
        answer is an empty final with ``from_finalize`` (unverified: Deepgram's docs do not say)."""
        return await self._final(speech_final=False, from_finalize=True)

    async def close_stream(self) -> list[Outgoing]:
        """CloseStream: flush pending speech (no ``from_finalize``), then nothing more will come."""
        if self._partial:
            self._partial += bytes([0xFF]) * (MULAW_FRAME_BYTES - len(self._partial))
            out = await self.push(b"")  # the padded part unit goes through as any other unit does
        else:
            out = []
        if self._voice_in_window:
            out += await self._final(speech_final=False, from_finalize=False)
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": self.sha256.hexdigest(),
            "created": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "duration": self.audio_bytes / SAMPLE_RATE,
            "channels": 1,
        }

    async def _recognise(self) -> str:
        return (await asyncio.to_thread(self._transcribe, bytes(self._window))).strip()

    async def _final(self, *, speech_final: bool, from_finalize: bool) -> list[Outgoing]:
        text = await self._recognise() if self._voice_in_window else ""
        message, _ = self._results(text, is_final=True, speech_final=speech_final, from_finalize=from_finalize)
        words = message["channel"]["alternatives"][0]["words"]
        if words:
            self._last_word_end = words[-1]["end"]
        self.cursor_ms = self.position_ms
        self._window.clear()
        self._in_speech = self._voice_in_window = False
        self._silence_ms = 0
        self._last_text = ""
        return [(message, self.config.stt_final_delay_ms / 1000)]

    def _results(
        self, text: str, *, is_final: bool, speech_final: bool = False, from_finalize: bool = False
    ) -> Outgoing:
        tokens = text.split()
        begin = self._speech_start_ms if self._voice_in_window else self.cursor_ms
        end = max(self._voice_end_ms, begin) if self._voice_in_window else self.position_ms
        step = (end - begin) / len(tokens) if tokens else 0.0
        words = [
            {
                "word": token.lower().strip(".,?!"),
                "start": round((begin + i * step) / 1000, 3),
                "end": round((begin + (i + 1) * step) / 1000, 3),
                "confidence": 0.99,
                "punctuated_word": token,
            }
            for i, token in enumerate(tokens)
        ]
        words = [word for word in words if word["word"]]
        message = {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": (self.position_ms - self.cursor_ms) / 1000,
            "start": self.cursor_ms / 1000,
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {"alternatives": [{"transcript": text, "confidence": 0.99 if words else 0.0, "words": words}]},
            "metadata": {"request_id": self.request_id, "model_info": dict(MODEL_INFO), "model_uuid": MODEL_UUID},
        }
        return message, 0.0


# -- the endpoint ----------------------------------------------------------------------------------


class ListenEndpoint:
    """The ASGI endpoint for ``ws /v1/listen``: handshake checks, then one ``ListenConnection``."""

    def __init__(self, config: DeepgramSimConfig, state: DeepgramSimState, transcribe: Transcribe) -> None:
        self.config = config
        self.state = state
        self.transcribe = transcribe
        self._handshakes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        faults = self.config.listen
        self._handshakes += 1
        if self._handshakes <= len(faults.refuse):
            self.state.listen_refused += 1
            status = faults.refuse[self._handshakes - 1]
            await websocket.send_denial_response(fault_response(status, faults.retry_after_s))
            return
        if not authorised(websocket.headers, self.config.api_key):
            await websocket.send_denial_response(error_response(401, "INVALID_AUTH", "Invalid credentials."))
            return
        try:
            options = parse_listen_options(list(websocket.query_params.multi_items()))
        except ValueError as error:
            # A refused handshake is an HTTP 400 (Deepgram's troubleshooting guide); the body is unverified.
            await websocket.send_denial_response(error_response(400, "Bad Request", str(error)))
            return
        await websocket.accept()
        self.state.listen_connections += 1
        faulty = self.state.listen_connections <= faults.faulty_connections
        connection = ListenConnection(websocket, ListenTimeline(options, self.config, self.transcribe), self, faulty)
        await connection.run()


class ListenConnection:
    """One accepted stream: a receive loop feeding the timeline and a sender that paces the messages
    (a delayed final holds back what follows it, so the order on the wire is the order of events)."""

    def __init__(self, websocket: WebSocket, timeline: ListenTimeline, endpoint: ListenEndpoint, faulty: bool) -> None:
        self.websocket = websocket
        self.timeline = timeline
        self.config = endpoint.config
        self.state = endpoint.state
        self.faults = endpoint.config.listen if faulty else ListenFaults()
        self._outbox: asyncio.Queue[tuple[dict[str, Any] | None, float, tuple[int, str] | None]] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._results_sent = 0

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        dropper = asyncio.create_task(self._drop_later(self.faults.drop_after_s)) if self.faults.drop_after_s else None
        try:
            await self._receive_loop()
            self._outbox.put_nowait((None, 0.0, None))  # the sender finishes what is queued, then stops
            await sender
        finally:
            for task in (sender, dropper):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (sender, dropper) if t is not None), return_exceptions=True)
            self.state.audio_bytes += self.timeline.audio_bytes

    async def _receive_loop(self) -> None:
        idle = self.config.idle_timeout_s
        while not self._closed:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), timeout=idle)
            except TimeoutError:
                await self._close(*NET_0001)
                return
            if message["type"] == "websocket.disconnect":
                self._closed = True
                return
            if message.get("bytes") is not None:
                self.state.audio_messages += 1
                for outgoing in await self.timeline.push(message["bytes"]):
                    self._outbox.put_nowait((*outgoing, None))
                continue
            if not await self._control(message.get("text") or ""):
                return

    async def _control(self, text: str) -> bool:
        """One JSON control message; False when the stream is over."""
        try:
            control = json.loads(text)
            kind = control["type"]
        except (ValueError, KeyError, TypeError):
            self._outbox.put_nowait((None, 0.0, (1008, "DATA-0000: the message could not be decoded")))
            return False
        if kind == "KeepAlive":
            self.state.keepalives += 1
        elif kind == "Finalize":
            for outgoing in await self.timeline.finalize():
                self._outbox.put_nowait((*outgoing, None))
        elif kind == "CloseStream":
            for outgoing in await self.timeline.close_stream():
                self._outbox.put_nowait((*outgoing, None))
            self._outbox.put_nowait((self.timeline.metadata(), 0.0, (1000, "")))
            return False
        elif kind == "Configure" and isinstance(control.get("keyterms"), list):
            keyterms = [str(term) for term in control["keyterms"]]
            self.state.configures.append(keyterms)
            reply = {"type": "ConfigureSuccess", "request_id": self.timeline.request_id, "keyterms": keyterms}
            self._outbox.put_nowait((reply, 0.0, None))
        else:
            error = {"type": "Error", "variant": "SchemaError", "description": f"unknown message type {kind!r}"}
            self._outbox.put_nowait((error, 0.0, None))
        return True

    async def _send_loop(self) -> None:
        while True:
            message, delay, close = await self._outbox.get()
            if delay > 0:
                await asyncio.sleep(delay)
            if message is not None:
                await self._send(message)
            if close is not None:
                await self._close(*close)
                return
            if message is None:
                return

    async def _send(self, message: dict[str, Any]) -> None:
        validate_listen_message(message)  # a simulator bug must fail loudly, not reach the client
        await self._send_text(json.dumps(message))
        self.state.listen_sent[message["type"]] += 1
        if message["type"] != "Results":
            return
        self._results_sent += 1
        if self._results_sent == self.faults.malformed_after_results:
            # Deliberately past the validator: what a client sees when the provider misbehaves.
            await self._send_text(json.dumps({key: value for key, value in message.items() if key != "channel"}))
        if self._results_sent == self.faults.error_after_results:
            await self._send({"type": "Error", "variant": self.faults.error_variant, "description": "simulated error"})
        if self._results_sent == self.faults.drop_after_results:
            await self._close(1011, "simulated drop")

    async def _send_text(self, text: str) -> None:
        async with self._send_lock:
            if self._closed:
                return
            try:
                await self.websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._closed = True  # the client went away; the receive loop sees the disconnect

    async def _drop_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._close(1011, "simulated drop")

    async def _close(self, code: int, reason: str) -> None:
        async with self._send_lock:
            if self._closed:
                return
            self._closed = True
            self.state.listen_closes.append((code, reason))
            with contextlib.suppress(RuntimeError, OSError):
                await self.websocket.close(code, reason)
