"""Engines for the ledger, its write path, and migrations.

Every write is a plain function over a synchronous SQLAlchemy ``Connection`` that :meth:`Database.write`
runs as one transaction, the same function on both databases:

* SQLite (the embedded default) has one writer at a time. Its writes run on one dedicated thread with a
  synchronous connection whose transactions start with ``BEGIN IMMEDIATE`` (the write lock is taken up
  front, so a transaction never has to upgrade a read lock and fail). A whole transaction is one hop to
  that thread: measured here, running each statement of a booking as its own await through aiosqlite
  cost about three times as much, and a transaction holding the only writer across event-loop turns made
  every other booking wait. Reads use aiosqlite and see a consistent WAL snapshot. Reads on a hot path
  go through :meth:`Database.read` instead: the whole read, on a synchronous connection, is one hop to a
  small pool of reader threads. Through aiosqlite every DBAPI call is a hop of its own (a one-row
  SELECT made eight: cursor, BEGIN, close, cursor, execute, fetch, close, rollback), which cost 1.6 ms
  of CPU per read against 0.5 ms in one hop.
* Writers in other processes (the server and ``voicebook worker``, several ``voicebook serve``) contend
  only for the write lock at ``BEGIN IMMEDIATE``. SQLite's own busy handler retries it after sleeps of
  1, 2, 5 ... 100 ms, so a writer could wake up to 100 ms after the lock was free; :class:`SqliteWriteLock`
  takes it with ``busy_timeout`` at 0 and retries every 0.1 to 2 ms itself, up to the same 30 s. The
  statements inside keep the 30 s ``busy_timeout``.
* The writer's commits never checkpoint the WAL (``wal_autocheckpoint=0``): a commit that did copied the
  WAL into the database file and synced it before returning, 20 to 46 ms on the booking process's lane.
  Each process that writes checkpoints on a thread of its own instead (``booking/ledger/checkpoint.py``).
* PostgreSQL runs the function through asyncpg with ``AsyncConnection.run_sync``, on a connection kept
  for writes (its statements stay prepared). Writes that need no answer back go to the server together
  (``booking/ledger/combined.py``): each statement there is a round trip.

Each transaction ends with the audit entries its writes appended (``booking/ledger/audit.py``): one flush
after the last write, right before COMMIT, for the whole transaction. Every engine here refuses a COMMIT
that would leave appended entries unwritten, so a transaction run any other way fails loudly instead of
losing them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import random
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import alembic.command
import alembic.config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from booking import metrics
from booking.ledger.audit import flush_audit, track_pending_entries
from booking.ledger.checkpoint import WalCheckpointer
from booking.ledger.group_commit import GroupCommit

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
# The writer's sleeps between two tries of the write lock: the first, and the most they grow to.
WRITE_LOCK_FIRST_SLEEP = 0.0002
WRITE_LOCK_MAX_SLEEP = 0.002
READER_THREADS = 4  # SQLite: Database.read's threads (WAL readers do not block each other or the writer)


class LedgerConfigurationError(ValueError):
    pass


def normalise_database_url(url: str) -> URL:
    """Accept the usual spellings and pick the async driver: ``postgresql://`` and ``postgres://`` become
    ``postgresql+asyncpg://``; ``sqlite:///path`` becomes ``sqlite+aiosqlite:///path``."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise LedgerConfigurationError(f"DATABASE_URL is not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise LedgerConfigurationError(
                "DATABASE_URL: an in-memory SQLite ledger would lose every booking; give a file path"
            )
        return parsed.set(drivername="sqlite+aiosqlite")
    raise LedgerConfigurationError(f"DATABASE_URL: unsupported database {backend!r} (use sqlite or postgresql)")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Autocommit at the driver level: SQLAlchemy's "begin" event below issues BEGIN itself, so the
    # transaction mode (IMMEDIATE for writers) is ours to choose.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL fsyncs at checkpoint
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
    # The writer's commits never checkpoint: booking.ledger.checkpoint does it on a thread of its own.
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")


def _is_busy(error: BaseException | None) -> bool:
    """Whether ``error`` is SQLite's "database is locked" (SQLITE_BUSY or one of its extended codes)."""
    return isinstance(error, sqlite3.OperationalError) and error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


class SqliteWriteLock:
    """The SQLite writer's ``begin`` listener: starts each transaction with ``BEGIN IMMEDIATE``, waiting
    for a write lock another process holds in short sleeps of its own.

    While it takes the lock the connection's ``busy_timeout`` is 0, so SQLite reports a held lock at once
    instead of sleeping in its own coarse steps; the lock is tried again after sleeps growing from
    ``first_sleep`` to ``max_sleep`` (each drawn between half and all of the step, so that writers of
    several processes do not retry in step). After ``timeout`` seconds of waiting the last try raises
    SQLAlchemy's ``OperationalError`` ("database is locked"), as ``busy_timeout`` did. The statements of
    the transaction run with ``busy_timeout`` at ``SQLITE_BUSY_TIMEOUT_MS`` again.

    ``waits`` counts the transactions that found the lock held, ``retries`` the tries after the first;
    both are also exported (``voicebook_ledger_lock_waits_total``, ``voicebook_ledger_lock_wait_seconds``).
    """

    def __init__(
        self,
        timeout: float = SQLITE_BUSY_TIMEOUT_MS / 1000,
        *,
        first_sleep: float = WRITE_LOCK_FIRST_SLEEP,
        max_sleep: float = WRITE_LOCK_MAX_SLEEP,
    ) -> None:
        if timeout < 0 or not 0 < first_sleep <= max_sleep:
            raise ValueError("need timeout >= 0 and 0 < first_sleep <= max_sleep")
        self.timeout = timeout
        self.first_sleep = first_sleep
        self.max_sleep = max_sleep
        self.waits = 0
        self.retries = 0

    def __call__(self, connection: Connection) -> None:
        driver = connection.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        driver.execute("PRAGMA busy_timeout=0")
        try:
            self._begin(connection, driver)
        finally:
            driver.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")

    def _begin(self, connection: Connection, driver: sqlite3.Connection) -> None:
        try:
            # Through SQLAlchemy, as before this class: its events and its error wrapping.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            return
        except OperationalError as error:
            if not _is_busy(error.orig):
                raise
        self.waits += 1
        started = time.monotonic()
        outcome = "failed"
        try:
            if self._retry(driver, deadline=started + self.timeout):
                outcome = "acquired"
                return
            # The last try, through SQLAlchemy again: it raises the error busy_timeout would have raised.
            self.retries += 1
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            outcome = "acquired"
        finally:
            metrics.LEDGER_LOCK_WAITS.labels(outcome).inc()
            metrics.LEDGER_LOCK_WAIT_SECONDS.observe(time.monotonic() - started)

    def _retry(self, driver: sqlite3.Connection, *, deadline: float) -> bool:
        """Try ``BEGIN IMMEDIATE`` on the driver's connection (cheaper than through SQLAlchemy) until it
        succeeds (True) or ``deadline`` passes or it fails otherwise than busy (False)."""
        step = self.first_sleep
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, random.uniform(step / 2, step)))  # jitter: processes spread out
            step = min(step * 1.5, self.max_sleep)
            self.retries += 1
            try:
                driver.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as error:
                if not _is_busy(error):
                    return False


def _begin_deferred(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN")


class Database:
    """The ledger's engines: ``reader`` for reads, :meth:`write` for transactions that write."""

    def __init__(
        self,
        url: URL,
        reader: AsyncEngine,
        *,
        async_writer: AsyncEngine | None = None,
        sync_writer: Engine | None = None,
        writer_thread: ThreadPoolExecutor | None = None,
        write_lock: SqliteWriteLock | None = None,
        lanes: int = 1,
        sync_reader: Engine | None = None,
        reader_threads: ThreadPoolExecutor | None = None,
        checkpointer: WalCheckpointer | None = None,
    ) -> None:
        self.url = url
        self.reader = reader
        self._sync_reader = sync_reader
        self._reader_threads = reader_threads
        self._async_writer = async_writer
        self._sync_writer = sync_writer
        self._writer_thread = writer_thread
        self.write_lock = write_lock  # SQLite only: how its writer takes the write lock, and its waits
        self.checkpointer = checkpointer  # SQLite only: its WAL checkpoints, started after the first commit
        self.group_commit = GroupCommit(self._transaction, lanes=lanes)
        engines = {reader.sync_engine, sync_writer, sync_reader, async_writer.sync_engine if async_writer else None}
        for engine in engines:
            if engine is not None:
                track_pending_entries(engine)

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @property
    def write_engine(self) -> Engine:
        """The engine writes run on (SQLite: the writer thread's; PostgreSQL: the async engine's
        synchronous side), for its events and caches."""
        if self._async_writer is not None:
            return self._async_writer.sync_engine
        assert self._sync_writer is not None
        return self._sync_writer

    @classmethod
    def connect(
        cls, url: str, *, pool_size: int = 10, write_lock_timeout: float = SQLITE_BUSY_TIMEOUT_MS / 1000
    ) -> Database:
        """Engines for ``url``. ``write_lock_timeout`` (SQLite): how long a write waits for a write lock
        another process holds before it fails."""
        parsed = normalise_database_url(url)
        if parsed.get_backend_name() == "sqlite":
            Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
            reader = create_async_engine(parsed, pool_size=pool_size, max_overflow=0, pool_timeout=60)
            event.listen(reader.sync_engine, "connect", _sqlite_pragmas)
            event.listen(reader.sync_engine, "begin", _begin_deferred)
            writer = create_engine(parsed.set(drivername="sqlite+pysqlite"), pool_size=1, max_overflow=0)
            event.listen(writer, "connect", _sqlite_pragmas)
            event.listen(writer, "connect", _no_autocheckpoint)
            write_lock = SqliteWriteLock(write_lock_timeout)
            event.listen(writer, "begin", write_lock)
            thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
            # Database.read's engine: its connections read in WAL mode beside the writer, each read in a
            # deferred transaction (one snapshot), as the async reader's do.
            threads = min(READER_THREADS, pool_size)
            sync_reader = create_engine(
                parsed.set(drivername="sqlite+pysqlite"), pool_size=threads, max_overflow=0, pool_timeout=60
            )
            event.listen(sync_reader, "connect", _sqlite_pragmas)
            event.listen(sync_reader, "begin", _begin_deferred)
            reader_threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ledger-reader")
            return cls(
                parsed,
                reader,
                sync_writer=writer,
                writer_thread=thread,
                write_lock=write_lock,
                lanes=1,
                sync_reader=sync_reader,
                reader_threads=reader_threads,
                checkpointer=WalCheckpointer(str(parsed.database)),
            )
        # No pool_pre_ping: it costs a round trip on every checkout (measured: a quarter of a booking's
        # ledger time). A connection that died with a server restart fails its one transaction, SQLAlchemy
        # then invalidates the pool, and the caller's retry with the same idempotency key is safe.
        engine = create_async_engine(
            parsed, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800, pool_timeout=30
        )
        # Writes have a connection of their own, kept from one transaction to the next (group commit runs
        # one at a time): the statements a write prepares on a connection, and the types asyncpg looks
        # up for them, are prepared once and warmed by the rehearsal before serving. Taken from the
        # readers' pool, each write could land on a connection that had never run it: measured under
        # load, such a booking's first statements took 15 to 20 ms more, and the bookings queued behind
        # it waited as long (docs/benchmarks.md, sixteenth measurement). Not recycled after a while, for the
        # same reason: it would prepare everything again.
        own_writer = create_async_engine(parsed, pool_size=1, max_overflow=0, pool_timeout=30)
        return cls(parsed, engine, async_writer=own_writer, lanes=1)

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction, possibly shared with concurrent writes (group commit): its
        result comes back once that transaction has committed; if it raises, none of its writes stay.

        ``work`` runs in the caller's context (its current span, its bound log fields): a shared
        transaction runs on a task that only one of its callers started, and SQLite's writer thread
        has no context of its own. The effects a write enqueues take their trace context from it."""
        context = contextvars.copy_context()

        @functools.wraps(work)  # keeps its name for whoever inspects the queue
        def in_caller_context(connection: Connection) -> T:
            return context.run(work, connection)

        return await self.group_commit.submit(in_caller_context)

    async def read(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` on a connection of its own in a read transaction, then roll back; its result comes
        back. ``work`` only reads, and should return rows or plain values: with SQLite it runs on a reader
        thread (in the caller's context), its statements sharing one snapshot, so the work done there is
        kept short. PostgreSQL runs it through asyncpg with ``run_sync``, at read committed (a snapshot
        per statement), as its async reader does."""
        if self._sync_reader is None or self._reader_threads is None:
            async with self.reader.connect() as connection:
                return await connection.run_sync(work)
        engine = self._sync_reader
        context = contextvars.copy_context()

        def run() -> T:
            with engine.connect() as connection:
                return context.run(work, connection)

        return await asyncio.get_running_loop().run_in_executor(self._reader_threads, run)

    async def _transaction(self, works: list[Callable[[Connection], Any]]) -> list[Any]:
        """Run ``works`` in order in one transaction, then write the audit entries they appended, then
        commit. The one place the ledger's writes commit (group commit's batches and its one-by-one
        re-runs included)."""
        if self._async_writer is not None:
            async with self._async_writer.begin() as connection:
                return await connection.run_sync(_run_and_flush, works)
        assert self._sync_writer is not None and self._writer_thread is not None
        engine = self._sync_writer

        def transaction() -> list[Any]:
            with engine.begin() as connection:
                return _run_and_flush(connection, works)

        results = await asyncio.get_running_loop().run_in_executor(self._writer_thread, transaction)
        if self.checkpointer is not None:
            self.checkpointer.start()  # the file exists now (later calls do nothing)
        return results

    async def rehearse(self, works: list[Callable[[Connection], Any]]) -> None:
        """Run ``works`` in one transaction as :meth:`write` would (their audit entries flushed too),
        then roll it back: nothing of it stays. A process runs its hot writes this way once before it
        serves, so that their first caller does not pay for a statement's first run (SQLAlchemy compiling
        it and filling its caches, SQLite preparing it, the PostgreSQL driver preparing it on that
        connection): several milliseconds of CPU, against a fraction of one afterwards. Not through group
        commit, and not counted in the ledger's write metrics."""
        context = contextvars.copy_context()
        if self._async_writer is not None:
            async with self._async_writer.connect() as connection:
                transaction = await connection.begin()
                try:
                    await connection.run_sync(lambda sync: context.run(_run_and_flush, sync, works))
                finally:
                    await transaction.rollback()
            return
        assert self._sync_writer is not None and self._writer_thread is not None
        engine = self._sync_writer

        def rehearsal() -> None:
            with engine.connect() as connection:
                transaction = connection.begin()
                try:
                    context.run(_run_and_flush, connection, works)
                finally:
                    transaction.rollback()

        await asyncio.get_running_loop().run_in_executor(self._writer_thread, rehearsal)

    async def sqlite_pragma(self, pragma: str) -> list[Any]:
        """Run ``PRAGMA <pragma>`` outside any transaction on the SQLite writer's connection (its pool holds
        one, so the next write runs on it); returns its rows."""
        assert self._sync_writer is not None and self._writer_thread is not None
        engine = self._sync_writer

        def run() -> list[Any]:
            raw = engine.raw_connection()
            try:
                return list(raw.cursor().execute(f"PRAGMA {pragma}").fetchall())
            finally:
                raw.close()

        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, run)

    async def dispose(self) -> None:
        await self.group_commit.drain()
        if self.checkpointer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.checkpointer.stop)
        await self.reader.dispose()
        if self._async_writer is not None and self._async_writer is not self.reader:
            await self._async_writer.dispose()
        if self._sync_writer is not None and self._writer_thread is not None:
            engine, thread = self._sync_writer, self._writer_thread
            await asyncio.get_running_loop().run_in_executor(thread, engine.dispose)
            thread.shutdown(wait=True)
        if self._sync_reader is not None and self._reader_threads is not None:
            self._reader_threads.shutdown(wait=True)  # reads in flight finish first
            self._sync_reader.dispose()

    async def ping(self) -> None:
        async with self.reader.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at, or None before the first migration."""
        async with self.reader.connect() as connection:
            return await connection.run_sync(_current_revision)


def _run_and_flush(connection: Connection, works: list[Callable[[Connection], Any]]) -> list[Any]:
    results = [work(connection) for work in works]
    flush_audit(connection)  # last: on PostgreSQL the head row stays locked from here to COMMIT
    return results


def _alembic_config(connection: Connection) -> alembic.config.Config:
    config = alembic.config.Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = alembic.config.Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head


async def migrate(database: Database, revision: str = "head") -> None:
    """Upgrade the ledger's schema to ``revision``."""
    await _migrating(database, lambda connection: alembic.command.upgrade(_alembic_config(connection), revision))


async def downgrade(database: Database, revision: str) -> None:
    """Take the ledger's schema back to ``revision``."""
    await _migrating(database, lambda connection: alembic.command.downgrade(_alembic_config(connection), revision))


async def _migrating(database: Database, step: Callable[[Connection], None]) -> None:
    """Run a migration step. On SQLite, with foreign keys off for its duration: an altered table is rebuilt
    (copy, drop, rename), and dropping a table other rows reference fails the check even though the copy
    takes its place. SQLite ignores the pragma inside a transaction, so it is set before and after on the
    writer's one connection, and the keys are checked once the step has committed."""
    if database.dialect != "sqlite":
        await database.write(step)
        return
    await database.sqlite_pragma("foreign_keys=OFF")
    try:
        await database.write(step)
        broken = await database.sqlite_pragma("foreign_key_check")
        if broken:
            raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
    finally:
        await database.sqlite_pragma("foreign_keys=ON")
