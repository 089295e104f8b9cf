"""A caller as Twilio presents one, for `voicebook call`, end-to-end tests and load tests.

It does what Twilio does for a real phone call: posts the signed voice webhook, reads the TwiML answer,
opens the signed Media Streams WebSocket and then streams the caller's microphone as 20 ms mu-law frames
on a real-time clock, continuously (silence included, as a phone line does). The agent's audio is
"played" in real time: a mark is echoed when the audio queued before it has played, and every pending
mark at once on ``clear``. Turn latency is measured the way a caller feels it: from the last frame of
the caller's speech to the first frame of the agent's answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect

FRAME_BYTES = 160
FRAME_SECONDS = 0.02
SILENCE = b"\xff" * FRAME_BYTES


class CallRefused(RuntimeError):
    """The server answered the webhook without a media stream (a refusal, or an error status)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the voice webhook answered: where to stream and the parameters to carry."""

    stream_url: str
    parameters: Mapping[str, str]
    said: tuple[str, ...] = ()


def consent_question(twiml: str) -> str | None:
    """The action URL of a ``<Gather>`` asking the caller for consent before connecting, if any."""
    gather = ET.fromstring(twiml).find("./Gather")
    return gather.get("action") if gather is not None else None


def parse_answer(twiml: str) -> Answer:
    root = ET.fromstring(twiml)
    said = tuple((say.text or "").strip() for say in root.iter("Say"))
    stream = root.find("./Connect/Stream")
    if stream is None:
        raise CallRefused(" ".join(said) or "no <Connect><Stream> in the answer")
    parameters = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
    return Answer(stream.get("url", ""), parameters, said)


@dataclass
class AgentReply:
    """One stretch of agent audio: when it started (monotonic), its audio, and whether it was cut off."""

    started: float
    audio: bytearray = field(default_factory=bytearray)
    latency: float | None = None
    """Seconds from the end of the caller's speech to this reply's first frame (None for the greeting)."""
    cleared: bool = False


class Softphone:
    """One call. ``async with Softphone.dial(...) as phone:`` then ``await phone.say(mulaw)`` and
    ``await phone.wait_for_reply()``; ``phone.replies`` holds what the agent said, as audio."""

    def __init__(self, ws: ClientConnection, *, call_sid: str, answer: Answer, account_sid: str) -> None:
        self.ws = ws
        self.call_sid = call_sid
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self._answer = answer
        self._account_sid = account_sid
        self._sequence = 0
        self._chunk = 0
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self._speech_end: float | None = None
        self._play_end = 0.0
        self._last_audio = 0.0
        self._echoes: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.replies: list[AgentReply] = []
        self.marks_echoed = 0
        self.clears = 0
        self.closed = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def dial(
        cls,
        base_url: str,
        *,
        auth_token: str | None,
        caller: str,
        called: str,
        call_sid: str | None = None,
        account_sid: str = "AC" + "0" * 32,
        public_url: str | None = None,
        http: httpx.AsyncClient | None = None,
        consent_key: str | None = "1",
    ) -> Any:
        """Ring the server at ``base_url`` like Twilio would; ``public_url`` is the URL the server believes
        it is reached at (what Twilio signs), when that differs. Asked for consent before the call
        connects, the caller presses ``consent_key`` (None: says nothing)."""
        call_sid = call_sid or "CA" + uuid.uuid4().hex
        signed_base = (public_url or base_url).rstrip("/")
        form = {
            "CallSid": call_sid,
            "AccountSid": account_sid,
            "From": caller,
            "To": called,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
        }
        headers = {}
        if auth_token is not None:
            headers["X-Twilio-Signature"] = RequestValidator(auth_token).compute_signature(
                signed_base + "/twilio/voice", form
            )
        async with contextlib.AsyncExitStack() as stack:
            client = http if http is not None else await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))
            response = await client.post(base_url.rstrip("/") + "/twilio/voice", data=form, headers=headers)
            if response.status_code != 200:
                raise CallRefused(f"voice webhook answered {response.status_code}: {response.text[:200]}")
            action = consent_question(response.text)
            if action is not None:
                # Twilio posts the call's form with what was gathered to the action, signed over its URL.
                answered = {**form, **({"Digits": consent_key} if consent_key else {})}
                headers = {}
                if auth_token is not None:
                    headers["X-Twilio-Signature"] = RequestValidator(auth_token).compute_signature(action, answered)
                path = urlsplit(action).path
                response = await client.post(base_url.rstrip("/") + path, data=answered, headers=headers)
                if response.status_code != 200:
                    raise CallRefused(f"consent action answered {response.status_code}: {response.text[:200]}")
            answer = parse_answer(response.text)
            # The stream URL is public; connect to the same path on the address we actually reach.
            path = urlsplit(answer.stream_url).path
            ws_base = base_url.replace("https://", "wss://").replace("http://", "ws://").rstrip("/")
            upgrade = {}
            if auth_token is not None:
                upgrade["X-Twilio-Signature"] = RequestValidator(auth_token).compute_signature(answer.stream_url, {})
            ws = await stack.enter_async_context(connect(ws_base + path, additional_headers=upgrade, max_size=2**20))
            phone = cls(ws, call_sid=call_sid, answer=answer, account_sid=account_sid)
            await phone._begin()
            try:
                yield phone
            finally:
                await phone._finish()

    # -- the line ----------------------------------------------------------------------------------
    async def _send(self, event: str, **body: Any) -> None:
        message: dict[str, Any] = {"event": event, **body}
        if event != "connected":
            self._sequence += 1
            message = {"event": event, "sequenceNumber": str(self._sequence), "streamSid": self.stream_sid, **body}
        await self.ws.send(orjson.dumps(message).decode())

    async def _begin(self) -> None:
        await self._send("connected", protocol="Call", version="1.0.0")
        await self._send(
            "start",
            start={
                "streamSid": self.stream_sid,
                "accountSid": self._account_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": dict(self._answer.parameters),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._microphone()), loop.create_task(self._speaker())]

    async def _finish(self) -> None:
        for task in [*self._tasks, *self._echoes]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._echoes, return_exceptions=True)

    async def _microphone(self) -> None:
        """A frame every 20 ms on an absolute schedule (no drift), speech when queued, else silence."""
        next_at = time.monotonic()
        while True:
            try:
                payload = self._outgoing.get_nowait()
                self._outgoing.task_done()
                if self._outgoing.empty():
                    self._speech_end = next_at + FRAME_SECONDS
            except asyncio.QueueEmpty:
                payload = SILENCE
            self._chunk += 1
            with contextlib.suppress(Exception):
                await self._send(
                    "media",
                    media={
                        "track": "inbound",
                        "chunk": str(self._chunk),
                        "timestamp": str(self._chunk * 20),
                        "payload": base64.b64encode(payload).decode(),
                    },
                )
            next_at += FRAME_SECONDS
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _speaker(self) -> None:
        try:
            async for raw in self.ws:
                message = orjson.loads(raw)
                event = message.get("event")
                now = time.monotonic()
                if event == "media":
                    audio = base64.b64decode(message["media"]["payload"])
                    # A new reply when the line went quiet before this audio.
                    if not self.replies or now - self._last_audio > 0.3 or self.replies[-1].cleared:
                        reply = AgentReply(now)
                        if self._speech_end is not None:
                            reply.latency = now - self._speech_end
                            self._speech_end = None
                        self.replies.append(reply)
                    self.replies[-1].audio.extend(audio)
                    self._last_audio = now
                    self._play_end = max(self._play_end, now) + len(audio) / 8000
                elif event == "mark":
                    task = asyncio.get_running_loop().create_task(self._echo(message["mark"]["name"], self._play_end))
                    self._echoes.add(task)
                    task.add_done_callback(self._echoes.discard)
                elif event == "clear":
                    self.clears += 1
                    self._play_end = now
                    if self.replies:
                        self.replies[-1].cleared = True
        finally:
            self.closed.set()

    async def _echo(self, name: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        self.marks_echoed += 1
        with contextlib.suppress(Exception):
            await self._send("mark", mark={"name": name})

    # -- what a test or a person does ---------------------------------------------------------------
    async def say(self, mulaw: bytes) -> None:
        """Speak ``mulaw`` (8 kHz) into the line; returns once it has all been sent, in real time."""
        for offset in range(0, len(mulaw), FRAME_BYTES):
            frame = mulaw[offset : offset + FRAME_BYTES]
            await self._outgoing.put(frame.ljust(FRAME_BYTES, b"\xff"))
        await self._outgoing.join()

    async def press(self, digit: str) -> None:
        await self._send("dtmf", dtmf={"track": "inbound_track", "digit": digit})

    def playing(self) -> bool:
        return time.monotonic() < self._play_end

    async def wait_for_speech(self, *, within: float = 15.0) -> AgentReply:
        """Wait until the agent starts a new reply (its first audio frame), e.g. to talk over it."""
        replies_before = len(self.replies)
        async with asyncio.timeout(within):
            while len(self.replies) == replies_before:
                if self.closed.is_set():
                    raise ConnectionError("the call ended")
                await asyncio.sleep(0.02)
        return self.replies[-1]

    async def wait_for_reply(self, *, within: float = 15.0, quiet: float = 0.8) -> AgentReply:
        """Wait for the agent to answer and finish: audio came and then ``quiet`` seconds passed after
        it had played. Raises TimeoutError when the agent says nothing."""
        replies_before = len(self.replies)
        async with asyncio.timeout(within):
            # Polled: "finished" is a span of time without audio, not an event anything could set.
            while len(self.replies) == replies_before:
                if self.closed.is_set():
                    raise ConnectionError("the call ended")
                await asyncio.sleep(0.02)
            while (self.playing() or time.monotonic() - self._last_audio < quiet) and not self.closed.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return self.replies[-1]

    async def hang_up(self) -> None:
        await self._send("stop", stop={"accountSid": self._account_sid, "callSid": self.call_sid})
        await self.ws.close()


__all__ = ["AgentReply", "Answer", "CallRefused", "Softphone", "parse_answer"]
