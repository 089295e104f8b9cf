"""Agent audio out to Twilio: paced in real time, a little ahead, with a mark after each utterance.

Audio sent far ahead of real time cannot be taken back quickly, and bursts jitter; so audio goes out when
Twilio's buffer holds less than ``lead`` of it. The whole 20 ms frames at hand when the speech provider's
chunk arrives go out together, up to ``frames_per_message`` in one ``media`` message (Twilio plays a
message's payload of any length): a fifth of the messages, and of their framing, JSON and base64, that a
message per frame would cost. Audio is never held back to fill a message. ``clear`` still drops whatever
Twilio has buffered, so a larger message does not slow a barge-in. A ``mark`` follows each utterance; Twilio echoes it
when the audio before it has played, which is how the session knows what the caller actually heard.
``clear`` empties Twilio's buffer; marks still pending then come back too, but they were not heard.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from voice_server.audio import Framer
from voice_server.media_streams import MediaStreamCodec

FRAME_SECONDS = 0.02
DEFAULT_LEAD_SECONDS = 0.1
DEFAULT_FRAMES_PER_MESSAGE = 5  # up to 100 ms of audio per media message

Send = Callable[[str], Awaitable[None]]


class Playout:
    def __init__(
        self,
        send: Send,
        stream_sid: str,
        *,
        lead: float = DEFAULT_LEAD_SECONDS,
        frames_per_message: int = DEFAULT_FRAMES_PER_MESSAGE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._send = send
        self._stream_sid = stream_sid
        self._lead = lead
        self._frames_per_message = frames_per_message
        self._clock = clock
        self._sleep = sleep
        self._buffer_end = 0.0  # when the audio already sent will have finished playing
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._played: set[str] = set()
        self._cleared: set[str] = set()
        self.frames_sent = 0
        self.clears = 0

    @property
    def buffered(self) -> float:
        """Seconds of audio sent but not yet played (as far as pacing knows)."""
        return max(0.0, self._buffer_end - self._clock())

    async def play(self, audio: AsyncIterator[bytes], mark: str) -> None:
        """Send one utterance, paced, then its mark. Cancelling stops sending at once."""
        framer = Framer()
        async for chunk in audio:
            await self._send_frames(framer.push(chunk))
        tail = framer.flush(pad=True)
        if tail is not None:
            await self._send_frames([tail])
        self._pending[mark] = asyncio.get_running_loop().create_future()
        await self._send(MediaStreamCodec.mark(self._stream_sid, mark))

    async def _send_frames(self, frames: list[bytes]) -> None:
        step = self._frames_per_message
        for start in range(0, len(frames), step):
            batch = frames[start : start + step]
            ahead = self._buffer_end - self._clock()
            if ahead > self._lead:
                await self._sleep(ahead - self._lead)
            await self._send(MediaStreamCodec.media(self._stream_sid, b"".join(batch)))
            self.frames_sent += len(batch)
            self._buffer_end = max(self._buffer_end, self._clock()) + FRAME_SECONDS * len(batch)

    def on_mark(self, name: str) -> None:
        """Twilio echoed a mark: the utterance before it has played (unless it was cleared first)."""
        future = self._pending.pop(name, None)
        if future is not None:  # marks cleared earlier also come back; they stay "not heard"
            self._played.add(name)
            if not future.done():
                future.set_result(True)

    def was_heard(self, mark: str) -> bool:
        """Whether Twilio has echoed ``mark`` as played (without waiting)."""
        return mark in self._played

    async def heard(self, mark: str) -> bool:
        """Whether the utterance ending in ``mark`` was heard, waiting for Twilio's echo (callers bound
        the wait with ``asyncio.timeout``)."""
        if mark in self._played:
            return True
        future = self._pending.get(mark)
        if future is None:
            return False  # cleared, or never sent
        return await asyncio.shield(future)

    async def clear(self) -> None:
        """Barge-in: drop everything Twilio has buffered. Pending marks count as not heard."""
        await self._send(MediaStreamCodec.clear(self._stream_sid))
        self.clears += 1
        for future in self._pending.values():
            if not future.done():
                future.set_result(False)
        self._cleared.update(self._pending)
        self._pending.clear()
        self._buffer_end = self._clock()
