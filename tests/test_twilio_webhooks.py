"""Twilio's webhooks through the real app: signatures over the configured public URL, TwiML answers,
calls in the ledger, and status callbacks that never apply twice."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from xml.etree import ElementTree

import httpx
import pytest
from starlette.applications import Starlette
from twilio.request_validator import RequestValidator

from booking.calls import CallStatus
from booking.ledger.numbers_repository import NumberFacts, NumberRegistry, NumberType
from tests.conftest import FrozenClock, running_app
from voice_server.settings import Settings

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
PUBLIC = "https://voice.example.test"
CALL = {
    "CallSid": "CA0123456789abcdef0123456789abcdef",
    "AccountSid": "AC0123456789abcdef0123456789abcdef",
    "From": "+16465550199",
    "To": "+12125550100",
    "CallStatus": "ringing",
    "Direction": "inbound",
    "ApiVersion": "2010-04-01",
    "CallerName": "",
    "FromCity": "NEW YORK",
    "ToState": "NY",
}

App = tuple[Starlette, httpx.AsyncClient]


@pytest.fixture
def twilio_settings(app_settings: Settings) -> Settings:
    return dataclasses.replace(app_settings, public_url=PUBLIC, twilio_auth_token=AUTH_TOKEN)


@pytest.fixture
async def app(twilio_settings: Settings, clock: FrozenClock) -> AsyncIterator[App]:
    async with running_app(twilio_settings, clock) as running:
        yield running


def signed(path: str, params: dict[str, str], *, token: str = AUTH_TOKEN, base: str = PUBLIC) -> dict[str, str]:
    signature = RequestValidator(token).compute_signature(base + path, params)
    return {"X-Twilio-Signature": signature}


async def post(client: httpx.AsyncClient, path: str, params: dict[str, str], **kwargs: str) -> httpx.Response:
    return await client.post(path, data=params, headers=signed(path, params, **kwargs))


def parse(xml: str) -> ElementTree.Element:
    return ElementTree.fromstring(xml)


async def test_a_signed_call_is_recorded_and_connected_to_the_media_stream(app: App) -> None:
    application, client = app
    response = await post(client, "/twilio/voice", CALL)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/xml")
    root = parse(response.text)
    stream = root.find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://voice.example.test/twilio/media"
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert parameters == {"call_sid": CALL["CallSid"], "from": "+16465550199", "to": "+12125550100"}
    assert root.find("Say") is None, "no notice unless one is configured"
    call = await application.state.components.calls.require_call(CALL["CallSid"])
    assert (call.status, call.from_number, call.refused_reason) == (CallStatus.RINGING, "+16465550199", None)


async def test_twilio_retrying_the_webhook_records_one_call(app: App) -> None:
    application, client = app
    for _ in range(3):
        assert (await post(client, "/twilio/voice", CALL)).status_code == 200
    events = await application.state.components.calls.status_events(CALL["CallSid"])
    assert events == []  # the webhook records the call; status callbacks record events
    assert (await application.state.components.calls.require_call(CALL["CallSid"])).status is CallStatus.RINGING


async def test_unsigned_missigned_and_proxy_url_signatures_are_refused(app: App) -> None:
    application, client = app
    unsigned = await client.post("/twilio/voice", data=CALL)
    wrong_token = await post(client, "/twilio/voice", CALL, token="f" * 32)
    # Signed for the URL a proxy would report, not the public one Twilio was given.
    proxy_url = await post(client, "/twilio/voice", CALL, base="http://voicebook.test")
    tampered = await client.post(
        "/twilio/voice", data={**CALL, "From": "+15555550123"}, headers=signed("/twilio/voice", CALL)
    )
    assert [r.status_code for r in (unsigned, wrong_token, proxy_url, tampered)] == [403, 403, 403, 403]
    assert await application.state.components.calls.get_call(CALL["CallSid"]) is None


async def test_the_query_string_is_part_of_what_is_signed(app: App) -> None:
    _, client = app
    path = "/twilio/voice?tenant=clinic"
    good = await client.post(path, data=CALL, headers=signed(path, CALL))
    assert good.status_code == 200
    bad = await client.post(path, data=CALL, headers=signed("/twilio/voice", CALL))
    assert bad.status_code == 403


async def test_consent_notice_is_spoken_before_the_stream(twilio_settings: Settings, clock: FrozenClock) -> None:
    notice = "This call may be recorded to help us book your appointment."
    async with running_app(dataclasses.replace(twilio_settings, consent_notice=notice), clock) as (_, client):
        root = parse((await post(client, "/twilio/voice", CALL)).text)
    assert [child.tag for child in root] == ["Say", "Connect"]
    assert root.find("Say").text == notice  # type: ignore[union-attr]


async def test_blocked_callers_and_unknown_numbers_get_a_polite_refusal(
    twilio_settings: Settings, clock: FrozenClock
) -> None:
    settings = dataclasses.replace(twilio_settings, blocked_numbers=("+16465550199",))
    async with running_app(settings, clock) as (application, client):
        blocked = parse((await post(client, "/twilio/voice", CALL)).text)
        other = {**CALL, "CallSid": "CA" + "1" * 32, "From": "+16465550100", "To": "+13125550100"}
        unknown = parse((await post(client, "/twilio/voice", other)).text)
        calls = application.state.components.calls
        assert (await calls.require_call(CALL["CallSid"])).refused_reason == "blocked_caller"
        assert (await calls.require_call(other["CallSid"])).refused_reason == "unknown_number"
    for root in (blocked, unknown):
        assert [child.tag for child in root] == ["Say", "Hangup"]
        assert root.find("Connect") is None


def status(value: str, sequence: int, **extra: str) -> dict[str, str]:
    return {
        **CALL,
        "CallStatus": value,
        "SequenceNumber": str(sequence),
        "Timestamp": "Tue, 01 Dec 2026 15:00:00 +0000",
        **extra,
    }


async def test_status_callbacks_move_the_call_forward_once(app: App) -> None:
    application, client = app
    calls = application.state.components.calls
    await post(client, "/twilio/voice", CALL)
    for params in (status("in-progress", 1), status("completed", 2, CallDuration="93")):
        assert (await post(client, "/twilio/call-status", params)).status_code == 204
    call = await calls.require_call(CALL["CallSid"])
    assert (call.status, call.duration_seconds) == (CallStatus.COMPLETED, 93)
    # Replayed, and late out-of-order callbacks change nothing.
    assert (await post(client, "/twilio/call-status", status("completed", 2, CallDuration="93"))).status_code == 204
    assert (await post(client, "/twilio/call-status", status("ringing", 0))).status_code == 204
    after = await calls.require_call(CALL["CallSid"])
    assert after.status is CallStatus.COMPLETED and after.ended_at == call.ended_at
    recorded = {(s, n) for s, n, _ in await calls.status_events(CALL["CallSid"])}
    assert recorded == {("in-progress", 1), ("completed", 2), ("ringing", 0)}, "each distinct callback once"


async def test_a_callback_for_a_call_we_never_saw_creates_it(app: App) -> None:
    application, client = app
    assert (await post(client, "/twilio/call-status", status("no-answer", 3))).status_code == 204
    call = await application.state.components.calls.require_call(CALL["CallSid"])
    assert call.status is CallStatus.NO_ANSWER and call.ended_at is not None


async def test_malformed_callbacks_are_refused(app: App) -> None:
    _, client = app
    assert (await post(client, "/twilio/call-status", status("exploded", 1))).status_code == 400
    assert (await post(client, "/twilio/call-status", {"CallStatus": "completed"})).status_code == 400
    unsigned = await client.post("/twilio/call-status", data=status("completed", 1))
    assert unsigned.status_code == 403


async def test_the_development_switch_skips_signatures(twilio_settings: Settings, clock: FrozenClock) -> None:
    settings = dataclasses.replace(twilio_settings, skip_twilio_signature=True)
    async with running_app(settings, clock) as (_, client):
        assert (await client.post("/twilio/voice", data=CALL)).status_code == 200


async def test_without_an_auth_token_every_webhook_is_refused(app_settings: Settings, clock: FrozenClock) -> None:
    async with running_app(dataclasses.replace(app_settings, public_url=PUBLIC), clock) as (_, client):
        assert (await post(client, "/twilio/voice", CALL)).status_code == 403


async def test_a_call_to_a_registered_number_is_answered_and_to_an_unknown_one_refused(app: App) -> None:
    """Calls are routed by the number they came to: the business's configured phone, or a number in the
    registry (``voicebook numbers``); any other number is not ours."""
    application, client = app
    registry = NumberRegistry(application.state.components.database)
    second_line = "+12125550111"
    await registry.upsert(NumberFacts(second_line, "PN" + "1" * 32, "US", NumberType.LOCAL, True, True, False))
    answered = {**CALL, "CallSid": "CA" + "3" * 32, "To": second_line}
    stranger = {**CALL, "CallSid": "CA" + "4" * 32, "To": "+12125550122"}
    assert parse((await post(client, "/twilio/voice", answered)).text).find("./Connect/Stream") is not None
    assert parse((await post(client, "/twilio/voice", stranger)).text).find("./Connect") is None
    calls = application.state.components.calls
    assert (await calls.require_call(answered["CallSid"])).refused_reason is None
    assert (await calls.require_call(stranger["CallSid"])).refused_reason == "unknown_number"
