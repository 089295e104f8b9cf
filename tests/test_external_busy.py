"""Google free/busy imported into the Redis index: through the real google-api-python-client against the
Calendar simulator on loopback, a real Redis and a real ledger. Covers the hard and soft conflict
policies, our own events not counted twice, refreshes on demand and on schedule, and a slow or failing
calendar never holding up the hold path."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from booking.business import EXAMPLE_BUSINESS_FILE, Business, parse_business
from booking.domain import Interval
from booking.errors import ConfigurationError, EffectFailed
from booking.external_busy import ExternalBusyRefresher, subtract
from booking.freebusy import FreeBusyIndex
from booking.ledger.repository import CustomerDetails, Ledger
from booking.service import Booked, BookingService, BookRequest, Held, SlotUnavailable
from integrations.google_calendar import GoogleCalendar
from integrations.simulators.google_calendar import (
    CalendarFaults,
    CalendarState,
    service_account_info,
)
from tests.conftest import FrozenClock, running_app
from voice_server.ports import CallInfo, ToolCall
from voice_server.settings import Settings
from voice_server.tools import BookingTools

LEE = "dr-lee@riverside-clinic.example"
PATEL = "dr-patel@riverside-clinic.example"
SA_EMAIL = "voicebook@voicebook-test.iam.gserviceaccount.com"
NY = ZoneInfo("America/New_York")
INTERVAL = timedelta(minutes=5)
TUESDAY = date(2026, 12, 1)  # Dr Lee works 08:30-12:00 and 13:00-17:00; Dr Patel does not work Tuesdays
FREE_BUSY = ("POST", "/calendar/v3/freeBusy")
ALICE = CustomerDetails(phone="(212) 555-0142", name="Alice Rivera")


def ny(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=NY).astimezone(UTC)


def business_with(booking: dict[str, Any] | None = None, **resources: dict[str, Any]) -> Business:
    """The example clinic with changed ``[booking]`` rules and per-resource settings."""
    data = tomllib.loads(EXAMPLE_BUSINESS_FILE.read_text(encoding="utf-8"))
    data["booking"].update(booking or {})
    for resource in data["resources"]:
        resource.update(resources.get(resource["id"], {}))
    return parse_business(data)


@dataclass
class Rig:
    """A booking service whose refresher reads the simulator's calendars."""

    state: CalendarState
    calendar: GoogleCalendar
    business: Business
    index: FreeBusyIndex
    refresher: ExternalBusyRefresher
    service: BookingService
    clock: FrozenClock

    def free_busy_requests(self) -> int:
        return self.state.requests.count(FREE_BUSY)

    def busy_in_google(self, calendar_id: str, start: datetime, end: datetime) -> None:
        """An event someone made in Google directly (free/busy shows it; voicebook never wrote it)."""
        self.state.external_busy.setdefault(calendar_id, []).append((start, end))

    async def slot_starts(self, day: date, resource_id: str | None = "dr-lee") -> set[datetime]:
        window = Interval(ny(day, 0), ny(day + timedelta(days=1), 0))
        search = await self.service.find_slots("checkup", window=window, resource_id=resource_id, limit=200)
        return {slot.start for slot in search.slots}

    async def fetched_at(self, resource_id: str, day: date) -> datetime | None:
        return (await self.index.external_fetched_at(resource_id, [day])).get(day)


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(
    calendar_sim: tuple[CalendarState, str],
    private_key_pem: str,
    ledger: Ledger,
    redis_client: aioredis.Redis,
    clock: FrozenClock,
) -> AsyncIterator[RigFactory]:
    state, url = calendar_sim
    built: list[Rig] = []

    async def make(
        business: Business | None = None,
        *,
        interval: timedelta = INTERVAL,
        external_wait: timedelta = timedelta(seconds=5),
    ) -> Rig:
        business = business or business_with()
        calendar = GoogleCalendar.from_service_account(
            service_account_info(url, private_key_pem), api_endpoint=f"{url}/calendar/v3/", timeout=5.0
        )
        index = FreeBusyIndex(redis_client, prefix=f"t{uuid.uuid4().hex[:6]}", external_ttl=3 * INTERVAL)
        refresher = ExternalBusyRefresher(business, ledger, index, calendar, interval=interval, clock=clock)
        service = BookingService(business, ledger, index, clock=clock, external=refresher, external_wait=external_wait)
        await service.start()
        rig = Rig(state, calendar, business, index, refresher, service, clock)
        built.append(rig)
        return rig

    yield make
    for rig in built:
        await rig.service.drain()
        await rig.refresher.aclose()


# -- the pure part -------------------------------------------------------------------------------


def hours(start: float, end: float) -> Interval:
    base = datetime(2030, 1, 1, tzinfo=UTC)
    return Interval(base + timedelta(hours=start), base + timedelta(hours=end))


def test_subtract_keeps_only_what_no_hole_covers() -> None:
    assert subtract([hours(9, 12)], [hours(10, 11)]) == [hours(9, 10), hours(11, 12)]
    assert subtract([hours(9, 12)], [hours(8, 13)]) == []
    assert subtract([hours(9, 12), hours(14, 15)], [hours(11, 14.5), hours(8, 9.5)]) == [
        hours(9.5, 11),
        hours(14.5, 15),
    ]
    assert subtract([hours(9, 10)], []) == [hours(9, 10)]
    assert subtract([hours(9, 10)], [hours(10, 11), hours(7, 9)]) == [hours(9, 10)]  # touching holes


def test_the_policy_is_the_business_default_unless_the_resource_overrides_it() -> None:
    business = business_with({"external_conflicts": "soft"}, **{"dr-patel": {"external_conflicts": "hard"}})
    assert business.external_conflicts("dr-lee") == "soft"
    assert business.external_conflicts("dr-patel") == "hard"
    assert business_with().external_conflicts("dr-lee") == "hard"  # the default


def test_an_unknown_policy_is_refused_with_its_location() -> None:
    with pytest.raises(ConfigurationError, match=r"resources\[0\]\.external_conflicts"):
        business_with(**{"dr-lee": {"external_conflicts": "maybe"}})
    with pytest.raises(ConfigurationError, match=r"booking\.external_conflicts"):
        business_with({"external_conflicts": "strict"})


# -- the refresher -------------------------------------------------------------------------------


async def test_one_refresh_covers_the_horizon_in_two_requests_and_stamps_every_day(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.busy_in_google(LEE, ny(TUESDAY, 10), ny(TUESDAY, 11))
    await rig.refresher.refresh("dr-lee")
    # Today (30 November) through the 60-day horizon and two days' margin: 63 days, 60 per request.
    assert rig.free_busy_requests() == 2
    first, last = date(2026, 11, 30), date(2027, 1, 31)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    stamps = await rig.index.external_fetched_at("dr-lee", [*days, last + timedelta(days=1)])
    assert set(stamps) == set(days) and set(stamps.values()) == {rig.clock.now}
    assert await rig.index.external_busy("dr-lee", Interval(ny(TUESDAY, 0), ny(TUESDAY, 23))) == (
        Interval(ny(TUESDAY, 10), ny(TUESDAY, 11)),
    )
    assert await rig.refresher.refresh_all() == ()
    assert await rig.index.external_fetched_at("nurse-kim", days) == {}  # no calendar, nothing read


async def test_a_failing_calendar_is_reported_by_refresh_all_and_the_others_still_refresh(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    del rig.state.calendars[PATEL]  # Google answers notFound for it
    assert await rig.refresher.refresh_all() == ("dr-patel",)
    assert await rig.fetched_at("dr-lee", TUESDAY) == rig.clock.now
    assert await rig.fetched_at("dr-patel", TUESDAY) is None


# -- the conflict policy -------------------------------------------------------------------------


async def test_hard_policy_hides_and_refuses_time_busy_in_google(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.busy_in_google(LEE, ny(TUESDAY, 10), ny(TUESDAY, 11))
    await rig.refresher.refresh_all()

    starts = await rig.slot_starts(TUESDAY)
    assert ny(TUESDAY, 9, 15) in starts and ny(TUESDAY, 11) in starts  # 9:15 ends with its buffer at 9:55
    assert not starts & {ny(TUESDAY, 9, 30), ny(TUESDAY, 10), ny(TUESDAY, 10, 45)}
    refused = await rig.service.hold("checkup", ny(TUESDAY, 10), resource_id="dr-lee")
    assert isinstance(refused, SlotUnavailable) and refused.alternatives
    outcome = await rig.service.book(BookRequest("checkup", ny(TUESDAY, 10), ALICE, resource_id="dr-lee"))
    assert isinstance(outcome, SlotUnavailable)
    held = await rig.service.hold("checkup", ny(TUESDAY, 11), resource_id="dr-lee")
    assert isinstance(held, Held) and held.warnings == ()


async def test_soft_policy_offers_holds_and_books_the_time_with_a_warning(make_rig: RigFactory) -> None:
    rig = await make_rig(business_with({"external_conflicts": "soft"}))
    rig.busy_in_google(LEE, ny(TUESDAY, 10), ny(TUESDAY, 11))
    await rig.refresher.refresh_all()
    warning = "overlaps busy time in Dr. Amelia Lee's calendar, 2026-12-01 10:00 to 2026-12-01 11:00"

    assert {ny(TUESDAY, 9, 30), ny(TUESDAY, 10), ny(TUESDAY, 10, 45)} <= await rig.slot_starts(TUESDAY)
    held = await rig.service.hold("checkup", ny(TUESDAY, 10), resource_id="dr-lee")
    assert isinstance(held, Held) and held.warnings == (warning,)
    booked = await rig.service.book(
        BookRequest("checkup", ny(TUESDAY, 10), ALICE, resource_id="dr-lee", hold_token=held.token)
    )
    assert isinstance(booked, Booked) and booked.warnings == (warning,)
    # Without a hold of its own (the book path takes one) the warning comes the same way.
    other = await rig.service.book(BookRequest("checkup", ny(TUESDAY, 10, 45), ALICE, resource_id="dr-lee"))
    assert isinstance(other, Booked) and other.warnings == (warning,)
    clear = await rig.service.book(BookRequest("checkup", ny(TUESDAY, 13), ALICE, resource_id="dr-lee"))
    assert isinstance(clear, Booked) and clear.warnings == ()
    # Our own booking still refuses: only external time is soft.
    assert isinstance(await rig.service.hold("checkup", ny(TUESDAY, 10), resource_id="dr-lee"), SlotUnavailable)


async def test_a_resource_can_override_the_business_policy(make_rig: RigFactory) -> None:
    wednesday = TUESDAY + timedelta(days=1)  # Dr Lee 08:30-12:00, Dr Patel 10:00-18:00
    rig = await make_rig(business_with(**{"dr-lee": {"external_conflicts": "soft"}}))
    rig.busy_in_google(LEE, ny(wednesday, 10), ny(wednesday, 11))
    rig.busy_in_google(PATEL, ny(wednesday, 10), ny(wednesday, 11))
    await rig.refresher.refresh_all()
    window = Interval(ny(wednesday, 0), ny(wednesday, 23))
    search = await rig.service.find_slots("checkup", window=window, limit=500)
    at_ten = {slot.resource_id for slot in search.slots if slot.start == ny(wednesday, 10)}
    assert at_ten == {"dr-lee"}
    assert isinstance(await rig.service.hold("checkup", ny(wednesday, 10), resource_id="dr-patel"), SlotUnavailable)
    held = await rig.service.hold("checkup", ny(wednesday, 10), resource_id="dr-lee")
    assert isinstance(held, Held) and len(held.warnings) == 1


# -- our own events ------------------------------------------------------------------------------


async def test_our_own_event_is_not_counted_twice_so_a_booking_moves_by_a_quarter_hour(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    await rig.refresher.refresh_all()
    booked = await rig.service.book(BookRequest("checkup", ny(TUESDAY, 10), ALICE, resource_id="dr-lee"))
    assert isinstance(booked, Booked)
    await rig.calendar.create(booked.booking, rig.business)  # what the calendar effect does
    rig.busy_in_google(LEE, ny(TUESDAY, 9), ny(TUESDAY, 10))  # a meeting right before it
    # Google merges the two: one busy span 09:00-10:30 that includes our own event.
    day = (ny(TUESDAY, 0), ny(TUESDAY, 23))
    assert await rig.calendar.busy(LEE, *day) == [Interval(ny(TUESDAY, 9), ny(TUESDAY, 10, 30))]

    await rig.refresher.refresh("dr-lee")
    assert await rig.index.external_busy("dr-lee", Interval(*day)) == (Interval(ny(TUESDAY, 9), ny(TUESDAY, 10)),)
    moved = await rig.service.reschedule(booked.booking.id, ny(TUESDAY, 10, 15))
    assert isinstance(moved, Booked) and moved.booking.start == ny(TUESDAY, 10, 15)
    into_the_meeting = await rig.service.reschedule(booked.booking.id, ny(TUESDAY, 9, 45))
    assert isinstance(into_the_meeting, SlotUnavailable)


# -- on demand -----------------------------------------------------------------------------------


async def test_stale_data_is_refreshed_by_an_availability_query(make_rig: RigFactory) -> None:
    rig = await make_rig()
    await rig.refresher.refresh_all()
    requests = rig.free_busy_requests()
    rig.busy_in_google(LEE, ny(TUESDAY, 14), ny(TUESDAY, 15))

    assert ny(TUESDAY, 14) in await rig.slot_starts(TUESDAY)  # fresh enough: Google is not asked
    assert rig.free_busy_requests() == requests

    rig.clock.advance(INTERVAL + timedelta(seconds=1))
    assert ny(TUESDAY, 14) not in await rig.slot_starts(TUESDAY)
    assert rig.free_busy_requests() == requests + 2  # one refresh of Dr Lee: two requests
    assert await rig.fetched_at("dr-lee", TUESDAY) == rig.clock.now


async def test_concurrent_queries_share_one_fetch(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.state.faults = CalendarFaults(latency_ms=200)  # so the queries overlap the fetch
    searches = await asyncio.gather(*(rig.slot_starts(TUESDAY) for _ in range(8)))
    assert all(starts == searches[0] for starts in searches)
    assert rig.free_busy_requests() == 2  # one refresh (of two requests) for eight queries


async def test_a_failing_calendar_leaves_queries_answering_from_the_index(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.busy_in_google(LEE, ny(TUESDAY, 10), ny(TUESDAY, 11))
    await rig.refresher.refresh_all()
    rig.busy_in_google(LEE, ny(TUESDAY, 14), ny(TUESDAY, 15))  # not seen yet
    rig.clock.advance(INTERVAL + timedelta(seconds=1))
    rig.state.faults = CalendarFaults(next=["500"])
    requests = rig.free_busy_requests()

    starts = await rig.slot_starts(TUESDAY)
    assert ny(TUESDAY, 10) not in starts and ny(TUESDAY, 14) in starts  # what the index had
    assert rig.free_busy_requests() == requests + 1  # the failed request
    await rig.slot_starts(TUESDAY)
    assert rig.free_busy_requests() == requests + 1  # right after a failure queries do not wait on Google

    rig.clock.advance(timedelta(minutes=1))
    assert ny(TUESDAY, 14) not in await rig.slot_starts(TUESDAY)  # retried, and Google answers again


async def test_a_hanging_calendar_delays_a_query_only_briefly(make_rig: RigFactory) -> None:
    rig = await make_rig(external_wait=timedelta(milliseconds=200))
    await rig.refresher.refresh_all()
    rig.busy_in_google(LEE, ny(TUESDAY, 14), ny(TUESDAY, 15))
    rig.clock.advance(INTERVAL + timedelta(seconds=1))
    rig.state.faults = CalendarFaults(next=["timeout"], hang_seconds=3)

    assert ny(TUESDAY, 14) in await rig.slot_starts(TUESDAY)  # answered from the index
    # The fetch outlived the query; joining it gets its outcome (the simulator gives up with a 503).
    with pytest.raises(EffectFailed):
        await rig.refresher.refresh("dr-lee")


async def test_without_any_calendar_data_the_ledger_alone_answers(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.busy_in_google(LEE, ny(TUESDAY, 10), ny(TUESDAY, 11))
    rig.state.faults = CalendarFaults(next=["503"])
    assert ny(TUESDAY, 10) in await rig.slot_starts(TUESDAY)
    held = await rig.service.hold("checkup", ny(TUESDAY, 10), resource_id="dr-lee")
    assert isinstance(held, Held)  # the ledger and Redis decide; the calendar is consulted when it answers


# -- the hold path -------------------------------------------------------------------------------


async def test_a_hold_does_not_wait_for_a_slow_calendar_but_refreshes_behind_it(make_rig: RigFactory) -> None:
    rig = await make_rig()
    await rig.refresher.refresh_all()
    before = rig.clock.now
    rig.clock.advance(INTERVAL + timedelta(seconds=1))
    rig.state.faults = CalendarFaults(latency_ms=500)

    held = await rig.service.hold("checkup", ny(TUESDAY, 10), resource_id="dr-lee")
    assert isinstance(held, Held)
    assert await rig.fetched_at("dr-lee", TUESDAY) == before  # the hold answered before Google did
    await rig.service.drain()  # the background refresh is owned by the service
    assert await rig.fetched_at("dr-lee", TUESDAY) == rig.clock.now

    # An availability query, by contrast, waits for the stale calendar (within its bound).
    rig.clock.advance(INTERVAL + timedelta(seconds=1))
    await rig.slot_starts(TUESDAY)
    assert await rig.fetched_at("dr-lee", TUESDAY) == rig.clock.now


# -- the schedule --------------------------------------------------------------------------------


async def test_the_schedule_refreshes_and_survives_a_failed_tick(make_rig: RigFactory) -> None:
    rig = await make_rig(interval=timedelta(milliseconds=50))
    rig.state.faults = CalendarFaults(next=["500"])
    rig.busy_in_google(LEE, ny(TUESDAY, 10), ny(TUESDAY, 11))
    task = asyncio.create_task(rig.refresher.run())
    try:
        window = Interval(ny(TUESDAY, 0), ny(TUESDAY, 23))
        for _ in range(400):
            if await rig.index.external_busy("dr-lee", window):
                break
            await asyncio.sleep(0.025)
        assert await rig.index.external_busy("dr-lee", window) == (Interval(ny(TUESDAY, 10), ny(TUESDAY, 11)),)
        assert not rig.state.faults.next  # the first tick's request failed, and a later tick succeeded
    finally:
        rig.refresher.stop()
        await task


async def test_closing_ends_the_schedule_in_the_middle_of_a_slow_refresh(make_rig: RigFactory) -> None:
    rig = await make_rig(interval=timedelta(milliseconds=10))
    rig.state.faults = CalendarFaults(latency_ms=1500)
    task = asyncio.create_task(rig.refresher.run())
    for _ in range(400):
        if rig.free_busy_requests():
            break
        await asyncio.sleep(0.01)
    assert rig.free_busy_requests() == 1  # a tick is waiting for Google
    await rig.refresher.aclose()
    await task  # returned, not cancelled, without the answer
    assert task.exception() is None
    assert await rig.fetched_at("dr-lee", TUESDAY) is None


# -- wired into the server -----------------------------------------------------------------------


@pytest.fixture
def google_settings(
    app_settings: Settings, calendar_sim: tuple[CalendarState, str], private_key_pem: str, tmp_path: Path
) -> Settings:
    _, url = calendar_sim
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(service_account_info(url, private_key_pem)))
    return dataclasses.replace(
        app_settings,
        google_service_account_file=key_file,
        google_calendar_api_url=f"{url}/calendar/v3/",
        run_workers=False,
    )


HOLD = {"service": "checkup", "start": "2026-12-01T10:00", "resource": "dr-lee"}


async def test_the_server_loads_free_busy_at_start_up_and_refuses_busy_time(
    google_settings: Settings, calendar_sim: tuple[CalendarState, str], clock: FrozenClock
) -> None:
    state, _ = calendar_sim
    state.external_busy[LEE] = [(ny(TUESDAY, 10), ny(TUESDAY, 11))]
    headers = {"Authorization": f"Bearer {google_settings.admin_token}"}
    async with running_app(google_settings, clock) as (_, client):
        assert state.requests.count(FREE_BUSY) == 4  # both calendars, two requests each
        response = await client.post("/api/holds", json=HOLD, headers=headers)
        assert response.status_code == 409, response.text
    assert state.requests.count(FREE_BUSY) == 4  # the schedule was stopped at shutdown, not ticked


async def test_the_server_starts_when_google_fails_and_warns_under_the_soft_policy(
    google_settings: Settings, calendar_sim: tuple[CalendarState, str], clock: FrozenClock, tmp_path: Path
) -> None:
    state, _ = calendar_sim
    state.external_busy[LEE] = [(ny(TUESDAY, 10), ny(TUESDAY, 11))]
    state.faults = CalendarFaults(next=["503"])  # Dr Lee's first request at start-up
    text = EXAMPLE_BUSINESS_FILE.read_text(encoding="utf-8")
    soft_file = tmp_path / "soft.toml"
    soft_file.write_text(text.replace('external_conflicts = "hard"', 'external_conflicts = "soft"'))
    settings = dataclasses.replace(google_settings, business_file=soft_file)
    headers = {"Authorization": f"Bearer {settings.admin_token}"}
    async with running_app(settings, clock) as (app, client):
        # Dr Lee failed at start-up. A while later a hold is granted at once and refreshes him behind it.
        clock.advance(timedelta(minutes=1))
        first = await client.post("/api/holds", json=HOLD, headers=headers)
        assert first.status_code == 201 and first.json()["warnings"] == []
        await client.delete(f"/api/holds/{first.json()['token']}", headers=headers)
        await app.state.components.bookings.drain()
        hold = await client.post("/api/holds", json=HOLD, headers=headers)
        assert hold.status_code == 201, hold.text
        assert hold.json()["warnings"] == [
            "overlaps busy time in Dr. Amelia Lee's calendar, 2026-12-01 10:00 to 2026-12-01 11:00"
        ]
        booking = await client.post(
            "/api/bookings",
            json={**HOLD, "customer": {"phone": "(212) 555-0142"}, "hold_token": hold.json()["token"]},
            headers={**headers, "Idempotency-Key": "soft-1"},
        )
        assert booking.status_code == 201, booking.text
        assert booking.json()["warnings"] == hold.json()["warnings"]


async def test_the_agent_hears_the_warning(make_rig: RigFactory) -> None:
    rig = await make_rig(business_with({"external_conflicts": "soft"}))
    rig.busy_in_google(LEE, ny(TUESDAY, 10), ny(TUESDAY, 11))
    await rig.refresher.refresh_all()
    tools = BookingTools(rig.service, clock=rig.clock)
    info = CallInfo("CA-alice", "MZ-alice", "+12125550142", "+12125550100")
    checked = await tools.run(
        ToolCall(
            "call_1",
            "check_availability",
            {"service": "checkup", "date": "2026-12-01", "time": "10:00", "resource": "dr-lee"},
        ),
        info,
    )
    assert checked["held"] is True and len(checked["warnings"]) == 1
    booked = await tools.run(
        ToolCall(
            "call_2",
            "book_appointment",
            {"service": "checkup", "start": "2026-12-01T10:00", "customer_name": "Alice", "resource": "dr-lee"},
        ),
        info,
    )
    assert booked["status"] == "booked" and booked["warnings"] == checked["warnings"]
