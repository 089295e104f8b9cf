"""What the benchmarks share: a business of rooms with room for thousands of bookings, the order in
which its slots fill, a scratch PostgreSQL database, and the percentile line they print."""

from __future__ import annotations

import contextlib
import statistics
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import redis.asyncio as aioredis

from booking.business import Business, parse_business
from booking.ledger import pii
from booking.ledger.database import Database, migrate
from booking.ledger.pii import FieldCipher, new_key
from voice_server.embedded_redis import EmbeddedRedis


def rooms_business(
    rooms: int, *, timezone: str = "America/New_York", calendar_of: Callable[[int], str] | None = None
) -> Business:
    """Rooms open around the clock, 15-minute visits, a year ahead, no notice needed; ``calendar_of``
    gives each room a Google calendar."""
    hours = {day: ["00:00-24:00"] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}
    resources = []
    for i in range(rooms):
        resource = {"id": f"room-{i}", "name": f"Room {i}", "kind": "room", "hours": hours}
        if calendar_of is not None:
            resource["calendar_id"] = calendar_of(i)
        resources.append(resource)
    return parse_business(
        {
            "business": {"name": "Benchmark Rooms", "timezone": timezone, "phone": "+12125550100"},
            "booking": {"min_notice_minutes": 0, "horizon_days": 365, "slot_step_minutes": 15},
            "resources": resources,
            "services": [
                {
                    "id": "visit",
                    "name": "Visit",
                    "duration_minutes": 15,
                    "resources": [f"room-{i}" for i in range(rooms)],
                }
            ],
        }
    )


def free_slots(first_day: datetime, rooms: int) -> Iterator[tuple[str, datetime]]:
    """Distinct slots in the order a busy day fills: rooms round-robin, then quarter hours, then days."""
    n = 0
    while True:
        room, rest = n % rooms, n // rooms
        day, quarter = divmod(rest, 96)
        yield f"room-{room}", first_day + timedelta(days=day, minutes=15 * quarter)
        n += 1


def summary(samples: list[float], *, decimals: int = 2) -> str:
    """``n``, p50, p95, p99 and max of ``samples`` (seconds), in milliseconds."""
    if len(samples) < 2:
        return f"n={len(samples)}"
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    width = 5 + decimals

    def ms(value: float) -> str:
        return f"{value * 1e3:{width}.{decimals}f} ms"

    return f"n={len(samples):>6}  p50={ms(cuts[49])}  p95={ms(cuts[94])}  p99={ms(cuts[98])}  max={ms(max(samples))}"


async def scratch_postgres(url: str, exits: contextlib.AsyncExitStack) -> str:
    """A fresh database beside the one ``url`` names, dropped when ``exits`` closes; returns its URL."""
    import asyncpg

    admin_url = url.replace("postgresql+asyncpg://", "postgresql://")
    name = f"voicebook_bench_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(admin_url)
    await connection.execute(f'CREATE DATABASE "{name}"')
    await connection.close()

    async def drop() -> None:
        admin = await asyncpg.connect(admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    exits.push_async_callback(drop)
    return f"{url.rsplit('/', 1)[0]}/{name}"


async def drop_keys(redis: aioredis.Redis, prefix: str) -> None:
    """Remove a run's keys from a shared Redis."""
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        await redis.delete(key)


@contextlib.asynccontextmanager
async def redis_and_ledger(
    database_url: str | None, redis_url: str | None, folder: Path
) -> AsyncIterator[tuple[aioredis.Redis, Database, str]]:
    """A Redis (the embedded redis-server unless ``redis_url``), a migrated ledger (SQLite in ``folder``
    unless ``database_url``; a PostgreSQL URL gets a scratch database beside it) and a key prefix of
    this run's own, all removed again on exit."""
    async with contextlib.AsyncExitStack() as exits:
        if redis_url is None:
            embedded = EmbeddedRedis()
            await embedded.start()
            exits.push_async_callback(embedded.stop)
            redis_url = embedded.url
        redis = aioredis.Redis.from_url(redis_url, max_connections=512)
        exits.push_async_callback(redis.aclose)
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        exits.push_async_callback(drop_keys, redis, prefix)
        if database_url is None:
            database_url = f"sqlite:///{folder / 'ledger.db'}"
        elif database_url.startswith(("postgresql", "postgres")):
            database_url = await scratch_postgres(database_url, exits)
        # The run's own keys for the personal data it writes (the ledger is removed with the run).
        pii.install(FieldCipher.parse(f"bench={new_key()}", new_key()))
        database = Database.connect(database_url, pool_size=20)
        exits.push_async_callback(database.dispose)
        await migrate(database)
        yield redis, database, prefix
