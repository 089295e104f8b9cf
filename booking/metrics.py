"""Prometheus instruments of the booking side: bookings made, moved and cancelled (and how long the
service took), effects (attempts, outcomes, time to done, work in flight), the outbox's queue and dead
letters, SMS delivery, and waits for the SQLite ledger's write lock.

They live in the default registry, which ``/metrics`` exposes. Instruments are module-level singletons,
as prometheus_client expects; tests read them through :func:`sample`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Iterator
from typing import Literal, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from booking.errors import BookingError

T = TypeVar("T")
BookingOperation = Literal["book", "cancel", "reschedule"]

BOOKINGS = Counter(
    "voicebook_bookings_total",
    "BookingService calls by operation (book, cancel, reschedule) and outcome: done, unavailable (the slot "
    "is taken: a return value), rejected (a BookingError: invalid, not found, conflict) or error.",
    ["operation", "outcome"],
)
BOOKING_SECONDS = Histogram(
    "voicebook_booking_seconds",
    "One BookingService call end to end (hold, ledger commit, index), by operation.",
    ["operation"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5),
)
BOOKING_STAGE_SECONDS = Histogram(
    "voicebook_booking_stage_seconds",
    "The parts of voicebook_booking_seconds, by operation and stage: hold (the slot's hold in Redis), "
    "ledger (the ledger's transaction, its wait for a batch included) and index (the hold settled into the "
    "free/busy index).",
    ["operation", "stage"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

EFFECT_ATTEMPTS = Counter(
    "voicebook_effect_attempts_total",
    "Effect attempts by integration, kind and outcome (done, retry, dead, lease_lost).",
    ["integration", "kind", "outcome"],
)
EFFECT_DURATION = Histogram(
    "voicebook_effect_duration_seconds",
    "Time one effect attempt spent in its handler (the provider's round trips), by integration.",
    ["integration"],
    buckets=(0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0, 2.5, 5.0, 10.0, 30.0),
)
EFFECT_DELAY = Histogram(
    "voicebook_effect_delay_seconds",
    "From the booking change that enqueued an effect (or its due time, for reminders) to the effect done.",
    ["integration"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0, 2.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0),
)
EFFECTS_IN_FLIGHT = Gauge(
    "voicebook_effects_in_flight",
    "Effects running now in this process, by integration; at the limit the integration is saturated.",
    ["integration"],
    multiprocess_mode="livesum",
)
EFFECTS_CONCURRENCY_LIMIT = Gauge(
    "voicebook_effects_concurrency_limit",
    "How many effects of an integration one worker runs at once (its backpressure bound).",
    ["integration"],
    multiprocess_mode="livemax",
)
EFFECT_QUEUE_DEPTH = Gauge(
    "voicebook_effect_queue_depth",
    "Effects due now and waiting for a worker, by kind (sampled from the ledger).",
    ["kind"],
    multiprocess_mode="livemax",
)
EFFECT_OLDEST_DUE_SECONDS = Gauge(
    "voicebook_effect_oldest_due_seconds",
    "How long the longest-waiting due effect has waited, by integration (0 when none waits).",
    ["integration"],
    multiprocess_mode="livemax",
)
DEAD_LETTERS = Gauge(
    "voicebook_effect_dead_letters",
    "Effects in the dead letters, waiting for an operator, by integration (sampled from the ledger).",
    ["integration"],
    multiprocess_mode="livemax",
)
LEDGER_LOCK_WAITS = Counter(
    "voicebook_ledger_lock_waits_total",
    "SQLite ledger transactions that found the write lock held (by another process: each has one writer) "
    "and waited for it, by outcome: acquired, or failed (still locked after the timeout, or another error).",
    ["outcome"],
)
LEDGER_LOCK_WAIT_SECONDS = Histogram(
    "voicebook_ledger_lock_wait_seconds",
    "How long a SQLite ledger transaction that found the write lock held waited for it: contention "
    "between the processes writing the same ledger file.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
LEDGER_WRITE_WAIT_SECONDS = Histogram(
    "voicebook_ledger_write_wait_seconds",
    "From a ledger write being queued to its transaction starting (group commit: the transaction before it "
    "still running).",
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
LEDGER_TRANSACTION_SECONDS = Histogram(
    "voicebook_ledger_transaction_seconds",
    "One ledger transaction from its start to its commit (a batch of writes under group commit; a SQLite "
    "write lock's wait included).",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
LEDGER_CHECKPOINT_SECONDS = Histogram(
    "voicebook_ledger_checkpoint_seconds",
    "One SQLite WAL checkpoint on the ledger's checkpoint thread (copying committed pages into the database "
    "file and syncing it; outside any commit).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
LEDGER_BATCH_WRITES = Histogram(
    "voicebook_ledger_batch_writes",
    "How many writes one ledger transaction committed together (group commit; a write run again alone "
    "after its batch failed is a transaction of 1).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
SMS_DELIVERY_RATE = Gauge(
    "voicebook_sms_delivery_rate",
    "Share of texts settled in the last 24 hours that were delivered (delivered / delivered+undelivered+failed).",
    multiprocess_mode="livemax",
)


async def timed_booking(
    operation: BookingOperation, work: Awaitable[T], *, unavailable: type[object] | None = None
) -> T:
    """Await ``work`` (one BookingService operation), counting its outcome and timing it. A result that is
    an ``unavailable`` instance (``SlotUnavailable``) is the outcome ``unavailable``, any other result
    ``done``. A cancelled call is neither: it is not counted."""
    started = time.perf_counter()
    outcome = "error"
    try:
        result = await work
        outcome = "unavailable" if unavailable is not None and isinstance(result, unavailable) else "done"
        return result
    except BookingError:
        outcome = "rejected"
        raise
    except Exception:
        outcome = "error"
        raise
    except BaseException:
        outcome = "cancelled"
        raise
    finally:
        if outcome != "cancelled":
            BOOKINGS.labels(operation, outcome).inc()
            BOOKING_SECONDS.labels(operation).observe(time.perf_counter() - started)


@contextlib.contextmanager
def booking_stage(operation: BookingOperation, stage: Literal["hold", "ledger", "index"]) -> Iterator[None]:
    """Time one stage of a booking operation into voicebook_booking_stage_seconds (raised errors too)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        BOOKING_STAGE_SECONDS.labels(operation, stage).observe(time.perf_counter() - started)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample of the default registry (0 when absent), for tests and the CLI."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return float(value) if value is not None else 0.0
