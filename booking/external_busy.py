"""Busy time from each resource's external calendar (Google Calendar free/busy), kept in the Redis index.

:class:`ExternalBusyRefresher` reads a resource's free/busy over the whole booking horizon in a few
requests and writes it into :class:`~booking.freebusy.FreeBusyIndex` one UTC day at a time. It runs on
a schedule (:meth:`~ExternalBusyRefresher.run`) and on demand when an availability query finds the data
missing or older than the refresh interval (:meth:`~ExternalBusyRefresher.ensure_fresh`). Concurrent
callers wanting the same resource share one fetch. The index expires external data after its own TTL,
so when the calendar cannot be reached for long, the index answers from the ledger alone.

Our own bookings appear in the calendar too (the outbox writes them as events), so what the calendar
reports is reduced by the blocks of the resource's active ledger bookings before it is stored; otherwise
a booking would collide with its own event when it is moved by a few minutes. This is an approximation:

- free/busy carries no event ids, so an external event overlapping one of our bookings loses the
  overlapping part (that time is busy with our booking anyway, but moving that booking into it is then
  not refused);
- calendar events follow the ledger a little later (the outbox), so a booking cancelled or moved since
  the calendar last saw it keeps its old time busy until the calendar effect has run and the next
  refresh reads it. The calendar is read before the ledger, so every booking the calendar already shows
  is still active in the ledger read that follows, unless it was cancelled in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol

import structlog

from booking.business import Business
from booking.domain import Interval
from booking.freebusy import FreeBusyIndex
from booking.ledger.repository import Clock, Ledger, utc_now

log = structlog.get_logger("voicebook.external_busy")

MAX_QUERY_SPAN = timedelta(days=60)
"""The longest span asked of the calendar in one request. Google refuses long freeBusy ranges ("The
requested time range is too long", reportedly past about 90 days); 60 days stays well clear."""

HORIZON_MARGIN = timedelta(days=2)
"""Days fetched beyond the booking horizon: a slot search widens its window by buffers and durations."""

ON_DEMAND_RETRY = timedelta(seconds=30)
"""After a failed fetch, on-demand refreshes of that resource wait this long (at most the refresh
interval) so that every query does not wait on a calendar that is down; the schedule still runs."""


class BusySource(Protocol):
    """Where external busy time comes from (``integrations.google_calendar.GoogleCalendar`` fits)."""

    async def busy(self, calendar_id: str, time_min: datetime, time_max: datetime) -> list[Interval]:
        """Busy time of ``calendar_id`` in ``[time_min, time_max)``; raises when it cannot be read."""
        ...


class BusyFreshness(Protocol):
    """What the booking service asks of the external-calendar refresher: whether a resource has a
    calendar, whether its busy time is due for a refresh, and a refresh that never raises.
    :class:`ExternalBusyRefresher` is one; ``booking.lane.CallLoopCalendar`` is the same refresher seen
    from another event loop."""

    def tracks(self, resource_id: str) -> bool: ...

    def outdated(self, fetched_at: datetime | None) -> bool: ...

    def is_stale(self, resource_id: str, window: Interval, fetched_at: Mapping[date, datetime]) -> bool: ...

    async def try_ensure_fresh(self, resource_id: str, window: Interval, *, wait: timedelta | None = None) -> bool: ...


class ExternalBusyRefresher:
    """Keeps each calendar-backed resource's external busy time in the index fresh. Build one per
    process; :meth:`run` is its scheduled loop, and :meth:`aclose` ends the loop and every fetch it
    started (at shutdown)."""

    def __init__(
        self,
        business: Business,
        ledger: Ledger,
        index: FreeBusyIndex,
        source: BusySource,
        *,
        interval: timedelta,
        clock: Clock = utc_now,
    ) -> None:
        if interval <= timedelta(0):
            raise ValueError(f"the refresh interval must be positive, not {interval}")
        self._calendars = {r.id: r.calendar_id for r in business.resources if r.calendar_id is not None}
        self._horizon = business.booking.horizon
        self._ledger = ledger
        self._index = index
        self._source = source
        self._interval = interval
        self._retry_after = min(interval, ON_DEMAND_RETRY)
        self._clock = clock
        self._fetches: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, datetime] = {}
        self._stopping = asyncio.Event()

    def tracks(self, resource_id: str) -> bool:
        """Whether the resource has an external calendar (only those have external busy time)."""
        return resource_id in self._calendars

    # -- freshness ------------------------------------------------------------------------------------
    def _coverage(self) -> tuple[date, date]:
        """First and last UTC day kept: today through the booking horizon and a margin."""
        now = self._clock()
        return now.date(), (now + self._horizon + HORIZON_MARGIN).date()

    def _days_in(self, window: Interval) -> list[date]:
        first, last = self._coverage()
        start = max(window.start.date(), first)
        end = min((window.end - timedelta(microseconds=1)).date(), last)
        return [start + timedelta(days=i) for i in range((end - start).days + 1)]

    def outdated(self, fetched_at: datetime | None) -> bool:
        """Whether data fetched at ``fetched_at`` (None: no data) is due for a refresh."""
        return fetched_at is None or fetched_at <= self._clock() - self._interval

    def is_stale(self, resource_id: str, window: Interval, fetched_at: Mapping[date, datetime]) -> bool:
        """Whether a day of ``window`` that matters (today to the horizon) has external data missing
        or older than the refresh interval; ``fetched_at`` as in ``BusySnapshot.external_fetched_at``."""
        if not self.tracks(resource_id):
            return False
        return any(self.outdated(fetched_at.get(day)) for day in self._days_in(window))

    async def ensure_fresh(self, resource_id: str, window: Interval) -> bool:
        """Refresh the resource when a day of ``window`` has external data missing or older than the
        refresh interval (see :meth:`is_stale`). Returns whether a refresh ran; raises what the fetch
        raised. A fetch already in flight is joined; after a failure, on-demand refreshes of the
        resource pause for a short while (``ON_DEMAND_RETRY``) and return False."""
        if not self.tracks(resource_id):
            return False
        if resource_id not in self._fetches:
            # Read the stamps here even when the caller just did: a fetch may have finished since.
            fetched_at = await self._index.external_fetched_at(resource_id, self._days_in(window))
            if not self.is_stale(resource_id, window, fetched_at):
                return False
            if self._resting(resource_id) and resource_id not in self._fetches:  # (joined if one started since)
                return False
        await self.refresh(resource_id)
        return True

    def _resting(self, resource_id: str) -> bool:
        """Whether the resource's last fetch failed too recently for an on-demand retry."""
        failed_at = self._failed_at.get(resource_id)
        return failed_at is not None and self._clock() < failed_at + self._retry_after

    async def try_ensure_fresh(self, resource_id: str, window: Interval, *, wait: timedelta | None = None) -> bool:
        """:meth:`ensure_fresh` for callers that must go on without the calendar: waits at most
        ``wait`` (None: until done; the fetch itself runs on for others), logs a slow or failing
        calendar instead of raising, and returns whether a refresh completed."""
        try:
            async with asyncio.timeout(None if wait is None else wait.total_seconds()):
                return await self.ensure_fresh(resource_id, window)
        except TimeoutError:
            log.warning("external_busy_slow", resource_id=resource_id, waited=wait.total_seconds() if wait else None)
        except Exception as error:  # the fetch logged its failure; this caller answers without it
            log.info("external_busy_skipped", resource_id=resource_id, error=str(error))
        return False

    # -- fetching -------------------------------------------------------------------------------------
    async def refresh(self, resource_id: str) -> None:
        """Fetch the resource's busy time now and store it, or join the fetch already in flight.
        Raises what the fetch raised (the index keeps its previous data)."""
        if not self.tracks(resource_id):
            raise ValueError(f"resource {resource_id!r} has no external calendar")
        task = self._fetches.get(resource_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(resource_id), name=f"freebusy:{resource_id}")
            self._fetches[resource_id] = task
            task.add_done_callback(lambda done: self._settled(resource_id, done))
        # Shielded: a caller that stops waiting (a timeout) leaves the fetch running for the others.
        await asyncio.shield(task)

    def _settled(self, resource_id: str, task: asyncio.Task[None]) -> None:
        if self._fetches.get(resource_id) is task:
            del self._fetches[resource_id]
        # Retrieving the exception here keeps asyncio quiet when every waiter gave up; _fetch logged it.
        if not task.cancelled() and task.exception() is not None:
            self._failed_at[resource_id] = self._clock()
        else:
            self._failed_at.pop(resource_id, None)

    async def _fetch(self, resource_id: str) -> None:
        calendar_id = self._calendars[resource_id]
        first, last = self._coverage()
        span = Interval(_midnight(first), _midnight(last + timedelta(days=1)))
        fetched_at = self._clock()  # before the request: data is never taken for newer than it is
        try:
            reported: list[Interval] = []
            start = span.start
            while start < span.end:
                end = min(start + MAX_QUERY_SPAN, span.end)
                reported += await self._source.busy(calendar_id, start, end)
                start = end
            # The ledger is read after the calendar: see the module docstring.
            ours = [block for _, block in await self._ledger.active_blocks(resource_id, span)]
            external = subtract(reported, ours)
            day = first
            while day <= last:
                bounds = Interval(_midnight(day), _midnight(day + timedelta(days=1)))
                on_day = [interval for interval in external if interval.overlaps(bounds)]
                await self._index.set_external_busy(resource_id, day, on_day, fetched_at=fetched_at)
                day += timedelta(days=1)
        except Exception as error:
            log.warning("external_busy_refresh_failed", resource_id=resource_id, error=str(error))
            raise
        log.debug("external_busy_refreshed", resource_id=resource_id, intervals=len(external))

    async def refresh_all(self) -> tuple[str, ...]:
        """Refresh every calendar-backed resource, one after the other. A failure is logged and the
        others still run; returns the ids of the resources that failed."""
        failed = []
        for resource_id in self._calendars:
            try:
                await self.refresh(resource_id)
            except Exception:
                failed.append(resource_id)  # logged by _fetch
        return tuple(failed)

    # -- the schedule ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Refresh every resource each interval until :meth:`stop` (start-up runs the first refresh).
        A failed refresh is logged and tried again at the next tick; the loop itself never ends early."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval.total_seconds()):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            try:
                await self.refresh_all()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._stopping.is_set() and current is not None and not current.cancelling():
                    return  # aclose cancelled the fetch this tick was waiting for
                raise
            except Exception:  # refresh_all reports per resource; this guards the loop against the rest
                log.exception("external_busy_schedule_failed")

    def stop(self) -> None:
        """Ask :meth:`run` to return at its next wake-up (at once when it is waiting)."""
        self._stopping.set()

    async def aclose(self) -> None:
        """Stop :meth:`run` and end the fetches still in flight (cancelled: the index keeps what it
        has; a request already sent finishes in its worker thread, bounded by the client's timeout)."""
        self.stop()
        tasks = list(self._fetches.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def overlap_warnings(business: Business, resource_id: str, overlaps: Sequence[Interval]) -> tuple[str, ...]:
    """One short sentence per external busy interval a soft-policy hold overlaps, in the business's
    local time (for the API's ``warnings`` and the agent's tool result)."""
    tz = business.tz
    resource = business.resource(resource_id)
    name = resource.name if resource is not None else resource_id
    return tuple(
        f"overlaps busy time in {name}'s calendar, "
        f"{o.start.astimezone(tz):%Y-%m-%d %H:%M} to {o.end.astimezone(tz):%Y-%m-%d %H:%M}"
        for o in overlaps
    )


def subtract(intervals: Sequence[Interval], holes: Sequence[Interval]) -> list[Interval]:
    """``intervals`` minus every part covered by ``holes`` (both need not be sorted or disjoint)."""
    result: list[Interval] = []
    ordered_holes = sorted(holes)
    for interval in sorted(intervals):
        start = interval.start
        for hole in ordered_holes:
            if hole.end <= start:
                continue
            if hole.start >= interval.end:
                break
            if hole.start > start:
                result.append(Interval(start, hole.start))
            start = max(start, hole.end)
            if start >= interval.end:
                break
        if start < interval.end:
            result.append(Interval(start, interval.end))
    return result


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


__all__ = ["BusySource", "ExternalBusyRefresher", "overlap_warnings", "subtract"]
