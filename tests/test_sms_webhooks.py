"""Texts through the real app and the Messages simulator: signed inbound keywords change the opt-out
list the SMS effect consults, HELP is answered, and signed delivery receipts move each message forward
only, once."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from xml.etree import ElementTree

import httpx
import pytest
from starlette.applications import Starlette
from twilio.request_validator import RequestValidator

from booking.ledger.sms_repository import SmsLedger
from booking.outbox import Effect, EffectStatus, Outbox
from integrations.simulators.twilio_messages import MessagesState, Outcome, create_twilio_messages_simulator
from tests.conftest import FrozenClock, running_app, serving
from voice_server.settings import Settings

ACCOUNT = "AC" + "5" * 32
TOKEN = "0123456789abcdef0123456789abcdef"
PUBLIC = "https://voice.example.test"
OUR_NUMBER = "+12125550100"
CUSTOMER = "+12125550142"
BOOKING = {"service": "checkup", "customer": {"phone": "(212) 555-0142", "name": "Alice"}}
STARTS = ("2026-12-01T10:00", "2026-12-01T11:00", "2026-12-01T14:00", "2026-12-02T10:00")

Running = tuple[Starlette, httpx.AsyncClient, MessagesState]


@pytest.fixture
async def running(app_settings: Settings, clock: FrozenClock) -> AsyncIterator[Running]:
    messages = MessagesState(ACCOUNT, TOKEN)
    async with serving(create_twilio_messages_simulator(messages), lifespan="on") as twilio_url:
        settings = dataclasses.replace(
            app_settings,
            public_url=PUBLIC,
            twilio_account_sid=ACCOUNT,
            twilio_auth_token=TOKEN,
            twilio_api_base_url=twilio_url,
            twilio_sms_from=OUR_NUMBER,
        )
        async with running_app(settings, clock) as (app, client):
            # Receipts and injected texts reach the app in-process, at the public URL Twilio signs.
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC) as to_app:
                messages.callback_client = to_app
                try:
                    yield app, client, messages
                finally:
                    await messages.aclose()
                    messages.callback_client = None


def ledger(app: Starlette) -> SmsLedger:
    return SmsLedger(app.state.components.database)


async def book(client: httpx.AsyncClient, start: str, key: str) -> str:
    response = await client.post(
        "/api/bookings",
        json=BOOKING | {"start": start},
        headers={"Authorization": "Bearer test-admin-token-0123456789", "Idempotency-Key": key},
    )
    assert response.status_code == 201, response.text
    booking_id: str = response.json()["id"]
    return booking_id


async def confirmation(app: Starlette, booking_id: str) -> Effect:
    """The booking's confirmation effect once it has finished (done or dead)."""
    outbox = Outbox(app.state.components.database)
    for _ in range(500):
        for effect in await outbox.for_booking(booking_id):
            if effect.kind == "sms.confirmation" and effect.status in (EffectStatus.DONE, EffectStatus.DEAD):
                return effect
        await asyncio.sleep(0.02)
    raise AssertionError(f"the confirmation of {booking_id} did not finish")


async def inbound(messages: MessagesState, body: str) -> httpx.Response:
    return await messages.inject_inbound(CUSTOMER, OUR_NUMBER, body, PUBLIC + "/twilio/sms")


def message_text(response: httpx.Response) -> str | None:
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/xml")
    root = ElementTree.fromstring(response.text)
    assert root.tag == "Response"
    found = root.find("Message")
    return None if found is None else found.text


async def test_stop_suppresses_the_next_confirmation_and_start_lifts_it(running: Running) -> None:
    app, client, messages = running
    assert message_text(await inbound(messages, " stop ")) is None  # Twilio's Advanced Opt-Out replies itself
    suppression = await ledger(app).suppression(CUSTOMER)
    assert suppression is not None and (suppression.opted_out, suppression.keyword) == (True, "STOP")

    first = await confirmation(app, await book(client, STARTS[0], "k1"))
    assert first.status is EffectStatus.DONE  # suppressed is an expected outcome, not a failure
    assert messages.sent_to(CUSTOMER) == [] and messages.requests == 0

    assert message_text(await inbound(messages, "START")) is None
    assert not await ledger(app).is_suppressed(CUSTOMER)
    second = await confirmation(app, await book(client, STARTS[1], "k2"))
    assert second.status is EffectStatus.DONE
    [sent] = messages.sent_to(CUSTOMER)
    assert "Alice" in sent.body
    [recorded] = await ledger(app).messages_to(CUSTOMER)
    assert (recorded.message_sid, recorded.effect_key) == (sent.sid, second.idempotency_key)


async def test_help_is_answered_with_the_business_and_how_to_opt_out(running: Running) -> None:
    app, _, messages = running
    text = message_text(await inbound(messages, "help"))
    business = app.state.components.business
    assert text is not None and business.name in text and "STOP" in text
    assert business.phone == OUR_NUMBER and "Call (212) 555-0100." in text  # as the customer writes it
    assert message_text(await inbound(messages, "see you tuesday")) is None
    assert await ledger(app).suppression(CUSTOMER) is None


async def test_unsigned_or_missigned_webhooks_are_refused(running: Running) -> None:
    app, client, _ = running
    params = {"MessageSid": "SM" + "1" * 32, "From": CUSTOMER, "To": OUR_NUMBER, "Body": "STOP"}
    assert (await client.post("/twilio/sms", data=params)).status_code == 403
    wrong = RequestValidator("f" * 32).compute_signature(PUBLIC + "/twilio/sms", params)
    refused = await client.post("/twilio/sms", data=params, headers={"X-Twilio-Signature": wrong})
    assert refused.status_code == 403
    receipt = {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered", "To": CUSTOMER}
    assert (await client.post("/twilio/message-status?effect=x", data=receipt)).status_code == 403
    assert await ledger(app).suppression(CUSTOMER) is None
    assert await ledger(app).get_message(receipt["MessageSid"]) is None


async def test_receipts_arrive_signed_and_move_the_message_to_delivered_once(
    running: Running, clock: FrozenClock
) -> None:
    app, client, messages = running
    effect = await confirmation(app, await book(client, STARTS[0], "k1"))
    await messages.settle()
    [sent] = messages.sent_to(CUSTOMER)
    assert [c.status_code for c in messages.callbacks] == [204, 204]
    assert all("effect=" in c.url for c in messages.callbacks)
    message = await ledger(app).get_message(sent.sid)
    assert message is not None and (message.status, message.effect_key) == ("delivered", effect.idempotency_key)
    assert await ledger(app).delivery_rate(hours=24) == 1.0

    # Twilio replays a receipt, and a late "sending" (never heard before) arrives after "delivered":
    # the first is recognised, the second recorded, and neither moves the message.
    clock.advance(timedelta(minutes=5))
    replayed = messages.callbacks[1]
    late = dict(messages.callbacks[0].params, MessageStatus="sending", SmsStatus="sending")
    for params in (replayed.params, late, late):
        response = await messages.post_signed(replayed.url, params)
        assert response.status_code == 204
    after = await ledger(app).get_message(sent.sid)
    assert after is not None and (after.status, after.updated_at) == ("delivered", message.updated_at)
    events = sorted(await ledger(app).status_events(sent.sid))
    assert events == [("delivered", None), ("sending", None), ("sent", None)]


async def test_a_receipt_for_an_unknown_message_is_recorded_against_its_effect(running: Running) -> None:
    app, _, messages = running
    sid = "SM" + "a" * 32
    url = PUBLIC + "/twilio/message-status?effect=bk1%3Asms.confirmation%3A1"
    params = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30003", "To": CUSTOMER}
    assert (await messages.post_signed(url, params)).status_code == 204
    message = await ledger(app).get_message(sid)
    assert message is not None
    assert (message.effect_key, message.status, message.error_code) == ("bk1:sms.confirmation:1", "undelivered", 30003)
    assert await ledger(app).delivery_rate(hours=24) == 0.0
    assert not await ledger(app).is_suppressed(CUSTOMER)


async def test_twilio_refusing_an_opted_out_number_suppresses_it(running: Running) -> None:
    app, client, messages = running
    messages.opted_out.add(CUSTOMER)
    first = await confirmation(app, await book(client, STARTS[0], "k1"))
    assert first.status is EffectStatus.DEAD and messages.requests == 1
    suppression = await ledger(app).suppression(CUSTOMER)
    assert suppression is not None and (suppression.opted_out, suppression.source) == (True, "send_refused")

    second = await confirmation(app, await book(client, STARTS[1], "k2"))
    assert second.status is EffectStatus.DONE and messages.requests == 1  # not asked again


async def test_a_receipt_carrying_21610_suppresses_the_recipient(running: Running) -> None:
    app, client, messages = running
    messages.outcomes[CUSTOMER] = Outcome(statuses=("sent", "failed"), error_code=21610)
    await confirmation(app, await book(client, STARTS[0], "k1"))
    await messages.settle()
    [sent] = messages.sent_to(CUSTOMER)
    message = await ledger(app).get_message(sent.sid)
    assert message is not None and (message.status, message.error_code) == ("failed", 21610)
    suppression = await ledger(app).suppression(CUSTOMER)
    assert suppression is not None and (suppression.opted_out, suppression.source) == (True, "status_callback")
