"""SQLite WAL checkpoints run on the ledger's checkpoint thread, never inside a commit.

A commit that checkpoints copies the WAL into the database file and syncs it before it returns; on the
booking process's lane that commit is a booking. These tests check that the ledger's writer never does,
that the checkpoint thread does it on its interval and stops with the database, and that a checkpoint
never creates a ledger file. They are about SQLite, so they use a SQLite file of their own whatever
``VOICEBOOK_TEST_BACKEND`` says.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection
from structlog.testing import capture_logs

from booking.ledger.checkpoint import WalCheckpointer
from booking.ledger.database import Database
from booking.metrics import sample

PAGE = 4096
ROWS_PER_TRANSACTION = 100  # a 4000-byte blob fills a page: about 100 WAL frames per transaction
TRANSACTIONS = 15  # 1,500 frames: past SQLite's automatic checkpoint at 1,000


def _make_filler(connection: Connection) -> None:
    connection.exec_driver_sql("CREATE TABLE filler (x BLOB)")


def _fill(connection: Connection) -> None:
    connection.exec_driver_sql(
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS_PER_TRANSACTION}) "
        "INSERT INTO filler SELECT randomblob(4000) FROM n"
    )


def _wal_frames(path: Path) -> int:
    """The WAL's frames from its size (a 32-byte header, then 24 bytes and a page per frame)."""
    wal = path.with_name(path.name + "-wal")
    return max(0, (wal.stat().st_size - 32) // (24 + PAGE)) if wal.exists() else 0


async def test_commits_leave_the_wal_to_the_checkpointer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    database = Database.connect(f"sqlite:///{path}")
    assert database.checkpointer is not None
    database.checkpointer.interval = 3600  # the thread never gets to it during the test
    try:
        await database.write(_make_filler)
        for _ in range(TRANSACTIONS):
            await database.write(_fill)
        # Nothing copied it: all 1,500 frames are still in the WAL (a commit that checkpointed past
        # 1,000 frames would have had the next transaction start the WAL over).
        assert _wal_frames(path) >= ROWS_PER_TRANSACTION * TRANSACTIONS
        before = sample("voicebook_ledger_checkpoint_seconds_count")
        result = await asyncio.to_thread(database.checkpointer.run_once)
        assert not result.busy
        assert result.wal_frames >= ROWS_PER_TRANSACTION * TRANSACTIONS
        assert result.checkpointed == result.wal_frames  # no reader held an old snapshot
        assert sample("voicebook_ledger_checkpoint_seconds_count") == before + 1
    finally:
        await database.dispose()


def test_a_connection_with_sqlites_default_checkpoints_in_its_commits(tmp_path: Path) -> None:
    """The control for the test above: the same writes through a connection left at SQLite's default
    start the WAL over, so the frame count there measures what the ledger's writer turned off."""
    path = tmp_path / "plain.db"
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("CREATE TABLE filler (x BLOB)")
        for _ in range(TRANSACTIONS):
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS_PER_TRANSACTION}) "
                "INSERT INTO filler SELECT randomblob(4000) FROM n"
            )
            connection.execute("COMMIT")
        assert _wal_frames(path) < ROWS_PER_TRANSACTION * TRANSACTIONS
    finally:
        connection.close()


async def test_the_thread_checkpoints_on_its_interval_and_stops_with_the_database(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    database = Database.connect(f"sqlite:///{path}")
    checkpointer = database.checkpointer
    assert checkpointer is not None
    checkpointer.interval = 0.05
    assert not checkpointer.running  # before the first commit the file may not exist
    await database.write(_make_filler)
    assert checkpointer.running
    await database.write(_fill)
    for _ in range(400):  # bounded: 20 s
        last = checkpointer.last
        if last is not None and last.wal_frames >= ROWS_PER_TRANSACTION and last.checkpointed == last.wal_frames:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the checkpoint thread did not copy the WAL: {checkpointer.last}")
    await database.dispose()
    assert not checkpointer.running
    runs = checkpointer.runs
    await asyncio.sleep(0.2)
    assert checkpointer.runs == runs


def test_a_checkpoint_never_creates_the_ledger_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    checkpointer = WalCheckpointer(path)
    with pytest.raises(sqlite3.OperationalError):
        checkpointer.run_once()
    assert not path.exists()


async def test_a_failed_checkpoint_is_logged_and_the_thread_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "later.db"
    checkpointer = WalCheckpointer(path, interval=0.02)
    with capture_logs() as logs:
        checkpointer.start()
        try:
            for _ in range(250):  # bounded: 5 s
                if any(entry["event"] == "ledger_checkpoint_failed" for entry in logs):
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("no ledger_checkpoint_failed logged for a file that is not there")
            plain = sqlite3.connect(path, isolation_level=None)
            plain.execute("PRAGMA journal_mode=WAL")
            plain.execute("CREATE TABLE t (x)")
            plain.execute("INSERT INTO t VALUES (1)")
            runs = checkpointer.runs
            for _ in range(250):
                if checkpointer.runs > runs and checkpointer.last is not None:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the thread stopped checkpointing after a failure")
            assert checkpointer.running
            plain.close()
        finally:
            checkpointer.stop()
    assert not checkpointer.running


def test_the_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        WalCheckpointer(tmp_path / "x.db", interval=0)


async def test_postgresql_has_no_checkpoint_thread() -> None:
    database = Database.connect("postgresql://postgres@127.0.0.1:5432/test")  # no connection is opened
    try:
        assert database.checkpointer is None
    finally:
        await database.dispose()


async def test_a_reader_holding_an_old_snapshot_is_logged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader's open snapshot keeps a passive checkpoint from copying what was written after it, so the
    WAL grows while it lasts: logged (once, not every second), and caught up once the reader ends."""
    monkeypatch.setattr("booking.ledger.checkpoint.LONG_WAL_FRAMES", ROWS_PER_TRANSACTION)
    path = tmp_path / "ledger.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE filler (x BLOB)")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM filler").fetchone()  # the snapshot is taken here
    checkpointer = WalCheckpointer(path, interval=0.02)
    with capture_logs() as logs:
        checkpointer.start()
        try:
            for _ in range(3):
                writer.execute(
                    f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS_PER_TRANSACTION})"
                    " INSERT INTO filler SELECT randomblob(4000) FROM n"
                )
            for _ in range(250):  # bounded: 5 s
                if any(entry["event"] == "ledger_wal_not_checkpointed" for entry in logs):
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail(f"no warning while a reader held the WAL back: {checkpointer.last}")
            runs = checkpointer.runs
            for _ in range(250):  # five more checkpoints, the reader still there
                if checkpointer.runs >= runs + 5:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the checkpoint thread stopped")
            assert [entry["event"] for entry in logs].count("ledger_wal_not_checkpointed") == 1
            reader.execute("COMMIT")
            for _ in range(250):
                last = checkpointer.last
                if last is not None and last.checkpointed == last.wal_frames:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail(f"the checkpoint did not catch up after the reader ended: {checkpointer.last}")
        finally:
            checkpointer.stop()
            reader.close()
            writer.close()
