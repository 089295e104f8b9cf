"""The effect workers of one process, with the outbox monitor and the reconciler beside them: the same
trio inside the server (VOICEBOOK_RUN_WORKERS) and in ``voicebook worker``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from booking.business import Business
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now
from booking.outbox import Outbox, RedisNotifier, scaled_policies
from booking.outbox_monitor import OutboxMonitor
from booking.reconciler import Reconciler
from booking.worker import Worker
from voice_server.effects import build_handlers, build_twilio_sms
from voice_server.settings import Settings

if TYPE_CHECKING:
    from integrations.google_calendar import GoogleCalendar


def effects_channel(settings: Settings) -> str:
    """The Redis channel commits publish on and idle workers listen to."""
    return f"{settings.redis_prefix}:effects"


@dataclass
class EffectWorkers:
    worker: Worker
    monitor: OutboxMonitor
    reconciler: Reconciler
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def stop(self) -> None:
        self.worker.stop()
        self.monitor.stop()
        self.reconciler.stop()

    async def wait(self) -> None:
        """Until all three have returned (after :meth:`stop`)."""
        await asyncio.gather(*self.tasks, return_exceptions=True)


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
) -> AsyncIterator[EffectWorkers]:
    """Run the worker, the monitor and the reconciler until the block exits (or :meth:`EffectWorkers.stop`);
    on exit, effects in flight get the worker's grace period to finish."""
    channel = effects_channel(settings)
    concurrency = concurrency or settings.worker_concurrency
    # One thread per effect the worker may run at once: no effect waits for a thread out of its sight.
    sms = build_twilio_sms(settings, threads=concurrency)
    handlers = build_handlers(settings, business, database=database, google=google, sms=sms)
    workers = EffectWorkers(
        worker=Worker(
            database,
            redis,
            handlers,
            clock=clock,
            channel=channel,
            concurrency=concurrency,
            lease=timedelta(seconds=settings.effect_lease_seconds),
            policies=scaled_policies(settings.effect_backoff_scale),
        ),
        monitor=OutboxMonitor(database, Outbox(database, clock=clock)),
        reconciler=Reconciler(
            database,
            clock=clock,
            notify=RedisNotifier(redis, channel),
            interval=float(settings.reconcile_seconds),
        ),
    )
    loop = asyncio.get_running_loop()
    workers.tasks.extend(
        [
            loop.create_task(workers.worker.run(), name="effects-worker"),
            loop.create_task(workers.monitor.run(), name="effects-monitor"),
            loop.create_task(workers.reconciler.run(), name="effects-reconciler"),
        ]
    )
    try:
        yield workers
    finally:
        workers.stop()
        await workers.wait()
        if sms is not None:
            sms.close()
