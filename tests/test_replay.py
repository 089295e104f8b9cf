"""Record and replay: calls recorded by the real server, replayed against a real server, differences found.

The committed recordings (tests/recordings/*.jsonl) are calls made in-process with the scripted providers
of tests/voice_fakes.py and a Twilio-like client (tests/twilio_caller.py). ``test_recording_is_current``
records each scenario afresh and checks the committed file still describes the same call; to rewrite the
committed files (after a deliberate change of behaviour) run::

    VOICEBOOK_REGENERATE_RECORDINGS=1 .venv/bin/python -m pytest -q tests/test_replay.py -k recording_is_current
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import uuid
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

from booking.reports.pipeline import open_spool
from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock, serving
from tests.twilio_caller import TwilioCaller
from tests.voice_fakes import ScriptedAgent, ScriptedSTT, ScriptedTTS
from voice_server.app import create_app
from voice_server.audio import mulaw_to_pcm16
from voice_server.cli import main
from voice_server.ports import Agent, AgentEvent, CallInfo, TextDelta, ToolCall, ToolSpec, Turn, VoicePorts
from voice_server.recording import RecordedCall, RecordedTurn, read_call
from voice_server.replay import (
    CallSummary,
    Difference,
    ReplayOptions,
    ToolUse,
    diff_calls,
    plan_replay,
    recorded_summary,
    replay,
)
from voice_server.settings import Settings
from voice_server.wav import write_wav

RECORDINGS = Path(__file__).parent / "recordings"
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
GREETING_MARKS = 2


class FreshIdTools:
    """Books every time with a new booking id, as the real booking service does."""

    specs: Sequence[ToolSpec] = ()

    async def run(self, call: ToolCall, info: CallInfo) -> Mapping[str, Any]:
        await asyncio.sleep(0.05)
        return {
            "status": "booked",
            "booking_id": f"bk-{uuid.uuid4().hex[:12]}",
            "service_name": "Checkup",
            "start": "2026-12-01T10:00",
            "spoken": "Tuesday, December 1 at 10 AM",
        }


class ChangedAgent:
    """The scripted agent with other words after a booking: a changed agent the replay must notice."""

    def __init__(self) -> None:
        self._base = ScriptedAgent()

    async def respond(self, conversation: Sequence[Turn], call: CallInfo) -> AsyncIterator[AgentEvent]:
        if conversation[-1].role == "tool":
            yield TextDelta("All done. Anything else?")
            return
        async for event in self._base.respond(conversation, call):
            yield event


# -- a server with scripted providers ---------------------------------------------------------------


@dataclasses.dataclass
class VoiceServer:
    base: str
    settings: Settings

    @property
    def media_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/twilio/media"

    def options(self, speed: float = 4.0) -> ReplayOptions:
        return ReplayOptions(url=self.media_url, auth_token=AUTH_TOKEN, speed=speed)


@contextlib.asynccontextmanager
async def voice_server(
    app_settings: Settings, clock: FrozenClock, script: list[str], agent: Agent | None = None, **overrides: Any
) -> AsyncIterator[VoiceServer]:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ports = VoicePorts(stt=ScriptedSTT(script), agent=agent or ScriptedAgent(), tts=ScriptedTTS(), tools=FreshIdTools())
    settings = dataclasses.replace(app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN, **overrides)
    async with serving(create_app(settings, clock=clock, voice=ports), sock, lifespan="on", ws="websockets-sansio"):
        yield VoiceServer(base, settings)


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def caller_script(call: RecordedCall) -> list[str]:
    """What the scripted recogniser must "hear" to replay ``call``: its caller lines, in order."""
    return [turn.text for turn in call.turns if turn.role == "caller"]


# -- the scenarios the committed recordings come from ---------------------------------------------


async def speak(caller: TwilioCaller) -> None:
    """0.4 s of speech and 0.3 s of silence (ending the turn), frames in real time as Twilio sends them."""
    await caller.say(loud_ms=400, then_silence_ms=300, pace=0.02)


async def _echoed(caller: TwilioCaller, count: int, within: float = 8.0) -> None:
    await caller.wait_for(lambda: len(caller.marks_echoed) >= count, within=within)


async def booking_call(caller: TwilioCaller) -> None:
    await _echoed(caller, GREETING_MARKS)
    await speak(caller)  # "please book a checkup": a line, the booking, two lines
    await _echoed(caller, GREETING_MARKS + 3)
    await speak(caller)  # "bye": the agent says goodbye and hangs up
    await caller.wait_for(lambda: caller.closed_with is not None, within=8)


async def barge_in_call(caller: TwilioCaller) -> None:
    await _echoed(caller, GREETING_MARKS)
    await speak(caller)  # "I would like a checkup"
    await _echoed(caller, GREETING_MARKS + 2)
    await speak(caller)  # "tell me a story": eight sentences
    await _echoed(caller, GREETING_MARKS + 4)  # two of them heard
    await speak(caller)  # "that is enough", over the third
    await caller.wait_for(lambda: caller.clears == 1)
    # Counted when the clear arrived: the reply's marks can follow it before this coroutine wakes.
    heard = caller.marks_at_clear[0]
    await _echoed(caller, heard + 2)  # "You said that is enough." "Is there anything else?"
    await caller.stop()


async def dtmf_call(caller: TwilioCaller) -> None:
    await _echoed(caller, GREETING_MARKS)
    await caller.dtmf("1")
    await _echoed(caller, GREETING_MARKS + 1)
    await caller.dtmf("#")
    await _echoed(caller, GREETING_MARKS + 2)
    await caller.stop()


Scenario = Callable[[TwilioCaller], Awaitable[None]]
SCENARIOS: dict[str, tuple[list[str], Scenario]] = {
    "booking": (["please book a checkup", "bye"], booking_call),
    "barge_in": (["I would like a checkup", "tell me a story", "that is enough"], barge_in_call),
    "dtmf": ([], dtmf_call),
}


async def record(name: str, app_settings: Settings, clock: FrozenClock) -> Path:
    """Make the call of scenario ``name`` against a recording server; returns the recording's path."""
    script, scenario = SCENARIOS[name]
    call_sid = "CA" + uuid.uuid5(uuid.NAMESPACE_URL, f"voicebook-{name}").hex
    recording_on = {"record_calls": True, "consent_notice": "This call is recorded."}
    async with voice_server(app_settings, clock, script, None, **recording_on) as server:
        signature = RequestValidator(AUTH_TOKEN).compute_signature(server.media_url, {})
        async with connect(server.media_url, additional_headers={"X-Twilio-Signature": signature}) as ws:
            async with TwilioCaller(ws, call_sid=call_sid, stream_sid="MZ" + uuid.uuid4().hex) as caller:
                await caller.connect()
                await scenario(caller)
        path = app_settings.data_dir / "recordings" / f"{call_sid}.jsonl"
        await eventually(path.exists)  # written once the call is filed
    return path


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_recording_is_current(name: str, app_settings: Settings, clock: FrozenClock) -> None:
    fresh = read_call(await record(name, app_settings, clock))
    committed_path = RECORDINGS / f"{name}.jsonl"
    if os.environ.get("VOICEBOOK_REGENERATE_RECORDINGS") == "1":
        RECORDINGS.mkdir(exist_ok=True)
        # Committed opened: the spool is sealed with this run's test keys, the committed file must not be.
        _, lines = open_spool((app_settings.data_dir / "recordings" / f"{fresh.call_sid}.jsonl").read_bytes())
        committed_path.write_bytes(b"".join(line + b"\n" for line in lines))
    committed = read_call(committed_path)
    assert diff_calls(recorded_summary(committed), recorded_summary(fresh)) == []
    assert committed_path.stat().st_size < 300_000


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_replaying_a_recording_reproduces_the_call(name: str, app_settings: Settings, clock: FrozenClock) -> None:
    call = read_call(RECORDINGS / f"{name}.jsonl")
    async with voice_server(app_settings, clock, caller_script(call)) as server:
        report = await replay(call, server.options(speed=4), server.settings.effective_database_url)
    assert report.differences == [], report.render()
    assert report.outcome.call_sid != call.call_sid and report.outcome.call_sid.startswith("CA")
    assert report.actual.lines == report.expected.lines and report.expected.lines
    assert report.outcome.clears == report.expected.clears


def replay_argv(call_file: Path, server: VoiceServer, *extra: str) -> list[str]:
    return [
        "replay",
        str(call_file),
        "--url",
        server.media_url,
        "--auth-token",
        AUTH_TOKEN,
        "--database-url",
        server.settings.effective_database_url,
        *extra,
    ]


async def test_the_command_exits_0_when_the_server_behaves_as_recorded(
    app_settings: Settings, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    path = RECORDINGS / "booking.jsonl"
    async with voice_server(app_settings, clock, caller_script(read_call(path))) as server:
        # The command runs its own event loop, so it runs in a thread beside the server's.
        status = await asyncio.to_thread(main, replay_argv(path, server, "--speed", "4"))
    assert status == 0
    assert "no differences" in capsys.readouterr().out


async def test_a_changed_agent_is_reported_with_exit_code_1(
    app_settings: Settings, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    path = RECORDINGS / "booking.jsonl"
    async with voice_server(app_settings, clock, caller_script(read_call(path)), agent=ChangedAgent()) as server:
        status = await asyncio.to_thread(main, replay_argv(path, server, "--speed", "4"))
    out = capsys.readouterr().out
    assert status == 1
    assert "1 difference(s):" in out
    assert "transcript: expected agent 'You are booked. Anything else?'; got agent 'All done. Anything else?'" in out


async def test_a_refused_or_unreachable_server_exits_2(
    app_settings: Settings, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    path = RECORDINGS / "dtmf.jsonl"
    async with voice_server(app_settings, clock, []) as server:
        wrong_token = replay_argv(path, server)
        wrong_token[wrong_token.index(AUTH_TOKEN)] = "f" * 32
        assert await asyncio.to_thread(main, wrong_token) == 2
        assert "403" in capsys.readouterr().err
    assert await asyncio.to_thread(main, replay_argv(path, server)) == 2  # the server has gone
    assert "cannot open" in capsys.readouterr().err
    assert main(["replay", str(path.with_name("missing.jsonl")), "--url", server.media_url]) == 2


def caller_span(call: RecordedCall, sent: Sequence[tuple[float, float]]) -> float:
    """Replay seconds between the first and last message of the longest stretch the caller sent without
    waiting for the agent (one anchor): the part of a replay ``speed`` governs."""
    steps = plan_replay(call, call_sid="CA", stream_sid="MZ")
    stretches: dict[int, list[float]] = {}
    for step, (_, at) in zip(steps, sent, strict=True):
        stretches.setdefault(step.anchor, []).append(at)
    longest = max(stretches.values(), key=len)
    return longest[-1] - longest[0]


async def test_speed_compresses_the_callers_timing(app_settings: Settings, clock: FrozenClock) -> None:
    call = read_call(RECORDINGS / "booking.jsonl")
    async with voice_server(app_settings, clock, caller_script(call)) as server:
        slow = await replay(call, server.options(speed=1), server.settings.effective_database_url)
        fast = await replay(call, server.options(speed=4), server.settings.effective_database_url)
    assert slow.differences == [] and fast.differences == []
    # Four times faster in theory; a loaded machine only slows the fast run's sleeps down, so ask for half.
    assert caller_span(call, slow.outcome.sent) > 2 * caller_span(call, fast.outcome.sent)


def test_a_plan_resends_the_callers_side_under_new_sids() -> None:
    call = read_call(RECORDINGS / "dtmf.jsonl")
    steps = plan_replay(call, call_sid="CAnew", stream_sid="MZnew")
    messages = [step.message for step in steps]
    assert all(isinstance(message, dict) for message in messages)
    events = [message["event"] for message in messages if isinstance(message, dict)]
    assert events == ["connected", "start", "dtmf", "dtmf", "stop"]  # recorded mark echoes are not re-sent
    start = messages[1]
    assert isinstance(start, dict)
    assert start["streamSid"] == "MZnew" and start["start"]["callSid"] == "CAnew"
    assert start["start"]["customParameters"]["call_sid"] == "CAnew"
    assert call.call_sid not in str(messages) and "sequenceNumber" not in str(messages)
    # Each DTMF waits for the echo of the agent's last mark before it: the greeting's second, then "You pressed 1."
    assert [step.anchor for step in steps] == [0, 0, 2, 3, 4]


# -- diff_calls ------------------------------------------------------------------------------------


def booked(booking_id: str, start: str = "2026-12-01T10:00") -> str:
    return (
        f'{{"id":"call-1","arguments":{{"service":"checkup"}},"result":{{"status":"booked",'
        f'"booking_id":"{booking_id}","start":"{start}"}}}}'
    )


def cancelled(booking_id: str) -> str:
    return f'{{"id":"call-2","arguments":{{"booking_id":"{booking_id}"}},"result":{{"status":"cancelled"}}}}'


def summary(*turns: tuple[str, ...], clears: int = 0, end: str | None = "stop") -> CallSummary:
    """A call from (role, text) and ("tool", body, tool name) tuples."""
    recorded = [RecordedTurn(turn[0], turn[1], tool=turn[2] if len(turn) > 2 else None) for turn in turns]
    return CallSummary.from_turns(recorded, clears=clears, end_reason=end)


CALL = (
    ("agent", "Hello."),
    ("caller", "book me in"),
    ("tool", booked("bk-1"), "book_appointment"),
    ("agent", "Booked: your reference is bk-1."),
    ("caller", "actually cancel it"),
    ("tool", cancelled("bk-1"), "cancel_appointment"),
)


def test_a_replay_that_matches_has_no_differences_even_with_new_booking_ids() -> None:
    renamed = tuple((t[0], t[1].replace("bk-1", "bk-99"), *t[2:]) for t in CALL)
    assert diff_calls(summary(*CALL), summary(*renamed)) == []


def test_changed_lines_tool_calls_results_barge_ins_and_endings_are_each_reported() -> None:
    changed = list(CALL)
    changed[3] = ("agent", "Done.")
    changed[5] = ("tool", cancelled("bk-2"), "cancel_appointment")  # not the booking just made
    changed[2] = ("tool", booked("bk-1", start="2026-12-01T11:00"), "book_appointment")
    differences = diff_calls(summary(*CALL), summary(*changed, clears=1, end="dropped"))
    assert differences == [
        Difference("transcript", "agent 'Booked: your reference is <booking 1>.'", "agent 'Done.'"),
        Difference(
            "tool_result",
            'book_appointment -> {"booking_id":"<booking 1>","start":"2026-12-01T10:00","status":"booked"}',
            '{"booking_id":"<booking 1>","start":"2026-12-01T11:00","status":"booked"}',
        ),
        Difference(
            "tool_call",
            'cancel_appointment({"booking_id":"<booking 1>"})',
            'cancel_appointment({"booking_id":"<booking 2>"})',
        ),
        Difference("barge_ins", "0 clear(s)", "1 clear(s)"),
        Difference("end", "'stop'", "'dropped'"),
    ]


def test_missing_and_extra_turns_are_reported_against_nothing() -> None:
    shorter = summary(*CALL[:2])
    differences = diff_calls(summary(*CALL), shorter)
    assert Difference("transcript", "agent 'Booked: your reference is <booking 1>.'", "nothing") in differences
    assert Difference("tool_call", 'book_appointment({"service":"checkup"})', "no call") in differences
    assert Difference("transcript", "nothing", "caller 'book me in'") in diff_calls(summary(*CALL[:1]), shorter)


def test_a_cut_off_line_differs_from_a_whole_one() -> None:
    whole = CallSummary((("agent", "One. Two.", False),), (), 0, "stop")
    cut = CallSummary((("agent", "One. Two.", True),), (), 0, "stop")
    assert diff_calls(whole, cut) == [Difference("transcript", "agent 'One. Two.'", "agent 'One. Two.' (cut off)")]
    assert (
        diff_calls(whole, dataclasses.replace(whole, tools=(ToolUse("end_call", None, "bye"),)))[0].kind == "tool_call"
    )


# -- WAV -------------------------------------------------------------------------------------------


def nonzero_samples(call: RecordedCall, direction: str) -> int:
    total = 0
    for message in call.messages:
        parsed = message.json()
        if message.direction == direction and parsed is not None and parsed.get("event") == "media":
            total += int(np.count_nonzero(mulaw_to_pcm16(base64.b64decode(parsed["media"]["payload"]))))
    return total


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_wav_holds_both_legs_on_the_recordings_clock(name: str, tmp_path: Path) -> None:
    call = read_call(RECORDINGS / f"{name}.jsonl")
    out = tmp_path / "call.wav"
    frames = write_wav(call, out)
    with wave.open(str(out), "rb") as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 8000, 2)
        assert wav.getnframes() == frames == round(call.duration * 8000)
        samples = np.frombuffer(wav.readframes(frames), dtype="<i2").reshape(-1, 2)
    caller, agent = (int(np.count_nonzero(samples[:, channel])) for channel in (0, 1))
    assert caller == nonzero_samples(call, "in")  # every caller frame, once
    clears = sum(1 for message in call.outbound if message.event == "clear")
    if clears:  # what was cleared from Twilio's buffer was never heard
        assert 0 < agent < nonzero_samples(call, "out")
    else:
        assert agent == nonzero_samples(call, "out")


def test_the_command_renders_a_wav_without_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "booking.wav"
    assert main(["replay", str(RECORDINGS / "booking.jsonl"), "--wav", str(out)]) == 0
    with wave.open(str(out), "rb") as wav:
        assert wav.getnchannels() == 2
    assert "caller left, agent right" in capsys.readouterr().out
