"""When a resource can be booked: weekly hours in the business's zone turned into UTC intervals, cut by
closures, booking rules and busy time. Pure: no I/O, and no clock reads (``now`` is passed in).

Hours are local wall-clock times converted per local date with
:func:`~booking.timeutil.local_boundary_to_utc`, so a spring-forward day is an hour shorter and a
fall-back day an hour longer. Candidate starts step in absolute time from the start of each opening
span, so none lands in a spring-forward gap, and a fall-back night's repeated hour yields both of its
occurrences (they are different instants).

The grid: the opening spans that anchor candidate starts are the configured spans of each local date
minus the closures, *not* merged with their neighbours. Merging would make a resource open around the
clock into one endless span with no start to anchor on, and would make the grid depend on how far the
query looked back. A service interval may still run from one span into an adjacent one (``09:00-12:00``
and ``12:00-17:00`` behave as ``09:00-17:00`` for the fit, each with its own grid).
"""

from __future__ import annotations

import enum
import heapq
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from operator import itemgetter
from zoneinfo import ZoneInfo

from booking.business import Business, OpeningSpan, Resource, Service
from booking.domain import Interval, Slot, ensure_utc
from booking.timeutil import local_boundary_to_utc, local_day_bounds

_DAY = timedelta(days=1)
_MINUTE = timedelta(minutes=1)
_MINUTES_PER_DAY = 24 * 60


class SlotProblem(enum.StrEnum):
    """Why a specific start time cannot be booked."""

    UNKNOWN_RESOURCE = "unknown_resource"
    NOT_WHOLE_MINUTE = "not_whole_minute"
    IN_THE_PAST = "in_the_past"
    INSIDE_NOTICE = "inside_notice"
    BEYOND_HORIZON = "beyond_horizon"
    CLOSED = "closed"
    OUTSIDE_HOURS = "outside_hours"
    BUSY = "busy"

    @property
    def is_permanent(self) -> bool:
        """Asking again cannot help, except for BUSY: a hold may expire or a booking be cancelled."""
        return self is not SlotProblem.BUSY


@dataclass(frozen=True, slots=True)
class _Hours:
    """A resource's opening time around some window, in UTC, each list sorted."""

    pieces: list[Interval]  # configured spans minus closures, unmerged: the grid anchors
    open: list[Interval]  # the pieces merged: a service interval must fit inside one of these
    closed: list[Interval]  # closures, merged


def opening_intervals(business: Business, resource_id: str, window: Interval) -> list[Interval]:
    """UTC intervals, sorted and merged, when the resource is open inside ``window`` (clipped to it).

    An unknown resource is never open. Whole-day closures remove the local day (midnight to midnight,
    23 or 25 hours on DST days); partial closures remove their local start..end.
    """
    resource = business.resource(resource_id)
    if resource is None:
        return []
    return _clip(_hours(business, resource, window).open, window)


def check_slot(
    business: Business,
    service: Service,
    resource_id: str,
    start: datetime,
    busy: Sequence[Interval],
    now: datetime,
) -> SlotProblem | None:
    """Why ``service`` cannot start at ``start`` on the resource, or None when it can.

    The service interval ``[start, start + duration)`` must avoid closures and lie inside one opening
    interval; the block (the service interval widened by the buffers) may reach outside the hours, since
    buffers are the resource's own preparation time, but must not overlap ``busy``.
    """
    start, now = ensure_utc(start), ensure_utc(now)
    resource = business.resource(resource_id)
    if resource is None or resource_id not in service.resources:
        return SlotProblem.UNKNOWN_RESOURCE
    if start.second or start.microsecond:
        return SlotProblem.NOT_WHOLE_MINUTE
    rules = business.booking
    if start <= now:
        return SlotProblem.IN_THE_PAST
    if start < now + rules.min_notice:
        return SlotProblem.INSIDE_NOTICE
    if start > now + rules.horizon:
        return SlotProblem.BEYOND_HORIZON
    wanted = Interval(start, start + service.duration)
    hours = _hours(business, resource, wanted)
    # Closures are checked before hours only to give the caller the more useful reason.
    if any(closure.overlaps(wanted) for closure in hours.closed):
        return SlotProblem.CLOSED
    if not any(interval.contains(wanted) for interval in hours.open):
        return SlotProblem.OUTSIDE_HOURS
    block = wanted.widen(service.buffer_before, service.buffer_after)
    if any(interval.overlaps(block) for interval in busy):
        return SlotProblem.BUSY
    return None


def free_slots(
    business: Business,
    service: Service,
    resource_ids: Sequence[str],
    window: Interval,
    busy: Mapping[str, Sequence[Interval]],
    now: datetime,
) -> list[Slot]:
    """Every bookable slot starting inside ``window``, on each resource in ``resource_ids`` that can
    serve ``service``, sorted by start and then by the order of ``resource_ids``.

    Starts step by ``slot_step`` from the start of each opening span (see the module docstring), and
    each slot returned is one that :func:`check_slot` accepts.
    """
    now = ensure_utc(now)
    rules = business.booking
    first_start = max(window.start, now + rules.min_notice)
    last_start = now + rules.horizon  # inclusive, unlike window.end
    if first_start >= window.end or first_start > last_start:
        return []
    # Far enough ahead that the last candidate's service interval can be fitted against the hours.
    reach = Interval(first_start, min(window.end, last_start) + service.duration + _MINUTE)
    found: list[tuple[datetime, int, Slot]] = []
    serving = [rid for rid in dict.fromkeys(resource_ids) if rid in service.resources]
    for order, resource_id in enumerate(serving):
        resource = business.resource(resource_id)
        if resource is None:
            continue
        hours = _hours(business, resource, reach)
        busy_index = _BusyIndex(busy.get(resource_id, ()))
        found.extend(
            (slot.start, order, slot)
            for slot in _resource_slots(
                service,
                resource_id,
                hours,
                busy_index,
                rules.slot_step,
                first_start=first_start,
                end_before=window.end,
                last_start=last_start,
                now=now,
            )
        )
    found.sort(key=itemgetter(0, 1))
    return [slot for _, _, slot in found]


def rank_slots(
    slots: Sequence[Slot], desired: datetime, *, limit: int, prefer_resource: str | None = None
) -> list[Slot]:
    """At most ``limit`` slots, closest to ``desired`` first; ties go to the earlier start, then to
    ``prefer_resource`` (the caller's usual practitioner), then to the order given."""
    if limit < 0:
        raise ValueError(f"limit must not be negative, not {limit}")
    desired = ensure_utc(desired)
    return heapq.nsmallest(
        limit,
        slots,
        key=lambda slot: (abs(slot.start - desired), slot.start, slot.resource_id != prefer_resource),
    )


def _resource_slots(
    service: Service,
    resource_id: str,
    hours: _Hours,
    busy_index: _BusyIndex,
    step: timedelta,
    *,
    first_start: datetime,
    end_before: datetime,
    last_start: datetime,
    now: datetime,
) -> list[Slot]:
    duration, before, after = service.duration, service.buffer_before, service.buffer_after
    slots: list[Slot] = []
    open_starts = [interval.start for interval in hours.open]
    seen: set[datetime] = set()  # spans can overlap where a spring-forward gap bends their boundaries
    for piece in hours.pieces:
        # A piece lies inside exactly one merged interval: the service must end by that one's end.
        open_end = hours.open[bisect_right(open_starts, piece.start) - 1].end
        anchor = _ceil_minute(piece.start)  # a closure ending at 10:10:30 must not make every start fail
        skip = max(first_start - anchor, timedelta(0))
        start = anchor + -(-skip // step) * step  # the first grid point at or after first_start
        stop = min(piece.end, end_before)
        while start < stop and start <= last_start:
            end = start + duration
            if end > open_end:
                break  # later starts end later still
            block_start, block_end = start - before, end + after
            if start > now and start not in seen and not busy_index.overlaps(block_start, block_end):
                seen.add(start)
                slots.append(Slot(resource_id, service.id, start, end, Interval(block_start, block_end)))
            start += step
    return slots


class _BusyIndex:
    """Busy intervals merged and sorted, so an overlap test is one bisection rather than a scan."""

    def __init__(self, busy: Sequence[Interval]) -> None:
        merged = _merge(busy)
        self._starts = [interval.start for interval in merged]
        self._ends = [interval.end for interval in merged]

    def overlaps(self, start: datetime, end: datetime) -> bool:
        """Whether ``[start, end)`` overlaps any busy interval."""
        # The first busy interval ending after ``start`` is the only one that can overlap.
        index = bisect_right(self._ends, start)
        return index < len(self._starts) and self._starts[index] < end


def _hours(business: Business, resource: Resource, window: Interval) -> _Hours:
    tz = business.tz
    days = _local_days(window, tz)
    closed = _closed_intervals(business, resource.id, days)
    pieces: list[Interval] = []
    for day in days:
        for span in resource.hours.for_weekday(day.weekday()):
            interval = _span_interval(day, span, tz)
            if interval is not None:
                pieces.extend(_subtract(interval, closed))
    pieces.sort()
    return _Hours(pieces=pieces, open=_merge(pieces), closed=closed)


def _local_days(window: Interval, tz: ZoneInfo) -> list[date]:
    """The local dates whose hours can reach into ``window``. A span stays inside its own local day, so
    the day's margin either side is cheap insurance, for a zone whose gap straddles midnight."""
    first = window.start.astimezone(tz).date() - _DAY
    last = window.end.astimezone(tz).date() + _DAY
    return [first + timedelta(days=offset) for offset in range((last - first).days + 1)]


@lru_cache(maxsize=16384)  # pure, and on every booking's path: one span on one day converts once
def _span_interval(day: date, span: OpeningSpan, tz: ZoneInfo) -> Interval | None:
    start = local_boundary_to_utc(day, span.start, tz)
    if span.end_minutes == _MINUTES_PER_DAY:
        end = local_boundary_to_utc(day + _DAY, time(0), tz)
    else:
        end = local_boundary_to_utc(day, time(*divmod(span.end_minutes, 60)), tz)
    # A span inside a spring-forward gap (New York 02:30-03:00) reads its start with the offset from
    # before the jump and its end with the one after, and comes out empty or reversed: never open.
    return Interval(start, end) if start < end else None


def _closed_intervals(business: Business, resource_id: str, days: Sequence[date]) -> list[Interval]:
    tz = business.tz
    closed: list[Interval] = []
    for closure in business.closures_for(resource_id):
        if closure.start is not None and closure.end is not None:
            start = local_boundary_to_utc(closure.start.date(), closure.start.time(), tz)
            end = local_boundary_to_utc(closure.end.date(), closure.end.time(), tz)
            if start < end:
                closed.append(Interval(start, end))
        else:
            closed.extend(Interval(*local_day_bounds(day, tz)) for day in days if closure.covers_day(day))
    return _merge(closed)


def _merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, with overlapping and touching intervals joined."""
    merged: list[Interval] = []
    for interval in sorted(intervals):
        if merged and interval.start <= merged[-1].end:
            if interval.end > merged[-1].end:
                merged[-1] = Interval(merged[-1].start, interval.end)
        else:
            merged.append(interval)
    return merged


def _subtract(interval: Interval, closed: Sequence[Interval]) -> list[Interval]:
    """``interval`` minus the sorted, merged ``closed`` intervals."""
    remaining: list[Interval] = []
    cursor = interval.start
    for closure in closed:
        if closure.end <= cursor:
            continue
        if closure.start >= interval.end:
            break
        if closure.start > cursor:
            remaining.append(Interval(cursor, closure.start))
        cursor = max(cursor, closure.end)
    if cursor < interval.end:
        remaining.append(Interval(cursor, interval.end))
    return remaining


def _clip(intervals: Iterable[Interval], window: Interval) -> list[Interval]:
    return [
        Interval(max(interval.start, window.start), min(interval.end, window.end))
        for interval in intervals
        if interval.overlaps(window)
    ]


def _ceil_minute(instant: datetime) -> datetime:
    whole = instant.replace(second=0, microsecond=0)
    return whole if whole == instant else whole + _MINUTE
