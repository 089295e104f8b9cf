"""Deepgram text to speech (Aura) on loopback: ``POST /v1/speak`` streams the audio of one text, and
``ws /v1/speak`` takes ``Speak``/``Flush``/``Clear``/``Close`` and answers with audio, ``Flushed`` and
``Cleared``. The simulator synthesises mu-law at 8 kHz only (what a phone line carries).

Without ``container=none`` the REST answer starts with a WAV header, as Deepgram's does: played down a
phone line those 44 bytes are a click, which is why the adapter asks for raw audio. Unverified details:
the ``content-type`` of the audio, the error codes' names and the close code for a bad socket message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from integrations.simulators.deepgram_wire import authorised, error_response, fault_response, validate_speak_message
from voice_server.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from integrations.simulators.deepgram import DeepgramSimConfig, DeepgramSimState

Synthesize = Callable[[str], bytes]
MAX_TEXT = 2000  # characters per request (Deepgram's documented limit for Aura)
KNOWN_REST_PARAMS = frozenset(
    {"model", "encoding", "sample_rate", "container", "bit_rate", "speed", "tag", "mip_opt_out"}
)
KNOWN_SOCKET_PARAMS = frozenset({"model", "encoding", "sample_rate", "speed", "mip_opt_out"})


@dataclass(frozen=True, slots=True)
class SpeakFaults:
    """``fail`` answers the first REST requests with these HTTP statuses, in order (429 and 5xx carry
    ``Retry-After: retry_after_s``)."""

    fail: tuple[int, ...] = ()
    retry_after_s: int = 1


def wav_header(data_bytes: int) -> bytes:
    """A RIFF/WAVE header for 8 kHz mono mu-law (format tag 7) followed by ``data_bytes`` of audio."""
    fmt = struct.pack("<HHIIHH", 7, 1, SAMPLE_RATE, SAMPLE_RATE, 1, 8)
    return (
        b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", data_bytes)
    )  # fmt: skip


def _check_audio_params(params: Mapping[str, str], known: frozenset[str]) -> str | None:
    """Why the query is refused, or None."""
    unknown = sorted(set(params) - known)
    if unknown:
        return f"unknown query parameter {unknown[0]!r}"
    if params.get("encoding") != "mulaw":
        return "the simulator synthesises encoding=mulaw only"
    if params.get("sample_rate", str(SAMPLE_RATE)) != str(SAMPLE_RATE):
        return f"the simulator synthesises sample_rate={SAMPLE_RATE} only"
    if params.get("container", "wav") not in ("none", "wav"):
        return "encoding=mulaw takes container=none or container=wav"
    return None


_SYNTHESIS_THREADS = 8


@functools.cache
def _synthesis_pool() -> ThreadPoolExecutor:
    """Threads of their own for speech synthesis. On the default executor, synthesis queued behind the
    recogniser's work (every interim and final result of every stream): with 100 calls in a load test,
    waves of calls ending their utterances at once held sentences back past the server's 2.5 s
    first-byte limit, a delay of the simulator that Deepgram's separate services do not have."""
    return ThreadPoolExecutor(max_workers=_SYNTHESIS_THREADS, thread_name_prefix="deepgram-sim-speak")


async def synthesised(synthesize: Synthesize, text: str) -> bytes:
    """``synthesize(text)`` on the synthesis threads."""
    return await asyncio.get_running_loop().run_in_executor(_synthesis_pool(), synthesize, text)


class SpeakRestEndpoint:
    def __init__(self, config: DeepgramSimConfig, state: DeepgramSimState, synthesize: Synthesize) -> None:
        self.config = config
        self.state = state
        self.synthesize = synthesize

    async def handle(self, request: Request) -> Response:
        self.state.speak_requests += 1
        faults = self.config.speak
        if self.state.speak_requests <= len(faults.fail):
            return fault_response(faults.fail[self.state.speak_requests - 1], faults.retry_after_s)
        if not authorised(request.headers, self.config.api_key):
            return error_response(401, "INVALID_AUTH", "Invalid credentials.")
        params = dict(request.query_params)
        problem = _check_audio_params(params, KNOWN_REST_PARAMS)
        if problem is not None:
            return error_response(400, "INVALID_QUERY_PARAMETER", problem)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error_response(400, "INVALID_BODY", "The body must be JSON.")
        if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str):
            return error_response(400, "INVALID_BODY", 'The body must be {"text": "..."}.')
        text = body["text"].strip()
        if not text or len(text) > MAX_TEXT:
            return error_response(400, "INVALID_TEXT", f"The text must hold 1 to {MAX_TEXT} characters.")
        audio = await synthesised(self.synthesize, text)
        if params.get("container", "wav") == "wav":
            audio = wav_header(len(audio)) + audio
        request_id = str(uuid.uuid4())
        headers = {
            "dg-request-id": request_id,
            "dg-model-name": params.get("model", "aura-2-thalia-en"),
            "dg-char-count": str(len(text)),
        }
        return StreamingResponse(self._stream(audio), media_type="audio/basic", headers=headers)

    async def _stream(self, audio: bytes) -> AsyncIterator[bytes]:
        complete = False
        try:
            await asyncio.sleep(self.config.tts_first_byte_ms / 1000)
            async for chunk in paced(audio, self.config):
                yield chunk
            complete = True
        finally:
            if complete:
                self.state.speak_completed += 1
            else:
                self.state.speak_cancelled += 1


async def paced(audio: bytes, config: DeepgramSimConfig) -> AsyncIterator[bytes]:
    """``audio`` in ``tts_chunk_bytes`` pieces, each after the time it plays for divided by the
    real-time factor (0: no pacing)."""
    size = config.tts_chunk_bytes
    for offset in range(0, len(audio), size):
        chunk = audio[offset : offset + size]
        yield chunk
        if config.tts_realtime_factor > 0:
            await asyncio.sleep(len(chunk) / SAMPLE_RATE / config.tts_realtime_factor)


class SpeakSocketEndpoint:
    """``ws /v1/speak``: text accumulates until ``Flush``; the audio of each flush is sent by a worker
    task so that ``Clear`` can stop it part way (the audio not yet sent is dropped)."""

    def __init__(self, config: DeepgramSimConfig, state: DeepgramSimState, synthesize: Synthesize) -> None:
        self.config = config
        self.state = state
        self.synthesize = synthesize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        if not authorised(websocket.headers, self.config.api_key):
            await websocket.send_denial_response(error_response(401, "INVALID_AUTH", "Invalid credentials."))
            return
        problem = _check_audio_params(dict(websocket.query_params), KNOWN_SOCKET_PARAMS)
        if problem is not None:
            await websocket.send_denial_response(error_response(400, "Bad Request", problem))
            return
        await websocket.accept()
        self.state.speak_sockets += 1
        session = _SpeakSession(websocket, self.config, self.synthesize)
        await session.run(websocket.query_params.get("model", "aura-2-thalia-en"))


class _SpeakSession:
    def __init__(self, websocket: WebSocket, config: DeepgramSimConfig, synthesize: Synthesize) -> None:
        self.websocket = websocket
        self.config = config
        self.synthesize = synthesize
        self._text: list[str] = []
        self._flushes: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self._sequence = 0
        self._lock = asyncio.Lock()
        self._worker: asyncio.Task[None] | None = None

    async def run(self, model: str) -> None:
        metadata = {
            "type": "Metadata", "request_id": str(uuid.uuid4()), "model_name": model,
            "model_version": "2025-04-07.0", "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, model)),
        }  # fmt: skip
        await self._send_json(metadata)
        self._worker = asyncio.create_task(self._work())
        try:
            await self._receive_loop()
        finally:
            await self._stop_worker()

    async def _receive_loop(self) -> None:
        while True:
            try:
                text = await self.websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError, KeyError):
                return  # the client went away (or sent binary, which this API never takes)
            try:
                message = json.loads(text)
                kind = message["type"]
            except (ValueError, KeyError, TypeError):
                await self.websocket.close(1003, "message could not be decoded")
                return
            if kind == "Speak" and isinstance(message.get("text"), str):
                self._text.append(message["text"])
            elif kind == "Flush":
                self._flushes.put_nowait(("".join(self._text), self._sequence))
                self._text.clear()
                self._sequence += 1
            elif kind == "Clear":
                self._text.clear()
                await self._stop_worker()
                self._flushes = asyncio.Queue()
                self._worker = asyncio.create_task(self._work())
                await self._send_json({"type": "Cleared", "sequence_id": self._sequence})
            elif kind == "Close":
                await self._stop_worker()
                with contextlib.suppress(RuntimeError):
                    await self.websocket.close(1000)
                return
            else:
                await self._send_json(
                    {"type": "Warning", "description": f"unknown message {kind!r}", "code": "UNKNOWN_MESSAGE_TYPE"}
                )

    async def _work(self) -> None:
        while True:
            text, sequence = await self._flushes.get()
            if text.strip():
                audio = await synthesised(self.synthesize, text.strip())
                await asyncio.sleep(self.config.tts_first_byte_ms / 1000)
                async for chunk in paced(audio, self.config):
                    async with self._lock:
                        await self.websocket.send_bytes(chunk)
            await self._send_json({"type": "Flushed", "sequence_id": sequence})

    async def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def _send_json(self, message: dict[str, Any]) -> None:
        validate_speak_message(message)
        async with self._lock:
            await self.websocket.send_text(json.dumps(message))
