"""The reconciler on the real ledger: bookings whose effects went missing (imported, deleted by hand,
moved behind the outbox's back) get exactly the effects they lack, once; healthy bookings, dead letters
and discarded effects are left alone; effects waiting long past their time are reported as stuck."""

from __future__ import annotations

import io
import json
from collections import Counter
from datetime import timedelta

from sqlalchemy import delete, update

from booking.errors import EffectFailed
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.outbox import EffectKind, EffectStatus, Outbox
from booking.reconciler import Reconciler
from booking.service import BookingService
from tests.conftest import FrozenClock
from tests.test_booking_service import booked, ny, request
from voice_server import dlq_cli
from voice_server.settings import Settings

CREATE, UPDATE, DELETE = EffectKind.CALENDAR_CREATE, EffectKind.CALENDAR_UPDATE, EffectKind.CALENDAR_DELETE
CONFIRM, REMIND, CANCEL = EffectKind.SMS_CONFIRMATION, EffectKind.SMS_REMINDER, EffectKind.SMS_CANCELLATION


async def forget_effects(database: Database, *booking_ids: str) -> None:
    """What an import straight into the ledger, or an operator's DELETE, leaves behind."""
    await database.write(lambda conn: conn.execute(delete(t.effects).where(t.effects.c.booking_id.in_(booking_ids))))


async def kinds(outbox: Outbox, booking_id: str) -> Counter[str]:
    return Counter(effect.kind for effect in await outbox.for_booking(booking_id))


async def test_healthy_bookings_need_nothing(service: BookingService, database: Database, clock: FrozenClock) -> None:
    first = (await booked(service, request(ny(2026, 12, 2, 9), resource_id="dr-lee"))).bookings[0]
    moved = (await booked(service, request(ny(2026, 12, 2, 10), resource_id="dr-lee"))).bookings[0]
    await service.reschedule(moved.id, ny(2026, 12, 2, 11))
    gone = (await booked(service, request(ny(2026, 12, 3, 13), resource_id="dr-lee"))).bookings[0]
    await service.cancel(gone.id)
    series = await booked(service, request(ny(2026, 12, 8, 9), resource_id="dr-lee", rrule="FREQ=WEEKLY;COUNT=3"))
    report = await Reconciler(database, clock=clock).run_once()
    assert report.checked == 3 + 3 and not report.enqueued and not report.stuck
    assert first.id not in report.repaired_bookings and series.series_id is not None


async def test_a_booking_without_effects_gets_them_once(
    service: BookingService, database: Database, clock: FrozenClock
) -> None:
    booking = (await booked(service, request(ny(2026, 12, 2, 9), resource_id="dr-lee"))).bookings[0]
    await forget_effects(database, booking.id)
    notified: list[int] = []

    async def notify() -> None:
        notified.append(1)

    reconciler = Reconciler(database, clock=clock, notify=notify)
    report = await reconciler.run_once()
    assert report.enqueued == {CREATE: 1, CONFIRM: 1, REMIND: 1} and report.repaired_bookings == [booking.id]
    assert notified == [1]
    outbox = Outbox(database, clock=clock)
    assert await kinds(outbox, booking.id) == {CREATE: 1, CONFIRM: 1, REMIND: 1}
    [reminder] = [e for e in await outbox.for_booking(booking.id) if e.kind == REMIND]
    assert reminder.due_at == booking.start - timedelta(hours=24)
    assert not (await reconciler.run_once()).enqueued  # repaired: the next pass finds nothing


async def test_a_move_behind_the_outbox_is_sent_to_the_calendar(
    service: BookingService, database: Database, clock: FrozenClock
) -> None:
    booking = (await booked(service, request(ny(2026, 12, 2, 9), resource_id="dr-lee"))).bookings[0]
    later = booking.start + timedelta(hours=2)
    await database.write(
        lambda conn: conn.execute(
            update(t.bookings)
            .where(t.bookings.c.id == booking.id)
            .values(
                start_at=later,
                end_at=booking.end + timedelta(hours=2),
                block_start=booking.block.start + timedelta(hours=2),
                block_end=booking.block.end + timedelta(hours=2),
                version=booking.version + 1,
            )
        )
    )
    report = await Reconciler(database, clock=clock).run_once()
    # The calendar moves; a reminder is due for the new time (the old one names the old time).
    assert report.enqueued == {UPDATE: 1, REMIND: 1}
    [move] = [e for e in await Outbox(database, clock=clock).for_booking(booking.id) if e.kind == UPDATE]
    assert move.payload["start"] == later.isoformat().replace("+00:00", "Z")
    assert move.payload["previous"]["start"] == booking.start.isoformat().replace("+00:00", "Z")


async def test_a_cancellation_whose_effects_were_lost_removes_the_event_and_tells_the_customer(
    service: BookingService, database: Database, clock: FrozenClock
) -> None:
    booking = (await booked(service, request(ny(2026, 12, 2, 9), resource_id="dr-lee"))).bookings[0]
    await service.cancel(booking.id)
    e = t.effects.c
    await database.write(
        lambda conn: conn.execute(delete(t.effects).where(e.booking_id == booking.id, e.kind.in_([DELETE, CANCEL])))
    )
    report = await Reconciler(database, clock=clock).run_once()
    assert report.enqueued == {DELETE: 1, CANCEL: 1}


async def test_dead_and_discarded_effects_are_not_doubled(
    service: BookingService, database: Database, clock: FrozenClock
) -> None:
    await booked(service, request(ny(2026, 12, 2, 9), resource_id="dr-lee"))
    outbox = Outbox(database, clock=clock)
    claimed = await outbox.claim("w", [CREATE, CONFIRM], limit=2, lease=timedelta(minutes=1))
    assert {effect.kind for effect in claimed} == {CREATE, CONFIRM}
    for effect in claimed:
        assert await outbox.fail(effect, EffectFailed("refused", permanent=True)) is EffectStatus.DEAD
    [text] = [effect for effect in claimed if effect.kind == CONFIRM]
    assert await outbox.discard(text.id, "customer asked not to be texted") is not None
    assert not (await Reconciler(database, clock=clock).run_once()).enqueued


async def test_a_series_without_effects_gets_one_event_one_confirmation_and_its_reminders(
    service: BookingService, database: Database, clock: FrozenClock
) -> None:
    result = await booked(service, request(ny(2026, 12, 8, 9), resource_id="dr-lee", rrule="FREQ=WEEKLY;COUNT=3"))
    await forget_effects(database, *(booking.id for booking in result.bookings))
    report = await Reconciler(database, clock=clock).run_once()
    assert report.enqueued == {CREATE: 1, CONFIRM: 1, REMIND: 3}
    first = min(result.bookings, key=lambda booking: booking.start)
    [create] = [e for e in await Outbox(database, clock=clock).for_booking(first.id) if e.kind == CREATE]
    assert create.payload["series"] == {"id": result.series_id, "rrule": "FREQ=WEEKLY;COUNT=3", "count": 3}


async def test_effects_long_overdue_are_reported_stuck(
    service: BookingService, database: Database, clock: FrozenClock
) -> None:
    await booked(service, request(ny(2026, 12, 2, 9), resource_id="dr-lee"))
    reconciler = Reconciler(database, clock=clock, stuck_after=timedelta(minutes=15))
    assert not (await reconciler.run_once()).stuck
    clock.advance(timedelta(minutes=16))  # no worker ran: the event and the text still wait
    assert (await reconciler.run_once()).stuck == {CREATE: 1, CONFIRM: 1}


async def test_voicebook_reconcile_prints_what_it_repaired(
    service: BookingService, database: Database, app_settings: Settings
) -> None:
    booking = (await booked(service, request(ny(2026, 12, 2, 9), resource_id="dr-lee"))).bookings[0]
    await forget_effects(database, booking.id)
    out, err = io.StringIO(), io.StringIO()
    assert await dlq_cli.reconcile(app_settings, out=out, err=err) == 0, err.getvalue()
    report = json.loads(out.getvalue())
    assert report["repaired_bookings"] == [booking.id]
    assert set(report["enqueued"]) >= {CREATE, CONFIRM}
