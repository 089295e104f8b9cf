"""What the outbox tells an operator: attempt outcomes, work in flight against the concurrency bound,
queue depth, the longest wait, dead letters (a gauge and a log line when they grow), the SMS delivery
rate, all on ``/metrics``. The registry is process-wide, so tests compare values before and after."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from booking import metrics
from booking.business import Business
from booking.errors import EffectFailed
from booking.ledger.database import Database
from booking.ledger.repository import Created, CustomerDetails, Ledger
from booking.ledger.sms_repository import SmsLedger
from booking.outbox import Effect, EffectKind, EffectStatus, Outbox
from booking.outbox_monitor import OutboxMonitor
from booking.worker import Worker
from tests.conftest import FrozenClock, running_app
from tests.test_outbox import new
from voice_server.settings import Settings

ALICE = CustomerDetails(phone="+12125550142", name="Alice")
START = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)


async def book(ledger: Ledger, business: Business) -> str:
    await ledger.sync_catalog(business)
    result = await ledger.create_bookings(ALICE, [new(START)])
    assert isinstance(result, Created), result
    return result.bookings[0].id


def attempts(kind: str, outcome: str) -> float:
    return metrics.sample(
        "voicebook_effect_attempts_total", {"integration": kind.partition(".")[0], "kind": kind, "outcome": outcome}
    )


async def test_worker_counts_outcomes_and_returns_in_flight_to_zero(
    ledger: Ledger, database: Database, redis_client: aioredis.Redis, clock: FrozenClock, business: Business
) -> None:
    await book(ledger, business)
    before = {
        "done": attempts(EffectKind.CALENDAR_CREATE, "done"),
        "retry": attempts(EffectKind.SMS_CONFIRMATION, "retry"),
        "dead": attempts(EffectKind.SMS_CONFIRMATION, "dead"),
    }
    peak: dict[str, float] = {}

    async def calendar(effect: Effect) -> None:
        peak["calendar"] = metrics.sample("voicebook_effects_in_flight", {"integration": "calendar"})

    failures = iter([EffectFailed("503", permanent=False), EffectFailed("21211", permanent=True)])

    async def sms(effect: Effect) -> None:
        raise next(failures)

    worker = Worker(
        database,
        redis_client,
        {EffectKind.CALENDAR_CREATE: calendar, EffectKind.SMS_CONFIRMATION: sms},
        concurrency={"calendar": 3, "sms": 2},
        clock=clock,
    )
    await worker.run_until_idle()
    clock.advance(timedelta(hours=1))  # past the retry's backoff
    await worker.run_until_idle()

    assert attempts(EffectKind.CALENDAR_CREATE, "done") - before["done"] == 1
    assert attempts(EffectKind.SMS_CONFIRMATION, "retry") - before["retry"] == 1
    assert attempts(EffectKind.SMS_CONFIRMATION, "dead") - before["dead"] == 1
    assert peak["calendar"] >= 1  # counted while the handler ran...
    assert metrics.sample("voicebook_effects_in_flight", {"integration": "calendar"}) == 0  # ...and not after
    assert metrics.sample("voicebook_effects_in_flight", {"integration": "sms"}) == 0
    assert metrics.sample("voicebook_effects_concurrency_limit", {"integration": "calendar"}) == 3
    assert metrics.sample("voicebook_effects_concurrency_limit", {"integration": "sms"}) == 2


async def test_monitor_samples_depth_waits_and_logs_when_dead_letters_grow(
    ledger: Ledger, database: Database, clock: FrozenClock, business: Business
) -> None:
    outbox = Outbox(database, clock=clock)
    monitor = OutboxMonitor(database, outbox)
    await book(ledger, business)
    clock.advance(timedelta(seconds=90))
    stats = await monitor.sample()
    assert stats.due[EffectKind.CALENDAR_CREATE] == 1 and stats.due[EffectKind.SMS_CONFIRMATION] == 1
    assert metrics.sample("voicebook_effect_queue_depth", {"kind": EffectKind.CALENDAR_CREATE}) == 1
    assert metrics.sample("voicebook_effect_queue_depth", {"kind": EffectKind.SMS_REMINDER}) == 0  # not due yet
    assert metrics.sample("voicebook_effect_oldest_due_seconds", {"integration": "calendar"}) == 90
    assert metrics.sample("voicebook_effect_dead_letters", {"integration": "sms"}) == 0

    lease = timedelta(minutes=1)
    [event] = await outbox.claim("w", [EffectKind.CALENDAR_CREATE], limit=1, lease=lease)
    assert await outbox.complete(event)  # a booking's effects run in order: the text comes next
    [claimed] = await outbox.claim("w", [EffectKind.SMS_CONFIRMATION], limit=1, lease=lease)
    assert await outbox.fail(claimed, EffectFailed("invalid number", permanent=True)) is EffectStatus.DEAD
    with capture_logs() as logs:
        await monitor.sample()
        await monitor.sample()  # no further growth: no second line
    grew = [entry for entry in logs if entry["event"] == "dead_letters_grew"]
    assert len(grew) == 1 and grew[0]["added"] == {EffectKind.SMS_CONFIRMATION: 1} and grew[0]["total"] == 1
    assert metrics.sample("voicebook_effect_dead_letters", {"integration": "sms"}) == 1
    assert metrics.sample("voicebook_effect_queue_depth", {"kind": EffectKind.SMS_CONFIRMATION}) == 0

    assert await outbox.retry(claimed.id) is not None
    await monitor.sample()
    assert metrics.sample("voicebook_effect_dead_letters", {"integration": "sms"}) == 0


async def test_monitor_reports_the_sms_delivery_rate(database: Database, clock: FrozenClock) -> None:
    sms = SmsLedger(database, clock=clock)
    for sid, status in (("SM1", "delivered"), ("SM2", "delivered"), ("SM3", "delivered"), ("SM4", "undelivered")):
        await sms.apply_status(
            message_sid=sid, status=status, error_code=None, to_number="+12125550142", effect_key=None
        )
    await OutboxMonitor(database, Outbox(database, clock=clock)).sample()
    assert metrics.sample("voicebook_sms_delivery_rate") == 0.75


async def test_metrics_endpoint_exposes_the_effect_instruments(app_settings: Settings, clock: FrozenClock) -> None:
    async with running_app(app_settings, clock) as (_, client):
        response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for name in ("voicebook_effect_attempts_total", "voicebook_effect_queue_depth", "voicebook_sms_delivery_rate"):
        assert name in response.text
