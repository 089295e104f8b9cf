"""Say what blocked the event loop: a thread that notices when the loop stops ticking and logs the stack
the loop thread was running at that moment.

The lag histogram (``voicebook_event_loop_lag_seconds``) says *that* the loop was late; an operator then
needs *what* held it. A coroutine cannot tell (it only runs once the block is over), so a daemon thread
watches a heartbeat the loop writes every ``interval``. When the heartbeat is older than ``interval``
plus ``threshold``, the thread takes the loop thread's current frames (``sys._current_frames``), which
is the code holding the loop, or the last code it ran before the process lost its CPU. Once the loop
ticks again, one ``event_loop_stalled`` warning carries how long it stalled and that stack. A stall is
reported once, however long it lasts; at most one report per ``cooldown`` seconds, so a loop that is
merely saturated does not flood the log.

The cost while nothing stalls: one ``loop.time()`` store per tick on the loop and one comparison per
``interval`` on the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

log = structlog.get_logger("voicebook.loop")

STACK_FRAMES = 12
"""How many of the innermost frames a report keeps (the blocking call and what led to it). The import
machinery's own frames are left out: an import on the loop then shows the chain of modules being loaded
and the code that imported them, not a dozen frames of ``importlib._bootstrap``."""


@dataclass(frozen=True)
class Stall:
    """One stall: how long the loop went without a tick, and the loop thread's stack during it."""

    seconds: float
    stack: tuple[str, ...]


class LoopWatchdog:
    """Heartbeat written by the loop (:meth:`beat`), watched by a daemon thread (:meth:`start`)."""

    def __init__(self, *, threshold: float, interval: float = 0.05, cooldown: float = 10.0) -> None:
        if threshold <= 0 or interval <= 0:
            raise ValueError("threshold and interval must be positive")
        self.threshold = threshold
        self.interval = interval
        self.cooldown = cooldown
        self.stalls: list[Stall] = []  # the last few, for tests and the debug endpoint-less operator
        self._beat = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_report = -float("inf")

    def beat(self) -> None:
        self._beat = time.monotonic()

    def start(self) -> None:
        """Watch from now on; the calling thread is the loop's."""
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        late_after = self.interval + self.threshold
        while not self._stop.wait(self.interval):
            started = self._beat
            if time.monotonic() - started < late_after:
                continue
            stack = self._loop_stack()
            # Wait for the loop to tick again, then report the whole stall once.
            while self._beat == started and not self._stop.wait(self.interval / 2):
                pass
            seconds = max(0.0, self._beat - started - self.interval)
            self._report(Stall(seconds, stack))

    def _loop_stack(self) -> tuple[str, ...]:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return ()
        summary = [
            entry for entry in traceback.extract_stack(frame) if not entry.filename.startswith("<frozen importlib")
        ]
        return tuple(f"{entry.filename}:{entry.lineno} {entry.name}" for entry in summary[-STACK_FRAMES:])

    def _report(self, stall: Stall) -> None:
        self.stalls = [*self.stalls[-9:], stall]
        now = time.monotonic()
        if now - self._last_report < self.cooldown:
            return
        self._last_report = now
        log.warning(
            "event_loop_stalled",
            stalled_ms=round(stall.seconds * 1000, 1),
            threshold_ms=round(self.threshold * 1000, 1),
            loop_stack=list(stall.stack),
        )


async def _heartbeat(watchdog: LoopWatchdog) -> None:
    while True:
        watchdog.beat()
        await asyncio.sleep(watchdog.interval)


@contextlib.asynccontextmanager
async def watching_for_stalls(threshold: float, **options: float) -> AsyncIterator[LoopWatchdog | None]:
    """Run a :class:`LoopWatchdog` while the block runs (none when ``threshold`` is 0: switched off)."""
    if threshold <= 0:
        yield None
        return
    watchdog = LoopWatchdog(threshold=threshold, **options)
    watchdog.start()
    task = asyncio.get_running_loop().create_task(_heartbeat(watchdog), name="loop-watchdog-heartbeat")
    try:
        yield watchdog
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(watchdog.stop)
