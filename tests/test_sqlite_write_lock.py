"""SQLite's write lock held by another process: the ledger's writer waits for it in short steps of its own
(not SQLite's busy handler, which sleeps 1, 2, 5 ... 100 ms between tries), fails after its timeout with
the error ``busy_timeout`` raised, and does not wait when nobody holds the lock.

The holder is a real second process with its own sqlite3 connection on the same ledger file. These tests
are about SQLite, so they use a SQLite file of their own whatever ``VOICEBOOK_TEST_BACKEND`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from booking.ledger.database import SQLITE_BUSY_TIMEOUT_MS, Database
from booking.metrics import sample

# Takes the write lock of the file argv[1], says "locked", holds it argv[2] seconds, commits, and prints
# the moment it let go on the monotonic clock (CLOCK_MONOTONIC: the same clock in every process here).
HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
connection.execute("BEGIN IMMEDIATE")
connection.execute("INSERT INTO probe VALUES ('holder')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
print(time.monotonic(), flush=True)
"""

# SQLite's busy handler tries again 0, 1, 3, 8, 18, 33, 53, 78, 103, 128, 178, 228, 328 ... ms after a
# writer first found the lock held. Where the release falls between two tries decides how long it sleeps
# on; a hold of 270 ms puts it in the middle of the 100 ms gap after 228 ms, so the comparison below does
# not hinge on a few milliseconds of scheduling noise.
HOLD_SECONDS = 0.27


@dataclass
class Holder:
    process: asyncio.subprocess.Process

    async def released(self) -> float:
        """When the holder committed (its monotonic clock), once it has."""
        assert self.process.stdout is not None
        return float((await self.process.stdout.readline()).decode())


@contextlib.asynccontextmanager
async def holding_write_lock(path: Path, seconds: float) -> AsyncIterator[Holder]:
    """Another process holding the write lock of ``path`` for ``seconds`` (killed on exit if it still does)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(path), str(seconds), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert await process.stdout.readline() == b"locked\n"
        yield Holder(process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.communicate()


@contextlib.asynccontextmanager
async def probe_database(path: Path, **options: Any) -> AsyncIterator[Database]:
    database = Database.connect(f"sqlite:///{path}", **options)
    try:
        await database.write(lambda connection: connection.exec_driver_sql("CREATE TABLE probe (name TEXT)"))
        yield database
    finally:
        await database.dispose()


def insert_probe(name: str, ran: list[float] | None = None) -> Callable[[Connection], int]:
    """A write that inserts ``name`` and returns the busy_timeout its statements run with; it notes
    in ``ran`` the moment it started (the transaction had the write lock by then)."""

    def work(connection: Connection) -> int:
        if ran is not None:
            ran.append(time.monotonic())
        connection.exec_driver_sql("INSERT INTO probe VALUES (?)", (name,))
        return int(connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one())

    return work


async def probe_names(database: Database) -> list[str]:
    async with database.reader.connect() as connection:
        result = await connection.exec_driver_sql("SELECT name FROM probe ORDER BY rowid")
        return [row[0] for row in result]


def begin_with_sqlite_busy_handler(path: Path) -> float:
    """Take the write lock the way the writer did before: ``busy_timeout`` and SQLite's own busy handler.
    Returns the moment it had the lock."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    try:
        connection.execute("BEGIN IMMEDIATE")
        acquired = time.monotonic()
        connection.execute("COMMIT")
        return acquired
    finally:
        connection.close()


def lock_metrics() -> tuple[float, float, float]:
    return (
        sample("voicebook_ledger_lock_waits_total", {"outcome": "acquired"}),
        sample("voicebook_ledger_lock_waits_total", {"outcome": "failed"}),
        sample("voicebook_ledger_lock_wait_seconds_count"),
    )


async def test_a_write_waits_for_another_process_and_takes_the_lock_soon_after_it_is_free(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with probe_database(path) as database:
        lock = database.write_lock
        assert lock is not None
        acquired_before, failed_before, observed_before = lock_metrics()

        ran: list[float] = []
        async with holding_write_lock(path, HOLD_SECONDS) as holder:
            timeout_inside = await database.write(insert_probe("writer", ran))
            released = await holder.released()
        ours = ran[0] - released

        # The same hold against SQLite's own busy handler, measured in the same run.
        async with holding_write_lock(path, HOLD_SECONDS) as holder:
            acquired = await asyncio.to_thread(begin_with_sqlite_busy_handler, path)
            released = await holder.released()
        sqlites = acquired - released

        assert await probe_names(database) == ["holder", "writer", "holder"]
        assert lock.waits == 1 and lock.retries > 0
        assert lock_metrics() == (acquired_before + 1, failed_before, observed_before + 1)
        assert timeout_inside == SQLITE_BUSY_TIMEOUT_MS  # the statements still wait on a busy database
        assert ours < sqlites, f"took the lock {ours * 1000:.1f} ms after release, SQLite {sqlites * 1000:.1f} ms"


def error_before_this_change(path: Path) -> OperationalError:
    """The error a write failed with before: ``BEGIN IMMEDIATE`` from a ``begin`` listener on a writer
    whose ``busy_timeout`` ran out (10 ms here rather than 30 s)."""
    engine = create_engine(f"sqlite+pysqlite:///{path}")

    @event.listens_for(engine, "connect")
    def pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA busy_timeout=10")

    @event.listens_for(engine, "begin")
    def begin_immediate(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    try:
        with pytest.raises(OperationalError) as raised, engine.begin():
            pass
        return raised.value
    finally:
        engine.dispose()


async def test_a_lock_held_past_the_timeout_fails_the_write_as_before(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    timeout = 0.3
    async with probe_database(path, write_lock_timeout=timeout) as database:
        lock = database.write_lock
        assert lock is not None
        acquired_before, failed_before, observed_before = lock_metrics()
        ran: list[float] = []
        async with holding_write_lock(path, 60) as holder:
            started = time.monotonic()
            with pytest.raises(OperationalError) as raised:
                await database.write(insert_probe("writer", ran))
            waited = time.monotonic() - started
            before = await asyncio.to_thread(error_before_this_change, path)
            holder.process.kill()  # its transaction goes with it

        error = raised.value
        assert type(error) is type(before) and str(error) == str(before)
        assert isinstance(error.orig, sqlite3.OperationalError)
        assert error.orig.sqlite_errorname == "SQLITE_BUSY"
        assert waited >= timeout
        assert ran == []
        assert lock.waits == 1 and lock.retries > 0
        assert lock_metrics() == (acquired_before, failed_before + 1, observed_before + 1)

        # Nothing of the failed write stayed, and the writer is fine once the lock is free.
        assert await probe_names(database) == []
        assert await database.write(insert_probe("after")) == SQLITE_BUSY_TIMEOUT_MS
        assert await probe_names(database) == ["after"]


async def test_a_write_without_contention_does_not_wait(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with probe_database(path) as database:
        lock = database.write_lock
        assert lock is not None
        metrics_before = lock_metrics()
        timeouts = [await database.write(insert_probe(f"w{number}")) for number in range(3)]

        assert timeouts == [SQLITE_BUSY_TIMEOUT_MS] * 3
        assert await probe_names(database) == ["w0", "w1", "w2"]
        assert (lock.waits, lock.retries) == (0, 0)
        assert lock_metrics() == metrics_before
