"""The booking service: the only way bookings are made, moved and cancelled.

The fast path of :meth:`BookingService.book` is one Redis round trip (an atomic hold), one ledger
transaction, and one Redis round trip to record the booking in the index. No external API is on it: when
the external calendar data a hold was checked against is stale, a refresh starts in the background.
Availability queries do wait for a stale resource's calendar, briefly (``external_wait``), and answer from
what the index has when the calendar is slow or failing.

Redis decides quickly and the ledger decides finally: a hold keeps concurrent callers off a slot while the
transaction runs, and the database's own overlap guarantee refuses anything the cache missed (a flushed
or restarted Redis, a stale index). When the ledger refuses, the index is repaired from what the ledger
said stood in the way.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, NoReturn, TypeVar

import structlog

from booking import metrics
from booking.availability import SlotProblem, check_slot, free_slots, rank_slots
from booking.business import Business, Service
from booking.domain import Booking, BookingStatus, Interval, Slot, SmsConsent, ensure_utc
from booking.errors import IdempotencyKeyReused, InvalidRequest, RequestInProgress
from booking.external_busy import BusyFreshness, overlap_warnings
from booking.freebusy import FreeBusyIndex, HoldGranted, HoldInProgress, HoldUnavailable, IndexNotReady
from booking.ledger.repository import (
    Clock,
    Created,
    CreateResult,
    CustomerDetails,
    IdempotencyRecord,
    KeyTaken,
    Ledger,
    NewBooking,
    Overlap,
    SeriesSpec,
    request_fingerprint,
    utc_now,
)
from booking.phone import normalise_phone, region_of
from booking.recurrence import expand
from booking.timeutil import local_day_bounds

T = TypeVar("T")

log = structlog.get_logger("voicebook.booking")

COMMIT_HOLD_TTL = timedelta(seconds=30)
"""How long the hold taken by ``book`` itself lives: long enough for the ledger transaction, short
enough that a process dying mid-booking frees the slot by itself."""

INDEX_MARGIN = timedelta(days=2)
SEARCH_DAYS_AFTER = 7
SEARCH_DAYS_BEFORE = 2

EXTERNAL_WAIT = timedelta(seconds=2)
"""How long an availability query waits for a stale external calendar before answering without it."""


@dataclass(frozen=True, slots=True)
class BookRequest:
    service_id: str
    start: datetime
    customer: CustomerDetails
    resource_id: str | None = None
    idempotency_key: str | None = None
    hold_token: str | None = None
    rrule: str | None = None
    notes: str | None = None
    source: str = "api"
    actor: str = "api"
    sms_consent: SmsConsent = SmsConsent.IMPLIED
    sms_consent_wording: str | None = None
    """The words the customer answered about texts (a booking form's checkbox label); kept with the
    decision in the consent history."""
    among: frozenset[str] | None = None
    """The resources this request may book (a number that serves part of the business); None: any."""
    line_number: str | None = None
    """The business's number the customer reached us on (E.164), kept with the booking for its texts."""


@dataclass(frozen=True, slots=True)
class Booked:
    """``warnings`` name external calendar busy time the booking overlaps (``soft`` conflict policy)."""

    bookings: tuple[Booking, ...]
    replayed: bool = False
    series_id: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def booking(self) -> Booking:
        return self.bookings[0]


@dataclass(frozen=True, slots=True)
class OccurrenceConflict:
    start: datetime | None
    local: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class SlotUnavailable:
    """The asked time cannot be had; ``alternatives`` are the nearest bookable slots, closest first."""

    service_id: str
    start: datetime
    alternatives: tuple[Slot, ...] = ()
    conflicts: tuple[OccurrenceConflict, ...] = ()


@dataclass(frozen=True, slots=True)
class Held:
    """``warnings`` name external calendar busy time the slot overlaps (``soft`` conflict policy)."""

    token: str
    slot: Slot
    expires_at: datetime
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SlotSearch:
    slots: tuple[Slot, ...]
    requested_available: bool | None = None


BookOutcome = Booked | SlotUnavailable
HoldOutcome = Held | SlotUnavailable


class BookingService:
    def __init__(
        self,
        business: Business,
        ledger: Ledger,
        index: FreeBusyIndex,
        *,
        clock: Clock = utc_now,
        external: BusyFreshness | None = None,
        external_wait: timedelta = EXTERNAL_WAIT,
    ) -> None:
        """``external`` keeps resources' external calendar busy time in the index (None: no external
        calendar); availability queries wait at most ``external_wait`` for it."""
        self.business = business
        self.ledger = ledger
        self.index = index
        self._clock = clock
        self._external = external
        self._external_wait = external_wait
        self._region = region_of(business.phone)
        self._rebuild_locks: dict[str, asyncio.Lock] = {}
        self._rebuilds: dict[str, int] = {}
        self._in_flight: set[asyncio.Task[Any]] = set()

    # -- start-up and the index -------------------------------------------------------------------
    async def start(self) -> None:
        """Mirror the catalog into the ledger and rebuild the Redis index from it."""
        await self.ledger.sync_catalog(self.business)
        await self.rebuild_index()

    async def warm_up(self) -> None:
        """Ready the booking path before the first caller needs it: Redis compiles the index's scripts,
        and the ledger runs a booking's transaction once and rolls it back (:meth:`Ledger.rehearse_booking`).
        Without it the first booking of a process paid 5 to 9 ms more, in every load test. A failure is
        logged, not raised: the first booking then pays, as it did without the warm-up."""
        try:
            await self.index.load_scripts()
            await self.ledger.rehearse_booking(self.business)
        except Exception as error:
            log.warning("booking_warm_up_failed", error=f"{type(error).__name__}: {error}")

    def _index_window(self) -> Interval:
        now = self._clock()
        return Interval(now - INDEX_MARGIN, now + self.business.booking.horizon + INDEX_MARGIN)

    async def rebuild_index(
        self, resource_ids: Sequence[str] | None = None, *, include_days: Sequence[date] = ()
    ) -> dict[str, int]:
        """Rebuild the free/busy index of the given resources (default: all) from the ledger, over the
        booking horizon and any ``include_days`` beyond it. Returns how many bookings each now holds."""
        counts: dict[str, int] = {}
        window = self._index_window()
        if include_days:
            first = datetime.combine(min(include_days), time(0), tzinfo=UTC)
            last = datetime.combine(max(include_days) + timedelta(days=1), time(0), tzinfo=UTC)
            window = Interval(min(window.start, first), max(window.end, last))
        for resource_id in resource_ids or [r.id for r in self.business.resources]:
            blocks = await self.ledger.active_blocks(resource_id, window)
            await self.index.rebuild(resource_id, (window.start.date(), window.end.date()), blocks)
            counts[resource_id] = len(blocks)
        return counts

    async def _ensure_index(self, resource_id: str, missing_days: Sequence[date] = ()) -> None:
        """Rebuild one resource's index after Redis reported days it does not have. Concurrent requests
        that saw the same gap wait for one rebuild instead of each running their own."""
        generation = self._rebuilds.get(resource_id, 0)
        lock = self._rebuild_locks.setdefault(resource_id, asyncio.Lock())
        async with lock:
            if self._rebuilds.get(resource_id, 0) != generation:
                return  # rebuilt while we waited
            await self.rebuild_index([resource_id], include_days=missing_days)
            self._rebuilds[resource_id] = generation + 1

    # -- validation -------------------------------------------------------------------------------
    def _service(self, service_id: str) -> Service:
        service = self.business.service(service_id)
        if service is None:
            known = ", ".join(s.id for s in self.business.services)
            raise InvalidRequest(f"unknown service {service_id!r} (known: {known})", code="unknown_service")
        return service

    def _candidates(self, service: Service, resource_id: str | None, among: Collection[str] | None = None) -> list[str]:
        """The resources that may take a booking of ``service``: ``resource_id`` when one is asked for,
        else every one providing it, limited to ``among`` (the resources a phone line serves) if given."""
        offered = [rid for rid in service.resources if among is None or rid in among]
        if not offered:
            raise InvalidRequest(
                f"{service.id} is not booked on this line (who provides it: {', '.join(service.resources)})",
                code="service_not_offered",
            )
        if resource_id is None:
            return offered
        if self.business.resource(resource_id) is None:
            raise InvalidRequest(f"unknown resource {resource_id!r}", code="unknown_resource")
        if resource_id not in service.resources:
            raise InvalidRequest(
                f"{resource_id} does not provide {service.id} (who does: {', '.join(service.resources)})",
                code="resource_cannot_serve",
            )
        if resource_id not in offered:
            raise InvalidRequest(
                f"{resource_id} is not booked on this line (who is: {', '.join(offered)})", code="resource_not_offered"
            )
        return [resource_id]

    def _block(self, service: Service, start: datetime) -> Interval:
        return Interval(start - service.buffer_before, start + service.duration + service.buffer_after)

    def _rule_problem(self, service: Service, resource_id: str, start: datetime) -> SlotProblem | None:
        """A reason the start can never work (hours, notice, closures...), ignoring busy time."""
        problem = check_slot(self.business, service, resource_id, start, (), self._clock())
        return problem if problem is not None and problem.is_permanent else None

    def _raise_for(self, problem: SlotProblem, service: Service, start: datetime) -> NoReturn:
        local = start.astimezone(self.business.tz).isoformat(timespec="minutes")
        messages = {
            SlotProblem.IN_THE_PAST: f"{local} is in the past",
            SlotProblem.INSIDE_NOTICE: f"{local} is sooner than the {self.business.booking.min_notice_minutes}"
            " minutes' notice needed",
            SlotProblem.BEYOND_HORIZON: f"{local} is more than {self.business.booking.horizon_days} days ahead",
            SlotProblem.CLOSED: f"{self.business.name} is closed at {local}",
            SlotProblem.OUTSIDE_HOURS: f"{local} to {service.duration_minutes} minutes later is outside opening hours",
            SlotProblem.NOT_WHOLE_MINUTE: f"{local} is not on a whole minute",
            SlotProblem.UNKNOWN_RESOURCE: "no resource can provide this service",
        }
        raise InvalidRequest(messages.get(problem, problem.value), code=problem.value, service_id=service.id)

    def _viable(self, service: Service, candidates: list[str], starts: Sequence[datetime]) -> list[str]:
        """Candidates for which every start passes the permanent rules; raise when none does."""
        problems: dict[str, SlotProblem] = {}
        viable = []
        for resource_id in candidates:
            found = next((p for s in starts if (p := self._rule_problem(service, resource_id, s))), None)
            if found is None:
                viable.append(resource_id)
            else:
                problems[resource_id] = found
        if not viable:
            # Report the problem of the first candidate: it is the one the caller asked for, or the
            # business's first choice.
            self._raise_for(problems[candidates[0]], service, starts[0])
        return viable

    # -- queries ----------------------------------------------------------------------------------
    async def busy(self, resource_id: str, window: Interval) -> tuple[Interval, ...]:
        """What makes the resource unavailable in ``window``: bookings, live holds, and external busy
        time under the ``hard`` policy. Stale external time is refreshed first, waiting at most
        ``external_wait``; a slow or failing calendar leaves the answer to what the index has (the
        ledger still refuses a double booking)."""
        hard = self.business.external_conflicts(resource_id) == "hard"
        snapshot = await self.index.snapshot(resource_id, window, include_external=hard)
        if not snapshot.ready:
            days = (window.start.date(), window.end.date())
            await self._ensure_index(resource_id, days)
            snapshot = await self.index.snapshot(resource_id, window, include_external=hard)
        # Under the soft policy external time hides no slot, so the answer does not wait for it.
        external = self._external
        if (
            hard
            and external is not None
            and external.is_stale(resource_id, window, snapshot.external_fetched_at)
            and await external.try_ensure_fresh(resource_id, window, wait=self._external_wait)
        ):
            snapshot = await self.index.snapshot(resource_id, window)
        return snapshot.busy

    def _refresh_soon(self, granted: HoldGranted) -> None:
        """After a hold: when the external data it was checked against is stale, refresh it in the
        background (the hold path never waits on the calendar)."""
        external = self._external
        if external is None or not external.tracks(granted.resource_id):
            return
        if external.outdated(granted.external_fetched_at):
            window = Interval(min(b.start for b in granted.blocks), max(b.end for b in granted.blocks))
            self._own(external.try_ensure_fresh(granted.resource_id, window))

    def _warnings(self, resource_id: str, overlaps: Sequence[Interval]) -> tuple[str, ...]:
        return overlap_warnings(self.business, resource_id, overlaps)

    async def find_slots(
        self,
        service_id: str,
        *,
        window: Interval | None = None,
        near: datetime | None = None,
        resource_id: str | None = None,
        among: Collection[str] | None = None,
        limit: int = 10,
    ) -> SlotSearch:
        """Bookable slots in ``window``; with ``near``, the ones closest to it first, and whether exactly
        ``near`` is available. Without a window, ``near`` widens to a few days around it. ``among``
        limits the search to those resources (a phone line's)."""
        service = self._service(service_id)
        candidates = self._candidates(service, resource_id, among)
        if window is None:
            anchor = ensure_utc(near) if near is not None else self._clock()
            local_day = anchor.astimezone(self.business.tz).date()
            window = Interval(
                local_day_bounds(local_day - timedelta(days=SEARCH_DAYS_BEFORE if near else 0), self.business.tz)[0],
                local_day_bounds(local_day + timedelta(days=SEARCH_DAYS_AFTER), self.business.tz)[1],
            )
        busy_window = window.widen(service.buffer_before + service.duration, service.duration + service.buffer_after)
        # Concurrently: each resource may wait (briefly) for its external calendar. Every read is
        # awaited to its end, then the first error (if any) is raised as it is.
        answers = await asyncio.gather(*(self.busy(rid, busy_window) for rid in candidates), return_exceptions=True)
        busy: dict[str, tuple[Interval, ...]] = {}
        for rid, answer in zip(candidates, answers, strict=True):
            if isinstance(answer, BaseException):
                raise answer
            busy[rid] = answer
        slots = free_slots(self.business, service, candidates, window, busy, self._clock())
        if near is None:
            return SlotSearch(tuple(slots[:limit]))
        near = ensure_utc(near)
        available = any(slot.start == near for slot in slots)
        return SlotSearch(tuple(rank_slots(slots, near, limit=limit, prefer_resource=resource_id)), available)

    async def alternatives(
        self,
        service_id: str,
        near: datetime,
        resource_id: str | None,
        limit: int = 5,
        *,
        among: Collection[str] | None = None,
    ) -> tuple[Slot, ...]:
        """The bookable slots nearest to ``near``, closest first. Looks within a day either side first
        (enough almost always, and cheap), then over the default few days around it."""
        near = ensure_utc(near)
        for window in (Interval(near - timedelta(days=1), near + timedelta(days=1)), None):
            found = await self.find_slots(
                service_id, window=window, near=near, resource_id=resource_id, among=among, limit=limit + 1
            )
            slots = tuple(slot for slot in found.slots if slot.start != near)[:limit]
            if len(slots) == limit:
                break
        return slots

    async def get_booking(self, booking_id: str) -> Booking:
        return await self.ledger.require_booking(booking_id)

    async def find_bookings(self, phone: str, *, upcoming_only: bool = True) -> list[Booking]:
        normalised = normalise_phone(phone, default_region=self._region)
        since = self._clock() if upcoming_only else None
        return await self.ledger.bookings_for_phone(normalised, since=since, active_only=upcoming_only)

    # -- holds ------------------------------------------------------------------------------------
    async def hold(
        self,
        service_id: str,
        start: datetime,
        *,
        resource_id: str | None = None,
        owner: str | None = None,
        among: Collection[str] | None = None,
    ) -> HoldOutcome:
        """Hold a slot while the caller decides (``hold_ttl_seconds`` from the business rules), with one
        of ``among``'s resources when given."""
        service = self._service(service_id)
        start = ensure_utc(start)
        candidates = self._viable(service, self._candidates(service, resource_id, among), [start])
        block = self._block(service, start)
        ttl = timedelta(seconds=self.business.booking.hold_ttl_seconds)
        for rid in candidates:
            outcome = await self._take_hold(rid, [block], ttl=ttl, owner=owner or f"hold:{secrets.token_hex(8)}")
            if isinstance(outcome, HoldGranted):
                slot = Slot(rid, service.id, start, start + service.duration, block)
                return Held(outcome.token, slot, outcome.expires_at, self._warnings(rid, outcome.external_overlaps))
            if isinstance(outcome, HoldInProgress):
                raise RequestInProgress("this caller already holds an overlapping slot", resource_id=rid)
        alternatives = await self.alternatives(service.id, start, resource_id, among=among)
        return SlotUnavailable(service.id, start, alternatives)

    async def release_hold(self, token: str) -> bool:
        return await self.index.release(token)

    async def _take_hold(
        self, resource_id: str, blocks: list[Interval], *, ttl: timedelta, owner: str, ignore_booking: str | None = None
    ) -> HoldGranted | HoldUnavailable | HoldInProgress:
        refuse_external = self.business.external_conflicts(resource_id) == "hard"
        for _ in range(2):
            if len(blocks) == 1:
                outcome = await self.index.hold(
                    resource_id,
                    blocks[0],
                    ttl=ttl,
                    owner=owner,
                    ignore_booking=ignore_booking,
                    refuse_external=refuse_external,
                )
            else:
                outcome = await self.index.hold_many(
                    resource_id, blocks, ttl=ttl, owner=owner, refuse_external=refuse_external
                )
            if isinstance(outcome, HoldGranted):
                self._refresh_soon(outcome)
            if not isinstance(outcome, IndexNotReady):
                return outcome
            await self._ensure_index(resource_id, outcome.missing_days)
        raise RuntimeError(f"free/busy index of {resource_id} did not become ready")

    # -- booking ----------------------------------------------------------------------------------
    async def book(self, request: BookRequest) -> BookOutcome:
        return await metrics.timed_booking("book", self._book(request), unavailable=SlotUnavailable)

    async def _book(self, request: BookRequest) -> BookOutcome:
        service = self._service(request.service_id)
        start = ensure_utc(request.start)
        customer = CustomerDetails(
            phone=normalise_phone(request.customer.phone, default_region=self._region),
            name=request.customer.name,
            email=request.customer.email,
            time_zone=request.customer.time_zone,
        )
        fingerprint = request_fingerprint(
            {
                "service": service.id,
                "resource": request.resource_id,
                "start": start.isoformat(),
                "phone": customer.phone,
                "rrule": request.rrule,
            }
        )
        # No look-up of the idempotency key first: a retry of a committed request finds its slot taken
        # (by itself) or commits into the key's unique constraint, and both paths end in a replay below.
        # That keeps a read off the fast path.
        candidates = self._candidates(service, request.resource_id, request.among)
        series: SeriesSpec | None = None
        if request.rrule is not None:
            occurrences = expand(
                request.rrule, start, self.business.tz, max_occurrences=self.business.booking.max_occurrences
            )
            missing = [o for o in occurrences if o.start is None]
            if missing:
                return SlotUnavailable(
                    service.id,
                    start,
                    conflicts=tuple(
                        OccurrenceConflict(None, o.local, o.problem or "nonexistent_local_time") for o in missing
                    ),
                )
            starts = [o.start for o in occurrences if o.start is not None]
            series = SeriesSpec(
                rrule=request.rrule,
                time_zone=self.business.timezone,
                first_start_local=start.astimezone(self.business.tz).replace(tzinfo=None).isoformat(),
            )
            rule_conflicts = self._series_rule_conflicts(service, candidates, starts)
            if rule_conflicts is not None:
                return SlotUnavailable(service.id, start, conflicts=rule_conflicts)
        else:
            starts = [start]
            candidates = self._viable(service, candidates, starts)
        blocks = [self._block(service, s) for s in starts]
        owner = f"idem:{request.idempotency_key}" if request.idempotency_key else f"book:{secrets.token_hex(8)}"
        first_conflicts: tuple[OccurrenceConflict, ...] = ()
        for resource_id in candidates:
            if series is not None and self._series_rule_conflicts(service, [resource_id], starts) is not None:
                continue
            with metrics.booking_stage("book", "hold"):
                secured = await self._secure(resource_id, blocks, request.hold_token, owner)
            if isinstance(secured, HoldUnavailable):
                if not first_conflicts and series is not None:
                    first_conflicts = self._occurrence_conflicts(starts, blocks, secured.conflicts)
                continue
            token, overlaps = secured
            new = [
                NewBooking(resource_id, service.id, s, s + service.duration, b)
                for s, b in zip(starts, blocks, strict=True)
            ]
            result = await self._shielded(self._commit(request, customer, new, series, fingerprint, resource_id, token))
            if isinstance(result, Created):
                return Booked(
                    result.bookings, series_id=result.series_id, warnings=self._warnings(resource_id, overlaps)
                )
            if isinstance(result, KeyTaken):
                return await self._replay(result.record, fingerprint)
            if isinstance(result, Overlap):
                # The index missed bookings the ledger knows: put them back so the next caller is told
                # at the Redis step.
                for booking in result.conflicts:
                    await self.index.add_booking(booking.id, booking.resource_id, booking.block)
                if not first_conflicts and series is not None:
                    first_conflicts = self._occurrence_conflicts(
                        starts, blocks, tuple(c.block for c in result.conflicts)
                    )
        if request.idempotency_key is not None:
            # A twin with the same key may have committed while we tried; its booking is our answer.
            record = await self.ledger.find_idempotency(request.idempotency_key)
            if record is not None:
                return await self._replay(record, fingerprint)
        if series is not None:
            return SlotUnavailable(service.id, start, conflicts=first_conflicts)
        alternatives = await self.alternatives(service.id, start, request.resource_id, among=request.among)
        return SlotUnavailable(service.id, start, alternatives)

    async def _commit(
        self,
        request: BookRequest,
        customer: CustomerDetails,
        new: list[NewBooking],
        series: SeriesSpec | None,
        fingerprint: str,
        resource_id: str,
        token: str,
    ) -> CreateResult:
        """Write the booking(s) to the ledger and settle the hold: recorded in the index when created,
        released otherwise."""
        try:
            with metrics.booking_stage("book", "ledger"):
                result = await self.ledger.create_bookings(
                    customer,
                    new,
                    idempotency=(request.idempotency_key, fingerprint) if request.idempotency_key else None,
                    series=series,
                    source=request.source,
                    notes=request.notes,
                    sms_consent=request.sms_consent,
                    sms_consent_wording=request.sms_consent_wording,
                    line_number=request.line_number,
                    actor=request.actor,
                )
        except BaseException:
            await self.index.release(token)
            raise
        with metrics.booking_stage("book", "index"):
            if not isinstance(result, Created):
                await self.index.release(token)
            elif series is None:
                booking = result.bookings[0]
                await self.index.confirm(token, booking_id=booking.id, resource_id=resource_id, blocks=[booking.block])
            else:
                # Record every occurrence before dropping the hold, so the slots are never shown free.
                for booking in result.bookings:
                    await self.index.add_booking(booking.id, resource_id, booking.block)
                await self.index.release(token)
        return result

    async def _shielded(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to completion even if the caller is cancelled (a caller barging in, a client
        hanging up): once a booking is being written it is finished and recorded, never half-done."""
        return await asyncio.shield(self._own(work))

    def _own(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start ``work`` as a task kept until done and awaited by :meth:`drain` at shutdown."""
        task = asyncio.get_running_loop().create_task(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return task

    async def drain(self) -> None:
        """Wait for booking writes and background refreshes still in flight (called at shutdown)."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _secure(
        self, resource_id: str, blocks: list[Interval], hold_token: str | None, owner: str
    ) -> tuple[str, tuple[Interval, ...]] | HoldUnavailable:
        """The token of a live hold on ``blocks``: the caller's own hold when it still covers them,
        else a fresh one. A stale token never wins: if it expired, the slot is taken anew or not at all.
        With the token come the external busy intervals the blocks overlap (soft policy only)."""
        if hold_token is not None and len(blocks) == 1:
            held = await self.index.refresh_hold(hold_token, ttl=COMMIT_HOLD_TTL)
            if held is not None and held.resource_id == resource_id and held.block == blocks[0]:
                return held.token, await self._soft_overlaps(resource_id, blocks[0])
        outcome = await self._take_hold(resource_id, blocks, ttl=COMMIT_HOLD_TTL, owner=owner)
        if isinstance(outcome, HoldInProgress):
            raise RequestInProgress(
                "a request with this idempotency key is already in progress", resource_id=resource_id
            )
        if isinstance(outcome, HoldUnavailable):
            return outcome
        return outcome.token, outcome.external_overlaps

    async def _soft_overlaps(self, resource_id: str, block: Interval) -> tuple[Interval, ...]:
        """External busy time overlapping ``block`` of a soft-policy resource with a calendar (the hold
        being confirmed was checked when taken; this reads it again for the booking's warnings)."""
        if self._external is None or not self._external.tracks(resource_id):
            return ()
        if self.business.external_conflicts(resource_id) == "hard":
            return ()  # the hold refused external time when it was taken
        return await self.index.external_busy(resource_id, block)

    def _series_rule_conflicts(
        self, service: Service, candidates: list[str], starts: list[datetime]
    ) -> tuple[OccurrenceConflict, ...] | None:
        """Occurrences that break a permanent rule on every candidate (closed day, outside hours...),
        or None when some candidate passes all of them."""
        best: tuple[OccurrenceConflict, ...] | None = None
        for resource_id in candidates:
            conflicts = tuple(
                OccurrenceConflict(s, s.astimezone(self.business.tz).replace(tzinfo=None), problem.value)
                for s in starts
                if (problem := self._rule_problem(service, resource_id, s)) is not None
            )
            if not conflicts:
                return None
            if best is None:
                best = conflicts
        return best

    def _occurrence_conflicts(
        self, starts: list[datetime], blocks: list[Interval], busy: tuple[Interval, ...]
    ) -> tuple[OccurrenceConflict, ...]:
        tz = self.business.tz
        return tuple(
            OccurrenceConflict(s, s.astimezone(tz).replace(tzinfo=None), SlotProblem.BUSY.value)
            for s, b in zip(starts, blocks, strict=True)
            if any(b.overlaps(other) for other in busy)
        )

    async def _replay(self, record: IdempotencyRecord, fingerprint: str) -> Booked:
        if record.request_hash != fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used for a different booking request", key=record.key
            )
        bookings = await self.ledger.get_bookings(record.booking_ids)
        return Booked(tuple(bookings), replayed=True, series_id=record.series_id)

    # -- changes ----------------------------------------------------------------------------------
    async def reschedule(
        self,
        booking_id: str,
        new_start: datetime,
        *,
        resource_id: str | None = None,
        expected_version: int | None = None,
        actor: str = "api",
        among: Collection[str] | None = None,
    ) -> BookOutcome:
        """Move a booking. The new slot is secured (held in Redis, then taken in the same UPDATE that
        releases the old time) before the old one is let go. ``among`` limits the resources it may move
        to (a phone line's); its own resource stays allowed, so it can always move within its day book."""
        move = self._reschedule(
            booking_id, new_start, resource_id=resource_id, expected_version=expected_version, actor=actor, among=among
        )
        return await metrics.timed_booking("reschedule", move, unavailable=SlotUnavailable)

    async def _reschedule(
        self,
        booking_id: str,
        new_start: datetime,
        *,
        resource_id: str | None,
        expected_version: int | None,
        actor: str,
        among: Collection[str] | None,
    ) -> BookOutcome:
        booking = await self.ledger.require_booking(booking_id)
        if not booking.status.is_active:
            booking.status.check_transition(BookingStatus.CONFIRMED, booking_id=booking_id)
        service = self._service(booking.service_id)
        new_start = ensure_utc(new_start)
        among = None if among is None else {*among, booking.resource_id}
        candidates = (
            self._candidates(service, resource_id, among)
            if resource_id
            else [booking.resource_id]
            + [rid for rid in service.resources if rid != booking.resource_id and (among is None or rid in among)]
        )
        candidates = self._viable(service, candidates, [new_start])
        block = self._block(service, new_start)
        for rid in candidates:
            with metrics.booking_stage("reschedule", "hold"):
                outcome = await self._take_hold(
                    rid, [block], ttl=COMMIT_HOLD_TTL, owner=f"move:{booking_id}", ignore_booking=booking_id
                )
            if isinstance(outcome, HoldInProgress):
                raise RequestInProgress("this booking is being rescheduled already", booking_id=booking_id)
            if isinstance(outcome, HoldUnavailable):
                continue
            try:
                with metrics.booking_stage("reschedule", "ledger"):
                    result = await self.ledger.reschedule(
                        booking_id,
                        resource_id=rid,
                        start=new_start,
                        end=new_start + service.duration,
                        block=block,
                        expected_version=expected_version,
                        actor=actor,
                    )
            except BaseException:
                await self.index.release(outcome.token)
                raise
            if isinstance(result, Overlap):
                await self.index.release(outcome.token)
                for other in result.conflicts:
                    await self.index.add_booking(other.id, other.resource_id, other.block)
                continue
            with metrics.booking_stage("reschedule", "index"):
                if rid == booking.resource_id:
                    await self.index.move_booking(booking_id, rid, booking.block, block, token=outcome.token)
                else:
                    await self.index.remove_booking(booking_id, booking.resource_id, booking.block)
                    await self.index.confirm(outcome.token, booking_id=booking_id, resource_id=rid, blocks=[block])
            return Booked((result,), warnings=self._warnings(rid, outcome.external_overlaps))
        alternatives = await self.alternatives(service.id, new_start, resource_id, among=among)
        return SlotUnavailable(service.id, new_start, alternatives)

    async def cancel(self, booking_id: str, *, reason: str | None = None, actor: str = "api") -> Booking:
        return await self.change_status(booking_id, BookingStatus.CANCELLED, reason=reason, actor=actor)

    async def change_status(
        self, booking_id: str, target: BookingStatus, *, reason: str | None = None, actor: str = "api"
    ) -> Booking:
        """Cancel, complete or mark a no-show; a booking that stops being active frees its time."""
        change = self._change_status(booking_id, target, reason=reason, actor=actor)
        if target is BookingStatus.CANCELLED:  # every cancellation counts, through cancel() or a status change
            return await metrics.timed_booking("cancel", change)
        return await change

    async def _change_status(
        self, booking_id: str, target: BookingStatus, *, reason: str | None, actor: str
    ) -> Booking:
        booking = await self.ledger.change_status(booking_id, target, actor=actor, reason=reason)
        if not booking.status.is_active:
            await self.index.remove_booking(booking.id, booking.resource_id, booking.block)
        return booking


__all__ = [
    "BookOutcome",
    "BookRequest",
    "Booked",
    "BookingService",
    "Held",
    "HoldOutcome",
    "OccurrenceConflict",
    "SlotSearch",
    "SlotUnavailable",
]
