"""Per-country SMS rules: which configured sender may text a destination, the opt-out it must carry, the
segment limit; and the SMS effect applying them, through twilio's client against the Messages simulator."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from booking.errors import EffectFailed
from booking.messages import is_gsm7
from booking.outbox import Outbox
from booking.sms_rules import (
    MAX_SEGMENTS,
    RULES,
    NoSender,
    SenderChoice,
    SenderKind,
    Senders,
    body_problem,
    choose_sender,
    is_alpha_sender,
    opt_out_footer,
    rules_for,
)
from integrations.simulators.twilio_messages import MessagesState, create_twilio_messages_simulator
from tests.conftest import FrozenClock, running_app, serving
from voice_server.effects import build_handlers, build_twilio_sms
from voice_server.settings import Settings

US_LONG_CODE = "+12125550100"
GB_LONG_CODE = "+447400123000"
US_TOLL_FREE = "+18005550199"
SERVICE = "MG" + "5" * 32
CUSTOMERS = {
    "US": "+16465550199",
    "CA": "+14165550199",
    "GB": "+447400123456",
    "DE": "+4915123456789",
    "FR": "+33612345678",
    "AU": "+61412345678",
    "IN": "+919876543210",
    "BR": "+5511912345678",
}


def test_the_table_covers_the_countries_we_serve() -> None:
    assert set(CUSTOMERS) <= set(RULES)
    for country, number in CUSTOMERS.items():
        assert rules_for(number).country == country
    assert rules_for("+81312345678").country == "ZZ"  # Japan: not in the table, the cautious default


@pytest.mark.parametrize(
    ("country", "senders", "expected"),
    [
        ("US", Senders(from_number=US_LONG_CODE), (SenderKind.LONG_CODE, True)),
        ("CA", Senders(from_number=US_LONG_CODE), (SenderKind.LONG_CODE, True)),
        ("CA", Senders(from_number=US_TOLL_FREE), (SenderKind.TOLL_FREE, True)),
        ("GB", Senders(from_number=US_LONG_CODE), (SenderKind.LONG_CODE, True)),
        ("US", Senders(from_number="12345"), (SenderKind.SHORT_CODE, True)),
        # A Messaging Service: Twilio picks a pool number, or the alphanumeric sender where allowed.
        ("US", Senders(messaging_service_sid=SERVICE, alpha_sender="Riverside"), (None, True)),
        ("CA", Senders(messaging_service_sid=SERVICE, alpha_sender="Riverside"), (None, True)),
        ("BR", Senders(messaging_service_sid=SERVICE, alpha_sender="Riverside"), (None, True)),
        ("GB", Senders(messaging_service_sid=SERVICE, alpha_sender="Riverside"), (SenderKind.ALPHANUMERIC, False)),
        ("DE", Senders(messaging_service_sid=SERVICE, alpha_sender="Riverside"), (SenderKind.ALPHANUMERIC, False)),
        ("FR", Senders(messaging_service_sid=SERVICE, alpha_sender="Riverside"), (SenderKind.ALPHANUMERIC, False)),
        ("AU", Senders(messaging_service_sid=SERVICE, alpha_sender="Riverside"), (SenderKind.ALPHANUMERIC, False)),
        ("IN", Senders(messaging_service_sid=SERVICE, alpha_sender="RVSIDE"), (SenderKind.ALPHANUMERIC, False)),
        ("GB", Senders(messaging_service_sid=SERVICE), (None, True)),
    ],
)
def test_a_sender_is_chosen_for_the_destination(
    country: str, senders: Senders, expected: tuple[SenderKind | None, bool]
) -> None:
    choice = choose_sender(CUSTOMERS[country], senders, home_region="US")
    assert isinstance(choice, SenderChoice), choice
    assert (choice.kind, choice.two_way) == expected and choice.rules.country == country


@pytest.mark.parametrize(
    ("country", "senders", "reason"),
    [
        ("US", Senders(from_number=GB_LONG_CODE), "only from numbers of CA, US, not GB"),
        ("FR", Senders(from_number=US_LONG_CODE), "do not deliver business texts from a long code"),
        ("GB", Senders(from_number=US_TOLL_FREE), "do not deliver business texts from a toll free"),
        ("CA", Senders(from_number="12345"), "a short code leased in US reaches only US"),
        ("IN", Senders(from_number=US_LONG_CODE), "do not deliver business texts from a long code"),
        ("IN", Senders(messaging_service_sid=SERVICE), "need a registered alphanumeric sender"),
        ("US", Senders(), "no sender is configured"),
    ],
)
def test_a_destination_no_configured_sender_may_text_is_refused_with_the_reason(
    country: str, senders: Senders, reason: str
) -> None:
    choice = choose_sender(CUSTOMERS[country], senders, home_region="US")
    assert isinstance(choice, NoSender) and reason in choice.reason


def test_opt_out_wording_follows_whether_the_customer_can_reply() -> None:
    assert opt_out_footer("en", two_way=True, contact="x") == " Reply STOP to opt out."
    assert opt_out_footer("es-MX", two_way=True, contact="x") == " Responda STOP para darse de baja."
    one_way = opt_out_footer("en", two_way=False, contact="+1 212-555-0100")
    assert "STOP" not in one_way and "call +1 212-555-0100" in one_way
    spanish = opt_out_footer("es", two_way=False, contact="+1 212-555-0100")
    assert "llame al +1 212-555-0100" in spanish
    # The footers never switch a GSM-7 text to UCS-2, which would halve what a segment holds.
    footers = [opt_out_footer(lang, two_way=w, contact="+1 212") for lang in ("en", "es") for w in (True, False)]
    assert all(is_gsm7(footer) for footer in footers)


def test_a_body_over_the_segment_limit_is_refused_not_cut() -> None:
    rules = RULES["GB"]
    assert body_problem("Hi Ana, your check-up is confirmed.", rules) is None
    fits = "a" * (153 * MAX_SEGMENTS)
    assert body_problem(fits, rules) is None
    problem = body_problem(fits + "a", rules)
    assert problem is not None and f"{MAX_SEGMENTS + 1} GSM-7 segments" in problem
    emoji = "🙂" * (67 * MAX_SEGMENTS // 2 + 1)  # two UTF-16 units each
    problem = body_problem(emoji, rules)
    assert problem is not None and "UCS-2" in problem


@pytest.mark.parametrize(
    ("text", "allowed"),
    [("Riverside", True), ("RVSIDE", True), ("Dr Lee & Co", True), ("12345", False), ("Riverside Clinic", False)],
)
def test_alphanumeric_senders_follow_twilios_format(text: str, allowed: bool) -> None:
    assert is_alpha_sender(text) is allowed


def test_an_alphanumeric_sender_needs_a_messaging_service() -> None:
    from voice_server.settings import SettingsError

    with pytest.raises(SettingsError, match="VOICEBOOK_SMS_ALPHA_SENDER: needs TWILIO_MESSAGING_SERVICE_SID"):
        Settings.from_env({"VOICEBOOK_SMS_ALPHA_SENDER": "Riverside"})
    with pytest.raises(SettingsError, match="VOICEBOOK_SMS_ALPHA_SENDER"):
        Settings.from_env({"VOICEBOOK_SMS_ALPHA_SENDER": "Riverside Clinic", "TWILIO_MESSAGING_SERVICE_SID": SERVICE})
    settings = Settings.from_env({"VOICEBOOK_SMS_ALPHA_SENDER": "Riverside", "TWILIO_MESSAGING_SERVICE_SID": SERVICE})
    assert settings.sms_alpha_sender == "Riverside"


# -- through the SMS effect -------------------------------------------------------------------------

ACCOUNT = "AC" + "3" * 32
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def twilio() -> AsyncIterator[tuple[MessagesState, dict[str, Any]]]:
    messages = MessagesState(ACCOUNT, TOKEN)
    async with serving(create_twilio_messages_simulator(messages), lifespan="on") as url:
        yield messages, {"twilio_account_sid": ACCOUNT, "twilio_auth_token": TOKEN, "twilio_api_base_url": url}


async def confirm(settings: Settings, phone: str) -> None:
    """Book for a customer at ``phone`` and run the booking's confirmation effect as a worker would."""
    async with running_app(settings, FrozenClock(datetime.now(UTC))) as (app, client):
        response = await client.post(
            "/api/bookings",
            json={"service": "checkup", "start": "2026-12-01T10:00", "customer": {"phone": phone, "name": "Ana"}},
            headers={"Authorization": f"Bearer {settings.admin_token}", "Idempotency-Key": phone},
        )
        assert response.status_code == 201, response.text
        database = app.state.components.database
        effects = await Outbox(database).for_booking(response.json()["id"])
        [effect] = [e for e in effects if e.kind == "sms.confirmation"]
        sms = build_twilio_sms(settings, threads=1)
        assert sms is not None
        try:
            handlers = build_handlers(settings, app.state.components.business, database=database, sms=sms)
            await handlers["sms.confirmation"](effect)
        finally:
            sms.close()


async def test_a_confirmation_by_long_code_says_reply_stop(
    app_settings: Settings, twilio: tuple[MessagesState, dict[str, Any]]
) -> None:
    messages, config = twilio
    settings = dataclasses.replace(app_settings, **config, run_workers=False, twilio_sms_from=US_LONG_CODE)
    await confirm(settings, "(646) 555-0199")
    [text] = messages.messages.values()
    assert text.to == CUSTOMERS["US"] and text.body.endswith(" Reply STOP to opt out.")


async def test_a_confirmation_from_an_alphanumeric_sender_says_how_else_to_opt_out(
    app_settings: Settings, twilio: tuple[MessagesState, dict[str, Any]]
) -> None:
    messages, config = twilio
    settings = dataclasses.replace(
        app_settings, **config, run_workers=False, twilio_messaging_service_sid=SERVICE, sms_alpha_sender="Riverside"
    )
    await confirm(settings, "+44 7400 123456")
    [text] = messages.messages.values()
    # The business's US number written for a reader in Britain: with its country code.
    assert text.to == CUSTOMERS["GB"] and text.body.endswith("call +1 212-555-0100.")
    assert "STOP" not in text.body


async def test_a_destination_the_sender_cannot_reach_fails_permanently_unsent(
    app_settings: Settings, twilio: tuple[MessagesState, dict[str, Any]]
) -> None:
    messages, config = twilio
    settings = dataclasses.replace(app_settings, **config, run_workers=False, twilio_sms_from=US_LONG_CODE)
    with pytest.raises(EffectFailed) as refused:
        await confirm(settings, "+33 6 12 34 56 78")
    assert refused.value.permanent and refused.value.code == "no_sender"
    assert "FR" in str(refused.value) and "612345678" not in str(refused.value)  # the number stays masked
    assert messages.messages == {}
