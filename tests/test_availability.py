"""Opening intervals, slot checks, free slots and ranking, with the DST days of America/New_York
spelled out instant by instant."""

from __future__ import annotations

import time as stopwatch
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from booking.availability import SlotProblem, check_slot, free_slots, opening_intervals, rank_slots
from booking.business import Business, Service, parse_business
from booking.domain import Interval, Slot
from booking.timeutil import is_nonexistent, local_day_bounds

NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
WEEKDAYS_9_TO_5 = {day: ["09:00-17:00"] for day in ("mon", "tue", "wed", "thu", "fri")}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def span(start: str, end: str) -> Interval:
    return Interval(utc(start), utc(end))


def make_business(
    hours: dict[str, Any] | None = None,
    *,
    timezone: str = "America/New_York",
    closures: Sequence[dict[str, Any]] = (),
    booking: dict[str, Any] | None = None,
    extra_resources: Sequence[dict[str, Any]] = (),
    service: dict[str, Any] | None = None,
) -> Business:
    """A business with resource ``a`` (given ``hours``) and service ``visit`` (30 minutes, no buffers,
    served by ``a`` and every extra resource that ``service`` does not say otherwise about)."""
    resources = [{"id": "a", "name": "A", "hours": hours or WEEKDAYS_9_TO_5}, *extra_resources]
    visit = {
        "id": "visit",
        "name": "Visit",
        "duration_minutes": 30,
        "resources": [resource["id"] for resource in resources],
        **(service or {}),
    }
    return parse_business(
        {
            "business": {"name": "Test", "timezone": timezone},
            "booking": {"min_notice_minutes": 0, "horizon_days": 365, "slot_step_minutes": 30, **(booking or {})},
            "resources": resources,
            "services": [visit],
            "closures": list(closures),
        }
    )


def visit(business: Business) -> Service:
    service = business.service("visit")
    assert service is not None
    return service


def starts(slots: Sequence[Slot]) -> list[datetime]:
    return [slot.start for slot in slots]


LONG_AGO = utc("2025-12-01T00:00")


# --- opening_intervals -------------------------------------------------------------------------------


def test_weekly_hours_become_utc_intervals_per_local_date() -> None:
    business = make_business({"mon": ["08:30-12:00", "13:00-17:00"], "wed": "10:00-11:00"})
    week = Interval(*local_day_bounds(date(2026, 1, 5), NEW_YORK)).widen(timedelta(0), timedelta(days=6))
    assert opening_intervals(business, "a", week) == [
        span("2026-01-05T13:30", "2026-01-05T17:00"),
        span("2026-01-05T18:00", "2026-01-05T22:00"),
        span("2026-01-07T15:00", "2026-01-07T16:00"),
    ]


def test_opening_intervals_are_clipped_to_the_window() -> None:
    business = make_business()
    window = span("2026-01-05T15:00", "2026-01-06T15:30")
    assert opening_intervals(business, "a", window) == [
        span("2026-01-05T15:00", "2026-01-05T22:00"),
        span("2026-01-06T14:00", "2026-01-06T15:30"),
    ]


def test_24_00_ends_at_the_next_local_midnight_and_joins_the_next_days_hours() -> None:
    business = make_business({"mon": "20:00-24:00", "tue": ["00:00-02:00", "09:00-12:00", "12:00-13:00"]})
    window = span("2026-01-05T00:00", "2026-01-08T00:00")
    assert opening_intervals(business, "a", window) == [
        span("2026-01-06T01:00", "2026-01-06T07:00"),
        span("2026-01-06T14:00", "2026-01-06T18:00"),
    ]


def test_whole_day_closures_remove_the_local_day_for_the_named_resources_only() -> None:
    business = make_business(
        closures=[
            {"date": "2026-01-05", "reason": "holiday"},
            {"start_date": "2026-01-07", "end_date": "2026-01-08", "resources": ["b"]},
        ],
        extra_resources=[{"id": "b", "name": "B", "hours": WEEKDAYS_9_TO_5}],
    )
    window = span("2026-01-05T00:00", "2026-01-10T00:00")
    every_day = [span(f"2026-01-0{day}T14:00", f"2026-01-0{day}T22:00") for day in range(6, 10)]
    assert opening_intervals(business, "a", window) == every_day
    assert opening_intervals(business, "b", window) == [every_day[0], every_day[3]]


def test_partial_closure_cuts_local_wall_clock_time_out_of_a_span() -> None:
    business = make_business(closures=[{"start": "2026-01-06T11:15:00", "end": "2026-01-06T13:00:00"}])
    window = span("2026-01-06T00:00", "2026-01-07T00:00")
    assert opening_intervals(business, "a", window) == [
        span("2026-01-06T14:00", "2026-01-06T16:15"),
        span("2026-01-06T18:00", "2026-01-06T22:00"),
    ]


def test_whole_day_closure_on_spring_forward_day_removes_exactly_23_hours() -> None:
    business = make_business({day: "00:00-24:00" for day in ("sat", "sun", "mon")}, closures=[{"date": "2026-03-08"}])
    window = span("2026-03-07T00:00", "2026-03-11T00:00")
    assert opening_intervals(business, "a", window) == [
        span("2026-03-07T05:00", "2026-03-08T05:00"),
        span("2026-03-09T04:00", "2026-03-10T04:00"),
    ]


def test_unknown_resource_is_never_open() -> None:
    assert opening_intervals(make_business(), "nobody", span("2026-01-05T00:00", "2026-01-12T00:00")) == []


@pytest.mark.parametrize(
    ("hours", "expected"),
    [
        # Midnight EST to 06:00 EDT: five real hours, because 02:00-03:00 never happens.
        ("00:00-06:00", [("2026-03-08T05:00", "2026-03-08T10:00")]),
        ("01:00-03:00", [("2026-03-08T06:00", "2026-03-08T07:00")]),
        # Read with the offset from before the jump: 02:00 opens at 03:00 EDT, the same elapsed time.
        ("02:00-04:00", [("2026-03-08T07:00", "2026-03-08T08:00")]),
        # Wholly inside the gap: never open.
        ("02:30-03:00", []),
    ],
)
def test_spring_forward_day_hours(hours: str, expected: list[tuple[str, str]]) -> None:
    business = make_business({"sun": hours})
    day = Interval(*local_day_bounds(date(2026, 3, 8), NEW_YORK))
    assert opening_intervals(business, "a", day) == [span(*pair) for pair in expected]


@pytest.mark.parametrize(
    ("hours", "expected"),
    [
        # Midnight EDT to 06:00 EST: seven real hours, 01:00-02:00 happens twice.
        ("00:00-06:00", [("2026-11-01T04:00", "2026-11-01T11:00")]),
        ("01:00-03:00", [("2026-11-01T05:00", "2026-11-01T08:00")]),
    ],
)
def test_fall_back_day_hours(hours: str, expected: list[tuple[str, str]]) -> None:
    business = make_business({"sun": hours})
    day = Interval(*local_day_bounds(date(2026, 11, 1), NEW_YORK))
    assert opening_intervals(business, "a", day) == [span(*pair) for pair in expected]


# --- check_slot --------------------------------------------------------------------------------------

# Monday 2026-01-05 10:00 EST; the clinic opens 09:00-12:00 and 13:00-17:00 on weekdays.
NOW = utc("2026-01-05T15:00")


def clinic(*, booking: dict[str, Any] | None = None, closures: Sequence[dict[str, Any]] = ()) -> Business:
    """Resource ``a`` serves ``visit`` (buffers 10 before, 15 after); ``b`` exists but does not."""
    return make_business(
        {day: ["09:00-12:00", "13:00-17:00"] for day in ("mon", "tue", "wed", "thu", "fri")},
        booking={"min_notice_minutes": 120, "horizon_days": 30, "slot_step_minutes": 15, **(booking or {})},
        service={"buffer_before_minutes": 10, "buffer_after_minutes": 15, "resources": ["a"]},
        extra_resources=[{"id": "b", "name": "B", "hours": WEEKDAYS_9_TO_5}],
        closures=closures,
    )


def check(
    business: Business, start: str, *, busy: Sequence[Interval] = (), resource: str = "a", now: datetime = NOW
) -> SlotProblem | None:
    return check_slot(business, visit(business), resource, utc(start), busy, now)


def test_bookable_slot_has_no_problem() -> None:
    assert check(clinic(), "2026-01-06T15:00") is None


def test_unknown_resource_and_resource_that_does_not_offer_the_service() -> None:
    assert check(clinic(), "2026-01-06T15:00", resource="nobody") is SlotProblem.UNKNOWN_RESOURCE
    assert check(clinic(), "2026-01-06T15:00", resource="b") is SlotProblem.UNKNOWN_RESOURCE


@pytest.mark.parametrize("start", ["2026-01-06T15:00:30", "2026-01-06T15:00:00.000001"])
def test_start_must_be_a_whole_minute(start: str) -> None:
    assert check(clinic(), start) is SlotProblem.NOT_WHOLE_MINUTE


@pytest.mark.parametrize("start", ["2026-01-05T15:00", "2026-01-05T14:00", "2025-06-02T14:00"])
def test_start_at_or_before_now_is_in_the_past(start: str) -> None:
    assert check(clinic(), start) is SlotProblem.IN_THE_PAST


def test_notice_boundary_is_inclusive() -> None:
    early = utc("2026-01-06T13:00")  # 08:00 EST: the first start two hours out is 10:00
    assert check(clinic(), "2026-01-06T14:59", now=early) is SlotProblem.INSIDE_NOTICE
    assert check(clinic(), "2026-01-06T15:00", now=early) is None


def test_past_needs_no_notice_to_be_refused() -> None:
    no_notice = clinic(booking={"min_notice_minutes": 0})
    assert check(no_notice, "2026-01-05T15:00") is SlotProblem.IN_THE_PAST
    assert check(no_notice, "2026-01-05T15:01") is None


def test_horizon_boundary_is_inclusive() -> None:
    # now + 30 days is Wednesday 2026-02-04 10:00 EST, inside the morning span.
    assert check(clinic(), "2026-02-04T15:00") is None
    assert check(clinic(), "2026-02-04T15:15") is SlotProblem.BEYOND_HORIZON


def test_closures_whole_day_and_partial_overlap() -> None:
    business = clinic(closures=[{"date": "2026-01-07"}, {"start": "2026-01-08T10:20:00", "end": "2026-01-08T11:00:00"}])
    assert check(business, "2026-01-07T15:00") is SlotProblem.CLOSED
    # 10:00-10:30 runs into the closure from 10:20; 10:30-11:00 is inside it; 11:00 is after it.
    assert check(business, "2026-01-08T15:00") is SlotProblem.CLOSED
    assert check(business, "2026-01-08T15:30") is SlotProblem.CLOSED
    # Buffers may reach into a closure, as they may reach outside the hours: 11:00 has 10:50 before
    # it, and 09:50-10:20 has 10:20-10:35 after it.
    assert check(business, "2026-01-08T16:00") is None
    assert check(business, "2026-01-08T14:50") is None


@pytest.mark.parametrize(
    "start",
    [
        "2026-01-06T13:59",  # 08:59: opens at 09:00
        "2026-01-06T16:45",  # 11:45-12:15 runs into the lunch break
        "2026-01-06T21:45",  # 16:45-17:15 runs past closing
        "2026-01-10T15:00",  # Saturday
    ],
)
def test_service_interval_outside_hours(start: str) -> None:
    assert check(clinic(), start) is SlotProblem.OUTSIDE_HOURS


def test_buffers_may_reach_outside_hours() -> None:
    # 09:00 with 10 minutes before; 16:30-17:00 with 15 minutes after; 11:30-12:00 before lunch.
    for start in ("2026-01-06T14:00", "2026-01-06T21:30", "2026-01-06T16:30"):
        assert check(clinic(), start) is None


def test_service_may_run_across_adjacent_spans() -> None:
    business = make_business({"tue": ["09:00-12:00", "12:00-17:00"]}, booking={"slot_step_minutes": 15})
    assert check_slot(business, visit(business), "a", utc("2026-01-06T16:45"), [], NOW) is None


def test_busy_overlapping_the_block_including_buffers() -> None:
    start = "2026-01-06T15:00"  # block 09:50-10:45 EST = 14:50Z-15:45Z
    assert check(clinic(), start, busy=[span("2026-01-06T14:40", "2026-01-06T14:51")]) is SlotProblem.BUSY
    assert check(clinic(), start, busy=[span("2026-01-06T15:44", "2026-01-06T16:00")]) is SlotProblem.BUSY
    assert check(clinic(), start, busy=[span("2026-01-06T15:10", "2026-01-06T15:20")]) is SlotProblem.BUSY
    # Half-open intervals: touching is not overlapping.
    touching = [span("2026-01-06T14:00", "2026-01-06T14:50"), span("2026-01-06T15:45", "2026-01-06T17:00")]
    assert check(clinic(), start, busy=touching) is None


def test_checks_run_in_the_documented_order() -> None:
    business = clinic(closures=[{"date": "2026-01-10"}])
    everything = [span("2026-01-01T00:00", "2026-03-01T00:00")]
    assert check(business, "2026-01-05T14:00:30", busy=everything, resource="b") is SlotProblem.UNKNOWN_RESOURCE
    assert check(business, "2026-01-05T14:00:30", busy=everything) is SlotProblem.NOT_WHOLE_MINUTE
    assert check(business, "2026-01-05T03:00", busy=everything) is SlotProblem.IN_THE_PAST
    assert check(business, "2026-01-05T16:00", busy=everything) is SlotProblem.INSIDE_NOTICE
    assert check(business, "2026-02-16T15:00", busy=everything) is SlotProblem.BEYOND_HORIZON
    assert check(business, "2026-01-10T15:00", busy=everything) is SlotProblem.CLOSED
    assert check(business, "2026-01-11T15:00", busy=everything) is SlotProblem.OUTSIDE_HOURS
    assert check(business, "2026-01-12T15:00", busy=everything) is SlotProblem.BUSY


def test_only_busy_is_not_permanent() -> None:
    assert [problem for problem in SlotProblem if not problem.is_permanent] == [SlotProblem.BUSY]


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        check_slot(clinic(), visit(clinic()), "a", datetime(2026, 1, 6, 10), [], NOW)


# --- free_slots --------------------------------------------------------------------------------------


def test_free_slots_step_from_span_start_with_buffers_in_the_block() -> None:
    business = make_business(
        {"tue": "09:10-10:30"},
        booking={"slot_step_minutes": 20},
        service={"buffer_before_minutes": 5, "buffer_after_minutes": 10},
    )
    slots = free_slots(business, visit(business), ["a"], span("2026-01-06T00:00", "2026-01-07T00:00"), {}, NOW)
    assert slots == [
        Slot(
            "a",
            "visit",
            utc(f"2026-01-06T{start}"),
            utc(f"2026-01-06T{end}"),
            span(f"2026-01-06T{block_start}", f"2026-01-06T{block_end}"),
        )
        for start, end, block_start, block_end in [
            ("14:10", "14:40", "14:05", "14:50"),
            ("14:30", "15:00", "14:25", "15:10"),
            ("14:50", "15:20", "14:45", "15:30"),
        ]
    ]


def test_partial_closure_restarts_the_grid_where_the_span_reopens() -> None:
    business = make_business(
        {"tue": "09:00-11:00"},
        booking={"slot_step_minutes": 15},
        closures=[{"start": "2026-01-06T09:20:00", "end": "2026-01-06T10:10:00"}],
    )
    slots = free_slots(business, visit(business), ["a"], span("2026-01-06T00:00", "2026-01-07T00:00"), {}, NOW)
    assert starts(slots) == [utc("2026-01-06T15:10"), utc("2026-01-06T15:25")]


def test_each_configured_span_anchors_its_own_grid_even_where_spans_touch() -> None:
    business = make_business({"tue": ["09:10-10:00", "10:00-11:00"]}, booking={"slot_step_minutes": 20})
    slots = free_slots(business, visit(business), ["a"], span("2026-01-06T00:00", "2026-01-07T00:00"), {}, NOW)
    # 09:50 runs on into the second span; that span's own grid starts at 10:00, not at 10:10.
    assert [slot.start.astimezone(NEW_YORK).strftime("%H:%M") for slot in slots] == [
        "09:10",
        "09:30",
        "09:50",
        "10:00",
        "10:20",
    ]


def test_closure_ending_between_minutes_moves_the_anchor_to_the_next_whole_minute() -> None:
    business = make_business(
        {"tue": "09:00-11:00"},
        booking={"slot_step_minutes": 15},
        closures=[{"start": "2026-01-06T08:00:00", "end": "2026-01-06T10:10:30"}],
    )
    slots = free_slots(business, visit(business), ["a"], span("2026-01-06T00:00", "2026-01-07T00:00"), {}, NOW)
    assert starts(slots) == [utc("2026-01-06T15:11"), utc("2026-01-06T15:26")]
    assert check_slot(business, visit(business), "a", utc("2026-01-06T15:11"), [], NOW) is None
    assert check_slot(business, visit(business), "a", utc("2026-01-06T15:10"), [], NOW) is SlotProblem.CLOSED


def test_free_slots_skip_busy_blocks_and_respect_notice_horizon_and_window() -> None:
    business = clinic()
    busy = {"a": [span("2026-01-05T18:00", "2026-01-05T18:30")]}
    slots = free_slots(business, visit(business), ["a"], span("2026-01-05T00:00", "2026-01-06T00:00"), busy, NOW)
    # Notice: nothing before 17:00Z (12:00 EST, lunch); the afternoon 13:00-17:00 EST minus the busy
    # 13:00-13:30 EST, which with the 10-minute buffer before also rules out 13:30.
    assert starts(slots)[0] == utc("2026-01-05T18:45")
    assert starts(slots)[-1] == utc("2026-01-05T21:30")
    assert len(slots) == 12
    assert all(check_slot(business, visit(business), "a", slot.start, busy["a"], NOW) is None for slot in slots)

    horizon = free_slots(business, visit(business), ["a"], span("2026-02-04T00:00", "2026-02-05T00:00"), {}, NOW)
    assert starts(horizon) == [
        utc("2026-02-04T14:00"),
        utc("2026-02-04T14:15"),
        utc("2026-02-04T14:30"),
        utc("2026-02-04T14:45"),
        utc("2026-02-04T15:00"),
    ]
    assert free_slots(business, visit(business), ["a"], span("2026-02-05T00:00", "2026-02-06T00:00"), {}, NOW) == []

    # The window bounds starts, half-open; a service may end after the window does.
    narrow = free_slots(business, visit(business), ["a"], span("2026-01-06T14:00", "2026-01-06T14:30"), {}, NOW)
    assert starts(narrow) == [utc("2026-01-06T14:00"), utc("2026-01-06T14:15")]


def test_free_slots_order_by_start_then_resource_order_and_ignore_resources_that_cannot_serve() -> None:
    business = make_business(
        {"tue": "09:00-10:00"},
        extra_resources=[
            {"id": "b", "name": "B", "hours": {"tue": "09:30-10:30"}},
            {"id": "c", "name": "C", "hours": {"tue": "09:00-10:00"}},
        ],
        service={"resources": ["a", "b"]},
    )
    window = span("2026-01-06T00:00", "2026-01-07T00:00")
    slots = free_slots(business, visit(business), ["b", "c", "nobody", "a", "b"], window, {}, NOW)
    assert [(slot.start.strftime("%H:%M"), slot.resource_id) for slot in slots] == [
        ("14:00", "a"),
        ("14:30", "b"),
        ("14:30", "a"),
        ("15:00", "b"),
    ]


def test_spring_forward_day_never_offers_a_time_that_does_not_exist() -> None:
    business = make_business({"sun": ["00:00-06:00"]})
    day = Interval(*local_day_bounds(date(2026, 3, 8), NEW_YORK))
    slots = free_slots(business, visit(business), ["a"], day, {}, LONG_AGO)
    local = [slot.start.astimezone(NEW_YORK).strftime("%H:%M %Z") for slot in slots]
    assert local == [
        "00:00 EST",
        "00:30 EST",
        "01:00 EST",
        "01:30 EST",
        "03:00 EDT",
        "03:30 EDT",
        "04:00 EDT",
        "04:30 EDT",
        "05:00 EDT",
        "05:30 EDT",
    ]
    assert not any(is_nonexistent(slot.start.astimezone(NEW_YORK).replace(tzinfo=None), NEW_YORK) for slot in slots)
    # The 01:30 EST slot ends at 03:00 EDT on the wall clock: still thirty real minutes.
    assert slots[3].end - slots[3].start == timedelta(minutes=30)

    short = make_business({"sun": ["01:00-03:00"]}, booking={"slot_step_minutes": 15})
    slots = free_slots(short, visit(short), ["a"], day, {}, LONG_AGO)
    assert [slot.start.astimezone(NEW_YORK).strftime("%H:%M") for slot in slots] == ["01:00", "01:15", "01:30"]


def test_fall_back_day_offers_both_occurrences_of_the_repeated_hour() -> None:
    business = make_business({"sun": ["01:00-03:00"]})
    day = Interval(*local_day_bounds(date(2026, 11, 1), NEW_YORK))
    slots = free_slots(business, visit(business), ["a"], day, {}, LONG_AGO)
    local = [slot.start.astimezone(NEW_YORK).isoformat(timespec="minutes") for slot in slots]
    assert local == [
        "2026-11-01T01:00-04:00",
        "2026-11-01T01:30-04:00",
        "2026-11-01T01:00-05:00",
        "2026-11-01T01:30-05:00",
        "2026-11-01T02:00-05:00",
        "2026-11-01T02:30-05:00",
    ]
    assert len(set(starts(slots))) == 6

    # Busy during the first 01:00-02:00 leaves the second one bookable.
    busy = {"a": [span("2026-11-01T05:00", "2026-11-01T06:00")]}
    slots = free_slots(business, visit(business), ["a"], day, busy, LONG_AGO)
    assert [slot.start.astimezone(NEW_YORK).strftime("%H:%M %Z") for slot in slots] == [
        "01:00 EST",
        "01:30 EST",
        "02:00 EST",
        "02:30 EST",
    ]


def test_window_in_the_callers_zone_returns_the_business_slots_inside_it() -> None:
    # On 2026-03-10 New York is already on daylight time and London not yet: four hours apart, not five.
    business = make_business(
        {"mon": "18:00-22:00", "tue": ["09:00-12:00", "18:00-22:00"]},
        booking={"slot_step_minutes": 60},
        service={"duration_minutes": 60},
    )
    callers_day = Interval(*local_day_bounds(date(2026, 3, 10), LONDON))
    assert callers_day == span("2026-03-10T00:00", "2026-03-11T00:00")
    slots = free_slots(business, visit(business), ["a"], callers_day, {}, LONG_AGO)
    assert [slot.start.astimezone(LONDON).strftime("%a %H:%M") for slot in slots] == [
        "Tue 00:00",
        "Tue 01:00",
        "Tue 13:00",
        "Tue 14:00",
        "Tue 15:00",
        "Tue 22:00",
        "Tue 23:00",
    ]
    assert [slot.start.astimezone(NEW_YORK).strftime("%a %H:%M") for slot in slots] == [
        "Mon 20:00",
        "Mon 21:00",
        "Tue 09:00",
        "Tue 10:00",
        "Tue 11:00",
        "Tue 18:00",
        "Tue 19:00",
    ]


def test_sixty_days_of_slots_with_many_busy_intervals_is_not_quadratic() -> None:
    business = make_business(
        {day: ["08:00-12:00", "13:00-18:00"] for day in ("mon", "tue", "wed", "thu", "fri", "sat")},
        booking={"slot_step_minutes": 15, "horizon_days": 60},
        extra_resources=[
            {"id": "b", "name": "B", "hours": WEEKDAYS_9_TO_5},
            {"id": "c", "name": "C", "hours": WEEKDAYS_9_TO_5},
        ],
    )

    def timed(days: int) -> tuple[float, int]:
        """The best of three runs over ``days`` days, and the slots found."""
        window = Interval(LONG_AGO, LONG_AGO + timedelta(days=days))
        # A 10-minute busy stretch every 97 minutes on each resource: about 900 intervals each in 60 days.
        busy = {
            rid: [
                Interval(LONG_AGO + timedelta(minutes=97 * n), LONG_AGO + timedelta(minutes=97 * n + 10))
                for n in range(days * 24 * 60 // 97)
            ]
            for rid in ("a", "b", "c")
        }
        best, found = float("inf"), 0
        for _ in range(3):
            began = stopwatch.perf_counter()
            found = len(free_slots(business, visit(business), ["a", "b", "c"], window, busy, LONG_AGO))
            best = min(best, stopwatch.perf_counter() - began)
        return best, found

    short, short_slots = timed(6)
    long, long_slots = timed(60)
    assert long_slots > 2000 and long_slots > 8 * short_slots
    # Ten times the days and the busy intervals: about ten times the time when linear, a hundred when
    # every candidate scans every busy interval. A ratio within one run, not a time (machines are noisy).
    assert long / short < 40, (short, long)


# --- rank_slots --------------------------------------------------------------------------------------


def slot(resource_id: str, start: str) -> Slot:
    begins = utc(start)
    return Slot(
        resource_id, "visit", begins, begins + timedelta(minutes=30), Interval(begins, begins + timedelta(minutes=30))
    )


def test_rank_closest_first_then_earlier_then_preferred_resource() -> None:
    slots = [
        slot("a", "2026-01-06T15:00"),
        slot("b", "2026-01-06T14:00"),
        slot("a", "2026-01-06T14:00"),
        slot("b", "2026-01-06T14:45"),
        slot("a", "2026-01-06T13:00"),
        slot("b", "2026-01-06T15:15"),
    ]
    desired = utc("2026-01-06T14:30")
    assert rank_slots(slots, desired, limit=10, prefer_resource="a") == [
        slots[3],
        slots[2],
        slots[1],
        slots[0],
        slots[5],
        slots[4],
    ]
    # Without a preference, equal slots keep the order they came in.
    assert rank_slots(slots, desired, limit=3) == [slots[3], slots[1], slots[2]]
    assert rank_slots(slots, desired, limit=0) == []
    assert rank_slots([], desired, limit=5) == []


def test_rank_rejects_a_negative_limit() -> None:
    with pytest.raises(ValueError, match="negative"):
        rank_slots([], utc("2026-01-06T14:30"), limit=-1)
