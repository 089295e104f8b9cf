"""The application factory: the one place that reads settings and wires concrete adapters together.

Every client (Redis, the SQL engines, the embedded redis-server) is opened in the lifespan and closed
there, in reverse order, even when start-up fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from booking.business import Business, load_business
from booking.external_busy import ExternalBusyRefresher
from booking.lane import BookingLane, CallLoopCalendar
from booking.lane_process import LaneClient
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database, head_revision, migrate
from booking.ledger.repository import Clock, utc_now
from booking.ledger.sms_repository import SmsLedger
from booking.outbox import RedisNotifier
from booking.service import BookingService
from booking.writes import BookingWriter, Writers
from voice_server import media_endpoint, sms_webhooks, twilio_webhooks
from voice_server.api import bookings, health, metrics
from voice_server.api import calls as calls_api
from voice_server.api import crm as crm_api
from voice_server.api import effects as effects_api
from voice_server.api import reports as reports_api
from voice_server.api.responses import problem
from voice_server.booking_stack import calendar_refresh, ledger_and_index, own_ledger_and_index
from voice_server.components import Components
from voice_server.correlation import CorrelationMiddleware
from voice_server.effect_workers import effect_workers
from voice_server.embedded_redis import EmbeddedRedis
from voice_server.google_setup import load_google_calendar
from voice_server.logging import register_settings_secrets
from voice_server.loop_watchdog import watching_for_stalls
from voice_server.metrics import WebhookMetrics, sampling_outbox, watching_event_loop
from voice_server.ports import VoicePorts
from voice_server.privacy_keys import install_pii_cipher
from voice_server.providers import build_voice
from voice_server.reporting import build_reporting
from voice_server.request_limits import RequestSizeLimit
from voice_server.settings import Settings
from voice_server.tracing import tracing_enabled

log = structlog.get_logger("voicebook.app")


class StartupError(RuntimeError):
    pass


async def _start_refresher(refresher: ExternalBusyRefresher, stack: contextlib.AsyncExitStack) -> None:
    """Read every resource's Google free/busy once (a failure is logged and start-up goes on: queries
    retry on demand), then keep it fresh on a schedule until shutdown."""
    failed = await refresher.refresh_all()
    if failed:
        log.warning("external_busy_not_loaded", resources=list(failed), hint="retried on demand and on schedule")
    task = asyncio.get_running_loop().create_task(refresher.run(), name="freebusy-schedule")

    async def stop() -> None:
        await refresher.aclose()  # run() returns at once, even from the middle of a refresh
        await task

    stack.push_async_callback(stop)


async def _start_booking_lane(
    settings: Settings,
    business: Business,
    redis_url: str,
    refresher: ExternalBusyRefresher | None,
    stack: contextlib.AsyncExitStack,
    *,
    clock: Clock,
) -> BookingLane:
    """The booking tools' writes on a loop of their own (``booking.lane``): a second BookingService on
    its own Redis client and ledger engines. Stopped after the calls have ended (the exit stack unwinds
    in reverse), so a booking a hang-up left in flight still commits."""
    call_loop = asyncio.get_running_loop()

    async def build(lane_stack: contextlib.AsyncExitStack) -> BookingService:
        _, ledger, index, _ = own_ledger_and_index(settings, redis_url, lane_stack, clock=clock, max_connections=128)
        external = CallLoopCalendar(refresher, call_loop) if refresher is not None else None
        return BookingService(business, ledger, index, clock=clock, external=external)

    lane = BookingLane(build)
    await lane.start()
    stack.push_async_callback(lane.stop)
    return lane


async def _connect_booking_process(path: Path, local: Writers, stack: contextlib.AsyncExitStack) -> LaneClient:
    """The calls' ledger writes go to ``voicebook serve``'s booking process (``booking.lane_process``);
    while it cannot be reached they run on ``local`` (this process's service and records). Closed after
    the calls have ended, once the writes in flight have their replies."""
    client = LaneClient(path, fallback=local)
    await client.connect()
    stack.push_async_callback(client.aclose)
    return client


def create_app(
    settings: Settings | None = None, *, clock: Clock = utc_now, voice: VoicePorts | None = None
) -> Starlette:
    """The server. ``voice`` replaces the speech, agent and telephony providers the settings choose
    (tests pass scripted ones)."""
    settings = settings or Settings.from_env()
    register_settings_secrets(settings)  # from now on no log line carries a configured secret
    install_pii_cipher(settings)  # the ledger's personal data is sealed and opened with these keys

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(tracing_enabled(settings))  # closed last: flushes the spans of the shutdown too
            await stack.enter_async_context(watching_event_loop())  # voicebook_event_loop_lag_seconds
            await stack.enter_async_context(watching_for_stalls(settings.loop_stall_ms / 1000))
            business = load_business(settings.business_file)
            redis_url = settings.redis_url
            if redis_url is None:
                embedded = EmbeddedRedis(settings.data_dir / "redis")
                await embedded.start()
                stack.push_async_callback(embedded.stop)
                redis_url = embedded.url
                log.info("embedded_redis_started", socket=str(embedded.socket_path))
            redis = aioredis.Redis.from_url(redis_url, max_connections=512)
            stack.push_async_callback(redis.aclose)
            # Published off the booking's path; its last notification goes out before Redis is closed.
            notify = RedisNotifier(redis, settings.effects_channel, background=True)
            stack.push_async_callback(notify.aclose)
            database = Database.connect(settings.effective_database_url, pool_size=settings.db_pool_size)
            stack.push_async_callback(database.dispose)
            if settings.auto_migrate:
                await migrate(database)
            elif await database.schema_revision() != head_revision():
                raise StartupError("the ledger's schema is not current: run `voicebook migrate` first")
            ledger, index = ledger_and_index(settings, redis, database, notify, clock=clock)
            calendar = await load_google_calendar(settings, database)  # shared: effects and free/busy
            if calendar is not None:
                stack.callback(calendar.close)  # after the workers and the refresher, which use it
            refresher = (
                ExternalBusyRefresher(
                    business, ledger, index, calendar, interval=calendar_refresh(settings), clock=clock
                )
                if calendar is not None
                else None
            )
            service = BookingService(business, ledger, index, clock=clock, external=refresher)
            await service.start()
            await service.warm_up()
            if refresher is not None:
                await _start_refresher(refresher, stack)
            reporting = await stack.enter_async_context(
                build_reporting(settings, business, database, redis, clock=clock, service=service)
            )
            if settings.run_workers:
                await stack.enter_async_context(
                    effect_workers(
                        settings, business, database, redis, clock=clock, google=calendar, reporting=reporting
                    )
                )
            else:  # the workers sample the outbox gauges; without them here, the server does
                await stack.enter_async_context(sampling_outbox(database, clock=clock))
            calls = CallLedger(database, clock=clock, notify_effects=notify, consent_mode=settings.consent_mode)
            lane: BookingWriter | None = None
            records_via: BookingWriter | None = None  # where the call and SMS records are written, if not here
            if voice is None and settings.booking_lane == "process" and settings.booking_socket is not None:
                lane = records_via = await _connect_booking_process(
                    settings.booking_socket, Writers(service, calls, SmsLedger(database, clock=clock)), stack
                )
                calls = CallLedger(
                    database, clock=clock, notify_effects=notify, consent_mode=settings.consent_mode, via=records_via
                )
            elif voice is None and settings.booking_lane != "off":
                # Also "process" in an app built without ``voicebook serve``'s booking process (in-process tests).
                lane = await _start_booking_lane(settings, business, redis_url, refresher, stack, clock=clock)
            ports = (
                voice
                if voice is not None
                else await build_voice(settings, business, service, stack, clock=clock, lane=lane)
            )
            app.state.components = Components(
                settings,
                business,
                redis,
                database,
                service,
                calls,
                ports,
                reports=reporting.pipeline,
                clock=clock,
                records_via=records_via,
            )
            if settings.skip_twilio_signature:
                log.warning(
                    "twilio_signatures_disabled", hint="VOICEBOOK_INSECURE_SKIP_TWILIO_SIGNATURE: local use only"
                )
            log.info(
                "voicebook_ready",
                business=business.name,
                database=database.dialect,
                redis="embedded" if settings.redis_url is None else "external",
                admin_api="enabled" if settings.admin_token else "disabled",
            )
            yield
            log.info("voicebook_stopping", active_calls=len(app.state.components.sessions))
            # Calls still up are ended and filed (transcript persisted) before the ledger closes.
            await asyncio.gather(
                *(session.end("server_shutdown") for session in list(app.state.components.sessions)),
                return_exceptions=True,
            )
            await service.drain()
        log.info("voicebook_stopped")

    async def not_found(request: Request, exc: Exception) -> Response:
        return problem(404, "not_found", "Not found", f"no route for {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return problem(
            405, "method_not_allowed", "Method not allowed", f"{request.method} is not allowed on {request.url.path}"
        )

    app = Starlette(
        routes=[
            *health.routes,
            *metrics.routes,
            *bookings.routes,
            *calls_api.routes,
            *reports_api.routes,
            *crm_api.routes,
            *effects_api.routes,
            *twilio_webhooks.routes,
            *sms_webhooks.routes,
            *media_endpoint.routes,
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed},
    )
    app.state.settings = settings
    # Innermost of ours: a body refused for its size is still counted by the webhook metrics and logged with the id.
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(WebhookMetrics, routes=[*twilio_webhooks.routes, *sms_webhooks.routes, *media_endpoint.routes])
    app.add_middleware(CorrelationMiddleware)  # added last, so outermost: every other layer logs with the id
    return app
