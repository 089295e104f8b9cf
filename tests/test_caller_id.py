"""The caller ID of a transfer to staff, for each policy: a real server and call session, twilio's REST
client against the Twilio simulator, which records the TwiML the call was updated with."""

from __future__ import annotations

import dataclasses
from typing import Any
from xml.etree import ElementTree

import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

from integrations.simulators.loopback import loopback_socket
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from integrations.twilio_rest import CallControlError, TwilioCallControl
from tests.conftest import FrozenClock, serving
from tests.twilio_caller import TwilioCaller
from tests.voice_fakes import scripted_ports
from voice_server.app import create_app
from voice_server.caller_id import TransferCallerId, policy_problem, transfer_caller_id
from voice_server.settings import Settings, SettingsError

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
ACCOUNT = "AC" + "0" * 32
CALL_SID = "CA" + "c" * 32
BUSINESS = "+12125550100"  # the example business's number, and the number the caller dialled
CUSTOMER = "+16465550199"
STAFF = "+12125550177"


async def transfer_twiml(app_settings: Settings, clock: FrozenClock, *, caller: str, **policy: Any) -> str:
    """Call the server as ``caller``, ask for a person, and return the TwiML Twilio was told to run."""
    state = TwilioState(ACCOUNT, AUTH_TOKEN)
    state.add_call(CALL_SID)
    async with serving(create_twilio_simulator(state), lifespan="off") as twilio_url:
        sock = loopback_socket()
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        control = TwilioCallControl(ACCOUNT, AUTH_TOKEN, api_base_url=twilio_url)
        settings = dataclasses.replace(
            app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN, transfer_number=STAFF, **policy
        )
        app = create_app(settings, clock=clock, voice=scripted_ports(["I want a person"], control=control))
        media_url = base.replace("http://", "ws://") + "/twilio/media"
        signature = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(media_url, {})}
        async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
            async with (
                connect(media_url, additional_headers=signature) as ws,
                TwilioCaller(ws, call_sid=CALL_SID) as call,
            ):
                await call.send("connected", protocol="Call", version="1.0.0")
                await call.send(
                    "start",
                    start={
                        "streamSid": call.stream_sid,
                        "accountSid": ACCOUNT,
                        "callSid": CALL_SID,
                        "tracks": ["inbound"],
                        "customParameters": {"call_sid": CALL_SID, "from": caller, "to": BUSINESS},
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    },
                )
                await call.wait_for(lambda: len(call.marks_echoed) >= 2)  # the greeting
                await call.say()
                await call.wait_for(lambda: app.state.components.sessions == set(), within=8)
    [twiml] = state.calls[CALL_SID].twiml
    return twiml


def dial_of(twiml: str) -> tuple[str | None, str | None]:
    dial = ElementTree.fromstring(twiml).find("Dial")
    assert dial is not None, twiml
    return dial.text, dial.get("callerId")


async def test_by_default_staff_see_the_business_number(app_settings: Settings, clock: FrozenClock) -> None:
    twiml = await transfer_twiml(app_settings, clock, caller=CUSTOMER)
    assert dial_of(twiml) == (STAFF, BUSINESS)
    assert CUSTOMER not in twiml


async def test_unmasked_caller_policy_shows_staff_the_customer(app_settings: Settings, clock: FrozenClock) -> None:
    twiml = await transfer_twiml(
        app_settings, clock, caller=CUSTOMER, transfer_caller_id=TransferCallerId.CALLER, mask_caller_number=False
    )
    assert dial_of(twiml) == (STAFF, CUSTOMER)


async def test_a_withheld_caller_is_shown_as_the_business(app_settings: Settings, clock: FrozenClock) -> None:
    """Without a callerId Twilio would pass "anonymous" on, which some carriers reject: the business's
    number is shown instead."""
    twiml = await transfer_twiml(
        app_settings, clock, caller="anonymous", transfer_caller_id=TransferCallerId.CALLER, mask_caller_number=False
    )
    assert dial_of(twiml) == (STAFF, BUSINESS)


def test_showing_the_caller_while_masking_is_refused_at_start_up() -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"VOICEBOOK_TRANSFER_CALLER_ID": "caller"})  # masking is on by default
    assert "VOICEBOOK_TRANSFER_CALLER_ID" in str(refused.value) and "VOICEBOOK_MASK_CALLER_NUMBER" in str(refused.value)
    allowed = Settings.from_env({"VOICEBOOK_TRANSFER_CALLER_ID": "caller", "VOICEBOOK_MASK_CALLER_NUMBER": "false"})
    assert (allowed.transfer_caller_id, allowed.mask_caller_number) == (TransferCallerId.CALLER, False)
    defaults = Settings.from_env({})
    assert (defaults.transfer_caller_id, defaults.mask_caller_number) == (TransferCallerId.BUSINESS, True)
    assert policy_problem(TransferCallerId.BUSINESS, mask_caller_number=True) is None


def test_the_transfer_number_is_read_in_e164_and_refused_otherwise() -> None:
    assert Settings.from_env({"VOICEBOOK_TRANSFER_NUMBER": "+1 (212) 555-0177"}).transfer_number == STAFF
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"VOICEBOOK_TRANSFER_NUMBER": "212 555 0177"})  # no country code to read it by
    assert "VOICEBOOK_TRANSFER_NUMBER: '212 555 0177'" in str(refused.value)


@pytest.mark.parametrize("shown", list(TransferCallerId))
def test_the_staff_members_own_number_is_never_the_caller_id(shown: TransferCallerId) -> None:
    # A misconfiguration: the transfer goes to the business line itself, and the customer calls from it.
    chosen = transfer_caller_id(
        shown,
        mask_caller_number=False,
        business_number=STAFF,
        called_number=BUSINESS,
        caller_number=STAFF,
        transfer_number=STAFF,
    )
    assert chosen == BUSINESS
    nothing = transfer_caller_id(
        shown,
        mask_caller_number=True,
        business_number=STAFF,
        called_number=None,
        caller_number=None,
        transfer_number=STAFF,
    )
    assert nothing is None


async def test_twilio_is_never_asked_to_dial_without_a_caller_id() -> None:
    state = TwilioState(ACCOUNT, AUTH_TOKEN)
    state.add_call(CALL_SID)
    async with serving(create_twilio_simulator(state), lifespan="off") as url:
        control = TwilioCallControl(ACCOUNT, AUTH_TOKEN, api_base_url=url)
        for caller_id in (None, STAFF):
            with pytest.raises(CallControlError) as refused:
                await control.transfer(CALL_SID, STAFF, caller_id=caller_id)
            assert refused.value.permanent
    assert state.calls[CALL_SID].twiml == []
