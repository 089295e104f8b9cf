"""What one ledger read on the call and effect paths costs: through aiosqlite, and as one hop.

    python load_tests/bench_reads.py [--reads 3000] [--concurrency 1] [--database-url URL]

Three reads the server and the effect worker make for every call (the SMS opt-out list before a text, a
registered number, a call record) each run ``--reads`` times on a ledger holding 1,000 of each row,
``--concurrency`` at a time, two ways in the same run: the statement awaited through the async engine
(``database.reader``: on SQLite every DBAPI call is a hop to aiosqlite's thread) and ``Database.read``
(the whole read on a reader thread, one hop). Printed per read and way: this process's CPU per read (all
its threads) and the wall time per read. The ratio between the two ways is the figure to compare; the
absolute numbers follow the machine. With ``--database-url postgresql://...`` a scratch database beside
the one named is used, where both ways go through asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import redis_and_ledger  # load_tests/common.py
from sqlalchemy import insert, select
from sqlalchemy.sql import Select

from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.database import Database

ROWS = 1000


async def fill(database: Database) -> None:
    now = datetime.now(UTC)
    cipher = pii.cipher()

    def rows(conn: Any) -> None:
        conn.execute(
            insert(t.sms_suppressions),
            [
                {
                    "phone_index": cipher.blind_index(phone(i)),
                    "phone": cipher.encrypt(phone(i), table="sms_suppressions", column="phone", row=phone(i)),
                    "opted_out": i % 2 == 0,
                    "keyword": "STOP",
                    "changed_at": now,
                    "source": "keyword",
                }
                for i in range(ROWS)
            ],
        )
        conn.execute(
            insert(t.phone_numbers),
            [
                {
                    "number": phone(i),
                    "sid": f"PN{i:032d}",
                    "country": "US",
                    "type": "local",
                    "voice": True,
                    "sms": True,
                    "mms": False,
                    "resources": [],
                    "a2p_status": "approved",
                    "toll_free_verification": "not_required",
                    "created_at": now,
                }
                for i in range(ROWS)
            ],
        )

    await database.write(rows)


def phone(i: int) -> str:
    return f"+1415555{i % 10_000:04d}"


def queries() -> dict[str, Callable[[int], Select[Any]]]:
    cipher = pii.cipher()
    return {
        "opt-out list": lambda i: select(t.sms_suppressions).where(
            t.sms_suppressions.c.phone_index == cipher.blind_index(phone(i % ROWS))
        ),
        "registered number": lambda i: select(t.phone_numbers).where(t.phone_numbers.c.number == phone(i % ROWS)),
        "call record": lambda i: select(t.calls).where(t.calls.c.call_sid == f"CA{i:032d}"),
    }


async def timed(reads: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> tuple[float, float]:
    """CPU and wall seconds per read over ``reads`` reads, ``concurrency`` in flight."""
    for i in range(100):  # warm: pools, statement caches
        await one(i)
    next_read = iter(range(reads))

    async def lane() -> None:
        for i in next_read:
            await one(i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return (time.process_time() - cpu) / reads, (time.perf_counter() - wall) / reads


async def run(options: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="voicebook-bench-reads-") as folder:
        async with redis_and_ledger(options.database_url, None, Path(folder)) as (_, database, _):
            await fill(database)
            print(f"ledger: {database.dialect}; {options.reads} reads each, {options.concurrency} at a time")
            for name, query in queries().items():

                async def awaited(i: int, query: Callable[[int], Select[Any]] = query) -> Any:
                    async with database.reader.connect() as conn:
                        return (await conn.execute(query(i))).first()

                async def one_hop(i: int, query: Callable[[int], Select[Any]] = query) -> Any:
                    statement = query(i)
                    return await database.read(lambda conn: conn.execute(statement).first())

                old_cpu, old_wall = await timed(options.reads, options.concurrency, awaited)
                new_cpu, new_wall = await timed(options.reads, options.concurrency, one_hop)
                print(
                    f"  {name:<18} awaited: {old_cpu * 1e6:6.0f} us CPU {old_wall * 1e6:6.0f} us wall   "
                    f"Database.read: {new_cpu * 1e6:6.0f} us CPU {new_wall * 1e6:6.0f} us wall   "
                    f"CPU ratio {old_cpu / new_cpu:4.1f}x"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=3000, help="reads per query and way")
    parser.add_argument("--concurrency", type=int, default=1, help="reads in flight at once")
    parser.add_argument("--database-url", help="ledger (default: a temporary SQLite file)")
    options = parser.parse_args()
    if options.reads < 1 or options.concurrency < 1:
        parser.error("--reads and --concurrency must be at least 1")
    asyncio.run(run(options))


if __name__ == "__main__":
    main()
