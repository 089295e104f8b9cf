"""``voicebook booking-process``: the booking process that ``voicebook serve`` runs beside its server
processes (``booking.lane_process`` says why).

It builds the same :class:`~booking.service.BookingService` as a server process (the business file, Redis,
the ledger, the external calendars' busy time when Google Calendar is configured), and the ledger's call
and SMS records, and serves the calls' writes (bookings, and the records of the calls and their texts,
``booking.writes``) on a Unix socket until SIGTERM or SIGINT; then it finishes the writes in flight and exits. It does
not sync the catalog or rebuild the index at start: the server processes do that, as before. External
busy time is refreshed on demand here (a booking that needs fresher calendar data fetches it); the
scheduled refresh stays with the server processes.

The supervisor (``voice_server.supervisor``) starts it first, passes its socket to the server processes as
``VOICEBOOK_BOOKING_SOCKET``, restarts it if it dies (the server processes book locally meanwhile), and
stops it after the server processes have drained their calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from pathlib import Path

import structlog

from booking.business import load_business
from booking.external_busy import ExternalBusyRefresher
from booking.lane_process import serve_until
from booking.ledger.calls_repository import CallLedger
from booking.ledger.repository import Clock, utc_now
from booking.ledger.sms_repository import SmsLedger
from booking.service import BookingService
from booking.writes import Writers
from voice_server.booking_stack import calendar_refresh, own_ledger_and_index
from voice_server.google_setup import load_google_calendar
from voice_server.logging import register_settings_secrets
from voice_server.loop_watchdog import watching_for_stalls
from voice_server.metrics import COLLECTOR_PAUSES
from voice_server.privacy_keys import install_pii_cipher
from voice_server.settings import Settings
from voice_server.tracing import tracing_enabled

log = structlog.get_logger("voicebook.booking_process")

SOCKET_NAME = "booking.sock"


class BookingProcessError(RuntimeError):
    """The booking process cannot start as configured; the message says why."""


async def run_booking_process(settings: Settings, socket_path: Path, *, clock: Clock = utc_now) -> None:
    """Serve booking writes on ``socket_path`` until SIGTERM or SIGINT."""
    if settings.redis_url is None:
        raise BookingProcessError("the booking process needs REDIS_URL (the supervisor passes its embedded Redis)")
    register_settings_secrets(settings)
    install_pii_cipher(settings)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(tracing_enabled(settings))
        await stack.enter_async_context(watching_for_stalls(settings.loop_stall_ms / 1000))
        await stack.enter_async_context(COLLECTOR_PAUSES.installed())  # voicebook_gc_pause_seconds, as in the server
        business = load_business(settings.business_file)
        database, ledger, index, notify = own_ledger_and_index(
            settings, settings.redis_url, stack, clock=clock, max_connections=256
        )
        calendar = await load_google_calendar(settings, database)
        if calendar is not None:
            stack.callback(calendar.close)
        refresher = (
            ExternalBusyRefresher(business, ledger, index, calendar, interval=calendar_refresh(settings), clock=clock)
            if calendar is not None
            else None
        )
        if refresher is not None:
            stack.push_async_callback(refresher.aclose)
        service = BookingService(business, ledger, index, clock=clock, external=refresher)
        writers = Writers(
            service,
            CallLedger(database, clock=clock, notify_effects=notify, consent_mode=settings.consent_mode),
            SmsLedger(database, clock=clock),
        )
        await service.warm_up()  # before the first call's booking, not during it
        gc.freeze()  # what lives for the whole process, out of the collector's way (as in the server)
        log.info("booking_process_started", socket=str(socket_path))
        await serve_until(stopped.wait(), writers, socket_path)
    log.info("booking_process_stopped")
