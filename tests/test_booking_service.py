"""The booking service against a real Redis and a real ledger (SQLite or PostgreSQL by backend)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from booking.business import Business
from booking.domain import BookingStatus, Interval
from booking.errors import IdempotencyKeyReused, InvalidRequest, InvalidTransition, RequestInProgress
from booking.freebusy import FreeBusyIndex
from booking.ledger.repository import CreateResult, CustomerDetails, Ledger
from booking.service import Booked, BookingService, BookRequest, Held, SlotUnavailable
from tests.conftest import FrozenClock

NY = "America/New_York"


def ny(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    """A New York wall-clock time (unambiguous dates only) as UTC."""
    from zoneinfo import ZoneInfo

    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(NY)).astimezone(UTC)


ALICE = CustomerDetails(phone="(212) 555-0142", name="Alice Rivera")
BOB = CustomerDetails(phone="+1 646 555 0199", name="Bob Chen")


def request(start: datetime, *, customer: CustomerDetails = ALICE, **kwargs: object) -> BookRequest:
    values: dict[str, object] = {"service_id": "checkup", "start": start, "customer": customer}
    values.update(kwargs)
    return BookRequest(**values)  # type: ignore[arg-type]


async def booked(service: BookingService, req: BookRequest) -> Booked:
    outcome = await service.book(req)
    assert isinstance(outcome, Booked), outcome
    return outcome


async def test_book_confirms_and_marks_the_index_busy(service: BookingService, index: FreeBusyIndex) -> None:
    outcome = await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))
    booking = outcome.booking
    assert booking.status is BookingStatus.CONFIRMED
    assert (booking.start, booking.end) == (ny(2026, 12, 1, 10), ny(2026, 12, 1, 10, 30))
    assert booking.block == Interval(ny(2026, 12, 1, 10), ny(2026, 12, 1, 10, 40))  # 10 min buffer after
    assert booking.customer.phone == "+12125550142"
    snapshot = await index.snapshot("dr-lee", Interval(ny(2026, 12, 1, 0), ny(2026, 12, 2, 0)))
    assert booking.block in snapshot.busy
    history = await service.ledger.history(booking.id)
    assert [event.kind for event in history] == ["created"]


async def test_same_idempotency_key_returns_the_same_booking(service: BookingService) -> None:
    first = await booked(service, request(ny(2026, 12, 1, 10), idempotency_key="call-1:tool-1"))
    again = await booked(service, request(ny(2026, 12, 1, 10), idempotency_key="call-1:tool-1"))
    assert again.replayed and not first.replayed
    assert again.booking.id == first.booking.id
    assert await service.ledger.count_bookings() == 1


async def test_same_key_with_other_parameters_is_refused(service: BookingService) -> None:
    await booked(service, request(ny(2026, 12, 1, 10), idempotency_key="k-1"))
    with pytest.raises(IdempotencyKeyReused):
        await service.book(request(ny(2026, 12, 1, 11), idempotency_key="k-1"))
    assert await service.ledger.count_bookings() == 1


async def test_a_taken_slot_is_unavailable_with_nearest_alternatives(service: BookingService) -> None:
    await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))
    outcome = await service.book(request(ny(2026, 12, 1, 10), customer=BOB, resource_id="dr-lee"))
    assert isinstance(outcome, SlotUnavailable)
    assert outcome.alternatives, "a taken slot must come with alternatives"
    taken = Interval(ny(2026, 12, 1, 10), ny(2026, 12, 1, 10, 40))
    distances = [abs(slot.start - ny(2026, 12, 1, 10)) for slot in outcome.alternatives]
    assert distances == sorted(distances)
    assert all(not slot.block.overlaps(taken) for slot in outcome.alternatives)
    assert all(slot.resource_id == "dr-lee" for slot in outcome.alternatives)
    # The nearest free starts on the 15-minute grid around a 10:00-10:40 block are 09:15 and 10:45.
    assert outcome.alternatives[0].start in (ny(2026, 12, 1, 9, 15), ny(2026, 12, 1, 10, 45))


async def test_any_resource_falls_through_to_the_next_who_can_serve(service: BookingService) -> None:
    monday = ny(2026, 12, 7, 10)  # both doctors work Monday mornings
    first = await booked(service, request(monday))
    second = await booked(service, request(monday, customer=BOB))
    assert {first.booking.resource_id, second.booking.resource_id} == {"dr-lee", "dr-patel"}
    third = await service.book(request(monday, customer=CustomerDetails(phone="+12125550177")))
    assert isinstance(third, SlotUnavailable)


@pytest.mark.parametrize(
    ("start", "code"),
    [
        (ny(2026, 12, 6, 10), "outside_hours"),  # Sunday
        (ny(2026, 11, 30, 6), "in_the_past"),
        (ny(2026, 11, 30, 8, 45), "inside_notice"),  # now is 07:00, two hours' notice needed
        (ny(2027, 3, 1, 10), "beyond_horizon"),
        (ny(2026, 12, 24, 10), "closed"),  # Christmas closure
        (ny(2026, 12, 1, 11, 45), "outside_hours"),  # runs past Dr. Lee's 12:00 lunch break
        (ny(2026, 12, 1, 10) + timedelta(seconds=30), "not_whole_minute"),
    ],
)
async def test_impossible_requests_are_refused_with_the_reason(
    service: BookingService, start: datetime, code: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await service.book(request(start, resource_id="dr-lee"))
    assert caught.value.code == code
    assert await service.ledger.count_bookings(active_only=False) == 0


async def test_unknown_service_resource_and_phone_are_refused(service: BookingService) -> None:
    with pytest.raises(InvalidRequest, match="unknown service 'massage'"):
        await service.book(request(ny(2026, 12, 1, 10), service_id="massage"))
    with pytest.raises(InvalidRequest, match="nurse-kim does not provide checkup"):
        await service.book(request(ny(2026, 12, 1, 10), resource_id="nurse-kim"))
    with pytest.raises(InvalidRequest) as caught:
        await service.book(request(ny(2026, 12, 1, 10), customer=CustomerDetails(phone="12")))
    assert caught.value.code == "invalid_phone"


async def test_a_hold_keeps_others_off_until_its_owner_books(service: BookingService) -> None:
    held = await service.hold("checkup", ny(2026, 12, 1, 10), resource_id="dr-lee")
    assert isinstance(held, Held)
    other = await service.book(request(ny(2026, 12, 1, 10), customer=BOB, resource_id="dr-lee"))
    assert isinstance(other, SlotUnavailable)
    mine = await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee", hold_token=held.token))
    assert mine.booking.resource_id == "dr-lee"
    assert not await service.release_hold(held.token), "booking consumes the hold"


async def test_a_stale_hold_cannot_win_a_slot_someone_else_booked(service: BookingService) -> None:
    held = await service.hold("checkup", ny(2026, 12, 1, 10), resource_id="dr-lee")
    assert isinstance(held, Held)
    await service.release_hold(held.token)  # what expiry does
    await booked(service, request(ny(2026, 12, 1, 10), customer=BOB, resource_id="dr-lee"))
    stale = await service.book(request(ny(2026, 12, 1, 10), resource_id="dr-lee", hold_token=held.token))
    assert isinstance(stale, SlotUnavailable)
    assert await service.ledger.count_bookings() == 1


async def test_an_expired_hold_still_books_a_slot_nobody_took(service: BookingService) -> None:
    held = await service.hold("checkup", ny(2026, 12, 1, 10), resource_id="dr-lee")
    assert isinstance(held, Held)
    await service.release_hold(held.token)
    outcome = await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee", hold_token=held.token))
    assert outcome.booking.start == ny(2026, 12, 1, 10)


async def test_a_twin_request_in_flight_is_a_conflict(service: BookingService, index: FreeBusyIndex) -> None:
    # The twin holds the slot under the same idempotency key and has not committed yet.
    block = Interval(ny(2026, 12, 1, 10), ny(2026, 12, 1, 10, 40))
    await index.hold("dr-lee", block, ttl=timedelta(seconds=30), owner="idem:same-key")
    with pytest.raises(RequestInProgress):
        await service.book(request(ny(2026, 12, 1, 10), resource_id="dr-lee", idempotency_key="same-key"))


async def test_reschedule_takes_the_new_time_and_frees_the_old(service: BookingService) -> None:
    original = (await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))).booking
    moved = await service.reschedule(original.id, ny(2026, 12, 1, 10, 15))  # overlaps its own old block
    assert isinstance(moved, Booked)
    assert moved.booking.id == original.id and moved.booking.version == 2
    assert moved.booking.start == ny(2026, 12, 1, 10, 15)
    # 09:00-09:40 was blocked by nothing; 09:30 would overlap the moved booking's block only if it reached 10:15.
    assert isinstance(await service.book(request(ny(2026, 12, 1, 9, 30), customer=BOB, resource_id="dr-lee")), Booked)
    history = await service.ledger.history(original.id)
    assert [event.kind for event in history] == ["created", "rescheduled"]
    assert history[1].details["from"]["start"] == "2026-12-01T15:00:00Z"


async def test_reschedule_onto_a_taken_slot_leaves_the_booking_where_it_was(service: BookingService) -> None:
    mine = (await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))).booking
    await booked(service, request(ny(2026, 12, 1, 11), customer=BOB, resource_id="dr-lee"))
    outcome = await service.reschedule(mine.id, ny(2026, 12, 1, 11), resource_id="dr-lee")
    assert isinstance(outcome, SlotUnavailable)
    unchanged = await service.get_booking(mine.id)
    assert unchanged.start == ny(2026, 12, 1, 10) and unchanged.version == 1


async def test_cancel_frees_the_slot_and_cannot_happen_twice(service: BookingService) -> None:
    booking = (await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))).booking
    cancelled = await service.cancel(booking.id, reason="caller asked")
    assert cancelled.status is BookingStatus.CANCELLED
    assert isinstance(await service.book(request(ny(2026, 12, 1, 10), customer=BOB, resource_id="dr-lee")), Booked)
    with pytest.raises(InvalidTransition):
        await service.cancel(booking.id)
    with pytest.raises(InvalidTransition):
        await service.reschedule(booking.id, ny(2026, 12, 2, 10))


async def test_recurring_booking_is_all_or_nothing(service: BookingService, ledger: Ledger) -> None:
    # Weekly Tuesdays 10:00 from 1 December; someone already has 15 December.
    await booked(service, request(ny(2026, 12, 15, 10), customer=BOB, resource_id="dr-lee"))
    refused = await service.book(request(ny(2026, 12, 1, 10), resource_id="dr-lee", rrule="FREQ=WEEKLY;COUNT=4"))
    assert isinstance(refused, SlotUnavailable)
    assert [c.local for c in refused.conflicts] == [datetime(2026, 12, 15, 10, 0)]
    assert [c.reason for c in refused.conflicts] == ["busy"]
    assert await ledger.count_bookings() == 1, "nothing of the series may be stored"
    series = await booked(
        service,
        request(ny(2026, 12, 1, 11), resource_id="dr-lee", rrule="FREQ=WEEKLY;COUNT=4", idempotency_key="series-1"),
    )
    assert series.series_id is not None
    assert [b.start for b in series.bookings] == [ny(2026, 12, d, 11) for d in (1, 8, 15, 22)]
    replay = await booked(
        service,
        request(ny(2026, 12, 1, 11), resource_id="dr-lee", rrule="FREQ=WEEKLY;COUNT=4", idempotency_key="series-1"),
    )
    assert replay.replayed and [b.id for b in replay.bookings] == [b.id for b in series.bookings]


async def test_recurring_booking_reports_closed_occurrences(service: BookingService) -> None:
    # Thursdays from 3 December: the 24th is Christmas Eve, closed.
    outcome = await service.book(request(ny(2026, 12, 3, 10), rrule="FREQ=WEEKLY;COUNT=4"))
    assert isinstance(outcome, SlotUnavailable)
    assert [(c.local.day, c.reason) for c in outcome.conflicts] == [(24, "closed")]
    assert await service.ledger.count_bookings() == 0


async def test_unbounded_or_malformed_rules_are_refused(service: BookingService) -> None:
    for rule in ("FREQ=WEEKLY", "FREQ=SOMETIMES;COUNT=2", "FREQ=DAILY;COUNT=500"):
        with pytest.raises(InvalidRequest):
            await service.book(request(ny(2026, 12, 1, 10), rrule=rule))


async def test_find_bookings_by_phone_in_any_format(service: BookingService) -> None:
    await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))
    await booked(service, request(ny(2026, 12, 2, 10), resource_id="dr-lee"))
    await booked(service, request(ny(2026, 12, 1, 11), customer=BOB, resource_id="dr-lee"))
    found = await service.find_bookings("212-555-0142")
    assert [b.start for b in found] == [ny(2026, 12, 1, 10), ny(2026, 12, 2, 10)]
    assert await service.find_bookings("+1 (212) 555 0142") == found


async def test_find_slots_near_a_time_ranks_by_closeness(service: BookingService) -> None:
    search = await service.find_slots("checkup", near=ny(2026, 12, 1, 10), resource_id="dr-lee", limit=5)
    assert search.requested_available is True
    assert search.slots[0].start == ny(2026, 12, 1, 10)
    await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))
    after = await service.find_slots("checkup", near=ny(2026, 12, 1, 10), resource_id="dr-lee", limit=5)
    assert after.requested_available is False
    assert ny(2026, 12, 1, 10) not in [slot.start for slot in after.slots]


async def test_losing_redis_loses_no_booking(service: BookingService, index: FreeBusyIndex, redis_client) -> None:  # type: ignore[no-untyped-def]
    booking = (await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))).booking
    await redis_client.flushdb()
    assert not await index.is_ready("dr-lee")
    again = await service.book(request(ny(2026, 12, 1, 10), customer=BOB, resource_id="dr-lee"))
    assert isinstance(again, SlotUnavailable)
    assert await index.is_ready("dr-lee"), "the index is rebuilt from the ledger on demand"
    snapshot = await index.snapshot("dr-lee", Interval(ny(2026, 12, 1, 0), ny(2026, 12, 2, 0)))
    assert booking.block in snapshot.busy


async def test_a_stale_index_is_overruled_by_the_ledger_and_repaired(
    service: BookingService, index: FreeBusyIndex
) -> None:
    booking = (await booked(service, request(ny(2026, 12, 1, 10), resource_id="dr-lee"))).booking
    await index.remove_booking(booking.id, "dr-lee", booking.block)  # the cache forgets; the ledger does not
    outcome = await service.book(request(ny(2026, 12, 1, 10), customer=BOB, resource_id="dr-lee"))
    assert isinstance(outcome, SlotUnavailable)
    assert await service.ledger.count_bookings() == 1
    snapshot = await index.snapshot("dr-lee", Interval(ny(2026, 12, 1, 0), ny(2026, 12, 2, 0)))
    assert booking.block in snapshot.busy, "the conflict the ledger reported is written back to the index"


async def test_weekly_series_keeps_its_wall_clock_time_across_dst(
    business: Business, ledger: Ledger, index: FreeBusyIndex, clock: FrozenClock
) -> None:
    clock.now = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
    service = BookingService(business, ledger, index, clock=clock)
    await service.start()
    # Mondays 10:00 New York: 8 March is EST (UTC-5), 15 March is EDT (UTC-4) after the 14 March jump.
    series = await booked(service, request(ny(2027, 3, 8, 10), resource_id="dr-lee", rrule="FREQ=WEEKLY;COUNT=2"))
    assert [b.start.hour for b in series.bookings] == [15, 14]
    assert [b.start.astimezone(business.tz).hour for b in series.bookings] == [10, 10]


async def test_days_entering_the_horizon_are_indexed_as_time_passes(
    service: BookingService, index: FreeBusyIndex, clock: FrozenClock
) -> None:
    """The index was built at start-up for the horizon then; weeks later, new days are rebuilt on demand."""
    clock.advance(timedelta(days=45))  # 14 January 2027; the start-up index reached about 31 January
    day = ny(2027, 2, 23, 10)  # beyond what start-up built, inside today's horizon
    first = await booked(service, request(day, resource_id="dr-lee"))
    second = await service.book(request(day, customer=BOB, resource_id="dr-lee"))
    assert isinstance(second, SlotUnavailable)
    snapshot = await index.snapshot("dr-lee", Interval(ny(2027, 2, 23, 0), ny(2027, 2, 24, 0)))
    assert snapshot.ready and first.booking.block in snapshot.busy


class GatedLedger(Ledger):
    """The real ledger, paused at the start of a booking write until the test opens the gate."""

    def __init__(self, ledger: Ledger, clock: FrozenClock) -> None:
        super().__init__(ledger.database, clock=clock)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def create_bookings(self, *args: Any, **kwargs: Any) -> CreateResult:
        self.entered.set()
        await self.gate.wait()
        return await super().create_bookings(*args, **kwargs)


async def test_a_booking_being_written_survives_its_caller_being_cancelled(
    service: BookingService, index: FreeBusyIndex, clock: FrozenClock
) -> None:
    """Barge-in or a dropped client cancels the caller; a booking already being written completes and
    is recorded in the index all the same."""
    gated = GatedLedger(service.ledger, clock)
    service.ledger = gated
    caller = asyncio.create_task(service.book(request(ny(2026, 12, 1, 10), resource_id="dr-lee")))
    await gated.entered.wait()
    caller.cancel()
    gated.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await service.drain()
    assert await gated.count_bookings() == 1
    [booking] = await gated.bookings_for_phone("+12125550142")
    snapshot = await index.snapshot("dr-lee", Interval(ny(2026, 12, 1, 0), ny(2026, 12, 2, 0)))
    assert booking.block in snapshot.busy
