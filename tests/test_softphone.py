"""The softphone (what `voicebook call`, the end-to-end tests and the load tests dial with) against the real
server: signed webhook, TwiML answer, signed upgrade, a continuous real-time microphone, replies heard and
timed. Providers are the scripted ones of tests/voice_fakes.py; everything else is real."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock, serving
from tests.twilio_caller import LOUD
from tests.voice_fakes import scripted_ports
from voice_server.app import create_app
from voice_server.settings import Settings
from voice_server.softphone import CallRefused, Softphone, parse_answer

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def base(app_settings: Settings, clock: FrozenClock) -> AsyncIterator[str]:
    sock = loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = dataclasses.replace(
        app_settings, public_url=url, twilio_auth_token=AUTH_TOKEN, blocked_numbers=("+16465550100",)
    )
    app = create_app(settings, clock=clock, voice=scripted_ports(["I would like a checkup", "bye"]))
    async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
        yield url


def test_the_answer_is_read_from_twiml() -> None:
    answer = parse_answer(
        '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Recorded.</Say><Connect>'
        '<Stream url="wss://x.example/twilio/media"><Parameter name="call_sid" value="CA1"/></Stream>'
        "</Connect></Response>"
    )
    assert answer.stream_url == "wss://x.example/twilio/media"
    assert answer.parameters == {"call_sid": "CA1"}
    assert answer.said == ("Recorded.",)
    with pytest.raises(CallRefused, match="not taking calls"):
        parse_answer("<Response><Say>We are not taking calls.</Say><Hangup/></Response>")


async def test_a_call_hears_the_greeting_then_a_timed_reply_and_is_filed(base: str) -> None:
    async with Softphone.dial(base, auth_token=AUTH_TOKEN, caller="+16465550199", called="+12125550100") as phone:
        greeting = await phone.wait_for_reply()
        assert greeting.latency is None and len(greeting.audio) > 4000  # half a second of speech and more
        await phone.say(LOUD * 20)
        reply = await phone.wait_for_reply()
        assert reply.latency is not None and reply.latency > 0
        assert phone.marks_echoed >= 4  # two greeting sentences, two reply sentences
        await phone.say(LOUD * 20)  # "bye": the agent says goodbye and hangs up
        await phone.wait_for_reply()
        await asyncio.wait_for(phone.closed.wait(), 10)


async def test_unsigned_and_blocked_calls_are_refused(base: str) -> None:
    with pytest.raises(CallRefused, match="403"):
        async with Softphone.dial(base, auth_token="wrong-token-0123456789abcdef", caller="+1", called="+1"):
            pass
    with pytest.raises(CallRefused):
        async with Softphone.dial(base, auth_token=AUTH_TOKEN, caller="+16465550100", called="+12125550100"):
            pass
