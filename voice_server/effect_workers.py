"""The effect workers of one process, with the outbox monitor, the reconciler and the housekeeping
schedules beside them: the same set inside the server (VOICEBOOK_RUN_WORKERS) and in ``voicebook worker``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from booking.business import Business
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now
from booking.outbox import EffectKind, Outbox, RedisNotifier, insert_effects_once, scaled_policies
from booking.outbox_monitor import OutboxMonitor
from booking.periodic import Periodic
from booking.reconciler import Reconciler
from booking.worker import Handler, Worker
from voice_server.effects import build_handlers, build_twilio_sms
from voice_server.report_effects import bucketed, retention_effect_row
from voice_server.reporting import Reporting, build_reporting
from voice_server.settings import Settings

if TYPE_CHECKING:
    from integrations.google_calendar import GoogleCalendar


@dataclass
class EffectWorkers:
    worker: Worker
    monitor: OutboxMonitor
    reconciler: Reconciler
    schedules: list[Periodic] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def stop(self) -> None:
        self.worker.stop()
        self.monitor.stop()
        self.reconciler.stop()
        for schedule in self.schedules:
            schedule.stop()

    async def wait(self) -> None:
        """Until every task has returned (after :meth:`stop`)."""
        await asyncio.gather(*self.tasks, return_exceptions=True)


CRM_CONCURRENCY = 2
"""CRM syncs in flight: Airtable takes about four requests a second per base, so more syncs at once only
make every one of them finish later (the queue drains no faster)."""


def per_integration(handlers: dict[str, Handler], concurrency: int) -> dict[str, int]:
    """``concurrency`` for every integration the handlers serve, but no more than the CRM can use."""
    limits = {kind.partition(".")[0]: concurrency for kind in handlers}
    if "crm" in limits:
        limits["crm"] = min(concurrency, CRM_CONCURRENCY)
    return limits


def housekeeping(
    settings: Settings, database: Database, notify: RedisNotifier, *, clock: Clock, crm: bool
) -> list[Periodic]:
    """The schedules that enqueue housekeeping effects: the daily retention sweep, the CRM push of
    bookings changed outside calls and (two-way sync) the pull. Each enqueues under a key of its time
    bucket, so every worker process may run them and each bucket still gets one effect."""
    jobs: list[tuple[str, float, Callable[[datetime], dict[str, Any]]]] = []
    if settings.retention_days > 0:
        jobs.append(("retention_schedule", 3600.0, retention_effect_row))
    if crm:
        jobs.append(
            (
                "crm_push_schedule",
                float(settings.crm_push_seconds),
                bucketed(EffectKind.CRM_PUSH, settings.crm_push_seconds),
            )
        )
        if settings.crm_two_way:
            jobs.append(
                (
                    "crm_pull_schedule",
                    float(settings.crm_pull_seconds),
                    bucketed(EffectKind.CRM_PULL, settings.crm_pull_seconds),
                )
            )

    def schedule(row: Callable[[datetime], dict[str, Any]]) -> Callable[[], Awaitable[None]]:
        async def step() -> None:
            if await database.write(lambda conn: insert_effects_once(conn, [row(clock())])):
                await notify()

        return step

    return [Periodic(schedule(row), interval, name=name) for name, interval, row in jobs]


@contextlib.asynccontextmanager
async def effect_workers(
    settings: Settings,
    business: Business,
    database: Database,
    redis: aioredis.Redis,
    *,
    clock: Clock = utc_now,
    google: GoogleCalendar | None = None,
    concurrency: int | None = None,
    reporting: Reporting | None = None,
) -> AsyncIterator[EffectWorkers]:
    """Run the worker, the monitor and the reconciler until the block exits (or :meth:`EffectWorkers.stop`);
    on exit, effects in flight get the worker's grace period to finish."""
    channel = settings.effects_channel
    concurrency = concurrency or settings.worker_concurrency
    # One thread per effect the worker may run at once: no effect waits for a thread out of its sight.
    sms = build_twilio_sms(settings, threads=concurrency)
    handlers = build_handlers(settings, business, database=database, google=google, sms=sms)
    async with contextlib.AsyncExitStack() as stack:
        if sms is not None:
            stack.callback(sms.close)
        if reporting is None:
            reporting = await stack.enter_async_context(
                build_reporting(settings, business, database, redis, clock=clock)
            )
        handlers |= reporting.handlers
        async with _running(settings, database, redis, handlers, channel, concurrency, clock, reporting) as workers:
            yield workers


@contextlib.asynccontextmanager
async def _running(
    settings: Settings,
    database: Database,
    redis: aioredis.Redis,
    handlers: dict[str, Handler],
    channel: str,
    concurrency: int,
    clock: Clock,
    reporting: Reporting,
) -> AsyncIterator[EffectWorkers]:
    notify = RedisNotifier(redis, channel)
    workers = EffectWorkers(
        worker=Worker(
            database,
            redis,
            handlers,
            clock=clock,
            channel=channel,
            concurrency=per_integration(handlers, concurrency),
            lease=timedelta(seconds=settings.effect_lease_seconds),
            policies=scaled_policies(settings.effect_backoff_scale),
        ),
        monitor=OutboxMonitor(database, Outbox(database, clock=clock)),
        reconciler=Reconciler(database, clock=clock, notify=notify, interval=float(settings.reconcile_seconds)),
        schedules=housekeeping(settings, database, notify, clock=clock, crm=reporting.crm is not None),
    )
    loop = asyncio.get_running_loop()
    workers.tasks.extend(
        [
            loop.create_task(workers.worker.run(), name="effects-worker"),
            loop.create_task(workers.monitor.run(), name="effects-monitor"),
            loop.create_task(workers.reconciler.run(), name="effects-reconciler"),
            *(loop.create_task(schedule.run(), name="effects-schedule") for schedule in workers.schedules),
        ]
    )
    try:
        yield workers
    finally:
        workers.stop()
        await workers.wait()
