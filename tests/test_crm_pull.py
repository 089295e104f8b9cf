"""The CRM pull (people's Airtable edits back into the ledger): the real Airtable adapter through pyairtable
against the Airtable simulator on loopback, a real ledger and the booking service. The simulator's wall
clock is the test's clock, so Airtable's modification times and the ledger's ``updated_at`` compare on
one timeline the test moves by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import pytest
import redis.asyncio as aioredis
import requests
from pyairtable import Api
from pyairtable.formulas import IS_AFTER, IS_BEFORE, Field

from booking.crm_pull import Applied, ConflictReason, CrmPull, Winner
from booking.domain import Booking, BookingStatus
from booking.errors import EffectFailed
from booking.ledger.crm_repository import CrmLedger
from booking.ledger.database import Database
from booking.ledger.repository import CustomerDetails
from booking.outbox import EffectKind, Outbox
from booking.service import Booked, BookingService, BookRequest
from integrations.airtable import APPOINTMENTS, LAST_MODIFIED, AirtableCRM, AppointmentRow
from integrations.redis_rate_limit import RedisRateLimiter
from integrations.simulators.airtable import AirtableState, create_airtable_simulator
from tests.conftest import TEST_NOW, FrozenClock, serving

TOKEN = "patSimulatorToken.0123456789"
BASE = "appVoicebook0001"
START = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)  # 10:00 in New York, a Tuesday
ALICE = CustomerDetails(phone="+12125550142", name="Alice Rivera")
MINUTE = timedelta(minutes=1)


@pytest.fixture
def sim(clock: FrozenClock) -> AirtableState:
    state = AirtableState(token=TOKEN, rate=1000, wall_clock=clock)
    state.add_base(BASE)
    return state


@pytest.fixture
async def sim_url(sim: AirtableState) -> AsyncIterator[str]:
    async with serving(create_airtable_simulator(sim)) as url:
        yield url


@pytest.fixture
async def crm(redis_client: aioredis.Redis, sim_url: str) -> AsyncIterator[AirtableCRM]:
    limiter = RedisRateLimiter(redis_client, "airtable", limit=1000, window=1.0)
    adapter = AirtableCRM(TOKEN, BASE, limiter, endpoint_url=sim_url)
    try:
        assert (await adapter.ensure_schema(create=True)).ok
        yield adapter
    finally:
        adapter.close()


@pytest.fixture
def store(database: Database, clock: FrozenClock) -> CrmLedger:
    return CrmLedger(database, clock=clock)


@pytest.fixture
def pull(crm: AirtableCRM, service: BookingService, store: CrmLedger) -> CrmPull:
    return CrmPull(crm, service, store)


async def book(service: BookingService, start: datetime = START, notes: str | None = None) -> Booking:
    outcome = await service.book(
        BookRequest(service_id="checkup", start=start, customer=ALICE, resource_id="dr-lee", notes=notes)
    )
    assert isinstance(outcome, Booked), outcome
    return outcome.booking


async def push(crm: AirtableCRM, booking: Booking) -> str:
    """What the CRM push does with a booking; returns its Airtable record id."""
    row = AppointmentRow(
        booking.id,
        booking.customer.phone,
        start=booking.start,
        end=booking.end,
        status=booking.status.value,
        notes=booking.notes,
    )
    return (await crm.sync(appointments=[row])).appointments[booking.id]


async def synced_booking(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, clock: FrozenClock, notes: str | None = None
) -> tuple[Booking, str]:
    """A booking made now, pushed a minute later, and a first pull that finds nothing to do."""
    booking = await book(service, notes=notes)
    clock.advance(MINUTE)
    record_id = await push(crm, booking)
    first = await pull.pull_once()
    assert (first.applied, first.conflicts) == ((), ())
    return booking, record_id


# -- Airtable's edit is the latest: applied ----------------------------------------------------------


async def test_a_cancellation_in_airtable_cancels_the_booking_with_its_effects(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, sim: AirtableState, clock: FrozenClock, database: Database
) -> None:
    booking, record_id = await synced_booking(service, crm, pull, clock)
    clock.advance(5 * MINUTE)
    sim.edit_as_person(BASE, APPOINTMENTS, record_id, {"Status": "cancelled"}, at=clock.now)
    clock.advance(MINUTE)

    result = await pull.pull_once()

    assert result.applied == (Applied(booking.id, "status", "confirmed", "cancelled"),)
    assert result.conflicts == ()
    stored = await service.ledger.require_booking(booking.id)
    assert stored.status is BookingStatus.CANCELLED and stored.updated_at == clock.now
    history = await service.ledger.history(booking.id)
    assert (history[-1].to_status, history[-1].actor) == (BookingStatus.CANCELLED, "airtable")
    kinds = [effect.kind for effect in await Outbox(database, clock=clock).for_booking(booking.id)]
    assert EffectKind.CALENDAR_DELETE in kinds and EffectKind.SMS_CANCELLATION in kinds
    # The slot is free again: someone else can have it.
    assert isinstance(
        await service.book(BookRequest("checkup", START, CustomerDetails("+16465550199"), "dr-lee")), Booked
    )


async def test_notes_edited_in_airtable_reach_the_ledger(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, sim: AirtableState, clock: FrozenClock, database: Database
) -> None:
    booking, record_id = await synced_booking(service, crm, pull, clock, notes="first visit")
    effects_before = len(await Outbox(database, clock=clock).for_booking(booking.id))
    clock.advance(5 * MINUTE)
    sim.edit_as_person(BASE, APPOINTMENTS, record_id, {"Notes": "needs wheelchair access"}, at=clock.now)
    clock.advance(MINUTE)

    result = await pull.pull_once()

    assert result.applied == (Applied(booking.id, "notes", "first visit", "needs wheelchair access"),)
    stored = await service.ledger.require_booking(booking.id)
    assert stored.notes == "needs wheelchair access"
    assert (stored.version, stored.updated_at, stored.status) == (booking.version + 1, clock.now, booking.status)
    assert len(await Outbox(database, clock=clock).for_booking(booking.id)) == effects_before  # nobody is told
    # The next push writes back what Airtable already has: the row's modification time stays.
    modified = sim.records(BASE, APPOINTMENTS)[0].modified_time
    clock.advance(MINUTE)
    await push(crm, stored)
    assert sim.records(BASE, APPOINTMENTS)[0].modified_time == modified


async def test_pulling_twice_applies_nothing_twice(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, sim: AirtableState, clock: FrozenClock, database: Database
) -> None:
    booking, record_id = await synced_booking(service, crm, pull, clock)
    clock.advance(5 * MINUTE)
    sim.edit_as_person(BASE, APPOINTMENTS, record_id, {"Status": "cancelled", "Notes": "called the desk"}, at=clock.now)
    first = await pull.pull_once()
    assert {applied.field for applied in first.applied} == {"status", "notes"}
    effects = await Outbox(database, clock=clock).for_booking(booking.id)
    version = (await service.ledger.require_booking(booking.id)).version

    second = await pull.pull_once()

    assert second.fetched == 1, "the overlap reads the row again"
    assert (second.applied, second.conflicts) == ((), ())
    assert second.watermark == first.watermark == clock.now
    assert await Outbox(database, clock=clock).for_booking(booking.id) == effects
    assert (await service.ledger.require_booking(booking.id)).version == version


async def test_an_edit_made_visible_late_is_read_through_the_overlap(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, sim: AirtableState, clock: FrozenClock
) -> None:
    booking, record_id = await synced_booking(service, crm, pull, clock)
    other = await book(service, START + timedelta(hours=1))
    clock.advance(5 * MINUTE)
    other_record = await push(crm, other)
    assert (await pull.pull_once()).watermark == clock.now
    # Stamped 30 seconds before the watermark, but not visible to that pull.
    sim.edit_as_person(BASE, APPOINTMENTS, record_id, {"Notes": "late"}, at=clock.now - timedelta(seconds=30))
    clock.advance(MINUTE)

    result = await pull.pull_once()

    assert result.applied == (Applied(booking.id, "notes", None, "late"),)
    assert other_record != record_id


# -- the ledger's change is the latest: kept, and a conflict when both changed -------------------------


async def test_a_later_ledger_change_wins_and_the_conflict_is_recorded(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, sim: AirtableState, clock: FrozenClock
) -> None:
    booking, record_id = await synced_booking(service, crm, pull, clock, notes="first visit")
    clock.advance(5 * MINUTE)
    edited_at = clock.now
    sim.edit_as_person(BASE, APPOINTMENTS, record_id, {"Status": "cancelled", "Notes": "do not book"}, at=edited_at)
    clock.advance(MINUTE)
    moved = await service.reschedule(booking.id, START + timedelta(hours=1))
    assert isinstance(moved, Booked)

    result = await pull.pull_once()

    assert result.applied == ()
    stored = await service.ledger.require_booking(booking.id)
    assert (stored.status, stored.notes, stored.start) == (BookingStatus.CONFIRMED, "first visit", moved.booking.start)
    found = {(c.field, c.ledger_value, c.airtable_value) for c in result.conflicts}
    assert found == {("status", "confirmed", "cancelled"), ("notes", "first visit", "do not book")}
    for conflict in result.conflicts:
        assert (conflict.booking_id, conflict.record_id) == (booking.id, record_id)
        assert (conflict.winner, conflict.reason) == (Winner.LEDGER, ConflictReason.BOTH_CHANGED)
        assert (conflict.ledger_at, conflict.airtable_at) == (stored.updated_at, edited_at)
        assert conflict.detected_at == clock.now and conflict.resolved_at is None

    # Read again, the same edit is not recorded again; the push then overwrites Airtable.
    assert (await pull.pull_once()).conflicts == ()
    clock.advance(MINUTE)
    await push(crm, stored)
    assert sim.records(BASE, APPOINTMENTS)[0].fields["Status"] == "confirmed"
    assert (await pull.pull_once()).conflicts == ()

    unresolved = await pull.conflicts()
    assert [c.id for c in unresolved] == [c.id for c in result.conflicts]
    resolved = await pull.resolve(unresolved[0].id)
    assert resolved is not None and resolved.resolved_at == clock.now
    assert [c.id for c in await pull.conflicts()] == [unresolved[1].id]
    assert len(await pull.conflicts(unresolved_only=False)) == 2
    assert await pull.resolve(999_999) is None


async def test_airtable_behind_the_ledger_is_no_conflict(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, clock: FrozenClock
) -> None:
    # The ledger cancels after the last push; the row still says "confirmed" until the next push.
    booking, _ = await synced_booking(service, crm, pull, clock)
    clock.advance(MINUTE)
    await service.cancel(booking.id, reason="caller asked")
    clock.advance(MINUTE)
    store_pull = await pull.pull_once()  # rereads the pushed row through the overlap
    assert store_pull.fetched == 1
    assert (store_pull.applied, store_pull.conflicts) == ((), ())
    assert (await service.ledger.require_booking(booking.id)).status is BookingStatus.CANCELLED


# -- edits the ledger cannot take ----------------------------------------------------------------------


async def test_unknown_and_missing_booking_ids_are_reported(
    crm: AirtableCRM, pull: CrmPull, sim_url: str, clock: FrozenClock
) -> None:
    table = Api(TOKEN, endpoint_url=sim_url, retry_strategy=None).table(BASE, APPOINTMENTS)
    unknown = await asyncio.to_thread(table.create, {"Booking ID": "bk_nowhere", "Status": "cancelled"}, typecast=True)
    by_hand = await asyncio.to_thread(table.create, {"Notes": "walk-in, no booking"})

    result = await pull.pull_once()

    reported = {(c.record_id, c.booking_id, c.reason, c.winner) for c in result.conflicts}
    assert reported == {
        (unknown["id"], "bk_nowhere", ConflictReason.UNKNOWN_BOOKING, Winner.NEITHER),
        (by_hand["id"], None, ConflictReason.NO_BOOKING_ID, Winner.NEITHER),
    }
    assert result.applied == () and result.watermark == clock.now
    assert (await pull.pull_once()).conflicts == ()
    assert len(await pull.conflicts()) == 2


async def test_statuses_the_ledger_cannot_take_are_conflicts(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, sim: AirtableState, clock: FrozenClock
) -> None:
    booking, record_id = await synced_booking(service, crm, pull, clock)
    clock.advance(MINUTE)
    sim.edit_as_person(BASE, APPOINTMENTS, record_id, {"Status": "tentative"}, at=clock.now)
    unsupported = await pull.pull_once()
    assert [(c.field, c.airtable_value, c.reason) for c in unsupported.conflicts] == [
        ("status", "tentative", ConflictReason.UNSUPPORTED_STATUS)
    ]

    other = await book(service, START + timedelta(hours=1))
    await service.cancel(other.id)
    clock.advance(MINUTE)
    other_record = await push(crm, await service.ledger.require_booking(other.id))
    clock.advance(MINUTE)
    sim.edit_as_person(BASE, APPOINTMENTS, other_record, {"Status": "confirmed"}, at=clock.now)
    reopened = await pull.pull_once()
    assert [(c.booking_id, c.reason) for c in reopened.conflicts] == [(other.id, ConflictReason.TRANSITION_NOT_ALLOWED)]
    assert (await service.ledger.require_booking(other.id)).status is BookingStatus.CANCELLED
    assert (await service.ledger.require_booking(booking.id)).status is BookingStatus.CONFIRMED


async def test_a_failed_read_leaves_the_watermark_alone(
    service: BookingService, crm: AirtableCRM, pull: CrmPull, sim: AirtableState, clock: FrozenClock, store: CrmLedger
) -> None:
    _, record_id = await synced_booking(service, crm, pull, clock)
    watermark = await store.watermark("airtable.appointments")
    clock.advance(MINUTE)
    sim.edit_as_person(BASE, APPOINTMENTS, record_id, {"Notes": "x"}, at=clock.now)
    sim.fail_next(503)
    with pytest.raises(EffectFailed) as caught:
        await pull.pull_once()
    assert not caught.value.permanent
    assert await store.watermark("airtable.appointments") == watermark
    assert len((await pull.pull_once()).applied) == 1


# -- the simulator, as pyairtable speaks to it --------------------------------------------------------


async def test_the_adapter_sends_the_formula_the_simulator_implements(
    crm: AirtableCRM, sim: AirtableState, sim_url: str, clock: FrozenClock
) -> None:
    table = Api(TOKEN, endpoint_url=sim_url, retry_strategy=None).table(BASE, APPOINTMENTS)
    old = await asyncio.to_thread(table.create, {"Booking ID": "bk_old"})
    clock.advance(MINUTE)
    new = await asyncio.to_thread(table.create, {"Booking ID": "bk_new"})
    assert new["fields"][LAST_MODIFIED] == "2026-11-30T12:01:00.000Z"

    changes = await crm.changed_appointments(TEST_NOW + timedelta(seconds=30))

    assert [(c.record_id, c.booking_id, c.modified_at) for c in changes] == [(new["id"], "bk_new", clock.now)]
    sent = parse_qs(sim.log[-1].query)
    assert sent["filterByFormula"] == [str(IS_AFTER(Field(LAST_MODIFIED), TEST_NOW + timedelta(seconds=30)))]
    assert sent["filterByFormula"] == ["IS_AFTER({Last Modified}, DATETIME_PARSE('2026-11-30T12:00:30.000Z'))"]
    assert sent["fields[]"] == ["Booking ID", "Status", "Notes", LAST_MODIFIED]
    listed = await asyncio.to_thread(table.all, fields=["Booking ID"])
    assert sorted(r["fields"]["Booking ID"] for r in listed) == ["bk_new", "bk_old"]
    assert all(set(r["fields"]) == {"Booking ID"} for r in listed)
    assert old["id"] != new["id"]


@pytest.mark.parametrize(
    "formula",
    [
        str(IS_BEFORE(Field(LAST_MODIFIED), TEST_NOW)),  # a function the simulator does not implement
        str(IS_AFTER(Field("Status"), TEST_NOW)),  # not a date field
        str(IS_AFTER(Field("Nope"), TEST_NOW)),  # no such field
        "IS_AFTER({Last Modified}, DATETIME_PARSE('yesterday'))",
        "IS_AFTER(LAST_MODIFIED_TIME(), DATETIME_PARSE('2026-11-30T12:00:00.000Z'))",
    ],
)
async def test_the_simulator_refuses_formulas_it_does_not_implement(
    crm: AirtableCRM, sim_url: str, formula: str
) -> None:
    table = Api(TOKEN, endpoint_url=sim_url, retry_strategy=None).table(BASE, APPOINTMENTS)
    with pytest.raises(requests.HTTPError) as caught:
        await asyncio.to_thread(table.all, formula=formula)
    assert caught.value.response is not None and caught.value.response.status_code == 422
    assert caught.value.response.json()["error"]["type"] == "INVALID_FILTER_BY_FORMULA"


async def test_last_modified_is_computed_and_moves_only_when_a_value_changes(
    crm: AirtableCRM, sim: AirtableState, sim_url: str, clock: FrozenClock
) -> None:
    table = Api(TOKEN, endpoint_url=sim_url, retry_strategy=None).table(BASE, APPOINTMENTS)
    with pytest.raises(requests.HTTPError) as caught:
        await asyncio.to_thread(table.create, {"Booking ID": "bk_1", LAST_MODIFIED: "2026-01-01T00:00:00.000Z"})
    assert caught.value.response is not None and caught.value.response.status_code == 422
    record = await asyncio.to_thread(table.create, {"Booking ID": "bk_1", "Notes": "a"})
    clock.advance(MINUTE)
    same = await asyncio.to_thread(table.update, record["id"], {"Notes": "a"})
    assert same["fields"][LAST_MODIFIED] == record["fields"][LAST_MODIFIED]
    changed = await asyncio.to_thread(table.update, record["id"], {"Notes": "b"})
    assert changed["fields"][LAST_MODIFIED] == "2026-11-30T12:01:00.000Z"
    by_person = sim.edit_as_person(BASE, APPOINTMENTS, record["id"], {"Notes": "c"}, at=clock.now + MINUTE)
    assert by_person.modified_time == "2026-11-30T12:02:00.000Z"
    fetched = await asyncio.to_thread(table.get, record["id"])
    assert fetched["fields"] == {"Booking ID": "bk_1", "Notes": "c", LAST_MODIFIED: "2026-11-30T12:02:00.000Z"}
