"""SQLite WAL checkpoints on a thread of their own, never inside a commit.

By default SQLite checkpoints from inside ``COMMIT``: the transaction that takes the WAL past 1000 pages
copies them into the database file and syncs both files before its commit call returns. On the booking
process's lane that commit is a booking, and every write queued behind it waits with it. Measured at
100 load-test calls, those commits took 20 to 46 ms (against 1 to 3 ms for the others) and set the booking
commit's p99. So the ledger's writer connections run with ``wal_autocheckpoint=0`` and each process that
writes runs one :class:`WalCheckpointer`: a daemon thread with a connection of its own that runs a
``PASSIVE`` checkpoint every ``interval`` seconds. A passive checkpoint takes no lock a writer or a reader
needs; it copies what no reader still needs, and SQLite starts the WAL over at the next write once all of
it is copied. Several processes may each run one: SQLite lets one checkpoint run at a time and the others
return at once.

Durability is unchanged: a commit is in the WAL either way (``synchronous=NORMAL``), and the checkpoint
syncs the WAL before it copies from it, as the automatic one did.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from booking import metrics

log = structlog.get_logger("voicebook.ledger")

CHECKPOINT_INTERVAL = 1.0  # seconds between two checkpoints: at 300 transactions/s the WAL stays near 7 MB
# A WAL still this long after a checkpoint means a reader keeps an old snapshot open (or checkpoints fail):
# logged, since the WAL grows until that reader finishes.
LONG_WAL_FRAMES = 50_000


@dataclass(frozen=True)
class CheckpointResult:
    """One ``PRAGMA wal_checkpoint(PASSIVE)``: whether another checkpoint was running (``busy``), the WAL's
    frames, and how many of them are now in the database file."""

    busy: bool
    wal_frames: int
    checkpointed: int


class WalCheckpointer:
    """Checkpoints the WAL of the SQLite file at ``path`` every ``interval`` seconds on a daemon thread."""

    def __init__(self, path: str | Path, *, interval: float = CHECKPOINT_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError("the checkpoint interval must be positive")
        self.path = Path(path)
        self.interval = interval
        self.runs = 0
        self.last: CheckpointResult | None = None
        self._connection: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one checkpoint at a time on our connection (thread, run_once)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (once; later calls do nothing). Called after the first commit, when the file
        exists: the checkpointer opens it read-write and never creates it."""
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._loop, name="ledger-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its connection (the last connection to close checkpoints the rest)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def run_once(self) -> CheckpointResult:
        """One passive checkpoint now, on this thread."""
        with self._lock:
            if self._connection is None:
                # check_same_thread off: run_once may also be called from another thread than the loop's.
                self._connection = sqlite3.connect(
                    f"file:{self.path}?mode=rw", uri=True, isolation_level=None, check_same_thread=False
                )
            started = time.perf_counter()
            busy, frames, done = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            metrics.LEDGER_CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
        self.runs += 1
        # Outside WAL mode (a file not yet migrated) SQLite answers -1 for both counts.
        self.last = CheckpointResult(bool(busy), max(frames, 0), max(done, 0))
        return self.last

    def _loop(self) -> None:
        long_wal_logged = False
        while not self._stop.wait(self.interval):
            try:
                result = self.run_once()
            except sqlite3.Error as error:  # never dies: the next interval tries again
                log.warning("ledger_checkpoint_failed", path=str(self.path), error=str(error))
                continue
            held_back = result.wal_frames - result.checkpointed >= LONG_WAL_FRAMES
            if held_back and not long_wal_logged:
                log.warning(
                    "ledger_wal_not_checkpointed",
                    path=str(self.path),
                    wal_frames=result.wal_frames,
                    checkpointed=result.checkpointed,
                    hint="a reader holds an old snapshot open; the WAL grows until it finishes",
                )
            long_wal_logged = held_back
