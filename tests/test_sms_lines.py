"""Texts follow the number the customer used (issue 9): a booking made on a registered line is texted
from that line when it can text and carriers have cleared it, otherwise from the configured sender with
the reason logged; a text to a number that is not ours has only its STOP/START honoured; HELP names the
line the customer texted, as they write it. The real app, ledger and twilio client against the Messages
simulator; effects run by the handlers a worker would run."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, MutableMapping
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from starlette.applications import Starlette
from structlog.testing import capture_logs

from booking.ledger.numbers_repository import (
    A2PStatus,
    NumberFacts,
    NumberRegistry,
    NumberType,
    TollFreeVerification,
)
from booking.ledger.repository import CustomerDetails
from booking.ledger.sms_repository import SmsLedger
from booking.outbox import Effect, Outbox
from booking.service import Booked, BookRequest
from integrations.simulators.twilio_messages import MessagesState, create_twilio_messages_simulator
from integrations.twilio_sms import TwilioSMS
from tests.conftest import FrozenClock, running_app, serving
from voice_server.components import Components
from voice_server.effects import build_handlers, build_twilio_sms, sms_body
from voice_server.lines import is_our_texting_number
from voice_server.settings import Settings

ACCOUNT = "AC" + "7" * 32
TOKEN = "0123456789abcdef0123456789abcdef"
PUBLIC = "https://voice.example.test"
CONFIGURED = "+12125550100"  # the business's phone and TWILIO_SMS_FROM
LINE = "+12125550111"
TOLL_FREE = "+18335550111"
UNKNOWN = "+12125550199"
CUSTOMER = "+16465550142"
ABROAD = "+447400123456"
SERVICE = "MG" + "8" * 32

Running = tuple[Starlette, httpx.AsyncClient, MessagesState, Settings]


@pytest.fixture
async def running(app_settings: Settings) -> AsyncIterator[Running]:
    """The app with a From number configured and no worker of its own (tests run the handlers), and the
    Messages simulator; inbound texts reach the app in-process at the URL Twilio signs."""
    messages = MessagesState(ACCOUNT, TOKEN)
    async with serving(create_twilio_messages_simulator(messages), lifespan="on") as twilio_url:
        settings = dataclasses.replace(
            app_settings,
            public_url=PUBLIC,
            twilio_account_sid=ACCOUNT,
            twilio_auth_token=TOKEN,
            twilio_api_base_url=twilio_url,
            twilio_sms_from=CONFIGURED,
            run_workers=False,
        )
        # Twilio stamps messages with its own (real) time; effects must be on that clock for find_sent.
        async with running_app(settings, FrozenClock(datetime.now(UTC))) as (app, client):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC) as to_app:
                messages.callback_client = to_app
                try:
                    yield app, client, messages, settings
                finally:
                    await messages.aclose()
                    messages.callback_client = None


def components(app: Starlette) -> Components:
    found: Components = app.state.components
    return found


async def register(
    app: Starlette,
    number: str,
    *,
    sms: bool = True,
    voice: bool = True,
    number_type: NumberType = NumberType.LOCAL,
    a2p: A2PStatus | None = A2PStatus.APPROVED,
    toll_free: TollFreeVerification | None = None,
    service: str | None = None,
) -> None:
    registry = NumberRegistry(components(app).database)
    await registry.upsert(NumberFacts(number, "PN" + number[-4:] * 8, "US", number_type, voice, sms, False))
    await registry.set_compliance(number, a2p_status=a2p, toll_free_verification=toll_free)
    if service is not None:
        await registry.set_messaging_service(number, service)


async def confirmation_of_a_call(app: Starlette, line: str | None, customer: str = CUSTOMER) -> Effect:
    """Book as a call to ``line`` does (voice_server/tools.py) and return the booking's confirmation."""
    business = components(app).business
    outcome = await components(app).bookings.book(
        BookRequest(
            "checkup",
            datetime.fromisoformat("2026-12-01T10:00").replace(tzinfo=business.tz),
            CustomerDetails(phone=customer, name="Alice"),
            resource_id="dr-lee",
            source="call",
            line_number=line,
        )
    )
    assert isinstance(outcome, Booked)
    effects = await Outbox(components(app).database).for_booking(outcome.booking.id)
    [effect] = [e for e in effects if e.kind == "sms.confirmation"]
    return effect


async def run_text(app: Starlette, settings: Settings, effect: Effect) -> list[MutableMapping[str, Any]]:
    """Run the confirmation as the worker would; the log lines it wrote."""
    sms = build_twilio_sms(settings, threads=2)
    assert sms is not None
    handlers = build_handlers(settings, components(app).business, database=components(app).database, sms=sms)
    try:
        with capture_logs() as logs:
            await handlers["sms.confirmation"](effect)
    finally:
        sms.close()
    return logs


def not_used(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == "sms_line_not_used"]


# -- outbound: which number a text goes from ------------------------------------------------------------


async def test_a_booking_made_on_a_cleared_line_is_texted_from_it(running: Running) -> None:
    app, _, messages, settings = running
    await register(app, LINE)
    logs = await run_text(app, settings, await confirmation_of_a_call(app, LINE))
    [sent] = messages.sent_to(CUSTOMER)
    assert (sent.from_number, sent.messaging_service_sid) == (LINE, None)
    assert sent.body.endswith("Reply STOP to opt out.")  # a number: the customer can reply STOP
    assert not_used(logs) == []


async def test_an_api_booking_is_texted_from_the_configured_sender_without_a_word(running: Running) -> None:
    app, _, messages, settings = running
    await register(app, LINE)
    logs = await run_text(app, settings, await confirmation_of_a_call(app, None))
    [sent] = messages.sent_to(CUSTOMER)
    assert sent.from_number == CONFIGURED
    assert not_used(logs) == []  # no line to explain


async def test_a_call_to_the_configured_sender_is_texted_from_it_without_a_word(running: Running) -> None:
    """The business's own phone is usually TWILIO_SMS_FROM too: a booking made on it needs no registry
    entry and no explanation to go from it."""
    app, _, messages, settings = running
    logs = await run_text(app, settings, await confirmation_of_a_call(app, CONFIGURED))
    [sent] = messages.sent_to(CUSTOMER)
    assert sent.from_number == CONFIGURED
    assert not_used(logs) == []


@pytest.mark.parametrize(
    ("registration", "reason"),
    [
        (None, "not_registered"),
        ({"sms": False}, "cannot_text"),
        ({"a2p": A2PStatus.UNREGISTERED}, "a2p_unregistered"),
        ({"a2p": A2PStatus.PENDING}, "a2p_pending"),
        ({"a2p": A2PStatus.FAILED}, "a2p_failed"),
    ],
    ids=["unregistered", "no SMS", "A2P unregistered", "A2P pending", "A2P failed"],
)
async def test_a_line_that_may_not_text_falls_back_to_the_configured_sender(
    running: Running, registration: dict[str, Any] | None, reason: str
) -> None:
    app, _, messages, settings = running
    if registration is not None:
        await register(app, LINE, **registration)
    effect = await confirmation_of_a_call(app, LINE)
    logs = await run_text(app, settings, effect)
    [sent] = messages.sent_to(CUSTOMER)
    assert sent.from_number == CONFIGURED
    [told] = not_used(logs)
    assert (told["reason"], told["line"], told["booking_id"]) == (reason, LINE, effect.booking_id)


@pytest.mark.parametrize(
    ("verification", "used"),
    [
        (TollFreeVerification.UNVERIFIED, False),
        (TollFreeVerification.PENDING, False),
        (TollFreeVerification.REJECTED, False),
        (TollFreeVerification.APPROVED, True),
    ],
)
async def test_a_toll_free_line_texts_once_verified(
    running: Running, verification: TollFreeVerification, used: bool
) -> None:
    app, _, messages, settings = running
    await register(app, TOLL_FREE, number_type=NumberType.TOLL_FREE, a2p=None, toll_free=verification)
    logs = await run_text(app, settings, await confirmation_of_a_call(app, TOLL_FREE))
    [sent] = messages.sent_to(CUSTOMER)
    assert sent.from_number == (TOLL_FREE if used else CONFIGURED)
    assert [line["reason"] for line in not_used(logs)] == ([] if used else [f"toll_free_{verification.value}"])


async def test_a_line_carriers_abroad_do_not_deliver_from_falls_back(running: Running) -> None:
    """A toll-free number texts the US and Canada only: to a UK customer the configured long code goes."""
    app, _, messages, settings = running
    await register(app, TOLL_FREE, number_type=NumberType.TOLL_FREE, a2p=None, toll_free=TollFreeVerification.APPROVED)
    logs = await run_text(app, settings, await confirmation_of_a_call(app, TOLL_FREE, customer=ABROAD))
    [sent] = messages.sent_to(ABROAD)
    assert sent.from_number == CONFIGURED
    [told] = not_used(logs)
    assert told["reason"] == "not_for_destination" and "toll" in told["detail"]


async def test_a_line_in_a_messaging_service_is_sent_from_within_it(running: Running) -> None:
    """From and MessagingServiceSid together: that sender of the pool, with the service's features."""
    app, _, messages, settings = running
    await register(app, LINE, service=SERVICE)
    await run_text(app, settings, await confirmation_of_a_call(app, LINE))
    await messages.settle()
    [sent] = messages.sent_to(CUSTOMER)
    assert (sent.from_number, sent.messaging_service_sid) == (LINE, SERVICE)
    # Our status callback still names the effect, so receipts reach the ledger as for any text.
    [recorded] = await SmsLedger(components(app).database).messages_to(CUSTOMER)
    assert recorded.message_sid == sent.sid and recorded.status == "delivered"


async def test_with_a_configured_messaging_service_a_line_outside_it_goes_alone(running: Running) -> None:
    """The configured service's pool does not hold the line (Twilio would answer 21711): From only."""
    app, _, messages, settings = running
    await register(app, LINE)
    configured = dataclasses.replace(settings, twilio_sms_from=None, twilio_messaging_service_sid=SERVICE)
    await run_text(app, configured, await confirmation_of_a_call(app, LINE))
    [sent] = messages.sent_to(CUSTOMER)
    assert (sent.from_number, sent.messaging_service_sid) == (LINE, None)


async def test_a_retried_text_from_a_line_whose_first_send_landed_is_not_sent_again(running: Running) -> None:
    app, _, messages, settings = running
    await register(app, LINE)
    effect = await confirmation_of_a_call(app, LINE)
    database = components(app).database
    to, body = sms_body(effect, components(app).business, settings.sms_locale)
    assert not await SmsLedger(database).begin_send(effect.idempotency_key, to)
    lost = await TwilioSMS(ACCOUNT, TOKEN, from_number=CONFIGURED, api_base_url=settings.twilio_api_base_url).send(
        to, body, idempotency_key=effect.idempotency_key, from_number=LINE
    )
    await run_text(app, settings, dataclasses.replace(effect, attempts=2))
    assert [(m.sid, m.from_number) for m in messages.messages.values()] == [(lost.sid, LINE)]
    recorded = await SmsLedger(database).message_for_effect(effect.idempotency_key)
    assert recorded is not None and recorded.message_sid == lost.sid


async def test_the_sender_override_needs_a_number(running: Running) -> None:
    _, _, messages, settings = running
    sms = TwilioSMS(ACCOUNT, TOKEN, from_number=CONFIGURED, api_base_url=settings.twilio_api_base_url)
    with pytest.raises(ValueError, match="together with from_number"):
        await sms.send(CUSTOMER, "hello", idempotency_key="k", messaging_service_sid=SERVICE)
    assert messages.requests == 0


# -- inbound: texts to a number that is not ours ---------------------------------------------------------


async def inbound(messages: MessagesState, to: str, body: str, **extra: Any) -> str | None:
    """Text ``to`` as ``CUSTOMER`` through the simulator; the reply's ``<Message>`` text, or None."""
    response = await messages.inject_inbound(CUSTOMER, to, body, PUBLIC + "/twilio/sms", **extra)
    assert response.status_code == 200, response.text
    found = ElementTree.fromstring(response.text).find("Message")
    return None if found is None else found.text


async def test_a_text_to_a_number_not_ours_has_only_its_opt_out_honoured(running: Running) -> None:
    app, _, messages, _ = running
    await register(app, LINE)
    ledger = SmsLedger(components(app).database)
    with capture_logs() as logs:
        assert await inbound(messages, UNKNOWN, "HELP") is None
        assert await inbound(messages, UNKNOWN, "STOP") is None
    assert await ledger.is_suppressed(CUSTOMER)  # an opt-out is never lost
    unknown = [line for line in logs if line["event"] == "sms_to_unknown_number"]
    assert [(line["to"], line["keyword"]) for line in unknown] == [(UNKNOWN, "help"), (UNKNOWN, "opt_out")]
    assert not [line for line in logs if line["event"] == "sms_help"]

    assert await inbound(messages, UNKNOWN, "START") is None
    assert not await ledger.is_suppressed(CUSTOMER)
    assert await inbound(messages, LINE, "HELP") is not None  # the registered line is answered


async def test_help_on_a_line_names_it_as_the_customer_writes_it(running: Running) -> None:
    app, _, messages, _ = running
    await register(app, LINE)
    text = await inbound(messages, LINE, "help")
    assert text is not None and "Call (212) 555-0111." in text
    assert "+1" not in text
    text = await inbound(messages, CONFIGURED, "help")
    assert text is not None and "Call (212) 555-0100." in text

    # From abroad the number keeps its country code.
    response = await messages.inject_inbound(ABROAD, LINE, "HELP", PUBLIC + "/twilio/sms")
    found = ElementTree.fromstring(response.text).find("Message")
    assert found is not None and found.text is not None and "Call +1 212-555-0111." in found.text


async def test_help_on_a_text_only_line_names_the_business_phone(running: Running) -> None:
    app, _, messages, _ = running
    await register(app, LINE, voice=False)
    text = await inbound(messages, LINE, "HELP")
    assert text is not None and "Call (212) 555-0100." in text


async def test_a_pool_number_of_the_configured_messaging_service_is_ours(running: Running) -> None:
    """With TWILIO_MESSAGING_SERVICE_SID, Twilio names the service on a text to any number of its pool."""
    app, _, _, settings = running
    service = dataclasses.replace(settings, twilio_messaging_service_sid=SERVICE)
    with_service = dataclasses.replace(components(app), settings=service)
    assert await is_our_texting_number(with_service, UNKNOWN, "US", messaging_service_sid=SERVICE)
    assert not await is_our_texting_number(with_service, UNKNOWN, "US", messaging_service_sid="MG" + "0" * 32)
    assert not await is_our_texting_number(with_service, UNKNOWN, "US")


async def test_with_nothing_configured_every_number_is_ours_until_one_is_registered(running: Running) -> None:
    app, _, _, settings = running
    bare = dataclasses.replace(
        components(app),
        business=components(app).business.model_copy(update={"phone": None}),
        settings=dataclasses.replace(settings, twilio_sms_from=None),
    )
    assert await is_our_texting_number(bare, UNKNOWN, "US")
    await register(app, LINE)
    assert not await is_our_texting_number(bare, UNKNOWN, "US")
    assert await is_our_texting_number(bare, LINE, "US")


async def test_a_configured_sender_that_is_not_the_business_phone_is_ours(running: Running) -> None:
    app, _, _, settings = running
    other = dataclasses.replace(components(app), settings=dataclasses.replace(settings, twilio_sms_from=UNKNOWN))
    assert await is_our_texting_number(other, UNKNOWN, "US")
    assert not await is_our_texting_number(components(app), UNKNOWN, "US")
