"""The transactional outbox and its worker, on the real ledger (SQLite or PostgreSQL) and a real Redis."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import update

from booking.business import Business
from booking.domain import BookingStatus, Interval
from booking.errors import EffectFailed
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import Created, CustomerDetails, Ledger, NewBooking, Overlap
from booking.outbox import (
    EFFECTS_CHANNEL,
    REMINDER_LEAD,
    Effect,
    EffectKind,
    EffectStatus,
    Outbox,
    RedisNotifier,
    RetryPolicy,
    booking_from_payload,
)
from booking.service import BookingService
from booking.worker import Handler, Worker
from tests.conftest import FrozenClock

T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)  # 27 hours after the test clock: gets a reminder
ALICE = CustomerDetails(phone="+12125550142", name="Alice")
ALL_KINDS = [kind.value for kind in EffectKind]
FAST = {
    "calendar": RetryPolicy(base=timedelta(seconds=1), cap=timedelta(seconds=60), max_attempts=40),
    "sms": RetryPolicy(base=timedelta(seconds=2), cap=timedelta(seconds=60), max_attempts=40),
}


def new(start: datetime, resource: str = "dr-lee") -> NewBooking:
    end = start + timedelta(minutes=30)
    return NewBooking(resource, "checkup", start, end, Interval(start, end + timedelta(minutes=10)))


@pytest.fixture
async def synced(ledger: Ledger, business: Business) -> Ledger:
    await ledger.sync_catalog(business)
    return ledger


@pytest.fixture
def outbox(database: Database, clock: FrozenClock) -> Outbox:
    return Outbox(database, clock=clock)


async def book(ledger: Ledger, start: datetime = T0, resource: str = "dr-lee") -> str:
    result = await ledger.create_bookings(ALICE, [new(start, resource)])
    assert isinstance(result, Created), result
    return result.bookings[0].id


class Recorder:
    """Handlers for every kind that record calls and successes by idempotency key."""

    def __init__(self, fail: Callable[[Effect], BaseException | None] = lambda effect: None) -> None:
        self.fail = fail
        self.calls: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        self.order: list[tuple[str, str]] = []
        self.running: set[int] = set()
        self.overlaps = 0

    async def __call__(self, effect: Effect) -> None:
        if effect.id in self.running:
            self.overlaps += 1
        self.running.add(effect.id)
        try:
            self.calls[effect.idempotency_key] += 1
            await asyncio.sleep(0)  # let other effects interleave
            error = self.fail(effect)
            if error is not None:
                raise error
            self.successes[effect.idempotency_key] += 1
            self.order.append((effect.booking_id, effect.kind))
        finally:
            self.running.discard(effect.id)

    def handlers(self) -> dict[str, Handler]:
        return dict.fromkeys(ALL_KINDS, self)


def worker(database: Database, redis: aioredis.Redis, recorder: Recorder, clock: FrozenClock, **kwargs: Any) -> Worker:
    return Worker(database, redis, recorder.handlers(), clock=clock, **kwargs)


async def test_a_booking_writes_its_effects_in_its_own_transaction(synced: Ledger, outbox: Outbox) -> None:
    booking_id = await book(synced)
    effects = await outbox.for_booking(booking_id)
    assert [e.kind for e in effects] == ["calendar.create", "sms.confirmation", "sms.reminder"]
    assert all(e.status is EffectStatus.PENDING and e.attempts == 0 for e in effects)
    assert effects[2].due_at == T0 - REMINDER_LEAD
    assert effects[0].payload["start"] == "2026-12-01T15:00:00Z"
    assert booking_from_payload(effects[0].payload) == (await synced.require_booking(booking_id))
    assert len({e.idempotency_key for e in effects}) == 3

    refused = await synced.create_bookings(ALICE, [new(T0 + timedelta(minutes=20))])  # overlaps
    assert isinstance(refused, Overlap)
    assert sum((await outbox.queue_depth()).values()) == 2  # the reminder is not due yet; nothing else added

    soon = await book(synced, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))  # 8 hours away: no reminder
    assert [e.kind for e in await outbox.for_booking(soon)] == ["calendar.create", "sms.confirmation"]


async def test_reschedule_moves_the_reminder_and_cancel_drops_it(synced: Ledger, outbox: Outbox) -> None:
    booking_id = await book(synced)
    later = T0 + timedelta(days=1)
    moved = await synced.reschedule(
        booking_id, resource_id="dr-lee", start=later, end=later + timedelta(minutes=30),
        block=Interval(later, later + timedelta(minutes=40)),
    )  # fmt: skip
    assert not isinstance(moved, Overlap)
    effects = await outbox.for_booking(booking_id)
    assert [(e.kind, e.status) for e in effects[2:]] == [
        ("sms.reminder", EffectStatus.CANCELLED),
        ("calendar.update", EffectStatus.PENDING),
        ("sms.reschedule", EffectStatus.PENDING),
        ("sms.reminder", EffectStatus.PENDING),
    ]
    assert effects[-1].due_at == later - REMINDER_LEAD
    assert booking_from_payload(effects[3].payload) == moved
    assert effects[3].payload["previous"]["start"] == "2026-12-01T15:00:00Z"

    await synced.change_status(booking_id, BookingStatus.CANCELLED, reason="caller asked")
    effects = await outbox.for_booking(booking_id)
    assert [(e.kind, e.status) for e in effects[5:]] == [
        ("sms.reminder", EffectStatus.CANCELLED),
        ("calendar.delete", EffectStatus.PENDING),
        ("sms.cancellation", EffectStatus.PENDING),
    ]
    assert effects[-1].payload["reason"] == "caller asked"


async def test_effects_of_one_booking_run_in_order(
    synced: Ledger, outbox: Outbox, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    first = await book(synced)
    await synced.change_status(first, BookingStatus.CANCELLED)
    second = await book(synced, resource="dr-patel")
    claimed = await outbox.claim("probe", ALL_KINDS, limit=10, lease=timedelta(minutes=1))
    # Only the head of each booking's queue per integration can be claimed, whatever the limit: the
    # calendar event and the confirmation go out side by side, their undoing waits for them.
    assert sorted((e.booking_id, e.kind) for e in claimed) == sorted(
        [(b, kind) for b in (first, second) for kind in ("calendar.create", "sms.confirmation")]
    )
    assert await outbox.claim("probe", ALL_KINDS, limit=10, lease=timedelta(minutes=1)) == []
    for effect in claimed:
        assert await outbox.complete(effect)

    recorder = Recorder()
    await worker(database, redis_client, recorder, clock, concurrency=4).run_until_idle()
    assert sorted(kind for booking, kind in recorder.order if booking == first) == [
        "calendar.delete",
        "sms.cancellation",
    ]
    assert [kind for booking, kind in recorder.order if booking == second] == []


async def test_an_expired_lease_runs_the_effect_again(
    synced: Ledger, outbox: Outbox, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    booking_id = await book(synced, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    [vanished] = await outbox.claim("vanished", ["calendar.create"], limit=1, lease=timedelta(minutes=1))
    assert await outbox.claim("other", ["calendar.create"], limit=1, lease=timedelta(minutes=1)) == []

    clock.advance(timedelta(minutes=1, seconds=1))
    recorder = Recorder()
    assert await worker(database, redis_client, recorder, clock).run_until_idle() == 2
    assert recorder.successes == {f"{booking_id}:calendar.create:v1": 1, f"{booking_id}:sms.confirmation:v1": 1}
    assert not await outbox.complete(vanished)  # the vanished worker's late answer is refused
    effects = await outbox.for_booking(booking_id)
    assert [(e.status, e.attempts) for e in effects] == [(EffectStatus.DONE, 2), (EffectStatus.DONE, 1)]


async def test_an_effect_that_keeps_losing_its_lease_goes_dead(
    synced: Ledger, outbox: Outbox, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    booking_id = await book(synced, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    [poison] = await outbox.claim("crashed", ["calendar.create"], limit=1, lease=timedelta(minutes=1))
    await database.write(
        lambda conn: conn.execute(update(t.effects).where(t.effects.c.id == poison.id).values(max_attempts=1))
    )
    clock.advance(timedelta(minutes=2))
    recorder = Recorder()
    await worker(database, redis_client, recorder, clock).run_until_idle()
    [dead] = await outbox.dead_letters()
    assert dead.id == poison.id and "lease expired" in (dead.last_error or "")
    assert list(recorder.successes) == [f"{booking_id}:sms.confirmation:v1"]  # a dead effect blocks nothing


async def test_one_claim_serves_several_integrations_in_one_transaction(
    synced: Ledger, outbox: Outbox, database: Database
) -> None:
    first = await book(synced, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    second = await book(synced, datetime(2026, 11, 30, 21, 0, tzinfo=UTC))
    batches = database.group_commit.batches
    calendar, texts, nothing, no_room = await outbox.claim_many(
        "w",
        [(["calendar.create"], 1), (["sms.confirmation", "sms.reminder"], 5), ([], 3), (["calendar.create"], 0)],
        lease=timedelta(minutes=1),
    )
    assert database.group_commit.batches == batches + 1  # one write transaction for all the groups
    assert [(e.booking_id, e.kind) for e in calendar] == [(first, "calendar.create")]  # its limit: 1
    assert [(e.booking_id, e.kind) for e in texts] == [(first, "sms.confirmation"), (second, "sms.confirmation")]
    assert nothing == [] and no_room == []
    assert all(e.status is EffectStatus.RUNNING and e.lease_owner == "w" for e in calendar + texts)
    [left] = await outbox.claim("w", ["calendar.create"], limit=5, lease=timedelta(minutes=1))
    assert (left.booking_id, left.kind) == (second, "calendar.create")


async def test_a_worker_looking_for_work_takes_at_most_one_write_for_all_its_integrations(
    synced: Ledger, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    runner = worker(database, redis_client, Recorder(), clock)
    assert len({kind.split(".")[0] for kind in runner.kinds}) > 2
    batches = database.group_commit.batches
    assert await runner.run_until_idle() == 0  # nothing due
    # On SQLite each write transaction takes the ledger's one write lock, which bookings wait for.
    assert database.group_commit.batches == batches + 1  # the first look also sweeps lost leases: a write
    assert await runner.run_until_idle() == 0
    # Until the next sweep, SQLite first reads whether anything is due (no lock); PostgreSQL just claims.
    assert database.group_commit.batches == batches + (2 if database.dialect == "postgresql" else 1)
    booking_id = await book(synced, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    assert await runner.run_until_idle() == 2  # what is due is still found between sweeps
    assert {e.status for e in await runner.outbox.for_booking(booking_id)} == {EffectStatus.DONE}


async def test_lost_leases_of_every_integration_are_swept_by_one_claim(
    synced: Ledger, outbox: Outbox, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    booking_id = await book(synced, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    poisons = await outbox.claim_many(
        "crashed", [(["calendar.create"], 1), (["sms.confirmation"], 1)], lease=timedelta(minutes=1)
    )
    ids = [effect.id for [effect] in poisons]
    await database.write(
        lambda conn: conn.execute(update(t.effects).where(t.effects.c.id.in_(ids)).values(max_attempts=1))
    )
    clock.advance(timedelta(minutes=2))
    recorder = Recorder()
    assert await worker(database, redis_client, recorder, clock).run_until_idle() == 0
    assert sorted(dead.id for dead in await outbox.dead_letters()) == sorted(ids)
    assert not recorder.calls  # neither ran a fourth time on a worker it might take down
    assert {e.status for e in await outbox.for_booking(booking_id)} == {EffectStatus.DEAD}


class Ceiling(random.Random):
    """Full jitter at its upper bound, so the test can see the exponential envelope."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_transient_failures_back_off_and_honour_retry_after(
    synced: Ledger, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    booking_id = await book(synced, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    errors: list[BaseException] = [
        RuntimeError("connection reset"),
        EffectFailed("503", permanent=False),
        EffectFailed("429", permanent=False, retry_after=30.0),
        EffectFailed("503", permanent=False),
    ]

    def fail(effect: Effect) -> BaseException | None:
        return errors.pop(0) if effect.kind == "calendar.create" and errors else None

    recorder = Recorder(fail)
    runner = worker(database, redis_client, recorder, clock, policies=FAST, rng=Ceiling())
    delays = []
    for _ in range(4):
        await runner.run_until_idle()
        [effect] = [e for e in await runner.outbox.for_booking(booking_id) if e.kind == "calendar.create"]
        assert effect.status is EffectStatus.PENDING
        delays.append((effect.due_at - clock()).total_seconds())
        clock.advance(effect.due_at - clock())
    assert delays == [1.0, 2.0, 30.0, 8.0]  # base * 2**n, with the provider's Retry-After as a floor
    await runner.run_until_idle()
    assert recorder.successes[f"{booking_id}:calendar.create:v1"] == 1
    assert recorder.successes[f"{booking_id}:sms.confirmation:v1"] == 1

    seeded = FAST["sms"]
    jittered = [seeded.delay(n, random.Random(7)).total_seconds() for n in range(1, 10)]
    assert all(0 <= d <= min(60, 2 * 2 ** (n - 1)) for n, d in zip(range(1, 10), jittered, strict=True))


async def test_permanent_failure_is_dead_until_an_operator_retries_it(
    synced: Ledger, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    booking_id = await book(synced, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    broken = {"sms.confirmation"}

    def fail(effect: Effect) -> BaseException | None:
        return EffectFailed("opted out", permanent=True) if effect.kind in broken else None

    recorder = Recorder(fail)
    runner = worker(database, redis_client, recorder, clock)
    await runner.run_until_idle()
    [dead] = await runner.outbox.dead_letters()
    assert dead.kind == "sms.confirmation" and dead.attempts == 1 and "opted out" in (dead.last_error or "")
    assert await runner.outbox.get(dead.id) == dead

    broken.clear()
    retried = await runner.outbox.retry(dead.id)
    assert retried is not None and retried.status is EffectStatus.PENDING and retried.attempts == 0
    assert await runner.outbox.retry(dead.id) is None  # no longer dead
    await runner.run_until_idle()
    assert recorder.successes[dead.idempotency_key] == 1 and recorder.calls[dead.idempotency_key] == 2
    assert await runner.outbox.dead_letters() == []

    await synced.change_status(booking_id, BookingStatus.CANCELLED)
    broken.add("sms.cancellation")
    await runner.run_until_idle()
    [dead] = await runner.outbox.dead_letters()
    discarded = await runner.outbox.discard(dead.id, "customer unreachable")
    assert discarded is not None and discarded.status is EffectStatus.CANCELLED
    assert "discarded: customer unreachable" in (discarded.last_error or "")


async def test_flaky_providers_still_deliver_every_effect_exactly_once(
    synced: Ledger, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    starts = [T0 + timedelta(days=day, hours=hour) for day in range(5) for hour in range(5)]
    ids = [await book(synced, start, resource) for start in starts for resource in ("dr-lee", "dr-patel")]
    assert len(ids) == 50
    for booking_id in ids[:10]:
        await synced.change_status(booking_id, BookingStatus.CANCELLED)
    chaos = random.Random(1234)
    recorder = Recorder(lambda effect: EffectFailed("flaky", permanent=False) if chaos.random() < 0.3 else None)
    runner = worker(database, redis_client, recorder, clock, policies=FAST, rng=random.Random(5), concurrency=3)
    for _ in range(200):
        await runner.run_until_idle()
        effects = [e for booking_id in ids for e in await runner.outbox.for_booking(booking_id)]
        if all(e.status in (EffectStatus.DONE, EffectStatus.CANCELLED) for e in effects):
            break
        clock.advance(timedelta(hours=2))  # past every backoff, and towards the reminders' due times
    delivered = {e.idempotency_key for e in effects if e.status is EffectStatus.DONE}
    assert all(e.status in (EffectStatus.DONE, EffectStatus.CANCELLED) for e in effects)
    assert len(delivered) == 50 * 2 + 10 * 2 + 40  # created, cancelled, reminders of the rest
    assert recorder.successes == dict.fromkeys(delivered, 1)
    assert sum(recorder.calls.values()) > len(delivered)  # failures did happen and were retried


async def test_two_workers_never_run_one_effect_at_once(
    synced: Ledger, database_url: str, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    for hour in range(10):  # all within 24 hours: no reminders
        for resource in ("dr-lee", "dr-patel"):
            await book(synced, datetime(2026, 11, 30, 13, 0, tzinfo=UTC) + timedelta(hours=hour), resource)
    recorder = Recorder()
    second_database = Database.connect(database_url)  # another process's connection to the same ledger
    try:
        first = worker(synced.database, redis_client, recorder, clock, concurrency=4, owner="a")
        second = worker(second_database, redis_client, recorder, clock, concurrency=4, owner="b")
        counts = await asyncio.gather(first.run_until_idle(), second.run_until_idle())
    finally:
        await second_database.dispose()
    assert sum(counts) == 40 and recorder.overlaps == 0
    assert len(recorder.successes) == 40 and set(recorder.successes.values()) == {1}


async def test_a_notification_wakes_a_sleeping_worker(
    database: Database, business: Business, redis_client: aioredis.Redis, clock: FrozenClock
) -> None:
    channel = f"{EFFECTS_CHANNEL}:{uuid.uuid4().hex}"  # its own channel: other test runs share the Redis
    notified = Ledger(database, clock=clock, notify_effects=RedisNotifier(redis_client, channel))
    await notified.sync_catalog(business)
    delivered = asyncio.Event()
    recorder = Recorder()

    async def confirm(effect: Effect) -> None:
        await recorder(effect)
        delivered.set()

    handlers: dict[str, Handler] = {"sms.confirmation": confirm, "calendar.create": recorder}
    # Polling once an hour: only the notification can get the effect run during this test.
    runner = Worker(database, redis_client, handlers, clock=clock, poll_interval=3600, channel=channel)
    task = asyncio.create_task(runner.run())
    try:
        await runner.listening.wait()
        await book(notified, datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
        await delivered.wait()
    finally:
        runner.stop()
        await task
    assert list(recorder.successes.values()) == [1, 1]


async def published(redis_client: aioredis.Redis, channel: str, notify: Callable[[], Awaitable[None]]) -> int:
    """How many notifications ``notify`` (which publishes on ``channel``) sends, read by a subscriber."""
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe(channel)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        await notify()
        await redis_client.publish(channel, b"end")  # after every notification, on the same connection order
        count = 0
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None, "the end marker never came"
            if message["data"] == b"end":
                return count
            count += 1


async def test_a_background_notifier_coalesces_calls_and_publishes_before_it_closes(
    redis_client: aioredis.Redis,
) -> None:
    channel = f"{EFFECTS_CHANNEL}:{uuid.uuid4().hex}"
    waited = RedisNotifier(redis_client, channel)
    background = RedisNotifier(redis_client, channel, background=True)

    async def burst(notifier: RedisNotifier) -> None:
        for _ in range(50):
            await notifier()
        await notifier.aclose()

    # Each awaited call publishes. In the background the 50 calls came before the first publish went
    # out, so it covers them all.
    assert await published(redis_client, channel, lambda: burst(waited)) == 50
    assert await published(redis_client, channel, lambda: burst(background)) == 1

    async def during_a_publish() -> None:
        await background()
        await asyncio.sleep(0)  # its task sends the PUBLISH and waits for the reply
        for _ in range(10):  # commits a woken worker may have looked before: one more for them all
            await background()
        await background.aclose()
        await background()  # after that: a notification of its own
        await background.aclose()

    assert await published(redis_client, channel, during_a_publish) == 3


async def test_a_background_notification_that_fails_is_dropped_quietly() -> None:
    # Nothing listens on port 1; no retries. A lost notification only waits for the workers' next poll.
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    notifier = RedisNotifier(unreachable, "nowhere", background=True)
    try:
        await notifier()
        await notifier.aclose()  # no error: the task swallowed it
    finally:
        await unreachable.aclose()


async def test_a_series_is_one_calendar_event_and_one_confirmation_with_a_reminder_each(
    service: BookingService, outbox: Outbox
) -> None:
    from tests.test_booking_service import booked, ny, request

    result = await booked(service, request(ny(2026, 12, 1, 9), resource_id="dr-lee", rrule="FREQ=WEEKLY;COUNT=4"))
    first, second, *_ = sorted(result.bookings, key=lambda booking: booking.start)
    kinds: Counter[str] = Counter()
    for booking in result.bookings:
        kinds.update(effect.kind for effect in await outbox.for_booking(booking.id))
    assert kinds == {EffectKind.CALENDAR_CREATE: 1, EffectKind.SMS_CONFIRMATION: 1, EffectKind.SMS_REMINDER: 4}
    create, confirmation = [e for e in await outbox.for_booking(first.id) if e.kind != EffectKind.SMS_REMINDER]
    assert create.kind == EffectKind.CALENDAR_CREATE
    assert create.payload["series"] == {"id": result.series_id, "rrule": "FREQ=WEEKLY;COUNT=4", "count": 4}
    assert confirmation.payload["series"]["count"] == 4

    # An occurrence that moves twice is still named by the start it was created with.
    await service.reschedule(second.id, second.start + timedelta(hours=1))
    await service.reschedule(second.id, second.start + timedelta(hours=2))
    await service.cancel(second.id, reason="travel")
    changes = [e for e in await outbox.for_booking(second.id) if e.kind.startswith("calendar.")]
    update, delete = EffectKind.CALENDAR_UPDATE, EffectKind.CALENDAR_DELETE
    assert [e.kind for e in changes] == [update, update, delete]
    original = second.start.astimezone(UTC).isoformat().replace("+00:00", "Z")
    assert {e.payload["series"]["original_start"] for e in changes} == {original}
    assert {e.payload["series"]["id"] for e in changes} == {result.series_id}
