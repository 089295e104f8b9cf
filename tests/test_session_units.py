"""Small parts of the call engine in isolation: sentence splitting, the call state machine, pacing."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import orjson
import pytest

from voice_server.playout import Playout
from voice_server.session import _LEGAL, CallState, split_sentences


def test_sentences_split_at_their_ends_but_not_after_abbreviations() -> None:
    sentences, rest = split_sentences("Dr. Lee can see you at 10 a.m. tomorrow. Shall I book it? I can also")
    assert sentences == ["Dr. Lee can see you at 10 a.m. tomorrow.", "Shall I book it?"]
    assert rest == "I can also"
    assert split_sentences("No end yet") == ([], "No end yet")


def test_every_state_can_end_and_ended_is_final() -> None:
    for state in CallState:
        if state not in (CallState.ENDING, CallState.ENDED):
            assert CallState.ENDING in _LEGAL[state], state
    assert _LEGAL[CallState.ENDED] == frozenset()
    assert CallState.LISTENING not in _LEGAL[CallState.TRANSFERRING]


async def test_playout_paces_frames_and_clear_forgets_pending_marks() -> None:
    """With a fake clock that never advances on its own, pacing must wait before a message while more
    than the lead is buffered: the sleep it asks for is what real time would have provided."""
    sent: list[dict[str, object]] = []
    now = [100.0]
    slept: list[float] = []

    async def send(text: str) -> None:
        sent.append(orjson.loads(text))

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds
        await asyncio.sleep(0)

    async def speech() -> AsyncIterator[bytes]:
        yield bytes([0x30]) * 3200  # 400 ms

    playout = Playout(send, "MZ1", lead=0.1, frames_per_message=5, clock=lambda: now[0], sleep=fake_sleep)
    await playout.play(speech(), "m1")
    media = [m for m in sent if m["event"] == "media"]
    assert [len(base64.b64decode(m["media"]["payload"])) for m in media] == [800] * 4  # type: ignore[index]
    assert sent[-1] == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "m1"}}
    # 400 ms sent; a message goes out once no more than the lead (100 ms) is buffered, so at most the lead
    # and one message (100 ms) ahead of real time: 200 ms had to be waited for.
    assert sum(slept) == pytest.approx(0.4 - 0.1 - 0.1, abs=0.001)
    await playout.clear()
    assert sent[-1] == {"event": "clear", "streamSid": "MZ1"}
    playout.on_mark("m1")  # Twilio returns the cleared mark
    assert not playout.was_heard("m1") and await playout.heard("m1") is False


async def test_playout_never_holds_audio_back_to_fill_a_message() -> None:
    """Frames go out as soon as they are whole, however few: a slow speech provider's first 20 ms is on
    the line before its next chunk comes."""
    sent: list[bytes] = []
    more = asyncio.Event()

    async def send(text: str) -> None:
        message = orjson.loads(text)
        if message["event"] == "media":
            sent.append(base64.b64decode(message["media"]["payload"]))

    async def speech() -> AsyncIterator[bytes]:
        yield b"\x31" * 230  # one whole frame and 70 bytes of the next
        await more.wait()
        yield b"\x32" * 1200

    playout = Playout(send, "MZ1", lead=10.0, frames_per_message=5)
    playing = asyncio.create_task(playout.play(speech(), "m1"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert sent == [b"\x31" * 160], "the first frame went out without waiting for more"
    more.set()
    await playing
    assert [len(payload) for payload in sent] == [160, 800, 320, 160]  # then at most 5 frames a message
    assert b"".join(sent) == b"\x31" * 230 + b"\x32" * 1200 + b"\xff" * 10  # the tail padded with silence
    assert playout.frames_sent == 9
