"""The parts every booking service of a deployment is built from, in one place: the server process's own
service, its booking lane's, and the booking process's agree on the index's keys and on how long external
busy time lives there."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import NamedTuple

import redis.asyncio as aioredis

from booking.freebusy import FreeBusyIndex
from booking.ledger.database import Database
from booking.ledger.repository import Clock, Ledger
from booking.outbox import RedisNotifier
from voice_server.settings import Settings


def calendar_refresh(settings: Settings) -> timedelta:
    """How often external calendars' busy time is fetched; the index keeps it for three of these."""
    return timedelta(seconds=settings.calendar_refresh_seconds)


def ledger_and_index(
    settings: Settings, redis: aioredis.Redis, database: Database, notify: RedisNotifier, *, clock: Clock
) -> tuple[Ledger, FreeBusyIndex]:
    """A booking service's ledger (its effects announced on ``notify``) and free/busy index."""
    index = FreeBusyIndex(redis, prefix=settings.redis_prefix, external_ttl=3 * calendar_refresh(settings))
    return Ledger(database, clock=clock, notify_effects=notify), index


class OwnParts(NamedTuple):
    database: Database
    ledger: Ledger
    freebusy: FreeBusyIndex
    notify: RedisNotifier
    """Wakes the effect workers (for what the call records enqueue, as for the ledger's effects)."""


def own_ledger_and_index(
    settings: Settings, redis_url: str, stack: contextlib.AsyncExitStack, *, clock: Clock, max_connections: int
) -> OwnParts:
    """A second booking service's parts on a Redis client and ledger engines of its own (the booking lane's,
    the booking process's), closed with ``stack``."""
    redis = aioredis.Redis.from_url(redis_url, max_connections=max_connections)
    stack.push_async_callback(redis.aclose)
    # Published off the booking's path (a booking does not wait for it); done before Redis is closed.
    notify = RedisNotifier(redis, settings.effects_channel, background=True)
    stack.push_async_callback(notify.aclose)
    database = Database.connect(settings.effective_database_url, pool_size=settings.db_pool_size)
    stack.push_async_callback(database.dispose)
    ledger, index = ledger_and_index(settings, redis, database, notify, clock=clock)
    return OwnParts(database, ledger, index, notify)
