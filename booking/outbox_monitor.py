"""Samples the outbox into gauges and says so in the log when dead letters grow.

Queue depth, the longest wait and the dead letters are facts of the ledger, not of one worker, so they
are read from it on an interval rather than counted in process: every worker process reports the same
numbers, and a restart loses nothing. A rise in dead letters is logged once per rise (with the kinds
that grew), the line an alert or an operator watching the log acts on.
"""

from __future__ import annotations

import structlog

from booking import metrics
from booking.ledger.database import Database
from booking.ledger.sms_repository import SmsLedger
from booking.outbox import EffectKind, Outbox, OutboxStats
from booking.periodic import Periodic

log = structlog.get_logger("voicebook.outbox")

DELIVERY_WINDOW_HOURS = 24.0


class OutboxMonitor:
    def __init__(self, database: Database, outbox: Outbox, *, interval: float = 15.0) -> None:
        self.database = database
        self.outbox = outbox
        self._dead: dict[str, int] | None = None
        self._integrations: set[str] = set()
        self._loop = Periodic(self.sample, interval, name="outbox_sample")

    async def sample(self) -> OutboxStats:
        """Read the outbox once, set the gauges, log a rise in dead letters; returns what it read."""
        stats = await self.outbox.stats()
        seen_kinds = set(stats.due) | set(stats.dead)
        # Every known kind, so a drained queue reads 0 rather than keeping its last value.
        for kind in seen_kinds | {kind.value for kind in EffectKind}:
            metrics.EFFECT_QUEUE_DEPTH.labels(kind).set(stats.due.get(kind, 0))
        dead = stats.by_integration(stats.dead)
        waits = stats.longest_wait()
        self._integrations |= set(dead) | set(waits) | {kind.partition(".")[0] for kind in seen_kinds}
        for integration in self._integrations:
            metrics.DEAD_LETTERS.labels(integration).set(dead.get(integration, 0))
            metrics.EFFECT_OLDEST_DUE_SECONDS.labels(integration).set(waits.get(integration, 0.0))
        if self._dead is not None:
            grown = {kind: count - self._dead.get(kind, 0) for kind, count in stats.dead.items()}
            grown = {kind: delta for kind, delta in grown.items() if delta > 0}
            if grown:
                log.error(
                    "dead_letters_grew",
                    added=grown,
                    total=sum(stats.dead.values()),
                    hint="voicebook dlq list; fix the cause, then voicebook dlq retry ID",
                )
        self._dead = dict(stats.dead)
        rate = await SmsLedger(self.database).delivery_rate(hours=DELIVERY_WINDOW_HOURS)
        if rate is not None:
            metrics.SMS_DELIVERY_RATE.set(rate)
        return stats

    def stop(self) -> None:
        self._loop.stop()

    async def run(self) -> None:
        """Sample every ``interval`` seconds until :meth:`stop`; a failed read is logged and retried."""
        await self._loop.run()
