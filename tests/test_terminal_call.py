"""`voicebook call` against the server on its offline defaults (pocketsphinx, espeak-ng, the dialog):
typed lines are spoken into the call, the agent's words come back from the calls API, and the call
books. This is the README's "place a test call" path."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from booking.service import BookingService
from integrations.espeak import Espeak
from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock, serving
from voice_server.app import create_app
from voice_server.settings import Settings
from voice_server.terminal_call import CallOptions, place_call

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"

pytestmark = pytest.mark.timeout(180)  # a whole call in real time: about 50 s, longer on a loaded machine


async def test_a_typed_call_books_and_prints_what_the_agent_said(app_settings: Settings, clock: FrozenClock) -> None:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = dataclasses.replace(app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN)
    app = create_app(settings, clock=clock)
    printed: list[str] = []
    async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
        turns = await place_call(
            CallOptions(base, AUTH_TOKEN, settings.admin_token, caller="+16465550111", called="+12125550100"),
            synthesize=Espeak().synthesize_mulaw,
            script=[
                "I would like to make an appointment",
                "a check up",
                "tomorrow at nine o'clock",
                "my name is john",
                "yes",
            ],
            out=printed.append,
        )
        service: BookingService = app.state.components.bookings
        [booking] = await service.find_bookings("+16465550111")
        async with httpx.AsyncClient(base_url=base) as http:
            unauthorised = await http.get("/api/calls/CA0123")  # no admin token
    assert booking.service_id == "checkup" and booking.customer.name == "John"
    assert printed[0].startswith("calling +12125550100 from +16465550111")
    assert any(line.startswith("agent: Thank you for calling Riverside Family Clinic") for line in printed)
    assert any("You're booked" in line for line in printed)
    assert printed[-1] == "call ended"
    roles = [turn["role"] for turn in turns]
    assert roles[0] == "agent" and "caller" in roles and "tool" in roles
    assert unauthorised.status_code == 401
