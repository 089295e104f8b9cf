"""The Google Calendar adapter through the real google-api-python-client and google-auth, against the
Calendar simulator served on loopback; plus unit tests of the pure event mapping and classifier."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httplib2  # type: ignore[import-untyped]
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from googleapiclient.errors import HttpError  # type: ignore[import-untyped]

from booking.business import Business
from booking.domain import Booking, BookingStatus, Customer, Interval, new_id
from booking.errors import EffectFailed
from integrations.google_calendar import (
    BOOKING_ID_PROPERTY,
    GoogleCalendar,
    Occurrence,
    classify,
    event_body,
    event_id_for,
    instance_id_for,
    mask_phone,
    retry_after,
)
from integrations.simulators.google_calendar import (
    CalendarFaults,
    CalendarState,
    create_google_calendar_simulator,
    service_account_info,
)
from tests.conftest import TEST_NOW, serving

LEE = "dr-lee@riverside-clinic.example"
SERIES = "0192f3a4-series-7c1d"
PATEL = "dr-patel@riverside-clinic.example"
SA_EMAIL = "voicebook@voicebook-test.iam.gserviceaccount.com"
START = datetime(2026, 12, 1, 14, 0, tzinfo=UTC)  # 09:00 in New York


def make_booking(
    booking_id: str | None = None,
    *,
    resource_id: str = "dr-lee",
    start: datetime = START,
    minutes: int = 30,
    series_id: str | None = None,
    email: str | None = None,
) -> Booking:
    end = start + timedelta(minutes=minutes)
    return Booking(
        id=booking_id or new_id(),
        resource_id=resource_id,
        service_id="checkup",
        customer=Customer(id="c1", phone="+12125550142", name="Ada Lovelace", email=email),
        start=start,
        end=end,
        block=Interval(start, end + timedelta(minutes=10)),
        status=BookingStatus.CONFIRMED,
        version=1,
        created_at=TEST_NOW,
        updated_at=TEST_NOW,
        series_id=series_id,
        source="phone",
    )


@pytest.fixture
def calendar(calendar_sim: tuple[CalendarState, str], private_key_pem: str) -> GoogleCalendar:
    _, url = calendar_sim
    return GoogleCalendar.from_service_account(
        service_account_info(url, private_key_pem), api_endpoint=f"{url}/calendar/v3/", timeout=5.0
    )


# -- the pure mapping ----------------------------------------------------------------------------


def test_event_id_is_base32hex_of_the_booking_id_and_distinct_per_booking() -> None:
    ids = {event_id_for(new_id()) for _ in range(200)} | {event_id_for("Booking/Ünïcode id")}
    assert len(ids) == 201
    assert all(re.fullmatch(r"[a-v0-9]{5,1024}", event_id) for event_id in ids)
    assert event_id_for("abc") == "c5h66"  # RFC 4648 base32hex of b"abc" is "C5H66===", lowercased
    with pytest.raises(ValueError, match=r"5\.\.1024"):
        event_id_for("ab")


def test_phone_is_masked_to_country_and_last_four_digits() -> None:
    assert mask_phone("+12125550142") == "+1 ••• ••• 0142"
    assert mask_phone("+442079460958") == "+44 ••• ••• 0958"
    assert mask_phone("12") == "•••"


def test_event_body_maps_times_in_the_business_zone_and_keeps_the_phone_masked(business: Business) -> None:
    booking = replace(make_booking(email="ada@example.com"), notes="first visit")
    body = event_body(booking, business)
    assert body["id"] == event_id_for(booking.id)
    assert body["start"] == {"dateTime": "2026-12-01T09:00:00-05:00", "timeZone": "America/New_York"}
    assert body["end"] == {"dateTime": "2026-12-01T09:30:00-05:00", "timeZone": "America/New_York"}
    assert body["summary"] == "General check-up: Ada Lovelace"
    assert "+1 ••• ••• 0142" in body["description"] and "5550142" not in json.dumps(body)
    assert booking.id in body["description"] and "first visit" in body["description"]
    assert body["extendedProperties"] == {"private": {BOOKING_ID_PROPERTY: booking.id, "source": "phone"}}
    assert "attendees" not in body and "recurrence" not in body
    invited = event_body(booking, business, invite_customer=True)
    assert invited["attendees"] == [{"email": "ada@example.com", "displayName": "Ada Lovelace"}]


def test_summer_times_carry_the_summer_offset(business: Business) -> None:
    body = event_body(make_booking(start=datetime(2026, 7, 1, 13, 0, tzinfo=UTC)), business)
    assert body["start"]["dateTime"] == "2026-07-01T09:00:00-04:00"


def test_recurrence_only_for_a_series(business: Business) -> None:
    assert "recurrence" not in event_body(make_booking(), business, recurrence="FREQ=WEEKLY;COUNT=4")
    series = make_booking(series_id=SERIES)
    assert event_body(series, business, recurrence="FREQ=WEEKLY;COUNT=4")["recurrence"] == ["RRULE:FREQ=WEEKLY;COUNT=4"]
    assert event_body(series, business, recurrence="RRULE:FREQ=DAILY;COUNT=2")["recurrence"] == [
        "RRULE:FREQ=DAILY;COUNT=2"
    ]


def http_error(status: int, reason: str | None, headers: dict[str, str] | None = None) -> HttpError:
    response = httplib2.Response({"status": status, **(headers or {})})
    errors = [{"domain": "global", "reason": reason, "message": "m"}] if reason else []
    content = json.dumps({"error": {"errors": errors, "code": status, "message": "m"}}).encode()
    return HttpError(response, content, uri="http://calendar.test/")


@pytest.mark.parametrize(
    ("status", "reason", "permanent"),
    [
        (429, "rateLimitExceeded", False),
        (403, "rateLimitExceeded", False),
        (403, "userRateLimitExceeded", False),
        (403, "forbidden", True),
        (403, "forbiddenForServiceAccounts", True),
        (500, "backendError", False),
        (502, None, False),
        (503, "backendError", False),
        (401, "authError", True),
        (400, "invalid", True),
        (404, "notFound", True),
        (410, "deleted", True),
    ],
)
def test_classification_of_each_status(status: int, reason: str | None, permanent: bool) -> None:
    failure = classify(http_error(status, reason), "insert", booking_id="b1")
    assert failure.permanent is permanent
    assert str(status) in failure.detail and failure.context == {"booking_id": "b1"}


def test_retry_after_seconds_or_date() -> None:
    assert classify(http_error(429, "rateLimitExceeded", {"retry-after": "7"}), "insert").retry_after == 7.0
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert retry_after({"retry-after": "Mon, 30 Nov 2026 12:00:30 GMT"}, now=now) == 30.0
    assert retry_after({"retry-after": "soon"}) is None
    assert classify(http_error(400, "invalid", {"retry-after": "7"}), "insert").retry_after is None


# -- through the real client against the simulator ----------------------------------------------


async def test_create_is_idempotent_one_event_per_booking(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    booking = make_booking()
    first = await calendar.create(booking, business)
    second = await calendar.create(booking, business)  # the outbox ran it again: 409 duplicate = done
    concurrent = await asyncio.gather(*(calendar.create(booking, business) for _ in range(4)))
    assert first == second == event_id_for(booking.id) and set(concurrent) == {first}
    events = state.live_events(LEE)
    assert len(events) == 1
    assert events[0]["extendedProperties"]["private"][BOOKING_ID_PROPERTY] == booking.id
    assert events[0]["start"] == {"dateTime": "2026-12-01T09:00:00-05:00", "timeZone": "America/New_York"}
    assert state.token_grants == ["urn:ietf:params:oauth:grant-type:jwt-bearer"] * len(state.token_grants)


async def test_list_by_private_property_finds_the_booking(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, url = calendar_sim
    one, two = make_booking(), make_booking(start=START + timedelta(hours=1))
    await calendar.create(one, business)
    await calendar.create(two, business)
    state.tokens["test-token"] = float("inf")
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer test-token"}) as client:
        answer = await client.get(
            f"/calendar/v3/calendars/{LEE}/events",
            params={"privateExtendedProperty": f"{BOOKING_ID_PROPERTY}={two.id}"},
        )
        unauthorised = await client.get(f"/calendar/v3/calendars/{LEE}/events", headers={"Authorization": "Bearer x"})
    assert [item["id"] for item in answer.json()["items"]] == [event_id_for(two.id)]
    assert unauthorised.status_code == 401
    assert unauthorised.json()["error"]["errors"][0]["reason"] == "authError"


async def test_update_moves_the_event_and_delete_twice_is_fine(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    booking = make_booking()
    event_id = await calendar.create(booking, business)
    assert event_id is not None
    moved = replace(booking, start=START + timedelta(days=1), end=START + timedelta(days=1, minutes=30))
    assert await calendar.update(moved, business) == event_id
    event = state.calendars[LEE][event_id]
    assert event["start"]["dateTime"] == "2026-12-02T09:00:00-05:00" and event["sequence"] == 1
    assert event["summary"] == "General check-up: Ada Lovelace"  # patch kept the rest
    assert await calendar.delete(moved, business) == event_id
    assert await calendar.delete(moved, business) == event_id  # 410 gone: already done
    assert await calendar.delete(make_booking(), business) is not None  # 404 never created: nothing to do
    assert state.live_events(LEE) == []


async def test_resource_without_calendar_is_skipped(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    booking = make_booking(resource_id="nurse-kim")
    assert await calendar.create(booking, business) is None
    assert await calendar.update(booking, business) is None
    assert await calendar.delete(booking, business) is None
    assert state.requests == []


async def test_recurring_series_is_one_event_with_its_rule(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    booking = make_booking(series_id=SERIES)
    event_id = await calendar.create(booking, business, recurrence="FREQ=WEEKLY;COUNT=3")
    assert event_id is not None
    assert state.calendars[LEE][event_id]["recurrence"] == ["RRULE:FREQ=WEEKLY;COUNT=3"]
    busy = await calendar.busy(LEE, START - timedelta(days=1), START + timedelta(days=30))
    assert [interval.start for interval in busy] == [START + timedelta(weeks=week) for week in range(3)]
    assert event_id == event_id_for(SERIES)
    assert state.calendars[LEE][event_id]["extendedProperties"]["private"]["voicebook_series_id"] == SERIES


async def test_one_occurrence_of_a_series_moves_or_goes_alone(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    first = make_booking(series_id=SERIES)
    await calendar.create(first, business, recurrence="FREQ=WEEKLY;COUNT=3")
    second = Occurrence(SERIES, START + timedelta(weeks=1))
    third = Occurrence(SERIES, START + timedelta(weeks=2))
    moved = make_booking(series_id=SERIES, start=START + timedelta(weeks=1, hours=2))
    for _ in range(2):  # a retried patch lands in the same place
        assert await calendar.update(moved, business, occurrence=second) == instance_id_for(second)
    exception = state.calendars[LEE][instance_id_for(second)]
    assert exception["recurringEventId"] == event_id_for(SERIES)
    assert exception["start"]["dateTime"].endswith("11:00:00-05:00")
    for _ in range(2):  # a retried delete finds the instance gone: done
        await calendar.delete(make_booking(series_id=SERIES, start=third.original_start), business, occurrence=third)
    busy = await calendar.busy(LEE, START - timedelta(days=1), START + timedelta(days=30))
    assert [interval.start for interval in busy] == [START, START + timedelta(weeks=1, hours=2)]


async def test_a_booking_moved_to_another_resource_moves_its_event(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    booking = make_booking()
    await calendar.create(booking, business)
    moved = make_booking(booking.id, resource_id="dr-patel", start=START + timedelta(hours=1))
    for _ in range(2):  # a retry after the move finds nothing left to move and only retimes
        assert await calendar.update(moved, business, previous_resource_id="dr-lee") == event_id_for(booking.id)
    assert state.live_events(LEE) == []
    [event] = state.live_events(PATEL)
    assert event["id"] == event_id_for(booking.id) and event["start"]["dateTime"].endswith("10:00:00-05:00")

    # An occurrence cannot leave its series: its instance goes, and it gets an event of its own.
    await calendar.create(make_booking(series_id=SERIES), business, recurrence="FREQ=WEEKLY;COUNT=2")
    occurrence = Occurrence(SERIES, START + timedelta(weeks=1))
    alone = make_booking(resource_id="dr-patel", series_id=SERIES, start=START + timedelta(weeks=1))
    await calendar.update(alone, business, occurrence=occurrence, previous_resource_id="dr-lee")
    assert [i.start for i in await calendar.busy(LEE, START, START + timedelta(days=30))] == [START]
    assert {e["id"] for e in state.live_events(PATEL)} == {event_id_for(booking.id), event_id_for(alone.id)}


@pytest.mark.parametrize("fault", ["429", "403", "403user", "500", "503"])
async def test_provider_faults_are_transient_and_a_retry_lands_once(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business, fault: Any
) -> None:
    state, _ = calendar_sim
    state.faults = CalendarFaults(next=[fault], retry_after=7)
    booking = make_booking()
    with pytest.raises(EffectFailed) as caught:
        await calendar.create(booking, business)
    assert caught.value.permanent is False
    assert caught.value.retry_after == (None if fault.startswith("5") else 7.0)
    assert await calendar.create(booking, business) == event_id_for(booking.id)
    assert len(state.live_events(LEE)) == 1


async def test_timeout_is_transient(
    calendar_sim: tuple[CalendarState, str], private_key_pem: str, business: Business
) -> None:
    state, url = calendar_sim
    calendar = GoogleCalendar.from_service_account(
        service_account_info(url, private_key_pem), api_endpoint=f"{url}/calendar/v3/", timeout=0.3
    )
    state.faults = CalendarFaults(next=["timeout"], hang_seconds=10)
    with pytest.raises(EffectFailed) as caught:
        await calendar.create(make_booking(), business)
    assert caught.value.permanent is False and caught.value.code == "calendar_unreachable"


async def test_connection_refused_is_transient(private_key_pem: str, business: Business) -> None:
    state = CalendarState()
    async with serving(create_google_calendar_simulator(state), lifespan="off") as url:
        pass  # the port is closed again: nothing listens there now
    calendar = GoogleCalendar.from_service_account(
        service_account_info(url, private_key_pem), api_endpoint=f"{url}/calendar/v3/"
    )
    with pytest.raises(EffectFailed) as caught:
        await calendar.create(make_booking(), business)
    assert caught.value.permanent is False


async def test_client_errors_are_permanent(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    with pytest.raises(EffectFailed) as bad_rule:  # 400: Google refuses DTSTART inside recurrence
        await calendar.create(make_booking(series_id=SERIES), business, recurrence="DTSTART:20261201T090000")
    del state.calendars[PATEL]
    with pytest.raises(EffectFailed) as no_calendar:  # 404 on insert: the calendar is gone
        await calendar.create(make_booking(resource_id="dr-patel"), business)
    with pytest.raises(EffectFailed) as no_event:  # 404 on patch: nothing to move
        await calendar.update(make_booking(), business)
    assert all(caught.value.permanent for caught in (bad_rule, no_calendar, no_event))
    assert "400" in bad_rule.value.detail and "404" in no_calendar.value.detail


async def test_expired_token_is_refreshed_once_then_401_is_permanent(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    await calendar.create(make_booking(), business)
    grants = len(state.token_grants)
    state.expire_tokens()  # the client still believes its token valid: the API answers 401
    await calendar.create(make_booking(), business)
    assert len(state.token_grants) == grants + 1
    state.reject_tokens = True
    with pytest.raises(EffectFailed) as caught:
        await calendar.create(make_booking(), business)
    assert caught.value.permanent is True and "401" in caught.value.detail
    assert len(state.token_grants) == grants + 2  # exactly one refresh for that attempt
    assert len(state.live_events(LEE)) == 2


async def test_delegated_subject_reaches_the_token_endpoint(
    calendar_sim: tuple[CalendarState, str], private_key_pem: str, business: Business
) -> None:
    state, url = calendar_sim
    calendar = GoogleCalendar.from_service_account(
        service_account_info(url, private_key_pem),
        subject="frontdesk@riverside-clinic.example",
        api_endpoint=f"{url}/calendar/v3/",
    )
    await calendar.create(make_booking(), business)
    assert state.subjects == ["frontdesk@riverside-clinic.example"]


async def test_unknown_service_account_key_is_refused_permanently(
    calendar_sim: tuple[CalendarState, str], business: Business
) -> None:
    _, url = calendar_sim
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    calendar = GoogleCalendar.from_service_account(service_account_info(url, pem), api_endpoint=f"{url}/calendar/v3/")
    with pytest.raises(EffectFailed) as caught:
        await calendar.create(make_booking(), business)
    assert caught.value.permanent is True and caught.value.code == "calendar_auth_failed"


async def test_user_oauth_refreshes_and_creates(calendar_sim: tuple[CalendarState, str], business: Business) -> None:
    state, url = calendar_sim
    state.add_user_grant("client-1", "secret-1", "refresh-1")
    calendar = GoogleCalendar.from_user_oauth(
        None, "refresh-1", f"{url}/token", "client-1", "secret-1", api_endpoint=f"{url}/calendar/v3/"
    )
    await calendar.create(make_booking(), business)
    assert state.token_grants == ["refresh_token"] and len(state.live_events(LEE)) == 1


async def test_free_busy_answers_busy_intervals_and_per_calendar_errors(
    calendar_sim: tuple[CalendarState, str], calendar: GoogleCalendar, business: Business
) -> None:
    state, _ = calendar_sim
    await calendar.create(make_booking(), business)  # 14:00-14:30Z
    await calendar.create(make_booking(start=START + timedelta(minutes=30)), business)  # adjacent: merged
    state.external_busy[LEE] = [(START + timedelta(hours=3), START + timedelta(hours=4))]
    busy = await calendar.busy(LEE, START - timedelta(hours=1), START + timedelta(hours=3, minutes=30))
    assert busy == [
        Interval(START, START + timedelta(hours=1)),
        Interval(START + timedelta(hours=3), START + timedelta(hours=3, minutes=30)),  # clipped to the window
    ]
    assert await calendar.busy(PATEL, START, START + timedelta(hours=1)) == []
    with pytest.raises(EffectFailed) as caught:
        await calendar.busy("nobody@example.com", START, START + timedelta(hours=1))
    assert caught.value.permanent is True and "notFound" in caught.value.detail
