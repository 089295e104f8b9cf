"""The call engine end to end: a real uvicorn server, the real Media Streams endpoint and call session,
and a real websockets client playing Twilio (tests/twilio_caller.py). Speech and agent providers are
scripted (tests/voice_fakes.py) until the real ones arrive; everything else is real, ledger included."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from booking.ledger.calls_repository import CallLedger
from integrations.simulators.loopback import loopback_socket
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from integrations.twilio_rest import TwilioCallControl
from tests.conftest import FrozenClock, serving
from tests.twilio_caller import TwilioCaller
from tests.voice_fakes import ScriptedTTS, SlowTools, scripted_ports
from voice_server import media_endpoint
from voice_server.app import create_app
from voice_server.recording import load_recording
from voice_server.settings import Settings

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
TWILIO_ACCOUNT = "AC" + "0" * 32
CALL_SID = "CA" + "a" * 32


@dataclass
class Server:
    app: Starlette
    base: str  # http://127.0.0.1:PORT (also the public URL Twilio signs)
    tools: SlowTools

    @property
    def media_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/twilio/media"

    def signature(self, url: str | None = None, token: str = AUTH_TOKEN) -> dict[str, str]:
        return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url or self.media_url, {})}

    @property
    def calls(self) -> CallLedger:
        ledger: CallLedger = self.app.state.components.calls
        return ledger


@pytest.fixture
def script() -> list[str]:
    """What the caller says, turn by turn (tests override it with parametrize)."""
    return ["I would like a checkup", "tell me a story"]


@pytest.fixture
def timers() -> dict[str, Any]:
    """Settings overrides for the call (timers, recording; tests override it with parametrize)."""
    return {}


@pytest.fixture
async def twilio_api(request: pytest.FixtureRequest) -> AsyncIterator[tuple[TwilioState, str] | None]:
    """Twilio's REST API simulated on loopback, when a test asks for it (``indirect`` parametrize)."""
    if getattr(request, "param", None) != "simulated":
        yield None
        return
    state = TwilioState(TWILIO_ACCOUNT, AUTH_TOKEN)
    async with serving(create_twilio_simulator(state), lifespan="off") as url:
        yield state, url


@pytest.fixture
async def server(
    app_settings: Settings,
    clock: FrozenClock,
    script: list[str],
    timers: dict[str, Any],
    twilio_api: tuple[TwilioState, str] | None,
) -> AsyncIterator[Server]:
    # The public URL Twilio signs must be known before the app is built: bind the port first.
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    tools = SlowTools()
    control = TwilioCallControl(TWILIO_ACCOUNT, AUTH_TOKEN, api_base_url=twilio_api[1]) if twilio_api else None
    voice = scripted_ports(script, tools, control)
    settings = dataclasses.replace(
        app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN, transfer_number="+12125550177", **timers
    )
    app = create_app(settings, clock=clock, voice=voice)
    async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
        yield Server(app, base, tools)


@contextlib.asynccontextmanager
async def dial(server: Server) -> AsyncIterator[TwilioCaller]:
    async with connect(server.media_url, additional_headers=server.signature()) as ws:
        async with TwilioCaller(ws, call_sid=CALL_SID) as caller:
            await caller.connect()
            yield caller


GREETING_MARKS = 2  # "Thank you for calling Riverside Family Clinic." "How can I help you today?"


async def hear_greeting(caller: TwilioCaller) -> None:
    await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS)


async def transcript_of(server: Server) -> list[tuple[str, str, bool]]:
    for _ in range(200):
        turns = await server.calls.transcript(CALL_SID)
        if turns:
            return [(t.role, t.text, t.truncated) for t in turns]
        await asyncio.sleep(0.02)
    return []


async def test_greeting_turn_and_stop_are_heard_and_filed(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 2)  # "You said ...", "Is there..."
        await caller.stop()
    turns = await transcript_of(server)
    assert turns == [
        ("agent", "Thank you for calling Riverside Family Clinic. How can I help you today?", False),
        ("caller", "I would like a checkup", False),
        ("agent", "You said I would like a checkup. Is there anything else?", False),
    ]
    call = await server.calls.require_call(CALL_SID)
    assert call.stream_sid == caller.stream_sid and call.end_reason == "stop"


async def test_barge_in_clears_playback_and_keeps_only_what_was_heard(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()  # "I would like a checkup"
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 2)
        await caller.say()  # "tell me a story": eight long sentences
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 4)  # two of them heard
        clears_before = caller.clears
        await caller.say(loud_ms=100, then_silence_ms=0)  # the caller talks over the story
        await caller.wait_for(lambda: caller.clears == clears_before + 1)
        await caller.stop()
    turns = await transcript_of(server)
    story = [turn for turn in turns if turn[0] == "agent" and "story" in turn[1]]
    assert len(story) == 1
    _, text, truncated = story[0]
    assert truncated, "an interrupted reply is flagged"
    assert "sentence number 1 " in text + " " and "sentence number 8" not in text
    assert caller.media_frames_received > 0


async def test_speech_cut_off_is_closed_by_the_call_not_left_to_the_garbage_collector(server: Server) -> None:
    """A sentence cut off by a barge-in, or by the hang-up, has its provider stream closed by the call
    itself. Left to the collector, asyncio's finalizer closes nested streams in no order, and an outer one
    closing an inner one the finalizer is closing too fails ("already running") with its HTTP response
    still held."""
    tts = server.app.state.components.voice.tts
    assert isinstance(tts, ScriptedTTS)
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()  # "I would like a checkup"
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 2)
        await caller.say()  # "tell me a story": eight long sentences
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 3)
        clears = caller.clears
        await caller.say(loud_ms=100, then_silence_ms=0)  # cut off mid-story
        await caller.wait_for(lambda: caller.clears == clears + 1)
        await caller.stop()
    await transcript_of(server)  # the call is filed: every task of it has ended
    gc.collect()  # whatever the call left behind is found now, and finalized
    await asyncio.sleep(0.05)
    assert tts.closed_by and "async_generator_athrow" not in tts.closed_by, tts.closed_by


@pytest.mark.parametrize("script", [["please book it", "wait"]])
async def test_a_booking_under_way_survives_barge_in(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()  # "please book it": "One moment while I book that." then the 0.3 s tool
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 1)
        await caller.say(loud_ms=60, then_silence_ms=0)  # the caller talks while the booking runs
        await caller.wait_for(lambda: server.tools.finished == ["book_appointment"], within=5)
        await caller.stop()
    turns = await transcript_of(server)
    tool_turns = [turn for turn in turns if turn[0] == "tool"]
    assert len(tool_turns) == 1 and '"booked":true' in tool_turns[0][1]


async def test_dtmf_reaches_the_agent(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.dtmf("1")
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 1)
        await caller.stop()
    turns = await transcript_of(server)
    assert ("dtmf", "1", False) in turns and ("agent", "You pressed 1.", False) in turns


async def test_a_dropped_socket_still_files_the_call(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()
        await caller.wait_for(lambda: len(caller.marks_received) >= GREETING_MARKS + 1)
        await caller.ws.close()  # no stop: the network went away
    turns = await transcript_of(server)
    assert turns[0][0] == "agent" and ("caller", "I would like a checkup", False) in turns
    call = await server.calls.require_call(CALL_SID)
    assert call.end_reason == "dropped"


async def test_malformed_frames_do_not_kill_a_healthy_call(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.ws.send("{not json")
        await caller.ws.send(b"\x00\x01binary")
        await caller.ws.send('{"event": "telepathy", "sequenceNumber": "99", "streamSid": "MZ"}')
        await caller.send("media", media={"track": "inbound", "chunk": "x", "timestamp": "1", "payload": "!!"})
        await caller.say()
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 2)
        await caller.stop()
    turns = await transcript_of(server)
    assert ("caller", "I would like a checkup", False) in turns


async def test_unsigned_and_missigned_upgrades_are_refused(server: Server) -> None:
    for headers in ({}, server.signature(token="f" * 32), server.signature(url="wss://elsewhere.test/twilio/media")):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.media_url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
    assert await server.calls.get_call(CALL_SID) is None


async def test_a_stream_that_never_starts_is_closed_as_a_policy_violation(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media_endpoint, "START_TIMEOUT_SECONDS", 0.3)
    async with connect(server.media_url, additional_headers=server.signature()) as ws:
        await ws.send('{"event": "connected", "protocol": "Call", "version": "1.0.0"}')
        with pytest.raises(Exception):  # noqa: B017 - the server closes; the exact exception is the library's
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1008


@pytest.mark.parametrize("script", [["bye"]])
async def test_the_agent_can_end_the_call(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()  # "bye"
        await caller.wait_for(lambda: server.app.state.components.sessions == set(), within=8)
    turns = await transcript_of(server)
    assert ("agent", "Goodbye, Dr. Lee will see you soon.", False) in turns
    call = await server.calls.require_call(CALL_SID)
    assert call.end_reason == "caller said goodbye"


@pytest.mark.parametrize("timers", [{"silence_seconds": 0.4, "silence_reprompts": 1}])
async def test_silence_is_reprompted_then_the_call_ends_politely(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)  # then say nothing at all
        await caller.wait_for(lambda: server.app.state.components.sessions == set(), within=8)
    turns = await transcript_of(server)
    agent_lines = [text for role, text, _ in turns if role == "agent"]
    assert agent_lines[1:] == ["Are you still there?", "I haven't heard anything, so I'll end the call now. Goodbye."]
    assert (await server.calls.require_call(CALL_SID)).end_reason == "silence"


@pytest.mark.parametrize("timers", [{"silence_seconds": 0.4, "silence_reprompts": 1}])
async def test_speaking_resets_the_silence_count(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 1)  # the re-prompt
        await caller.say()  # "I would like a checkup"
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 3)
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 4)  # re-prompted afresh
        await caller.stop()
    agent_lines = [text for role, text, _ in await transcript_of(server) if role == "agent"]
    assert agent_lines.count("Are you still there?") == 2


@pytest.mark.parametrize("timers", [{"max_call_seconds": 1.5, "silence_seconds": 30.0}])
@pytest.mark.parametrize("script", [["tell me a story"]])
async def test_the_call_ends_politely_at_its_time_limit(server: Server) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()  # a long story, cut by the time limit
        await caller.wait_for(lambda: server.app.state.components.sessions == set(), within=10)
    turns = await transcript_of(server)
    assert turns[-1][:2] == ("agent", "We've reached the time limit for this call. Please call again anytime. Goodbye.")
    story = [turn for turn in turns if turn[0] == "agent" and "story" in turn[1]]
    assert story and story[0][2], "the story was cut short"
    assert (await server.calls.require_call(CALL_SID)).end_reason == "max_duration"


@pytest.mark.parametrize("script", [["I want a person"]])
@pytest.mark.parametrize("twilio_api", ["simulated"], indirect=True)
async def test_the_agent_transfers_to_a_person_through_twilio(
    server: Server, twilio_api: tuple[TwilioState, str]
) -> None:
    state, _ = twilio_api
    state.add_call(CALL_SID)
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()
        await caller.wait_for(lambda: server.app.state.components.sessions == set(), within=8)
    [twiml] = state.calls[CALL_SID].twiml
    assert '<Dial callerId="+12125550100">+12125550177</Dial>' in twiml
    turns = await transcript_of(server)
    assert ("agent", "Let me put you through to a person.", False) in turns
    assert (await server.calls.require_call(CALL_SID)).end_reason == "transferred"


@pytest.mark.parametrize("script", [["I want a person", "I would like a checkup"]])
@pytest.mark.parametrize("twilio_api", ["simulated"], indirect=True)
async def test_a_failed_transfer_is_said_and_the_call_goes_on(server: Server) -> None:
    # The simulator does not know this call: Twilio answers 404 and the transfer fails.
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 3)
        await caller.say()
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 5)
        await caller.stop()
    agent_lines = [text for role, text, _ in await transcript_of(server) if role == "agent"]
    assert "I'm sorry, I can't put you through to a person right now. I can help you here." in agent_lines
    assert agent_lines[-1] == "You said I would like a checkup. Is there anything else?"


@pytest.mark.parametrize("script", [["I want a person"]])
async def test_without_call_control_a_transfer_is_declined_politely(server: Server) -> None:
    async with dial(server) as caller:  # no Twilio REST client configured for this server
        await hear_greeting(caller)
        await caller.say()
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 3)
        await caller.stop()
    agent_lines = [text for role, text, _ in await transcript_of(server) if role == "agent"]
    assert agent_lines[-2:] == [
        "Let me put you through to a person.",
        "I'm sorry, I can't put you through to a person right now. I can help you here.",
    ]
    assert (await server.calls.require_call(CALL_SID)).end_reason == "stop"


@pytest.mark.parametrize("timers", [{"record_calls": True, "consent_notice": "This call is recorded."}])
async def test_a_recorded_call_keeps_every_message_and_turn(server: Server, app_settings: Settings) -> None:
    async with dial(server) as caller:
        await hear_greeting(caller)
        await caller.say()
        await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 2)
        await caller.stop()
    path = app_settings.data_dir / "recordings" / f"{CALL_SID}.jsonl"
    for _ in range(100):
        if path.exists():
            break
        await asyncio.sleep(0.02)
    entries = load_recording(path)
    inbound = [orjson.loads(e["msg"])["event"] for e in entries if e.get("dir") == "in"]
    outbound = [orjson.loads(e["msg"])["event"] for e in entries if e.get("dir") == "out"]
    assert inbound[0] == "start" and inbound[-1] == "stop"
    assert inbound.count("media") == caller.chunk and inbound.count("mark") == len(caller.marks_echoed)
    assert outbound.count("media") == caller.media_frames_received
    assert outbound.count("mark") == len(caller.marks_received)
    turns = [(e["role"], e["text"]) for e in entries if e.get("event") == "turn"]
    assert ("caller", "I would like a checkup") in turns
    assert entries[-1] == {"event": "end", "reason": "stop", "t": entries[-1]["t"]}
    times = [e["t"] for e in entries]
    assert times == sorted(times)
