"""Bookings made through the server reach Google Calendar and the customer's phone: the outbox rows
written with the booking are run by the server's own worker, through the real google-api-python-client
and twilio clients against the Calendar and Messages simulators. Without providers the ledger is the
calendar and texts are logged, and the effects still finish."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette

from booking.outbox import EffectStatus, Outbox
from integrations.simulators.google_calendar import CalendarState, create_google_calendar_simulator
from integrations.simulators.twilio_messages import MessagesState, create_twilio_messages_simulator
from tests.conftest import FrozenClock, running_app, serving
from voice_server.settings import Settings

ACCOUNT = "AC" + "3" * 32
TOKEN = "0123456789abcdef0123456789abcdef"
SA_EMAIL = "voicebook@voicebook-test.iam.gserviceaccount.com"
BOOKING = {"service": "checkup", "start": "2026-12-01T10:00", "customer": {"phone": "(212) 555-0142", "name": "Alice"}}


async def book(client: httpx.AsyncClient, settings: Settings, key: str = "k1", **changes: Any) -> dict[str, Any]:
    response = await client.post(
        "/api/bookings",
        json=BOOKING | changes,
        headers={"Authorization": f"Bearer {settings.admin_token}", "Idempotency-Key": key},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def settled(app: Starlette, booking_id: str) -> list[Any]:
    outbox = Outbox(app.state.components.database)
    for _ in range(300):
        effects = [e for e in await outbox.for_booking(booking_id) if e.status is not EffectStatus.CANCELLED]
        due_now = [e for e in effects if e.kind != "sms.reminder"]
        if due_now and all(e.status is EffectStatus.DONE for e in due_now):
            return effects
        await asyncio.sleep(0.02)
    raise AssertionError(f"effects did not finish: {[(e.kind, e.status, e.last_error) for e in effects]}")


async def test_without_providers_effects_finish_in_the_ledger(app_settings: Settings, clock: FrozenClock) -> None:
    async with running_app(app_settings, clock) as (app, client):
        booking = await book(client, app_settings)
        effects = await settled(app, booking["id"])
    assert {e.kind for e in effects} >= {"calendar.create", "sms.confirmation"}


@pytest.fixture
async def providers(tmp_path: Path) -> AsyncIterator[tuple[CalendarState, MessagesState, dict[str, Any]]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    calendar = CalendarState()
    calendar.add_calendar("dr-lee@riverside-clinic.example")
    calendar.add_service_account(SA_EMAIL, pem)
    messages = MessagesState(ACCOUNT, TOKEN)
    async with (
        serving(create_google_calendar_simulator(calendar), lifespan="off") as calendar_url,
        serving(create_twilio_messages_simulator(messages), lifespan="on") as twilio_url,
    ):
        info = {
            "type": "service_account",
            "private_key_id": "0123456789abcdef",
            "private_key": pem,
            "client_email": SA_EMAIL,
            "client_id": "1234567890",
            "token_uri": f"{calendar_url}/token",
        }
        key_file = tmp_path / "service-account.json"
        key_file.write_text(json.dumps(info))
        yield (
            calendar,
            messages,
            {
                "google_service_account_file": key_file,
                "google_calendar_api_url": f"{calendar_url}/calendar/v3/",
                "twilio_account_sid": ACCOUNT,
                "twilio_auth_token": TOKEN,
                "twilio_api_base_url": twilio_url,
                "twilio_sms_from": "+12125550100",
            },
        )


async def test_a_booking_gets_one_event_and_one_text_and_a_cancellation_follows(
    app_settings: Settings, clock: FrozenClock, providers: tuple[CalendarState, MessagesState, dict[str, Any]]
) -> None:
    calendar, messages, config = providers
    settings = dataclasses.replace(app_settings, **config)
    async with running_app(settings, clock) as (app, client):
        booking = await book(client, settings, resource="dr-lee")
        again = await client.post(
            "/api/bookings",
            json=BOOKING | {"resource": "dr-lee"},
            headers={"Authorization": f"Bearer {settings.admin_token}", "Idempotency-Key": "k1"},
        )
        assert again.status_code == 200  # the same request replayed: no second booking, no second effect
        await settled(app, booking["id"])
        [event] = calendar.live_events("dr-lee@riverside-clinic.example")
        assert event["extendedProperties"]["private"]["voicebook_booking_id"] == booking["id"]
        [text] = messages.messages.values()
        assert text.to == "+12125550142" and "Alice" in text.body

        cancelled = await client.delete(
            f"/api/bookings/{booking['id']}", headers={"Authorization": f"Bearer {settings.admin_token}"}
        )
        assert cancelled.status_code == 200
        await settled(app, booking["id"])
    assert calendar.live_events("dr-lee@riverside-clinic.example") == []
    assert len(messages.messages) == 2  # the confirmation, then the cancellation
