"""Property tests: random businesses in zones with awkward DST rules, checked against a minute-by-minute
oracle that shares nothing with the implementation except the wall-clock conversion it is specified by.

The oracle marks every UTC minute around the window open or closed, then answers with prefix sums. Zones:
New York and London (1-hour DST at night), Lord Howe (30-minute DST), Santiago (local midnight itself is
skipped on the spring-forward day) and Kolkata (a half-hour offset, no DST). Half the scenarios are
general (windows around a 2026 transition as often as around an ordinary day); the other half put every
opening span in the small hours of a transition night, where gaps and repeated hours bend them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from itertools import accumulate, pairwise
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from booking.availability import SlotProblem, check_slot, free_slots, opening_intervals
from booking.business import Business, Service, parse_business
from booking.domain import Interval
from booking.timeutil import local_boundary_to_utc, local_day_bounds

ZONES = ("America/New_York", "Europe/London", "Australia/Lord_Howe", "America/Santiago", "Asia/Kolkata")
RESOURCE_IDS = ("r0", "r1", "r2")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


def _transition_days(zone: str) -> list[date]:
    """Local dates in 2026 that are not 24 hours long."""
    tz = ZoneInfo(zone)
    days = [date(2026, 1, 1) + timedelta(days=offset) for offset in range(365)]
    return [day for day in days if local_day_bounds(day, tz)[1] - local_day_bounds(day, tz)[0] != timedelta(days=1)]


TRANSITION_DAYS = {zone: _transition_days(zone) for zone in ZONES}


def test_every_zone_but_kolkata_has_its_two_transitions_in_2026() -> None:
    assert {zone: len(days) for zone, days in TRANSITION_DAYS.items()} == {
        "America/New_York": 2,
        "Europe/London": 2,
        "Australia/Lord_Howe": 2,
        "America/Santiago": 2,
        "Asia/Kolkata": 0,
    }


@dataclass(frozen=True)
class Scenario:
    business: Business
    service: Service
    resource_ids: list[str]  # as passed to free_slots: shuffled, with one that does not exist
    window: Interval
    busy: dict[str, list[Interval]]
    now: datetime


def _clock(tenth_hours: int) -> str:
    """10-minute steps from midnight: 0 is 00:00, 144 is 24:00."""
    hours, tens = divmod(tenth_hours, 6)
    return f"{hours:02d}:{tens * 10:02d}"


# Span boundaries in 10-minute steps, often in the small hours where DST transitions happen.
ANY_TIME = st.one_of(st.integers(0, 144), st.integers(0, 24))
# 00:00 to 04:30 only: every transition of these zones, so spans straddle gaps and repeated hours, and
# some fall wholly inside a gap.
SMALL_HOURS = st.integers(0, 27)


@st.composite
def day_spans(draw: st.DrawFn, boundaries: st.SearchStrategy[int], min_size: int = 0) -> list[str]:
    bounds = sorted(draw(st.lists(boundaries, unique=True, min_size=min_size, max_size=6)))
    if draw(st.booleans()):
        pairs = list(pairwise(bounds))  # spans that touch: 09:00-12:00, 12:00-13:00
    else:
        pairs = list(zip(bounds[0::2], bounds[1::2], strict=False))
    return [f"{_clock(start)}-{_clock(end)}" for start, end in pairs]


def minutes(low: int, high: int) -> st.SearchStrategy[timedelta]:
    """Offsets that are as often as not multiples of five minutes, so that busy intervals, ``now`` and
    window edges land exactly on slot boundaries, where off-by-one mistakes live."""
    aligned = st.integers(-(-low // 5), high // 5).map(lambda fives: fives * 5)
    return st.one_of(aligned, st.integers(low, high)).map(lambda offset: timedelta(minutes=offset))


@st.composite
def weekly_hours(draw: st.DrawFn, boundaries: st.SearchStrategy[int]) -> dict[str, list[str]]:
    if draw(st.booleans()):
        every_day = draw(day_spans(boundaries, min_size=2))
        hours = {day: every_day for day in WEEKDAYS if every_day}
    else:
        hours = {day: spans for day in WEEKDAYS if (spans := draw(day_spans(boundaries)))}
    # A resource needs hours on some day: then it is open around the clock.
    return hours or {day: ["00:00-24:00"] for day in WEEKDAYS}


@st.composite
def scenarios(draw: st.DrawFn, *, dst_night: bool = False) -> Scenario:
    """A business, a window and a ``now``; with ``dst_night``, hours only in the small hours and a
    window over a transition night."""
    zone = draw(st.sampled_from([zone for zone in ZONES if TRANSITION_DAYS[zone]] if dst_night else ZONES))
    tz = ZoneInfo(zone)
    ordinary = st.dates(date(2026, 1, 1), date(2026, 12, 31))
    transitions = TRANSITION_DAYS[zone]
    if dst_night:
        day = draw(st.sampled_from(transitions))
    else:
        day = draw(st.one_of(st.sampled_from(transitions), ordinary) if transitions else ordinary)
    count = draw(st.integers(1, len(RESOURCE_IDS)))
    ids = list(RESOURCE_IDS[:count])
    boundaries = SMALL_HOURS if dst_night else ANY_TIME
    resources = [{"id": rid, "name": rid.upper(), "hours": draw(weekly_hours(boundaries))} for rid in ids]
    serving = draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    service = {
        "id": "svc",
        "name": "Service",
        "resources": serving,
        "duration_minutes": draw(st.sampled_from([5, 10, 15, 20, 30, 45, 60, 90, 120, 180])),
        "buffer_before_minutes": draw(st.integers(0, 6)) * 5,
        "buffer_after_minutes": draw(st.integers(0, 6)) * 5,
    }
    rules = {
        "slot_step_minutes": draw(st.sampled_from([5, 10, 15, 20, 30, 45, 60])),
        "min_notice_minutes": draw(st.one_of(st.just(0), st.integers(0, 16), st.integers(0, 95))) * 15,
        "horizon_days": draw(st.integers(1, 3)),
    }
    midnight = datetime.combine(day, time(0))
    closures: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        applies = draw(st.lists(st.sampled_from(ids), unique=True, max_size=len(ids)))
        if draw(st.booleans()):
            closures.append({"date": day + timedelta(days=draw(st.integers(-1, 1))), "resources": applies})
        else:
            start = midnight + timedelta(minutes=10 * draw(st.integers(-72, 288)))
            end = start + timedelta(minutes=10 * draw(st.integers(1, 60)))
            closures.append({"start": start, "end": end, "resources": applies})
    business = parse_business(
        {
            "business": {"name": "Random", "timezone": zone},
            "booking": rules,
            "resources": resources,
            "services": [service],
            "closures": closures,
        }
    )
    if dst_night:
        window_start = local_boundary_to_utc(day, time(0), tz) + draw(minutes(-180, 60))
        window = Interval(window_start, window_start + draw(minutes(4 * 60, 12 * 60)))
    else:
        window_start = local_boundary_to_utc(day, time(0), tz) + draw(minutes(-720, 720))
        window = Interval(window_start, window_start + draw(st.one_of(minutes(12 * 60, 48 * 60), minutes(1, 120))))
    now = window_start + draw(minutes(-48 * 60, 6 * 60)) + timedelta(seconds=draw(st.sampled_from([0, 0, 1, 59])))
    busy: dict[str, list[Interval]] = {}
    for rid in ids:
        intervals = []
        for _ in range(draw(st.integers(0, 5))):
            begins = window_start + draw(minutes(-360, 48 * 60)) + timedelta(seconds=draw(st.sampled_from([0, 0, 30])))
            intervals.append(Interval(begins, begins + draw(minutes(1, 240))))
        busy[rid] = intervals
    order = draw(st.permutations([*ids, "ghost"]))
    found = business.service("svc")
    assert found is not None
    return Scenario(business, found, list(order), window, busy, now)


SCENARIOS = st.one_of(scenarios(), scenarios(dst_night=True))


def _minute(instant: datetime) -> int:
    return int(instant.timestamp()) // 60


def _instant(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, UTC)


class Oracle:
    """One resource's open and closed minutes, from three local days before the window to five after."""

    def __init__(self, scenario: Scenario, resource_id: str) -> None:
        business, tz = scenario.business, scenario.business.tz
        resource = business.resource(resource_id)
        assert resource is not None
        first = scenario.window.start.astimezone(tz).date() - timedelta(days=3)
        last = scenario.window.end.astimezone(tz).date() + timedelta(days=5)  # past the 3-day horizon
        days = [first + timedelta(days=offset) for offset in range((last - first).days + 1)]
        self.low = _minute(local_day_bounds(days[0], tz)[0])
        high = _minute(local_day_bounds(days[-1], tz)[1])
        closed = [False] * (high - self.low)
        for closure in business.closures_for(resource_id):
            if closure.start is not None and closure.end is not None:
                ranges = [
                    (
                        local_boundary_to_utc(closure.start.date(), closure.start.time(), tz),
                        local_boundary_to_utc(closure.end.date(), closure.end.time(), tz),
                    )
                ]
            else:
                ranges = [local_day_bounds(day, tz) for day in days if closure.covers_day(day)]
            for start, end in ranges:
                for minute in range(max(_minute(start), self.low), min(_minute(end), high)):
                    closed[minute - self.low] = True
        is_open = [False] * (high - self.low)
        self.grid: set[int] = set()
        for day in days:
            for span in resource.hours.for_weekday(day.weekday()):
                opens = _minute(local_boundary_to_utc(day, span.start, tz))
                end_day, end_minutes = (
                    (day, span.end_minutes) if span.end_minutes < 1440 else (day + timedelta(days=1), 0)
                )
                closes = _minute(local_boundary_to_utc(end_day, time(*divmod(end_minutes, 60)), tz))
                run_start: int | None = None
                for minute in range(opens, closes + 1):
                    inside = minute < closes and not closed[minute - self.low]
                    if inside:
                        is_open[minute - self.low] = True
                        run_start = minute if run_start is None else run_start
                    elif run_start is not None:
                        self.grid.update(range(run_start, minute, business.booking.slot_step_minutes))
                        run_start = None
        self.is_open, self.closed = is_open, closed
        self.open_sum = [0, *accumulate(is_open)]
        self.closed_sum = [0, *accumulate(closed)]

    def open_minutes(self, start: int, end: int) -> int:
        return self.open_sum[end - self.low] - self.open_sum[start - self.low]

    def closed_minutes(self, start: int, end: int) -> int:
        return self.closed_sum[end - self.low] - self.closed_sum[start - self.low]

    def edges(self, low: int, high: int) -> list[int]:
        """Minutes in ``(low, high)`` where opening or closure begins or ends."""
        cut = slice(low - self.low, high - self.low)
        marks = list(zip(self.is_open[cut], self.closed[cut], strict=True))
        return [low + index for index, (before, after) in enumerate(pairwise(marks), start=1) if before != after]

    def open_list(self, low: int, high: int) -> list[int]:
        return [low + index for index, is_open in enumerate(self.is_open[low - self.low : high - self.low]) if is_open]

    def open_runs(self, window: Interval) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for minute in range(_minute(window.start), _minute(window.end)):
            if self.open_minutes(minute, minute + 1):
                if runs and runs[-1][1] == minute:
                    runs[-1] = (runs[-1][0], minute + 1)
                else:
                    runs.append((minute, minute + 1))
        return runs


def expected_problem(
    scenario: Scenario, oracle: Oracle | None, resource_id: str, start: datetime
) -> SlotProblem | None:
    service, rules, now = scenario.service, scenario.business.booking, scenario.now
    if oracle is None or resource_id not in service.resources:
        return SlotProblem.UNKNOWN_RESOURCE
    if start.second or start.microsecond:
        return SlotProblem.NOT_WHOLE_MINUTE
    if start <= now:
        return SlotProblem.IN_THE_PAST
    if start < now + rules.min_notice:
        return SlotProblem.INSIDE_NOTICE
    if start > now + rules.horizon:
        return SlotProblem.BEYOND_HORIZON
    first = _minute(start)
    last = first + service.duration_minutes
    if oracle.closed_minutes(first, last):
        return SlotProblem.CLOSED
    if oracle.open_minutes(first, last) < service.duration_minutes:
        return SlotProblem.OUTSIDE_HOURS
    block_start, block_end = start - service.buffer_before, start + service.duration + service.buffer_after
    if any(busy.start < block_end and block_start < busy.end for busy in scenario.busy.get(resource_id, ())):
        return SlotProblem.BUSY
    return None


@given(SCENARIOS, st.data())
@PROPERTY_SETTINGS
def test_free_slots_are_exactly_the_grid_starts_the_oracle_accepts(scenario: Scenario, data: st.DataObject) -> None:
    serving = [rid for rid in scenario.resource_ids if rid in scenario.service.resources]
    oracles = {rid: Oracle(scenario, rid) for rid in serving}
    first_grid = [
        m for m in sorted(oracles[serving[0]].grid) if scenario.window.start <= _instant(m) < scenario.window.end
    ]
    move_now: bool = data.draw(st.booleans())
    if first_grid and move_now:
        # Put a grid start exactly on the notice or the horizon boundary, both of which are inclusive.
        rules = scenario.business.booking
        edge = data.draw(st.sampled_from([rules.min_notice, rules.horizon]))
        scenario = replace(scenario, now=_instant(data.draw(st.sampled_from(first_grid))) - edge)
    business, service, window, now = scenario.business, scenario.service, scenario.window, scenario.now
    slots = free_slots(business, service, scenario.resource_ids, window, scenario.busy, now)
    rank = {rid: index for index, rid in enumerate(serving)}
    keys = [(slot.start, rank[slot.resource_id]) for slot in slots]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    for slot in slots:
        busy = scenario.busy.get(slot.resource_id, [])
        assert slot.service_id == service.id
        assert slot.end - slot.start == service.duration
        assert slot.block == slot.interval.widen(service.buffer_before, service.buffer_after)
        assert window.start <= slot.start < window.end
        assert slot.start > now and slot.start >= now + business.booking.min_notice
        assert slot.start <= now + business.booking.horizon
        assert not any(interval.overlaps(slot.block) for interval in busy)
        assert check_slot(business, service, slot.resource_id, slot.start, busy, now) is None
    for rid, oracle in oracles.items():
        got = [_minute(slot.start) for slot in slots if slot.resource_id == rid]
        for minute in got:
            # Inside opening hours and outside every closure, minute by minute.
            assert oracle.open_minutes(minute, minute + service.duration_minutes) == service.duration_minutes
            assert oracle.closed_minutes(minute, minute + service.duration_minutes) == 0
        on_grid_in_window = sorted(m for m in oracle.grid if window.start <= _instant(m) < window.end)
        wanted = [m for m in on_grid_in_window if expected_problem(scenario, oracle, rid, _instant(m)) is None]
        assert got == wanted
        # Completeness against check_slot itself, on a bounded sample of the grid.
        busy = scenario.busy.get(rid, [])
        for minute in on_grid_in_window[:: max(1, len(on_grid_in_window) // 40)]:
            if check_slot(business, service, rid, _instant(minute), busy, now) is None:
                assert minute in got


@given(SCENARIOS, st.data())
@PROPERTY_SETTINGS
def test_check_slot_agrees_with_the_oracle(scenario: Scenario, data: st.DataObject) -> None:
    business, service, now, rules = scenario.business, scenario.service, scenario.now, scenario.business.booking
    known = {rid: Oracle(scenario, rid) for rid in RESOURCE_IDS if business.resource(rid) is not None}
    low = _minute(scenario.window.start) - 6 * 60
    high = _minute(scenario.window.end) + 24 * 60
    anywhere = st.integers(low, high)
    # Starts drawn anywhere, from open minutes (where the later checks get their turn), and close to an
    # edge (opening, closing, closure, busy, notice, horizon) so that a service or block ends exactly on it.
    rule_edges = [_minute(now) + 1, _minute(now + rules.min_notice) + 1, _minute(now + rules.horizon)]
    reach = st.integers(
        -(service.duration_minutes + service.buffer_before_minutes + 1), service.buffer_after_minutes + 1
    )
    at_a_rule_edge = st.builds(int.__add__, st.sampled_from(rule_edges), st.integers(-2, 1))
    choices: dict[str, list[st.SearchStrategy[int]]] = {}
    for rid, resource_oracle in known.items():
        edges = [*resource_oracle.edges(low, high), *rule_edges]
        for busy in scenario.busy[rid]:
            edges += [_minute(busy.start), _minute(busy.end - timedelta(microseconds=1)) + 1]
        choices[rid] = [anywhere, at_a_rule_edge, st.builds(int.__add__, st.sampled_from(edges), reach)]
        if opened := resource_oracle.open_list(low, high):
            choices[rid].append(st.sampled_from(opened))
    for _ in range(15):
        rid = data.draw(st.one_of(st.sampled_from(service.resources), st.sampled_from([*RESOURCE_IDS, "ghost"])))
        minute = data.draw(st.one_of(choices.get(rid, [anywhere])))
        start = _instant(minute) + timedelta(seconds=data.draw(st.sampled_from([0, 0, 0, 0, 30])))
        problem = check_slot(business, service, rid, start, scenario.busy.get(rid, []), now)
        assert problem is expected_problem(scenario, known.get(rid), rid, start)


@given(SCENARIOS)
@PROPERTY_SETTINGS
def test_opening_intervals_are_the_oracles_open_minutes_merged(scenario: Scenario) -> None:
    for rid in RESOURCE_IDS:
        if scenario.business.resource(rid) is None:
            continue
        intervals = opening_intervals(scenario.business, rid, scenario.window)
        assert all(earlier.end < later.start for earlier, later in pairwise(intervals))
        runs = [(_minute(interval.start), _minute(interval.end)) for interval in intervals]
        assert runs == Oracle(scenario, rid).open_runs(scenario.window)
