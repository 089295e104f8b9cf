"""The agent's booking tools against a real booking service (real Redis, real ledger). Every test runs
three times: with the writes on the test's own loop; on a booking lane (a loop of their own on another
thread, with its own Redis client and ledger engines); and through the booking process's Unix socket
protocol (``booking.lane_process``, served here on the test's loop by a second service with its own
client and engines, as ``voicebook serve``'s booking process does in a process of its own)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from booking.domain import BookingStatus
from booking.freebusy import FreeBusyIndex
from booking.lane import BookingLane
from booking.lane_process import LaneClient, LaneServer
from booking.ledger.database import Database
from booking.ledger.repository import Ledger
from booking.service import BookingService
from booking.writes import Writers
from tests.conftest import FrozenClock
from voice_server.ports import CallInfo, ToolCall
from voice_server.tools import ALL_TOOL_SPECS, BookingTools, spoken_time

ALICE = CallInfo("CA-alice", "MZ-alice", "+12125550142", "+12125550100")
BOB = CallInfo("CA-bob", "MZ-bob", "+16465550199", "+12125550100")


@pytest.fixture(params=["call loop", "booking lane", "booking process"])
async def tools(
    request: pytest.FixtureRequest,
    service: BookingService,
    index: FreeBusyIndex,
    clock: FrozenClock,
    database_url: str,
    redis_url: str,
    socket_path: Path,
) -> AsyncIterator[BookingTools]:
    if request.param == "call loop":
        yield BookingTools(service, clock=clock)
        return

    async def build(stack: contextlib.AsyncExitStack) -> BookingService:
        redis = aioredis.Redis.from_url(redis_url)
        stack.push_async_callback(redis.aclose)
        database = Database.connect(database_url)
        stack.push_async_callback(database.dispose)
        lane_index = FreeBusyIndex(redis, prefix=index.prefix)
        return BookingService(service.business, Ledger(database, clock=clock), lane_index, clock=clock)

    if request.param == "booking process":
        async with contextlib.AsyncExitStack() as stack:
            server = LaneServer(Writers(await build(stack)))
            await server.start(socket_path)
            stack.push_async_callback(server.stop)
            client = LaneClient(socket_path, fallback=Writers(service))
            stack.push_async_callback(client.aclose)
            yield BookingTools(service, clock=clock, lane=client)
            assert client.local_writes == 0  # every write went through the socket
        return

    lane = BookingLane(build)
    await lane.start()
    try:
        yield BookingTools(service, clock=clock, lane=lane)
    finally:
        await lane.stop()


async def run(tools: BookingTools, name: str, info: CallInfo = ALICE, call_id: str = "call_1", **arguments: Any) -> Any:
    return await tools.run(ToolCall(call_id, name, arguments), info)


def test_every_spec_is_a_closed_json_object_schema() -> None:
    names = [spec.name for spec in ALL_TOOL_SPECS]
    assert names == [
        "check_availability",
        "book_appointment",
        "reschedule_appointment",
        "cancel_appointment",
        "find_my_appointments",
        "transfer_to_human",
        "end_call",
    ]
    for spec in ALL_TOOL_SPECS:
        assert spec.parameters["type"] == "object"
        assert spec.parameters["additionalProperties"] is False
        assert "title" not in spec.parameters
    book = next(s for s in ALL_TOOL_SPECS if s.name == "book_appointment")
    assert set(book.parameters["required"]) == {"service", "start", "customer_name"}


async def test_an_exact_free_time_is_held_and_booking_converts_the_hold(tools: BookingTools) -> None:
    checked = await run(
        tools, "check_availability", service="check-up", date="2026-12-01", time="10:00", resource="doctor lee"
    )
    assert checked["requested_available"] is True and checked["held"] is True
    assert checked["slots"][0] == {
        "start": "2026-12-01T10:00",
        "spoken": "Tuesday, December 1 at 10 AM",
        "resource": "dr-lee",
        "resource_name": "Dr. Amelia Lee",
    }
    # Someone else cannot take the held time in the meantime.
    other = await run(
        tools,
        "book_appointment",
        BOB,
        service="checkup",
        start="2026-12-01T10:00",
        customer_name="Bob",
        resource="dr-lee",
    )
    assert other["status"] == "unavailable" and other["alternatives"]
    booked = await run(
        tools, "book_appointment", service="checkup", start="2026-12-01T10:00", customer_name="Alice Smith"
    )
    assert booked["status"] == "booked" and booked["resource"] == "dr-lee"
    assert booked["spoken"] == "Tuesday, December 1 at 10 AM"


async def test_booking_is_idempotent_per_call_and_tool_call(tools: BookingTools, service: BookingService) -> None:
    args = {"service": "checkup", "start": "2026-12-01T11:00", "customer_name": "Alice Smith"}
    first = await run(tools, "book_appointment", call_id="call_7", **args)
    again = await run(tools, "book_appointment", call_id="call_7", **args)
    assert first["booking_id"] == again["booking_id"]
    assert len(await service.find_bookings(ALICE.caller)) == 1


async def test_what_the_caller_said_about_texts_is_recorded_with_the_booking(
    tools: BookingTools, service: BookingService
) -> None:
    consents = {}
    for answer, start, call in (
        (None, "2026-12-01T09:00", "c1"),
        (True, "2026-12-01T10:00", "c2"),
        (False, "2026-12-01T11:00", "c3"),
    ):
        extra = {} if answer is None else {"texts_ok": answer}
        done = await run(
            tools, "book_appointment", call_id=call, service="checkup", start=start, customer_name="Al", **extra
        )
        booking = await service.get_booking(done["booking_id"])
        consents[answer] = booking.sms_consent.value
    assert consents == {None: "implied", True: "given", False: "declined"}


async def test_a_taken_time_offers_alternatives_closest_first(tools: BookingTools) -> None:
    for resource, call in (("dr-lee", "a"), ("dr-patel", "b")):
        done = await run(
            tools,
            "book_appointment",
            BOB,
            call_id=call,
            service="checkup",
            start="2026-12-03T10:00",
            customer_name="Bob",
            resource=resource,
        )
        assert done["status"] == "booked"
    checked = await run(tools, "check_availability", service="checkup", date="2026-12-03", time="10:00")
    assert checked["requested_available"] is False and checked["held"] is False
    starts = [slot["start"] for slot in checked["slots"]]
    assert 1 <= len(starts) <= 3 and "2026-12-03T10:00" not in starts
    assert starts[0].startswith("2026-12-03")


async def test_outside_hours_is_not_an_error_but_has_alternatives(tools: BookingTools) -> None:
    checked = await run(tools, "check_availability", service="checkup", date="2026-12-01", time="22:00")
    assert checked["requested_available"] is False
    assert "outside opening hours" in checked["reason"]
    assert checked["slots"]


async def test_a_day_offers_spread_out_times_and_part_of_day_narrows_them(tools: BookingTools) -> None:
    day = await run(tools, "check_availability", service="checkup", date="2026-12-01")
    starts = [slot["start"] for slot in day["slots"]]
    assert len(starts) == 3 and starts == sorted(starts)
    afternoon = await run(tools, "check_availability", service="checkup", date="2026-12-01", part_of_day="afternoon")
    assert all(slot["start"] >= "2026-12-01T12:00" for slot in afternoon["slots"])
    nothing_said = await run(tools, "check_availability", service="vaccination")
    assert nothing_said["slots"]


@pytest.mark.parametrize(
    ("name", "arguments", "field"),
    [
        ("book_appointment", {"service": "checkup", "start": "2026-02-30T10:00", "customer_name": "A"}, "start"),
        ("book_appointment", {"service": "checkup", "start": "tomorrow at ten", "customer_name": "A"}, "start"),
        ("book_appointment", {"service": "checkup", "start": "2026-12-01T10:00"}, "customer_name"),
        (
            "book_appointment",
            {"service": "checkup", "start": "2026-12-01T10:00", "customer_name": "A", "phone": "x"},
            "phone",
        ),
        ("check_availability", {"service": "checkup", "date": "2026-13-01"}, "date"),
        ("check_availability", {"service": "checkup", "date": "2026-12-01", "time": "25:00"}, "time"),
        ("check_availability", {"service": "checkup", "part_of_day": "night"}, "part_of_day"),
    ],
)
async def test_bad_arguments_come_back_as_tool_errors(
    tools: BookingTools, service: BookingService, name: str, arguments: dict[str, Any], field: str
) -> None:
    result = await tools.run(ToolCall("call_1", name, arguments), ALICE)
    assert result["error"]["code"] == "invalid_argument"
    assert result["error"]["field"] == field
    assert await service.find_bookings(ALICE.caller) == []


async def test_unknown_service_staff_and_tool_are_explained(tools: BookingTools) -> None:
    unknown = await run(tools, "check_availability", service="massage")
    assert unknown["error"]["code"] == "unknown_service" and "checkup" in unknown["error"]["message"]
    nobody = await run(tools, "check_availability", service="checkup", resource="Dr. Who")
    assert nobody["error"]["code"] == "unknown_resource"
    assert (await run(tools, "fly_to_the_moon"))["error"]["code"] == "unknown_tool"
    time_without_date = await run(tools, "check_availability", service="checkup", time="10:00")
    assert time_without_date["error"]["field"] == "date"


async def test_a_time_that_does_not_exist_is_refused_clearly(tools: BookingTools) -> None:
    # 2027-03-14 02:30 does not exist in New York (clocks spring forward at 2:00).
    result = await run(tools, "book_appointment", service="checkup", start="2027-03-14T02:30", customer_name="A")
    assert "does not exist" in result["error"]["message"]


async def test_find_reschedule_and_cancel_only_touch_the_callers_own_bookings(
    tools: BookingTools, service: BookingService
) -> None:
    booked = await run(tools, "book_appointment", service="checkup", start="2026-12-01T10:00", customer_name="Alice")
    mine = await run(tools, "find_my_appointments")
    assert [a["booking_id"] for a in mine["appointments"]] == [booked["booking_id"]]
    assert (await run(tools, "find_my_appointments", BOB))["appointments"] == []

    stolen = await run(tools, "cancel_appointment", BOB, booking_id=booked["booking_id"])
    assert stolen["error"]["code"] == "not_found"
    moved_by_other = await run(
        tools, "reschedule_appointment", BOB, booking_id=booked["booking_id"], new_start="2026-12-01T11:00"
    )
    assert moved_by_other["error"]["code"] == "not_found"

    moved = await run(tools, "reschedule_appointment", booking_id=booked["booking_id"], new_start="2026-12-01T11:00")
    assert moved["status"] == "rescheduled" and moved["start"] == "2026-12-01T11:00"
    cancelled = await run(tools, "cancel_appointment", booking_id=booked["booking_id"])
    assert cancelled["status"] == "cancelled"
    assert (await service.get_booking(booked["booking_id"])).status is BookingStatus.CANCELLED
    assert (await run(tools, "find_my_appointments"))["appointments"] == []


async def test_reschedule_onto_a_taken_time_keeps_the_old_one(tools: BookingTools, service: BookingService) -> None:
    mine = await run(
        tools, "book_appointment", service="checkup", start="2026-12-01T10:00", customer_name="Alice", resource="dr-lee"
    )
    await run(
        tools,
        "book_appointment",
        BOB,
        service="checkup",
        start="2026-12-01T11:00",
        customer_name="Bob",
        resource="dr-lee",
    )
    moved = await run(
        tools, "reschedule_appointment", booking_id=mine["booking_id"], new_start="2026-12-01T11:00", resource="dr-lee"
    )
    assert moved["status"] == "unavailable" and moved["alternatives"]
    kept = await service.get_booking(mine["booking_id"])
    assert spoken_time(kept.start, service.business) == "Tuesday, December 1 at 10 AM"


def test_spoken_times_read_like_a_person_says_them(service: BookingService) -> None:
    from datetime import UTC, datetime

    business = service.business
    assert spoken_time(datetime(2026, 12, 1, 17, 0, tzinfo=UTC), business) == "Tuesday, December 1 at noon"
    assert spoken_time(datetime(2026, 12, 1, 19, 30, tzinfo=UTC), business) == "Tuesday, December 1 at 2:30 PM"


async def test_asking_for_an_overlapping_time_gives_back_the_earlier_hold(tools: BookingTools) -> None:
    first = await run(
        tools, "check_availability", service="checkup", date="2026-12-01", time="10:00", resource="dr-lee"
    )
    assert first["held"] is True
    moved = await run(
        tools, "check_availability", service="checkup", date="2026-12-01", time="10:15", resource="dr-lee"
    )
    assert moved["held"] is True and moved["slots"][0]["start"] == "2026-12-01T10:15"
    # 10:00 is free again for someone else.
    other = await run(
        tools, "check_availability", BOB, service="checkup", date="2026-12-01", time="10:00", resource="dr-lee"
    )
    assert other["requested_available"] is False  # 10:00-10:40 overlaps Alice's 10:15 hold
    later = await run(
        tools, "check_availability", BOB, service="checkup", date="2026-12-01", time="09:30", resource="dr-lee"
    )
    assert later["held"] is True


async def test_a_hold_taken_during_the_call_does_not_block_moving_onto_it(tools: BookingTools) -> None:
    booked = await run(tools, "book_appointment", service="checkup", start="2026-12-01T10:00", customer_name="Alice")
    await run(tools, "check_availability", service="checkup", date="2026-12-02", time="09:00", resource="dr-lee")
    moved = await run(
        tools,
        "reschedule_appointment",
        booking_id=booked["booking_id"],
        new_start="2026-12-02T09:00",
        resource="dr-lee",
    )
    assert moved["status"] == "rescheduled"
