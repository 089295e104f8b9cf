"""A caller as Twilio presents one: a real WebSocket client speaking the Media Streams protocol, sending
the caller's audio as 20 ms mu-law frames and playing the agent's audio back in real time, echoing each
mark when the audio before it has played and every pending mark at once on ``clear``, as Twilio does."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import Any

import httpx
import orjson
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection

LOUD = bytes([0x10]) * 160  # a loud mu-law frame (about -8 dBFS)
QUIET = bytes([0xFF]) * 160  # mu-law silence


def inbound_call(call_sid: str) -> dict[str, str]:
    """The form Twilio posts to the voice webhook when ``call_sid`` rings the business."""
    return {
        "CallSid": call_sid,
        "AccountSid": "AC" + "0" * 32,
        "From": "+16465550199",
        "To": "+12125550100",
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }


async def ring(client: httpx.AsyncClient, base: str, form: dict[str, str], *, auth_token: str) -> httpx.Response:
    """Post ``form`` to the voice webhook at ``base``, signed with ``auth_token`` as Twilio signs it."""
    webhook = f"{base}/twilio/voice"
    signature = RequestValidator(auth_token).compute_signature(webhook, form)
    return await client.post(webhook, data=form, headers={"X-Twilio-Signature": signature})


class TwilioCaller:
    def __init__(self, ws: ClientConnection, *, call_sid: str, stream_sid: str = "MZ" + "0" * 32) -> None:
        self.ws = ws
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.sequence = 0
        self.chunk = 0
        self.media_frames_received = 0
        self.marks_received: list[str] = []
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.marks_at_clear: list[int] = []
        """How many marks had arrived when each clear did."""
        self._play_end = 0.0
        self._echoes: dict[str, asyncio.Task[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed_with: int | None = None

    async def __aenter__(self) -> TwilioCaller:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in [*self._echoes.values(), *([self._reader] if self._reader else [])]:
            task.cancel()
        await asyncio.gather(*self._echoes.values(), *([self._reader] if self._reader else []), return_exceptions=True)

    async def send(self, event: str, **body: Any) -> None:
        message: dict[str, Any] = {"event": event, **body}
        if event != "connected":
            self.sequence += 1
            message = {"event": event, "sequenceNumber": str(self.sequence), "streamSid": self.stream_sid, **body}
        await self.ws.send(orjson.dumps(message).decode())

    async def connect(self, *, to: str = "+12125550100") -> None:
        """``connected`` and ``start``; ``to`` is the business's number the call came to."""
        await self.send("connected", protocol="Call", version="1.0.0")
        await self.send(
            "start",
            start={
                "streamSid": self.stream_sid,
                "accountSid": "AC" + "0" * 32,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": {"call_sid": self.call_sid, "from": "+16465550199", "to": to},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        )

    async def frame(self, payload: bytes) -> None:
        self.chunk += 1
        await self.send(
            "media",
            media={
                "track": "inbound",
                "chunk": str(self.chunk),
                "timestamp": str(self.chunk * 20),
                "payload": base64.b64encode(payload).decode(),
            },
        )

    async def say(self, loud_ms: int = 300, then_silence_ms: int = 300, pace: float = 0.002) -> None:
        """Speak for ``loud_ms`` then fall silent long enough to end the turn (frames sent quickly)."""
        for _ in range(loud_ms // 20):
            await self.frame(LOUD)
            await asyncio.sleep(pace)
        for _ in range(then_silence_ms // 20):
            await self.frame(QUIET)
            await asyncio.sleep(pace)

    async def dtmf(self, digit: str) -> None:
        await self.send("dtmf", dtmf={"track": "inbound_track", "digit": digit})

    async def stop(self) -> None:
        await self.send("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": self.call_sid})

    async def wait_for(self, predicate: Any, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the server")
            await asyncio.sleep(0.01)

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                message = orjson.loads(raw)
                event = message["event"]
                if event == "media":
                    now = time.monotonic()
                    self._play_end = max(self._play_end, now) + 0.02
                    self.media_frames_received += 1
                elif event == "mark":
                    name = message["mark"]["name"]
                    self.marks_received.append(name)
                    self._echoes[name] = asyncio.create_task(self._echo(name, self._play_end))
                elif event == "clear":
                    self.clears += 1
                    self.marks_at_clear.append(len(self.marks_received))
                    self._play_end = time.monotonic()
                    pending = [name for name, task in self._echoes.items() if not task.done()]
                    for name in pending:
                        self._echoes[name].cancel()
                        await self._send_mark(name)  # Twilio returns cleared marks at once
        self.closed_with = self.ws.close_code

    async def _echo(self, name: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await self._send_mark(name)

    async def _send_mark(self, name: str) -> None:
        self.marks_echoed.append(name)
        await self.send("mark", mark={"name": name})
