"""Transfer and hang-up through twilio's own REST client, against our Twilio simulator on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from xml.etree import ElementTree

import pytest

from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from integrations.twilio_rest import CallControlError, TwilioCallControl
from tests.conftest import serving

ACCOUNT = "AC" + "1" * 32
TOKEN = "2" * 32
CALL = "CA" + "3" * 32


@pytest.fixture
async def twilio() -> AsyncIterator[tuple[TwilioState, str]]:
    """The simulator served by a real uvicorn on a loopback port: the SDK speaks real HTTP to it."""
    state = TwilioState(ACCOUNT, TOKEN)
    async with serving(create_twilio_simulator(state), lifespan="off") as url:
        yield state, url


async def test_transfer_dials_the_person_showing_the_business_number(twilio: tuple[TwilioState, str]) -> None:
    state, url = twilio
    state.add_call(CALL)
    await TwilioCallControl(ACCOUNT, TOKEN, api_base_url=url).transfer(CALL, "+12125550177", caller_id="+12125550100")
    [twiml] = state.calls[CALL].twiml
    dial = ElementTree.fromstring(twiml).find("Dial")
    assert dial is not None and dial.text == "+12125550177" and dial.get("callerId") == "+12125550100"


async def test_hangup_completes_the_call(twilio: tuple[TwilioState, str]) -> None:
    state, url = twilio
    state.add_call(CALL)
    await TwilioCallControl(ACCOUNT, TOKEN, api_base_url=url).hangup(CALL)
    assert state.calls[CALL].status == "completed"


async def test_refusals_are_permanent_and_outages_transient(twilio: tuple[TwilioState, str]) -> None:
    state, url = twilio
    with pytest.raises(CallControlError) as unknown:
        await TwilioCallControl(ACCOUNT, TOKEN, api_base_url=url).hangup(CALL)  # no such call
    assert unknown.value.permanent
    state.add_call(CALL)
    with pytest.raises(CallControlError) as bad_token:
        await TwilioCallControl(ACCOUNT, "f" * 32, api_base_url=url).hangup(CALL)
    assert bad_token.value.permanent and state.calls[CALL].status == "in-progress"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(CallControlError) as unreachable:
        await TwilioCallControl(ACCOUNT, TOKEN, api_base_url=f"http://127.0.0.1:{port}").hangup(CALL)
    assert not unreachable.value.permanent
