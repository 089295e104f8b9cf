"""Small parts of the call engine in isolation: sentence splitting, the call state machine, pacing."""

from __future__ import annotations

import asyncio
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
    """With a fake clock that never advances on its own, pacing must wait before sending more than the
    lead ahead: the sleep it asks for is what real time would have provided."""
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
        yield bytes([0x30]) * 1600  # 200 ms

    playout = Playout(send, "MZ1", lead=0.1, clock=lambda: now[0], sleep=fake_sleep)
    await playout.play(speech(), "m1")
    media = [m for m in sent if m["event"] == "media"]
    assert len(media) == 10 and sent[-1] == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "m1"}}
    assert sum(slept) == pytest.approx(0.2 - 0.1, abs=0.021), "never more than the lead ahead of real time"
    await playout.clear()
    assert sent[-1] == {"event": "clear", "streamSid": "MZ1"}
    playout.on_mark("m1")  # Twilio returns the cleared mark
    assert not playout.was_heard("m1") and await playout.heard("m1") is False
