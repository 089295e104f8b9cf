"""The outbox worker: claims due effects, runs their handlers, records the outcome.

One loop claims effects for each integration ("calendar", "sms") up to that integration's concurrency
and runs each in its own task. The loop sleeps until a Redis notification (a booking committed
effects), a finished effect (which may unblock the next effect of its booking), or the poll interval,
whichever comes first: a lost notification only delays an effect by one poll.

A handler that returns has succeeded. One that raises has failed: :class:`~booking.errors.EffectFailed`
says whether retrying can help; any other exception is taken as transient.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta

import redis.asyncio as aioredis
import structlog
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue
from redis.exceptions import RedisError

from booking import metrics
from booking.ledger.database import Database
from booking.outbox import (
    DEFAULT_POLICIES,
    EFFECTS_CHANNEL,
    Effect,
    EffectStatus,
    Outbox,
    RetryPolicy,
    integration_of,
)
from booking.trace_context import parent_context

Handler = Callable[[Effect], Awaitable[None]]
Clock = Callable[[], datetime]

log = structlog.get_logger("voicebook.worker")
# The OpenTelemetry API only (no SDK, no exporter): a no-op until the process installs a tracer provider.
_tracer = trace.get_tracer("voicebook.effects")

DEFAULT_CONCURRENCY = 4
DEFAULT_LEASE = timedelta(minutes=2)


class Worker:
    """Runs effects from the ledger's outbox. ``concurrency`` is per integration (one number for all,
    or a mapping from integration to number). Handlers are keyed by effect kind; kinds without a handler
    are left for another worker. Start with :meth:`run` (until :meth:`stop`), or, in tests and one-shot
    CLI runs, :meth:`run_until_idle`."""

    def __init__(
        self,
        database: Database,
        redis: aioredis.Redis,
        handlers: Mapping[str, Handler],
        *,
        concurrency: int | Mapping[str, int] = DEFAULT_CONCURRENCY,
        clock: Clock | None = None,
        policies: Mapping[str, RetryPolicy] = DEFAULT_POLICIES,
        rng: random.Random | None = None,
        lease: timedelta = DEFAULT_LEASE,
        poll_interval: float = 1.0,
        channel: str = EFFECTS_CHANNEL,
        owner: str | None = None,
    ) -> None:
        self.owner = owner or f"worker-{secrets.token_hex(6)}"
        self.outbox = Outbox(database, clock=clock, policies=policies, rng=rng)
        self._redis = redis
        self._handlers = dict(handlers)
        self._kinds: dict[str, list[str]] = {}
        for kind in self._handlers:
            self._kinds.setdefault(integration_of(kind), []).append(kind)
        self._limits = {
            integration: concurrency if isinstance(concurrency, int) else concurrency.get(integration, 1)
            for integration in self._kinds
        }
        if any(limit < 1 for limit in self._limits.values()):
            raise ValueError(f"concurrency must be at least 1 per integration: {self._limits}")
        for integration, limit in self._limits.items():
            metrics.EFFECTS_CONCURRENCY_LIMIT.labels(integration).set(limit)
        self._lease = lease
        # A handler gets most of the lease: one still running when the lease ends would run twice.
        self._handler_timeout = lease.total_seconds() * 0.8
        self._poll_interval = poll_interval
        self._channel = channel
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {integration: set() for integration in self._kinds}
        self._wake = asyncio.Event()
        self._stopping = False
        self.listening = asyncio.Event()
        """Set while subscribed to the notification channel (a worker that is not only polls)."""

    @property
    def kinds(self) -> list[str]:
        """The effect kinds this worker has handlers for."""
        return sorted(self._handlers)

    @property
    def in_flight(self) -> int:
        return sum(len(tasks) for tasks in self._in_flight.values())

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming; :meth:`run` returns once the effects in flight have finished."""
        self._stopping = True
        self._wake.set()

    async def run(self, *, grace: float = 10.0) -> None:
        """Claim and run effects until :meth:`stop`. Effects still running ``grace`` seconds after the stop
        are cancelled; their leases expire and another worker runs them again."""
        listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self._dispatch()
                except Exception:  # the ledger is unreachable: keep polling, it may come back
                    log.exception("outbox_claim_failed", owner=self.owner)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wake.wait()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await self._finish(grace)

    async def run_until_idle(self) -> int:
        """Run effects until none is due and none is in flight; returns how many were claimed."""
        claimed = 0
        while True:
            self._wake.clear()
            count = await self._dispatch()
            claimed += count
            tasks = self._all_tasks()
            if not tasks:
                if count == 0:
                    return claimed
                continue
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)

    def _all_tasks(self) -> set[asyncio.Task[None]]:
        return set().union(*self._in_flight.values())

    async def _dispatch(self) -> int:
        """Claim for every integration with a free slot, in one ledger transaction, and start the effects."""
        if self._stopping:
            return 0
        free = {
            integration: self._limits[integration] - len(self._in_flight[integration]) for integration in self._kinds
        }
        wanted = [integration for integration, slots in free.items() if slots > 0]
        if not wanted:
            return 0
        groups = [(self._kinds[integration], free[integration]) for integration in wanted]
        claimed = await self.outbox.claim_many(self.owner, groups, lease=self._lease)
        for integration, effects in zip(wanted, claimed, strict=True):
            for effect in effects:
                task = asyncio.get_running_loop().create_task(self._execute(effect))
                self._in_flight[integration].add(task)
                task.add_done_callback(self._finished)
        return sum(len(effects) for effects in claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        for tasks in self._in_flight.values():
            tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("outbox_effect_crashed", owner=self.owner, error=repr(task.exception()))
        # A settled effect may be what held up the next effect of its booking.
        self._wake.set()

    async def _execute(self, effect: Effect) -> None:
        """One attempt at ``effect``, as a span (its provider requests are children): the child of the
        span that enqueued the effect when that was traced, so it shows in the call's trace."""
        attributes: dict[str, AttributeValue] = {
            "voicebook.effect.id": effect.id,
            "voicebook.effect.kind": effect.kind,
            "voicebook.effect.integration": effect.integration,
            "voicebook.effect.attempt": effect.attempts,
        }
        if effect.booking_id is not None:
            attributes["voicebook.booking_id"] = effect.booking_id
        if effect.call_sid is not None:
            attributes["voicebook.call_sid"] = effect.call_sid
        # Every line the attempt logs (the handler's and its providers') names the effect and what it is for.
        fields: dict[str, object] = {"effect_id": effect.id, "kind": effect.kind}
        if effect.booking_id is not None:
            fields["booking_id"] = effect.booking_id
        if effect.call_sid is not None:
            fields["call_sid"] = effect.call_sid
        with (
            structlog.contextvars.bound_contextvars(**fields),
            _tracer.start_as_current_span(
                f"effect {effect.kind}",
                context=parent_context(effect.traceparent),
                kind=trace.SpanKind.CONSUMER,
                attributes=attributes,
            ) as span,
        ):
            await self._attempt(effect, span)

    async def _attempt(self, effect: Effect, span: trace.Span) -> None:
        handler = self._handlers[effect.kind]
        integration = effect.integration
        in_flight = metrics.EFFECTS_IN_FLIGHT.labels(integration)
        in_flight.inc()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._handler_timeout):
                await handler(effect)
        except Exception as error:
            in_flight.dec()
            metrics.EFFECT_DURATION.labels(integration).observe(time.perf_counter() - started)
            outcome = await self.outbox.fail(effect, error)
            label = "lease_lost" if outcome is None else "dead" if outcome is EffectStatus.DEAD else "retry"
            span.set_attribute("voicebook.effect.outcome", label)
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR, type(error).__name__)
            metrics.EFFECT_ATTEMPTS.labels(integration, effect.kind, label).inc()
            report = log.error if outcome is EffectStatus.DEAD else log.warning
            report(
                "outbox_effect_failed",
                effect_id=effect.id,
                kind=effect.kind,
                booking_id=effect.booking_id,
                attempts=effect.attempts,
                outcome=label,
                error=repr(error),
            )
            return
        in_flight.dec()
        metrics.EFFECT_DURATION.labels(integration).observe(time.perf_counter() - started)
        if not await self.outbox.complete(effect):
            span.set_attribute("voicebook.effect.outcome", "lease_lost")
            metrics.EFFECT_ATTEMPTS.labels(integration, effect.kind, "lease_lost").inc()
            log.warning("outbox_lease_lost", effect_id=effect.id, kind=effect.kind, owner=self.owner)
            return
        span.set_attribute("voicebook.effect.outcome", "done")
        metrics.EFFECT_ATTEMPTS.labels(integration, effect.kind, "done").inc()
        # From the commit that enqueued it (a reminder: from when it fell due) to done: what users wait.
        delay = (self.outbox.now() - effect.wanted_at).total_seconds()
        metrics.EFFECT_DELAY.labels(integration).observe(max(delay, 0.0))

    async def _listen(self) -> None:
        """Wake the loop on every notification; on a Redis failure, fall back to polling and resubscribe."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                self.listening.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake.set()
            except (RedisError, OSError) as error:
                log.warning("outbox_notifications_lost", error=repr(error))
            finally:
                self.listening.clear()
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            # Resubscribe after a pause, not in a tight loop while Redis is down; polling carries on.
            await asyncio.sleep(self._poll_interval)

    async def _finish(self, grace: float) -> None:
        tasks = self._all_tasks()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
