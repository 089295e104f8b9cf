"""Engines for the ledger, its write path, and migrations.

Every write is a plain function over a synchronous SQLAlchemy ``Connection`` that :meth:`Database.write`
runs as one transaction, the same function on both databases:

* SQLite (the embedded default) has one writer at a time. Its writes run on one dedicated thread with a
  synchronous connection whose transactions start with ``BEGIN IMMEDIATE`` (the write lock is taken up
  front, so a transaction never has to upgrade a read lock and fail). A whole transaction is one hop to
  that thread: measured here, running each statement of a booking as its own await through aiosqlite
  cost about three times as much, and a transaction holding the only writer across event-loop turns made
  every other booking wait. Reads use aiosqlite and see a consistent WAL snapshot; other processes writing
  the same file wait on ``busy_timeout``.
* PostgreSQL runs the function through asyncpg with ``AsyncConnection.run_sync``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import alembic.command
import alembic.config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from booking.ledger.group_commit import GroupCommit

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000


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


def _begin_immediate(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


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
        lanes: int = 1,
    ) -> None:
        self.url = url
        self.reader = reader
        self._async_writer = async_writer
        self._sync_writer = sync_writer
        self._writer_thread = writer_thread
        self.group_commit = GroupCommit(self._transaction, lanes=lanes)

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @classmethod
    def connect(cls, url: str, *, pool_size: int = 10) -> Database:
        parsed = normalise_database_url(url)
        if parsed.get_backend_name() == "sqlite":
            Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
            reader = create_async_engine(parsed, pool_size=pool_size, max_overflow=0, pool_timeout=60)
            event.listen(reader.sync_engine, "connect", _sqlite_pragmas)
            event.listen(reader.sync_engine, "begin", _begin_deferred)
            writer = create_engine(parsed.set(drivername="sqlite+pysqlite"), pool_size=1, max_overflow=0)
            event.listen(writer, "connect", _sqlite_pragmas)
            event.listen(writer, "begin", _begin_immediate)
            thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
            return cls(parsed, reader, sync_writer=writer, writer_thread=thread, lanes=1)
        # No pool_pre_ping: it costs a round trip on every checkout (measured: a quarter of a booking's
        # ledger time). A connection that died with a server restart fails its one transaction, SQLAlchemy
        # then invalidates the pool, and the caller's retry with the same idempotency key is safe.
        engine = create_async_engine(
            parsed, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800, pool_timeout=30
        )
        # Several transactions in flight at once keep PostgreSQL's backends busy while Python prepares
        # the next batch; the rest of the pool serves reads.
        return cls(parsed, engine, async_writer=engine, lanes=1)

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

    async def _transaction(self, works: list[Callable[[Connection], Any]]) -> list[Any]:
        if self._async_writer is not None:
            async with self._async_writer.begin() as connection:
                return await connection.run_sync(lambda sync: [work(sync) for work in works])
        assert self._sync_writer is not None and self._writer_thread is not None
        engine = self._sync_writer

        def transaction() -> list[Any]:
            with engine.begin() as connection:
                return [work(connection) for work in works]

        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, transaction)

    async def dispose(self) -> None:
        await self.group_commit.drain()
        await self.reader.dispose()
        if self._async_writer is not None and self._async_writer is not self.reader:
            await self._async_writer.dispose()
        if self._sync_writer is not None and self._writer_thread is not None:
            engine, thread = self._sync_writer, self._writer_thread
            await asyncio.get_running_loop().run_in_executor(thread, engine.dispose)
            thread.shutdown(wait=True)

    async def ping(self) -> None:
        async with self.reader.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at, or None before the first migration."""
        async with self.reader.connect() as connection:
            return await connection.run_sync(_current_revision)


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
    await database.write(lambda connection: alembic.command.upgrade(_alembic_config(connection), revision))
