"""One call's Twilio Media Streams socket for the locust callers (``locustfile.py``): frames sent on an
absolute 20 ms schedule from a sender greenlet, the agent's audio played on a playout clock by a receiver
greenlet, marks echoed when that clock reaches them, ``clear`` honoured. gevent-based: never import it in
pytest (locust monkey-patches the process)."""

from __future__ import annotations

import base64
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import gevent  # type: ignore[import-untyped]  # no stubs shipped
import orjson
from gevent.event import Event  # type: ignore[import-untyped]
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

FRAME_BYTES = 160
FRAME_SECONDS = 0.02
ANSWER_SECONDS = 20.0
QUIET_SECONDS = 0.6
SILENCE_B64 = base64.b64encode(b"\xff" * FRAME_BYTES).decode()  # one 20 ms frame of mu-law silence
NEW_REPLY_GAP = 0.3


class CallFailed(Exception):
    """The call could not go on: refused, unanswered, or cut off."""


@dataclass
class Reply:
    started: float
    latency: float | None  # seconds from the end of the caller's speech; None when it began before
    audio_bytes: int = 0


class MediaStream:
    """The Media Streams socket of one call: a sender greenlet (frames on an absolute 20 ms schedule, mark
    echoes when due) and a receiver greenlet (the agent's audio on a playout clock, marks, clear)."""

    def __init__(self, ws: ClientConnection, call_sid: str, parameters: dict[str, str]) -> None:
        self.ws = ws
        self.call_sid = call_sid
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self._parameters = parameters
        self._sequence = 0
        self._chunk = 0
        self._media = (
            '{"event":"media","sequenceNumber":"%d","streamSid":"' + self.stream_sid + '","media":'
            '{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
        )
        self._speech: deque[str] = deque()
        self._spoken = Event()
        self._speech_end: float | None = None
        self._marks: deque[tuple[str, float]] = deque()
        self._play_end = 0.0
        self._last_audio = 0.0
        self.replies: list[Reply] = []
        self.closed = Event()
        self.late_max = 0.0  # the sender's worst lateness against its schedule, seconds
        self._greenlets: list[gevent.Greenlet[Any, Any]] = []

    def begin(self, account_sid: str) -> None:
        self.ws.send(orjson.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}).decode())
        start = {
            "streamSid": self.stream_sid,
            "accountSid": account_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": self._parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        self._send_event("start", start=start)
        self._greenlets = [gevent.spawn(self._microphone), gevent.spawn(self._speaker)]

    def _send_event(self, event: str, **body: Any) -> None:
        self._sequence += 1
        message = {"event": event, "sequenceNumber": str(self._sequence), "streamSid": self.stream_sid, **body}
        self.ws.send(orjson.dumps(message).decode())

    def _microphone(self) -> None:
        next_at = time.monotonic()
        while not self.closed.is_set():
            if self._speech:
                payload = self._speech.popleft()
                if not self._speech:
                    self._speech_end = next_at + FRAME_SECONDS
                    self._spoken.set()
            else:
                payload = SILENCE_B64
            self._chunk += 1
            self._sequence += 1
            try:
                self.ws.send(self._media % (self._sequence, self._chunk, self._chunk * 20, payload))
                now = time.monotonic()
                while self._marks and self._marks[0][1] <= now:
                    self._send_event("mark", mark={"name": self._marks.popleft()[0]})
            except ConnectionClosed:
                self.closed.set()
                return
            next_at += FRAME_SECONDS
            delay = next_at - time.monotonic()
            if delay < 0:
                self.late_max = max(self.late_max, -delay)
            gevent.sleep(max(0.0, delay))

    def _speaker(self) -> None:
        try:
            for raw in self.ws:
                message = orjson.loads(raw)
                event = message.get("event")
                now = time.monotonic()
                if event == "media":
                    payload = message["media"]["payload"]
                    size = len(payload) * 3 // 4 - payload[-2:].count("=")
                    if not self.replies or now - self._last_audio > NEW_REPLY_GAP:
                        latency = None if self._speech_end is None else now - self._speech_end
                        self._speech_end = None
                        self.replies.append(Reply(now, latency))
                    self.replies[-1].audio_bytes += size
                    self._last_audio = now
                    self._play_end = max(self._play_end, now) + size / 8000
                elif event == "mark":
                    self._marks.append((message["mark"]["name"], max(self._play_end, now)))
                elif event == "clear":
                    self._play_end = now
                    self._marks = deque((name, now) for name, _ in self._marks)  # Twilio returns them all
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    def say(self, frames: list[str]) -> None:
        """Queue the utterance and return when its last frame was sent (in real time)."""
        self._spoken.clear()
        self._speech.extend(frames)
        while not self._spoken.wait(0.1):
            if self.closed.is_set():
                raise CallFailed("the socket closed while the caller spoke")

    def wait_reply(self, within: float = ANSWER_SECONDS) -> Reply:
        """The agent's next answer, once it has played and the line stayed quiet for 0.6 s."""
        before = len(self.replies)
        deadline = time.monotonic() + within
        while len(self.replies) == before:
            if self.closed.is_set():
                raise CallFailed("the socket closed before the agent answered")
            if time.monotonic() > deadline:
                raise CallFailed(f"no answer within {within:g} s")
            gevent.sleep(0.02)
        while not self.closed.is_set():
            now = time.monotonic()
            if now >= self._play_end and now - self._last_audio >= QUIET_SECONDS:
                break
            gevent.sleep(0.02)
        return self.replies[before]

    def hang_up(self, account_sid: str) -> None:
        gevent.killall(self._greenlets[:1])  # the sender first: no frame after "stop"
        if not self.closed.is_set():
            try:
                self._send_event("stop", stop={"accountSid": account_sid, "callSid": self.call_sid})
            except ConnectionClosed:
                pass
        self.ws.close()
        gevent.joinall(self._greenlets[1:], timeout=5)
        gevent.killall(self._greenlets[1:])
