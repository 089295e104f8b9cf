"""Bookings made through the server reach Google Calendar and the customer's phone: the outbox rows
written with the booking are run by the server's own worker, through the real google-api-python-client
and twilio clients against the Calendar and Messages simulators. Without providers the ledger is the
calendar and texts are logged, and the effects still finish."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from booking.errors import EffectFailed
from booking.ledger.sms_repository import SmsLedger
from booking.outbox import Effect, EffectStatus, Outbox
from booking.worker import Handler
from integrations.simulators.google_calendar import (
    CalendarState,
    create_google_calendar_simulator,
    new_private_key_pem,
    service_account_info,
)
from integrations.simulators.twilio_messages import Fault, MessagesState, create_twilio_messages_simulator
from integrations.twilio_sms import TwilioSMS
from tests.conftest import FrozenClock, running_app, serving
from voice_server.effects import build_handlers, build_twilio_sms, sms_body
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
        if all(e.status is EffectStatus.DONE for e in due_now):  # an occurrence may have only its reminder
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
    pem = new_private_key_pem()
    calendar = CalendarState()
    calendar.add_calendar("dr-lee@riverside-clinic.example")
    calendar.add_service_account(SA_EMAIL, pem)
    messages = MessagesState(ACCOUNT, TOKEN)
    async with (
        serving(create_google_calendar_simulator(calendar), lifespan="off") as calendar_url,
        serving(create_twilio_messages_simulator(messages), lifespan="on") as twilio_url,
    ):
        key_file = tmp_path / "service-account.json"
        key_file.write_text(json.dumps(service_account_info(calendar_url, pem, SA_EMAIL)))
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


async def confirmation_and_handlers(
    app: Starlette, client: httpx.AsyncClient, settings: Settings
) -> tuple[Effect, dict[str, Handler]]:
    """Book through the API (the server runs no worker) and return the booking's confirmation effect with
    the handlers a worker would run it with."""
    booking = await book(client, settings, resource="dr-lee")
    database = app.state.components.database
    [effect] = [e for e in await Outbox(database).for_booking(booking["id"]) if e.kind == "sms.confirmation"]
    sms = build_twilio_sms(settings, threads=2)
    return effect, build_handlers(settings, app.state.components.business, database=database, sms=sms)


async def test_a_retried_text_whose_first_send_landed_is_not_sent_again(
    app_settings: Settings, clock: FrozenClock, providers: tuple[CalendarState, MessagesState, dict[str, Any]]
) -> None:
    """The worker died between Twilio's 201 and the outbox's record (or the answer timed out): the retry
    finds the message in Twilio's list, records it, and does not text the customer twice."""
    _, messages, config = providers
    settings = dataclasses.replace(app_settings, **config, run_workers=False)
    # Twilio stamps messages with its own (real) time; the effect's creation time must be on that clock too.
    async with running_app(settings, FrozenClock(datetime.now(UTC))) as (app, client):
        effect, handlers = await confirmation_and_handlers(app, client, settings)
        database = app.state.components.database
        to, body = sms_body(effect, app.state.components.business, settings.sms_locale)
        # The first attempt: its mark written, its text accepted by Twilio, its answer never recorded.
        assert not await SmsLedger(database).begin_send(effect.idempotency_key, to)
        lost = await TwilioSMS(
            ACCOUNT, TOKEN, from_number="+12125550100", api_base_url=config["twilio_api_base_url"]
        ).send(to, body, idempotency_key=effect.idempotency_key)
        await handlers["sms.confirmation"](dataclasses.replace(effect, attempts=2))
        assert [m.sid for m in messages.messages.values()] == [lost.sid]
        recorded = await SmsLedger(database).message_for_effect(effect.idempotency_key)
        assert recorded is not None and recorded.message_sid == lost.sid

        # Known in the ledger now: a further retry does not even ask Twilio.
        requests = messages.requests
        await handlers["sms.confirmation"](dataclasses.replace(effect, attempts=3))
        assert messages.requests == requests and len(messages.messages) == 1


async def test_a_text_twilio_refused_is_sent_on_retry_without_looking_first(
    app_settings: Settings, clock: FrozenClock, providers: tuple[CalendarState, MessagesState, dict[str, Any]]
) -> None:
    _, messages, config = providers
    settings = dataclasses.replace(app_settings, **config, run_workers=False)
    async with running_app(settings, FrozenClock(datetime.now(UTC))) as (app, client):
        effect, handlers = await confirmation_and_handlers(app, client, settings)
        messages.fail_next(Fault.SERVER_ERROR)
        with pytest.raises(EffectFailed):
            await handlers["sms.confirmation"](effect)
        requests = messages.requests
        await handlers["sms.confirmation"](dataclasses.replace(effect, attempts=2))
        assert messages.requests == requests + 1  # the send only: a refusal leaves no doubt to look into
    [text] = messages.messages.values()
    assert "Alice" in text.body


async def test_a_series_is_one_recurring_event_whose_occurrences_move_and_go_alone(
    app_settings: Settings, clock: FrozenClock, providers: tuple[CalendarState, MessagesState, dict[str, Any]]
) -> None:
    calendar, messages, config = providers
    settings = dataclasses.replace(app_settings, **config)
    lee = "dr-lee@riverside-clinic.example"
    async with running_app(settings, clock) as (app, client):
        series = await book(client, settings, resource="dr-lee", rrule="FREQ=WEEKLY;COUNT=3")
        first, second, third = series["bookings"]
        for booking in (first, second, third):
            await settled(app, booking["id"])
        [event] = calendar.live_events(lee)
        assert event["recurrence"] == ["RRULE:FREQ=WEEKLY;COUNT=3"]
        [text] = messages.messages.values()  # one confirmation for the series
        assert "(first of 3)" in text.body

        admin = {"Authorization": f"Bearer {settings.admin_token}"}
        moved = await client.patch(f"/api/bookings/{second['id']}", json={"start": "2026-12-08T11:00"}, headers=admin)
        assert moved.status_code == 200, moved.text
        cancelled = await client.delete(f"/api/bookings/{third['id']}", headers=admin)
        assert cancelled.status_code == 200, cancelled.text
        await settled(app, second["id"])
        await settled(app, third["id"])
    # Google's freeBusy sees the series as it now is: the first as booked, the second two hours
    # later, the third gone.
    busy = calendar.busy_times(lee)
    starts = [start.astimezone(UTC).isoformat() for start, _ in busy]
    assert starts == ["2026-12-01T15:00:00+00:00", "2026-12-08T16:00:00+00:00"]


def test_the_sender_is_paced_as_configured(app_settings: Settings) -> None:
    settings = dataclasses.replace(
        app_settings,
        twilio_account_sid=ACCOUNT,
        twilio_auth_token=TOKEN,
        twilio_sms_from="+12125550100",
        sms_per_minute=90,
        sms_burst=3,
    )
    sms = build_twilio_sms(settings, threads=2)
    assert sms is not None and sms.rate_limiter is not None
    assert (sms.rate_limiter.rate, sms.rate_limiter.burst) == (1.5, 3)
    sms.close()
    assert build_twilio_sms(dataclasses.replace(settings, twilio_sms_from=None), threads=2) is None


async def test_consent_is_recorded_and_a_declined_booking_gets_no_text(
    app_settings: Settings, clock: FrozenClock, providers: tuple[CalendarState, MessagesState, dict[str, Any]]
) -> None:
    calendar, messages, config = providers
    settings = dataclasses.replace(app_settings, **config)
    async with running_app(settings, clock) as (app, client):
        declined = await book(client, settings, key="no-texts", resource="dr-lee", sms_consent=False)
        given = await book(client, settings, key="texts", resource="dr-lee", start="2026-12-01T11:00", sms_consent=True)
        assert (declined["sms_consent"], given["sms_consent"]) == ("declined", "given")
        await settled(app, declined["id"])
        await settled(app, given["id"])
        stored = await app.state.components.bookings.get_booking(declined["id"])
    assert stored.sms_consent.value == "declined"
    assert len(calendar.live_events("dr-lee@riverside-clinic.example")) == 2  # the calendar does not care
    [text] = messages.messages.values()  # only the booking that agreed to texts
    assert given["id"][-6:].upper() in text.body
