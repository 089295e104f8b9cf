"""Calls through the phone path, end to end, on both stacks.

The caller's words are synthesised with espeak-ng and sent as Twilio Media Streams frames in real time
by the softphone (signed webhook, signed upgrade, marks echoed as the agent's audio plays). The server is
the real app with the providers its settings choose:

- offline: pocketsphinx listening with per-question grammars, espeak-ng speaking, the dialog agent;
- production: the real Deepgram and OpenAI SDKs against our simulators on loopback (the Deepgram
  simulator detects speech and endpoints on the audio and speaks with espeak-ng, and names utterances
  with a recogniser that knows the script; the OpenAI simulator's model is the dialog agent reading the
  chat history), Twilio's REST client against the Twilio simulator.

The scenarios of one stack run as concurrent calls on one server (as a real line would see them), each
from its own number, and assert on the ledger, never on log text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from starlette.applications import Starlette

from booking.business import Business
from booking.calls import CallRecord
from booking.domain import Booking, BookingStatus
from booking.ledger.repository import CustomerDetails
from booking.service import Booked, BookingService, BookRequest
from integrations.espeak import Espeak
from integrations.simulators.deepgram import DeepgramSimConfig, create_deepgram_simulator
from integrations.simulators.dialog_policy import dialog_policy
from integrations.simulators.loopback import loopback_socket
from integrations.simulators.openai import OpenAISimConfig, create_openai_simulator
from integrations.simulators.scripted_speech import ScriptRecogniser, trim_to_voice
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from tests.conftest import FrozenClock, serving
from voice_server.app import create_app
from voice_server.components import Components
from voice_server.settings import Settings
from voice_server.softphone import Softphone

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
ACCOUNT = "AC" + "7" * 32
BUSINESS_NUMBER = "+12125550100"
NY = ZoneInfo("America/New_York")
VOICE = Espeak()

pytestmark = pytest.mark.timeout(300)


@dataclass
class Line:
    """The business's phone line: the running server and its ledger."""

    base: str
    app: Starlette
    # scenario (its task's name) -> the call SID it dialled, to show a failed scenario's own call
    dialled: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def components(self) -> Components:
        components: Components = self.app.state.components
        return components

    @property
    def service(self) -> BookingService:
        return self.components.bookings

    async def bookings_of(self, phone: str) -> list[Booking]:
        return await self.service.find_bookings(phone, upcoming_only=False)

    async def call_record(self, call_sid: str) -> CallRecord:
        for _ in range(100):  # filed a moment after the stream stops
            call = await self.components.calls.require_call(call_sid)
            if call.end_reason is not None:
                return call
            await asyncio.sleep(0.05)
        raise AssertionError(f"call {call_sid} was never filed")


UTTERANCES = (
    "I would like to make an appointment",
    "I need to make an appointment",
    "a check up",
    "a blood test",
    "tomorrow at nine o'clock",
    "monday at nine o'clock",
    "tomorrow",
    "ten o'clock",
    "monday at three p m",
    "my name is john",
    "my name is david",
    "yes",
    "that is all thank you",
    "I need to move my appointment",
    "I want to cancel my appointment",
)


@functools.cache
def audio(text: str) -> bytes:
    """What the caller says, as espeak-ng says it over the phone (trimmed to the voice)."""
    return trim_to_voice(VOICE.synthesize_mulaw(text))


@contextlib.asynccontextmanager
async def _simulators(business: Business, clock: FrozenClock) -> AsyncIterator[dict[str, Any]]:
    """The providers' simulators on loopback, and the settings that point the server at them. The
    Deepgram simulator hears with a recogniser that knows the script (how well pocketsphinx hears
    espeak-ng is the offline stack's business; here the SDKs, adapters and timing are under test) and
    speaks with espeak-ng."""
    known = {text: audio(text) for text in UTTERANCES}
    deepgram = create_deepgram_simulator(
        DeepgramSimConfig(api_key="dg-test-key"), transcribe=ScriptRecogniser(known), synthesize=_locked_espeak()
    )
    openai = create_openai_simulator(OpenAISimConfig(api_key="sk-test-key"), dialog_policy(business, clock))
    twilio = create_twilio_simulator(TwilioState(ACCOUNT, AUTH_TOKEN))
    async with (
        serving(deepgram, lifespan="off", ws="websockets-sansio") as deepgram_url,
        serving(openai, lifespan="off") as openai_url,
        serving(twilio, lifespan="off") as twilio_url,
    ):
        yield {
            "deepgram_api_key": "dg-test-key",
            "deepgram_base_url": deepgram_url,
            "openai_api_key": "sk-test-key",
            "openai_base_url": openai_url + "/v1",
            "twilio_account_sid": ACCOUNT,
            "twilio_api_base_url": twilio_url,
        }


@pytest.fixture(params=["offline", "production"])
async def line(
    request: pytest.FixtureRequest, app_settings: Settings, clock: FrozenClock, business: Business
) -> AsyncIterator[Line]:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = dataclasses.replace(
        app_settings,
        public_url=base,
        twilio_auth_token=AUTH_TOKEN,
        silence_seconds=3.0,
        silence_reprompts=1,
        transfer_number="+12125550177",
    )
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "production":
            providers = await stack.enter_async_context(_simulators(business, clock))
            settings = dataclasses.replace(settings, **providers)
            assert (settings.stt, settings.tts, settings.agent) == ("deepgram", "deepgram", "openai")
        else:
            assert (settings.stt, settings.tts, settings.agent) == ("sphinx", "espeak", "dialog")
        app = create_app(settings, clock=clock)
        await stack.enter_async_context(serving(app, sock, lifespan="on", ws="websockets-sansio"))
        yield Line(base, app)


def _locked_espeak() -> Callable[[str], bytes]:
    lock = threading.Lock()

    def synthesize(text: str) -> bytes:
        with lock:
            return VOICE.synthesize_mulaw(text)

    return synthesize


# -- the caller's side -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def dial(line: Line, caller: str) -> AsyncIterator[Softphone]:
    async with Softphone.dial(line.base, auth_token=AUTH_TOKEN, caller=caller, called=BUSINESS_NUMBER) as phone:
        task = asyncio.current_task()
        line.dialled[task.get_name() if task is not None else caller] = phone.call_sid
        await phone.wait_for_reply(within=20)  # the greeting
        yield phone


async def say(phone: Softphone, text: str) -> None:
    """Say ``text`` and wait for the agent's whole answer to play."""
    assert text in UTTERANCES, f"add {text!r} to UTTERANCES"
    await phone.say(await asyncio.to_thread(audio, text))
    await phone.wait_for_reply(within=30)


async def press(phone: Softphone, digit: str) -> None:
    await phone.press(digit)
    await phone.wait_for_reply(within=30)


def local(booking: Booking) -> str:
    return booking.start.astimezone(NY).strftime("%Y-%m-%dT%H:%M")


async def existing_booking(line: Line, phone: str, start: datetime, resource: str = "dr-lee") -> Booking:
    outcome = await line.service.book(
        BookRequest("checkup", start, CustomerDetails(phone, "Pat Doe"), resource_id=resource)
    )
    assert isinstance(outcome, Booked)
    return outcome.booking


def ny(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=NY)


# -- scenarios (each one call from its own number) ---------------------------------------------------
# The caller answers the question the agent asked, in words the offline recogniser reliably hears in
# espeak's voice at 8 kHz: each phrase was recognised 12 times out of 12 with jittered padding. It
# mishears espeak's "Thursday" and "Wednesday", and "ten" after a day as "eight" half the time, so the
# scenarios avoid them.


async def books_step_by_step(line: Line) -> None:
    caller = "+16465550101"
    async with dial(line, caller) as phone:
        await say(phone, "I would like to make an appointment")  # -> which service?
        await say(phone, "a check up")  # -> what day and time?
        await say(phone, "tomorrow at nine o'clock")  # -> Dr. Lee has ... your name?
        await say(phone, "my name is john")  # -> shall I book it?
        await say(phone, "yes")  # -> booked; anything else?
        await say(phone, "that is all thank you")  # -> goodbye, and the agent hangs up
        await asyncio.wait_for(phone.closed.wait(), 15)
    [booking] = await line.bookings_of(caller)
    assert (booking.service_id, local(booking)) == ("checkup", "2026-12-01T09:00")
    assert booking.status is BookingStatus.CONFIRMED and booking.source == "phone"
    assert booking.customer.name == "John"
    call = await line.call_record(phone.call_sid)
    assert call.end_reason not in ("dropped", "stop")


async def confirms_by_keypad(line: Line) -> None:
    caller = "+16465550102"
    async with dial(line, caller) as phone:
        await say(phone, "I need to make an appointment")
        await say(phone, "a blood test")
        await say(phone, "monday at three p m")
        await say(phone, "my name is david")
        await press(phone, "1")  # "press 1 for yes"
        await phone.hang_up()
    [booking] = await line.bookings_of(caller)
    assert (booking.service_id, local(booking)) == ("blood-test", "2026-12-07T15:00")


async def hears_alternatives_for_a_taken_slot(line: Line) -> None:
    caller = "+16465550103"
    # Monday 9:00 is taken at Dr. Lee's, the only doctor in before ten. No other scenario goes near Monday
    # morning, so the times offered are still free when the caller picks one.
    await existing_booking(line, "+16465550199", ny(7, 9), "dr-lee")
    async with dial(line, caller) as phone:
        await say(phone, "I would like to make an appointment")
        await say(phone, "a check up")
        await say(phone, "monday at nine o'clock")  # -> taken; I can do ... press 1, 2 or 3
        await press(phone, "1")  # the first alternative
        await say(phone, "my name is john")
        await say(phone, "yes")
        await phone.hang_up()
    [booking] = await line.bookings_of(caller)
    assert booking.service_id == "checkup" and local(booking) != "2026-12-07T09:00"


async def reschedules(line: Line) -> None:
    caller = "+16465550104"
    before = await existing_booking(line, caller, ny(4, 9))
    async with dial(line, caller) as phone:
        await say(phone, "I need to move my appointment")  # -> your check-up is on ...; new day and time?
        await say(phone, "monday at three p m")  # -> move it from ... to ...?
        await say(phone, "yes")
        await phone.hang_up()
    [after] = await line.bookings_of(caller)
    assert after.id == before.id and local(after) == "2026-12-07T15:00"


async def cancels(line: Line) -> None:
    caller = "+16465550105"
    booking = await existing_booking(line, caller, ny(4, 10))
    async with dial(line, caller) as phone:
        await say(phone, "I want to cancel my appointment")  # -> cancel your check-up on ...?
        await say(phone, "yes")
        await phone.hang_up()
    assert (await line.service.get_booking(booking.id)).status is BookingStatus.CANCELLED


async def barges_in(line: Line) -> None:
    caller = "+16465550106"
    async with dial(line, caller) as phone:
        await say(phone, "I would like to make an appointment")
        await say(phone, "a check up")
        # A day without a time: the agent reads out that day's free times, and the caller cuts in.
        await phone.say(await asyncio.to_thread(audio, "tomorrow"))
        await phone.wait_for_speech(within=30)
        await asyncio.sleep(1.0)
        await say(phone, "ten o'clock")
        await phone.hang_up()
    call = await line.call_record(phone.call_sid)
    assert phone.clears >= 1
    turns = await line.components.calls.transcript(call.call_sid)
    assert any(t.role == "agent" and t.truncated for t in turns)
    assert await line.bookings_of(caller) == []  # nothing was booked without a yes


async def hangs_up_on_silence(line: Line) -> None:
    caller = "+16465550107"
    async with dial(line, caller) as phone:
        await asyncio.wait_for(phone.closed.wait(), 30)  # a re-prompt, then a goodbye
    call = await line.call_record(phone.call_sid)
    assert call.end_reason == "silence"


SCENARIOS: list[Callable[[Line], Awaitable[None]]] = [
    books_step_by_step,
    confirms_by_keypad,
    hears_alternatives_for_a_taken_slot,
    reschedules,
    cancels,
    barges_in,
    hangs_up_on_silence,
]


async def test_calls_book_reschedule_cancel_barge_in_and_hang_up(line: Line) -> None:
    tasks = [asyncio.create_task(scenario(line), name=scenario.__name__) for scenario in SCENARIOS]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failed = {s.__name__: repr(o) for s, o in zip(SCENARIOS, outcomes, strict=True) if isinstance(o, BaseException)}
    # What each failed call heard and did, to tell a misheard word from a logic error; only the failed
    # calls, so the message is short enough to survive a CI log's truncation.
    heard = {
        name: [(t.role, t.text[:80]) for t in await line.components.calls.transcript(line.dialled[name])]
        for name in failed
        if name in line.dialled
    }
    assert not failed, (failed, heard)
