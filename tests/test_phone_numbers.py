"""Phone numbers as people type them, into E.164; and back out, as a person reads and hears them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from booking.business import EXAMPLE_BUSINESS_FILE
from booking.errors import InvalidRequest
from booking.phone import format_national, normalise_phone, spoken_number
from tests.conftest import FrozenClock, running_app
from tests.test_twilio_webhooks import AUTH_TOKEN, CALL, PUBLIC, post
from voice_server.privacy_cli import person_number
from voice_server.settings import Settings


@pytest.mark.parametrize(
    ("typed", "region", "e164"),
    [
        ("(646) 555-0199", "US", "+16465550199"),
        ("646.555.0199", "US", "+16465550199"),
        ("  1-646-555-0199 ", "US", "+16465550199"),
        ("646.555.0199 ext 2", "US", "+16465550199"),
        ("+1 646 555 0199 x12", "US", "+16465550199"),
        ("646-555-0199, ext. 5", "US", "+16465550199"),
        ("+44 20 7946 0958", "US", "+442079460958"),
        ("0044 20 7946 0958", "US", "+442079460958"),  # 00 typed where the US would dial 011
        ("011 44 20 7946 0958", "US", "+442079460958"),
        ("020 7946 0958", "GB", "+442079460958"),
        ("0044 20 7946 0958", "GB", "+442079460958"),
        ("030 901820", "DE", "+4930901820"),
    ],
)
def test_messy_input_becomes_e164(typed: str, region: str, e164: str) -> None:
    assert normalise_phone(typed, default_region=region) == e164


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        ("646-555-O199", "contains letters"),  # a letter O for a zero: not read as a keypad's 6
        ("1-800-FLOWERS", "contains letters"),
        ("call me", "contains letters"),
        ("555-01", "too few digits"),
        ("6465550199123456", "too many digits"),
        ("---", "no digits"),
        ("+999 1234 5678", "country code is unknown"),
        ("+1 200 555 0100", "no such number"),  # NANP area codes never start with 2-0-0
        ("   ", "is required"),
    ],
)
def test_invalid_numbers_are_refused_naming_the_input_and_why(typed: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        normalise_phone(typed)
    assert refused.value.code == "invalid_phone" and reason in str(refused.value)
    if typed.strip():
        assert repr(typed) in str(refused.value)


def test_the_national_form_is_what_a_person_writes() -> None:
    assert format_national("+16465550199") == "(646) 555-0199"
    assert format_national("+442079460958") == "020 7946 0958"
    assert format_national("+16465550199", home_region="US") == "(646) 555-0199"
    # Abroad, a national form would dial someone else: the country code stays.
    assert format_national("+442079460958", home_region="US") == "+44 20 7946 0958"
    assert format_national("anonymous") == "anonymous"


def test_the_spoken_form_says_each_digit_in_the_groups_a_person_pauses_at() -> None:
    assert spoken_number("+16465550199") == "six four six, five five five, zero one nine nine"
    assert spoken_number("+442079460958") == "zero two zero, seven nine four six, zero nine five eight"
    assert spoken_number("+442079460958", home_region="US") == (
        "plus four four, two zero, seven nine four six, zero nine five eight"
    )
    assert spoken_number("anonymous") == "anonymous"


async def test_the_booking_api_reads_numbers_in_the_business_country_and_names_a_bad_one(
    app_settings: Settings, clock: FrozenClock
) -> None:
    admin = {"Authorization": f"Bearer {app_settings.admin_token}"}
    booking = {"service": "checkup", "start": "2026-12-01T10:00"}
    async with running_app(app_settings, clock) as (_, client):
        made = await client.post(
            "/api/bookings",
            json=booking | {"customer": {"phone": "646.555.0199 ext 2", "name": "Ana"}},
            headers=admin | {"Idempotency-Key": "messy"},
        )
        assert made.status_code == 201, made.text
        assert made.json()["customer"]["phone"] == "+16465550199"
        found = await client.get("/api/bookings", params={"phone": "(646) 555-0199"}, headers=admin)
        assert [b["id"] for b in found.json()["bookings"]] == [made.json()["id"]]

        refused = await client.post(
            "/api/bookings",
            json=booking | {"customer": {"phone": "646-555-O199"}},
            headers=admin | {"Idempotency-Key": "letter-o"},
        )
        assert refused.status_code == 422
        assert refused.json()["code"] == "invalid_phone" and "'646-555-O199'" in refused.json()["detail"]


async def test_a_blocked_number_typed_nationally_blocks_the_caller(app_settings: Settings, clock: FrozenClock) -> None:
    """Twilio sends ``From`` in E.164; the operator typed the block list as people write numbers."""
    settings = dataclasses.replace(
        app_settings, public_url=PUBLIC, twilio_auth_token=AUTH_TOKEN, blocked_numbers=("(646) 555-0199",)
    )
    async with running_app(settings, clock) as (application, client):
        response = await post(client, "/twilio/voice", CALL)
        assert response.status_code == 200
        call = await application.state.components.calls.require_call(CALL["CallSid"])
    assert call.from_number == "+16465550199" and call.refused_reason == "blocked_caller"


def test_a_number_an_operator_types_is_read_in_the_business_country(app_settings: Settings, tmp_path: Path) -> None:
    """``voicebook privacy`` and ``consent`` read a number without a country code as the business's own
    country's, as callers and the booking API do; one with a country code needs no business file."""
    london = tmp_path / "london.toml"
    london.write_text(
        EXAMPLE_BUSINESS_FILE.read_text()
        .replace('phone = "+12125550100"', 'phone = "+442079460000"')
        .replace('timezone = "America/New_York"', 'timezone = "Europe/London"')
    )
    in_london = dataclasses.replace(app_settings, business_file=london)
    assert person_number(in_london, "020 7946 0958") == "+442079460958"
    assert person_number(app_settings, "(646) 555-0199") == "+16465550199"
    nowhere = dataclasses.replace(app_settings, business_file=tmp_path / "missing.toml")
    assert person_number(nowhere, "+44 20 7946 0958") == "+442079460958"
    with pytest.raises(InvalidRequest):
        person_number(in_london, "0207 946")
