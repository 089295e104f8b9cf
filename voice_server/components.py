"""The long-lived clients of one running server, built once in the lifespan and closed there."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from booking.business import Business
from booking.ledger.calls_repository import CallLedger
from booking.ledger.consent_repository import ConsentLedger
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now
from booking.ledger.sms_repository import SmsLedger
from booking.service import BookingService
from booking.writes import BookingWriter
from voice_server.ports import VoicePorts
from voice_server.settings import Settings

if TYPE_CHECKING:
    from booking.reports.pipeline import ReportPipeline
    from voice_server.session import CallSession


@dataclass(frozen=True)
class Components:
    settings: Settings
    business: Business
    redis: aioredis.Redis
    database: Database
    bookings: BookingService
    calls: CallLedger
    voice: VoicePorts
    sessions: set[CallSession] = field(default_factory=set)
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the server is shutting down: calls in progress finish, new ones are turned away."""
    reports: ReportPipeline | None = None
    """Builds and regenerates end-of-call reports (None: a server that builds none)."""
    clock: Clock = utc_now
    """The server's clock (tests freeze it); everything that stamps or compares times reads this one."""
    records_via: BookingWriter | None = None
    """Where the call and SMS records are written when not in this process: the booking process
    (``booking.writes`` says why); ``calls`` was built with it, and :attr:`sms` is."""

    @property
    def sms(self) -> SmsLedger:
        """Texts, their receipts and suppressions (a view over the ledger, like :attr:`consents`)."""
        return SmsLedger(self.database, clock=self.clock, via=self.records_via)

    @property
    def consents(self) -> ConsentLedger:
        """Consent decisions (a view over the ledger: nothing of its own to build or close)."""
        return ConsentLedger(self.database, clock=self.clock)
