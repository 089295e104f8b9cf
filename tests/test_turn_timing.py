"""Turn timing: the histogram type, the timer's accounting (on a hand-moved clock), and every turn of a real
call session (real uvicorn, real Media Streams endpoint, scripted providers) getting its record."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
from collections.abc import AsyncIterator

import orjson
import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock, serving
from tests.twilio_caller import TwilioCaller
from tests.voice_fakes import SlowTools, scripted_ports
from voice_server.app import create_app
from voice_server.playout import Playout
from voice_server.ports import Expect, Expectation, TextDelta, ToolCall
from voice_server.session import CallSession
from voice_server.settings import Settings
from voice_server.turn_timing import (
    OVERHEAD_BUCKETS,
    TURN_HISTOGRAMS,
    Histogram,
    TurnTimer,
    TurnTiming,
    observe,
    observe_speech_end,
    turn_histograms,
)

# -- the histogram ---------------------------------------------------------------------------------


def test_buckets_are_cumulative_and_a_value_on_a_bound_counts_in_that_bucket() -> None:
    h = Histogram("h_seconds", "help", (0.1, 0.2, 0.5))
    for value in (0.05, 0.1, 0.15, 0.2, 0.3, 7.0):
        h.observe(value)
    assert h.cumulative() == [(0.1, 2), (0.2, 4), (0.5, 5), (math.inf, 6)]
    assert h.count == 6 and h.sum == pytest.approx(7.8)
    h.reset()
    assert h.cumulative()[-1] == (math.inf, 0) and h.sum == 0.0 and h.quantile(0.5) is None


def test_quantiles_interpolate_inside_their_bucket_like_prometheus() -> None:
    h = Histogram("h_seconds", "help", (1.0, 2.0, 4.0))
    for value in (0.5, 1.5, 1.5, 3.0):  # buckets: 1 in (0,1], 2 in (1,2], 1 in (2,4]
        h.observe(value)
    assert h.quantile(0.25) == pytest.approx(1.0)  # rank 1: the top of the first bucket
    assert h.quantile(0.5) == pytest.approx(1.5)  # rank 2: half-way through (1, 2]
    assert h.quantile(0.875) == pytest.approx(3.0)  # rank 3.5: half-way through (2, 4]
    assert h.quantile(0.0) == pytest.approx(0.0)
    h.observe(100.0)  # in +Inf: reported as the highest finite bound
    assert h.quantile(1.0) == 4.0
    with pytest.raises(ValueError):
        h.quantile(1.5)


def test_bad_buckets_are_refused() -> None:
    for buckets in ((), (0.2, 0.1), (0.1, 0.1), (0.1, math.inf)):
        with pytest.raises(ValueError):
            Histogram("h_seconds", "help", buckets)


def test_every_turn_part_has_a_named_histogram() -> None:
    histograms = turn_histograms()
    assert set(histograms) == {
        "voice_to_voice_server",
        "stt_final",
        "agent_first_token",
        "tool",
        "tts_first_byte",
        "server_overhead",
    }
    assert histograms["server_overhead"].bounds == OVERHEAD_BUCKETS
    assert all(h.name == f"voicebook_turn_{part}_seconds" for part, h in histograms.items())


# -- the timer, on a clock moved by hand ------------------------------------------------------------


class HandClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_timer_splits_a_turn_into_provider_waits_and_overhead() -> None:
    clock = HandClock()
    sent: list[dict[str, object]] = []

    async def send(text: str) -> None:
        sent.append(orjson.loads(text))
        clock.now += 0.001  # each message costs the server 1 ms

    async def no_sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    playout = Playout(send, "MZ1", lead=10.0, clock=clock, sleep=no_sleep)
    timer = TurnTimer("speech", clock(), now=clock)
    clock.now += 0.002  # the session starts the reply

    async def agent() -> AsyncIterator[object]:
        yield Expect(Expectation(("yes_no",)))
        clock.now += 0.25
        yield ToolCall("c1", "check_availability", {})

    async def agent_again() -> AsyncIterator[object]:
        clock.now += 0.2
        yield TextDelta("Ten is free.")

    async def tts() -> AsyncIterator[bytes]:
        clock.now += 0.1
        yield bytes(range(200)) + bytes(300)  # 500 bytes: 3 whole frames and a tail
        yield b"\x01" * 140

    async for _ in timer.agent(agent()):
        clock.now += 0.003  # our own work between events
    timer.tools_started()
    clock.now += 0.05
    timer.tool_finished()
    timer.tools_done()
    async for _ in timer.agent(agent_again()):
        clock.now += 0.001
        await playout.play(timer.audio(tts(), lambda: playout.frames_sent), "m1")
        timer.utterance_played(playout.frames_sent)
    timing = timer.finish()

    payloads = [base64.b64decode(m["media"]["payload"]) for m in sent if m["event"] == "media"]  # type: ignore[index]
    assert b"".join(payloads) == bytes(range(200)) + bytes(300) + b"\x01" * 140
    assert [len(payload) for payload in payloads] == [160, 320, 160]  # the first frame alone, then what is at hand
    assert timing.agent_rounds == 2
    assert timing.agent_first_token == pytest.approx(0.253)  # asked, our 3 ms after the Expect, 250 ms of model
    assert timing.tool == pytest.approx(0.05)
    assert timing.tts_first_byte == pytest.approx(0.1)
    # Waits: agent 0.25 + 0.2, tool 0.05, TTS 0.1. Ours: 2 ms start, 3 ms after each of two agent events,
    # 1 ms after the text, 1 ms to send the first frame.
    assert timing.agent_wait == pytest.approx(0.45)
    assert timing.tool_wait == pytest.approx(0.05)
    assert timing.tts_wait == pytest.approx(0.1)
    assert timing.server_overhead == pytest.approx(0.002 + 0.003 + 0.003 + 0.001 + 0.001)
    assert timing.voice_to_voice_server == pytest.approx(0.45 + 0.05 + 0.1 + 0.010)
    assert timer.finish() is timing


async def test_the_first_frame_bytes_are_the_same_stream() -> None:
    """The timer hands the first frame's bytes over alone; the audio the playout sends does not change
    (only how it is grouped into messages: the first frame goes out in one of its own)."""
    chunks = [b"\x10" * 70, b"\x20" * 500, b"\x30" * 33]

    async def tts() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def frames(timed: bool) -> list[bytes | str]:
        sent: list[bytes | str] = []

        async def send(text: str) -> None:
            message = orjson.loads(text)
            sent.append(base64.b64decode(message["media"]["payload"]) if message["event"] == "media" else text)

        playout = Playout(send, "MZ1", lead=10.0)
        timer = TurnTimer("dtmf", 0.0)
        audio = timer.audio(tts(), lambda: playout.frames_sent) if timed else tts()
        await playout.play(audio, "m1")
        if timed:
            timer.utterance_played(playout.frames_sent)
            assert timer.finish().first_frame_at is not None
        return sent

    timed, untimed = await frames(timed=True), await frames(timed=False)
    assert len(timed) == 4 and len(untimed) == 3  # the first frame alone; the rest as it came; the mark
    audio = [b"".join(part for part in sent if isinstance(part, bytes)) for sent in (timed, untimed)]
    assert audio[0] == audio[1] == b"\x10" * 70 + b"\x20" * 500 + b"\x30" * 33 + b"\xff" * 37
    assert timed[-1] == untimed[-1]


async def test_a_first_utterance_shorter_than_a_frame_still_marks_the_first_frame() -> None:
    async def send(text: str) -> None:
        pass

    async def tts() -> AsyncIterator[bytes]:
        yield b"\x10" * 40

    playout = Playout(send, "MZ1")
    timer = TurnTimer("speech", 0.0)
    await playout.play(timer.audio(tts(), lambda: playout.frames_sent), "m1")
    timer.utterance_played(playout.frames_sent)
    timing = timer.finish()
    assert playout.frames_sent == 1 and timing.first_frame_at is not None and timing.tts_first_byte_at is not None


def test_a_known_speech_end_fills_the_stt_part() -> None:
    histograms = turn_histograms()
    timing = TurnTiming("speech", end_of_turn_at=10.45, first_frame_at=11.0, agent_wait=0.5)
    observe(timing, histograms)
    assert histograms["stt_final"].count == 0 and histograms["voice_to_voice_server"].count == 1
    assert histograms["server_overhead"].sum == pytest.approx(0.05)
    known = observe_speech_end(timing, 10.0, histograms)
    assert known.stt_final == pytest.approx(0.45) and histograms["stt_final"].count == 1


# -- a real call ------------------------------------------------------------------------------------

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
CALL_SID = "CA" + "b" * 32


async def test_every_turn_of_a_call_is_timed(app_settings: Settings, clock: FrozenClock) -> None:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    tools = SlowTools(seconds=0.05)
    settings = dataclasses.replace(app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN)
    app = create_app(settings, clock=clock, voice=scripted_ports(["I would like a checkup", "please book it"], tools))
    answered_before = TURN_HISTOGRAMS["voice_to_voice_server"].count
    tools_before = TURN_HISTOGRAMS["tool"].count
    url = base.replace("http://", "ws://") + "/twilio/media"
    headers = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, {})}
    async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
        async with connect(url, additional_headers=headers) as ws, TwilioCaller(ws, call_sid=CALL_SID) as caller:
            await caller.connect()
            await caller.wait_for(lambda: len(caller.marks_echoed) >= 2)  # the greeting
            [session] = app.state.components.sessions
            assert isinstance(session, CallSession)
            await caller.say()  # "I would like a checkup": "You said ...", "Is there anything else?"
            await caller.wait_for(lambda: len(caller.marks_echoed) >= 4)
            await caller.say()  # "please book it": "One moment ...", the tool, "You are booked.", "Anything else?"
            await caller.wait_for(lambda: len(caller.marks_echoed) >= 7)
            await caller.dtmf("1")  # "You pressed 1."
            await caller.wait_for(lambda: len(caller.marks_echoed) >= 8)
            await caller.stop()
            await asyncio.wait_for(session.ended.wait(), 5)
    timings = session.turn_timings
    assert [t.trigger for t in timings] == ["speech", "speech", "dtmf"]
    for timing in timings:
        assert timing.answered and timing.agent_first_token_at is not None and timing.tts_first_byte_at is not None
        assert timing.agent_asked_at is not None and timing.tts_asked_at is not None
        assert timing.first_frame_at is not None
        assert timing.end_of_turn_at <= timing.agent_asked_at <= timing.agent_first_token_at
        assert timing.tts_asked_at <= timing.tts_first_byte_at <= timing.first_frame_at
        assert timing.end_of_turn_at <= timing.tts_asked_at
        for part, value in timing.parts():
            assert value >= 0, (part, value)
    assert [t.end_of_turn_at for t in timings] == sorted(t.end_of_turn_at for t in timings)
    plain, booking, pressed = timings
    assert plain.tools_started_at is None and plain.tool is None and plain.tool_wait == 0.0
    # The booking turn spoke first ("One moment ..."), then ran the tool: its time is recorded, but it
    # was not on the way to the first frame.
    assert booking.tools_started_at is not None and booking.tools_done_at is not None
    assert booking.first_tool_result_at is not None and booking.first_frame_at is not None
    assert booking.first_frame_at <= booking.tools_started_at <= booking.first_tool_result_at <= booking.tools_done_at
    assert booking.tool is not None and booking.tool > 0 and booking.tool_wait == 0.0
    assert booking.agent_rounds == 2 and tools.finished == ["book_appointment"]
    assert pressed.agent_rounds == 1
    assert TURN_HISTOGRAMS["voice_to_voice_server"].count - answered_before == 3
    assert TURN_HISTOGRAMS["tool"].count - tools_before == 1
