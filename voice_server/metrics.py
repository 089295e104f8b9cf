"""Prometheus instruments of the voice side: calls, turns and their latency parts, barge-ins, key presses,
rejected Media Streams frames, Twilio webhooks by status, and the event loop's lag.

They live in the default registry, which ``GET /metrics`` exposes (``voice_server.api.metrics``; with
``PROMETHEUS_MULTIPROC_DIR`` set, every process's values summed or maxed as each gauge says). The turn
histograms are the Prometheus twins of ``voice_server.turn_timing.TURN_HISTOGRAMS``, with the same names
and buckets: ``turn_timing.observe`` fills both.

:class:`WebhookMetrics` is an ASGI middleware, so a request refused before any handler runs (a bad
signature, a body too large) is counted as well; :func:`watching_event_loop` runs the lag monitor for as
long as the app's lifespan lasts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram, multiprocess
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now
from booking.outbox import Outbox
from booking.outbox_monitor import OutboxMonitor
from voice_server.turn_timing import TurnPart, TurnTiming, turn_histograms

log = structlog.get_logger("voicebook.metrics")

# -- calls -------------------------------------------------------------------------------------------

CALLS_ACTIVE = Gauge(
    "voicebook_calls_active",
    "Calls with an open media stream now.",
    multiprocess_mode="livesum",
)
CALLS = Counter("voicebook_calls_total", "Media streams started (one per call).")
CALLS_ENDED = Counter(
    "voicebook_calls_ended_total",
    "Calls ended, by the session's end reason (stop, dropped, silence, max_duration, transferred, hangup, ...).",
    ["reason"],
)
BARGE_INS = Counter("voicebook_barge_ins_total", "Replies the caller talked over before they were heard.")
DTMF_DIGITS = Counter("voicebook_dtmf_digits_total", "Key presses received from callers.")
MEDIA_FRAMES_REJECTED = Counter(
    "voicebook_media_frames_rejected_total",
    "Malformed, unknown or out-of-order Media Streams frames, by reason.",
    ["reason"],
)

KNOWN_END_REASONS = frozenset(
    {
        "stop",  # Twilio stopped the stream: the caller hung up
        "dropped",  # the socket went away without a stop
        "no_start",
        "protocol_errors",
        "server_shutdown",
        "silence",
        "max_duration",
        "transferred",
    }
)
"""End reasons kept as they are; any other is the agent's own words for hanging up, counted as ``hangup``
(a label must come from a small set)."""


def end_reason_label(reason: str) -> str:
    return reason if reason in KNOWN_END_REASONS else "hangup"


def call_started() -> None:
    CALLS.inc()
    CALLS_ACTIVE.inc()


def call_ended(reason: str) -> None:
    CALLS_ACTIVE.dec()
    CALLS_ENDED.labels(end_reason_label(reason)).inc()


# -- turns -------------------------------------------------------------------------------------------

TURNS = Counter("voicebook_turns_total", "Caller turns the agent answered (or began to), by trigger.", ["trigger"])

_EXPORTED_PARTS: tuple[TurnPart, ...] = (
    "voice_to_voice_server",
    "agent_first_token",
    "tool",
    "tts_first_byte",
    "server_overhead",
)
TURN_SECONDS: Mapping[TurnPart, Histogram] = {
    part: Histogram(histogram.name, histogram.help + " (seconds).", buckets=histogram.bounds)
    for part, histogram in turn_histograms().items()
    if part in _EXPORTED_PARTS
}
"""``stt_final`` is left out: only a harness that plays the caller knows it (see ``turn_timing``)."""


def observe_turn(timing: TurnTiming) -> None:
    """Count a finished turn and observe its parts (``voice_server.turn_timing.observe`` calls this)."""
    TURNS.labels(timing.trigger).inc()
    for part, value in timing.parts():
        histogram = TURN_SECONDS.get(part)
        if histogram is not None:
            histogram.observe(value)


# -- webhooks ----------------------------------------------------------------------------------------

WEBHOOK_REQUESTS = Counter(
    "voicebook_webhook_requests_total",
    "Twilio webhook requests by endpoint and HTTP status (403: a bad signature; 101: a media stream accepted).",
    ["endpoint", "status"],
)

WEBSOCKET_ACCEPTED = 101
WEBSOCKET_REFUSED = 403  # a WebSocket closed before it is accepted is answered 403 by the server


class WebhookMetrics:
    """ASGI middleware counting requests to the paths of ``routes`` (Twilio's webhooks) by the status they
    were answered with. A Media Streams upgrade counts as 101 when accepted and 403 when refused; a handler
    that raised counts as 500; a request whose client went away before any answer is not counted."""

    def __init__(self, app: ASGIApp, *, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.endpoints = frozenset(route.path for route in routes if isinstance(route, Route | WebSocketRoute))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] not in self.endpoints:
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def counting(message: Message) -> None:
            nonlocal status
            if status is None:
                kind = message["type"]
                if kind in ("http.response.start", "websocket.http.response.start"):
                    status = int(message["status"])
                elif kind == "websocket.accept":
                    status = WEBSOCKET_ACCEPTED
                elif kind == "websocket.close":
                    status = WEBSOCKET_REFUSED
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except Exception:
            status = status or 500
            raise
        finally:
            if status is not None:
                WEBHOOK_REQUESTS.labels(scope["path"], str(status)).inc()


# -- the event loop ----------------------------------------------------------------------------------

EVENT_LOOP_LAG = Histogram(
    "voicebook_event_loop_lag_seconds",
    "How late a 20 ms timer fires on the server's event loop: time the loop spent on other work.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
# One sample per media frame's time. At 0.1 s a one-minute load test gave 600 samples, so its p99 was the
# sixth worst of them, and runs of the same code differed by up to four times; 20 ms gives five times the
# samples for about 50 timer wake-ups a second. The buckets around the 10 ms alert are finer for the same
# reason.
LAG_INTERVAL_SECONDS = 0.02


class RecentLag:
    """The last lag samples of this process's event loop, for code that must tell its own slowness from a
    provider's (``voice_server.fallback``): ``worst_since(t)`` is the worst lag measured at loop time ``t``
    or later (0 without samples)."""

    def __init__(self, keep: int = 500) -> None:  # 10 s of samples: longer than any speech deadline
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=keep)

    def observe(self, at: float, lag: float) -> None:
        self._samples.append((at, lag))

    def worst_since(self, since: float) -> float:
        worst = 0.0
        for at, lag in reversed(self._samples):
            if at < since:
                break
            worst = max(worst, lag)
        return worst


RECENT_LOOP_LAG = RecentLag()


async def measure_loop_lag(interval: float = LAG_INTERVAL_SECONDS) -> None:
    """Forever: sleep ``interval`` and observe how much later than asked the loop woke us."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        now = loop.time()
        lag = max(0.0, now - due)
        EVENT_LOOP_LAG.observe(lag)
        RECENT_LOOP_LAG.observe(now, lag)


@contextlib.asynccontextmanager
async def _in_background(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """``work`` runs as a task while the block runs; it is cancelled and awaited when the block exits."""
    task = asyncio.get_running_loop().create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


GC_PAUSE = Histogram(
    "voicebook_gc_pause_seconds",
    "How long one run of Python's cycle collector held the process (its event loop included), by generation.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


class CollectorPauses:
    """Times each run of the cycle collector (a ``gc.callbacks`` hook) into ``voicebook_gc_pause_seconds``.

    While the collector runs, nothing else in the process does: a full collection walks every container
    object the process keeps, and under load that is tens of milliseconds of event-loop lag with no
    await to blame. The lag histogram shows that the loop was late; this one shows how much of it was
    the collector.

    The hook itself only appends the pause to a list: a collection can start inside any allocation,
    including one made while prometheus_client holds its lock (one lock for every metric with
    ``PROMETHEUS_MULTIPROC_DIR``), so observing from the hook could deadlock the process. The pauses are
    observed on the event loop every ``interval`` while :meth:`installed` runs (the server's
    :func:`watching_event_loop`, the booking process), once per process however many blocks use it."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started: float | None = None
        self._pending: list[list[float]] = [[], [], []]  # seconds, by generation, not yet observed
        self._users = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._clock()
        elif self._started is not None:
            self._pending[info["generation"]].append(self._clock() - self._started)
            self._started = None

    def flush(self) -> None:
        """Observe the pauses recorded since the last flush."""
        for generation in range(3):
            # A collection during the swap appends to the list that is about to be read: none is lost.
            pauses, self._pending[generation] = self._pending[generation], []
            if pauses:
                histogram = GC_PAUSE.labels(str(generation))
                for seconds in pauses:
                    histogram.observe(seconds)

    @contextlib.asynccontextmanager
    async def installed(self, interval: float = 1.0) -> AsyncIterator[None]:
        self._users += 1
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        try:
            async with _in_background(self._flushing(interval), "gc-pauses"):
                yield
        finally:
            self._users -= 1
            if self._users == 0 and self in gc.callbacks:
                gc.callbacks.remove(self)
            self.flush()

    async def _flushing(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.flush()


COLLECTOR_PAUSES = CollectorPauses()


@contextlib.asynccontextmanager
async def watching_event_loop(interval: float = LAG_INTERVAL_SECONDS) -> AsyncIterator[None]:
    """The lag monitor and the collector's pause timer run while the block runs; the monitor is cancelled
    and awaited when the block exits."""
    async with COLLECTOR_PAUSES.installed(), _in_background(measure_loop_lag(interval), "event-loop-lag"):
        yield


@contextlib.asynccontextmanager
async def sampling_outbox(database: Database, *, clock: Clock = utc_now) -> AsyncIterator[OutboxMonitor]:
    """The outbox gauges (queue depth, dead letters, oldest due effect, SMS delivery rate) sampled from the
    ledger for as long as the block runs: for a server that runs no effect workers, whose workers (which
    sample them too) may be on another host."""
    monitor = OutboxMonitor(database, Outbox(database, clock=clock))
    task = asyncio.get_running_loop().create_task(monitor.run(), name="outbox-sample")
    try:
        yield monitor
    finally:
        monitor.stop()
        await task


# -- processes ---------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """Where prometheus_client keeps this host's processes' values (None: single-process mode)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def mark_process_dead(pid: int | None = None) -> None:
    """At process exit: drop this process's live gauges (``livesum``/``livemax``) from the aggregate."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(os.getpid() if pid is None else pid)  # type: ignore[no-untyped-call]  # untyped upstream
