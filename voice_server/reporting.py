"""Reports and the CRM, as the settings configure them: the analyser (OpenAI structured output with a key,
the offline analysers otherwise or when it fails), the archive (a local folder or S3), Airtable (when
``AIRTABLE_API_KEY`` and ``AIRTABLE_BASE_ID`` are set), and the handlers of the effects they run.

:func:`build_reporting` is used by the server (for the report API's regeneration), by the effect workers
(in the server or ``voicebook worker``) and by ``voicebook report regenerate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from booking.business import Business
from booking.crm_pull import CrmPull
from booking.errors import EffectFailed
from booking.freebusy import FreeBusyIndex
from booking.ledger.crm_repository import CrmLedger
from booking.ledger.database import Database
from booking.ledger.repository import Clock, Ledger, utc_now
from booking.outbox import Effect, EffectKind, RedisNotifier
from booking.reports.pipeline import ReportPipeline
from booking.reports.ports import Analyser
from booking.reports.schema import CallReport
from booking.service import BookingService
from booking.worker import Handler
from integrations.egress import httpx2_client, httpx_client
from voice_server import egress_policy
from voice_server.effects import build_twilio_sms
from voice_server.report_effects import (
    CrmBookingPush,
    CrmCallSync,
    CrmErase,
    crm_call_row,
    crm_pull_handler,
    report_handler,
    retention_handler,
)
from voice_server.settings import Settings
from voice_server.trigger_effects import TriggerHandlers, trigger_rows

if TYPE_CHECKING:
    from integrations.airtable import AirtableCRM
    from integrations.storage import ObjectStorage


@dataclass
class Reporting:
    pipeline: ReportPipeline
    storage: ObjectStorage
    crm: AirtableCRM | None = None
    handlers: dict[str, Handler] = field(default_factory=dict)


def build_analyser(settings: Settings, stack: contextlib.AsyncExitStack) -> Analyser | None:
    """OpenAI's structured output when a key is configured (the offline analysers when it fails; its
    client closed with ``stack``); None (the offline analysers) otherwise."""
    if not settings.openai_api_key:
        return None
    from integrations.openai_analyser import FallbackAnalyser, OpenAIAnalyser

    primary = OpenAIAnalyser.from_settings(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url,
        model=settings.report_model or settings.openai_model,
        timeout=settings.openai_timeout_seconds * 2,  # a whole call's analysis, not one reply
        max_retries=1,  # then the offline analysers: the report must not wait long
        http_client=httpx2_client(egress_policy.openai(settings)),
    )
    stack.push_async_callback(primary.aclose)
    return FallbackAnalyser(primary)


def build_crm(settings: Settings, redis: aioredis.Redis) -> AirtableCRM | None:
    """The Airtable base the settings name, paced by the limiter every process shares; None without one."""
    if not (settings.airtable_api_key and settings.airtable_base_id):
        return None
    from integrations.airtable import AirtableCRM, airtable_rate_limiter

    return AirtableCRM(
        settings.airtable_api_key,
        settings.airtable_base_id,
        airtable_rate_limiter(redis),
        endpoint_url=settings.airtable_api_url or "https://api.airtable.com",
        egress=egress_policy.airtable(settings),
    )


def _worker_service(
    settings: Settings, business: Business, database: Database, redis: aioredis.Redis, clock: Clock
) -> BookingService:
    """A booking service for a worker process: the server's ledger and its shared Redis index (the
    server keeps the index built; this one only applies what the CRM pull changes)."""
    notify = RedisNotifier(redis, settings.effects_channel)
    return BookingService(
        business,
        Ledger(database, clock=clock, notify_effects=notify),
        FreeBusyIndex(redis, prefix=settings.redis_prefix),
        clock=clock,
    )


def _guarded(handler: Handler) -> Handler:
    """Archive failures become outbox failures (transient or permanent as the store said)."""
    from integrations.storage import StorageError

    async def run(effect: Effect) -> None:
        try:
            await handler(effect)
        except StorageError as error:
            raise EffectFailed(str(error), permanent=error.permanent, code="storage") from error

    return run


@contextlib.asynccontextmanager
async def build_reporting(
    settings: Settings,
    business: Business,
    database: Database,
    redis: aioredis.Redis,
    *,
    clock: Clock = utc_now,
    service: BookingService | None = None,
) -> AsyncIterator[Reporting]:
    """``service`` applies what the two-way sync pulls (the server's own; a worker process makes one
    over the shared Redis index)."""
    from integrations.storage import build_storage

    try:
        storage = build_storage(settings.storage_url, settings.data_dir)
    except ValueError as error:
        raise EffectFailed(f"VOICEBOOK_STORAGE_URL: {error}", permanent=True, code="configuration") from error
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(storage.close)
        crm = build_crm(settings, redis)
        if crm is not None:
            stack.callback(crm.close)
        sms = build_twilio_sms(settings, threads=4)  # staff texts: few, on a sender of their own
        if sms is not None:
            stack.callback(sms.close)
        webhooks = None
        if settings.webhook_secrets:
            from integrations.webhooks import WebhookSender

            # Only to the receivers the business's triggers name; redirects are refused (integrations.egress).
            http = await stack.enter_async_context(httpx_client(egress_policy.webhooks(business)))
            webhooks = WebhookSender(http, secret=[key.encode() for key in settings.webhook_secrets])

        def follow_ups(report: CallReport, version: int, now: datetime) -> Sequence[dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            if crm is not None:
                rows.append(crm_call_row(report, version, now))
            rows.extend(trigger_rows(report, version, now, business))
            return rows

        pipeline = ReportPipeline(
            database,
            business,
            analyser=build_analyser(settings, stack),
            archive=storage,
            recordings_dir=settings.data_dir / "recordings",
            follow_ups=follow_ups,
            after_edit=lambda report, version, now: [crm_call_row(report, version, now)] if crm is not None else [],
            clock=clock,
        )
        reporting = Reporting(pipeline=pipeline, storage=storage, crm=crm)
        reporting.handlers[EffectKind.REPORT_BUILD] = _guarded(report_handler(pipeline))
        if settings.retention_days > 0:
            reporting.handlers[EffectKind.RETENTION_SWEEP] = _guarded(
                retention_handler(database, storage, days=settings.retention_days, clock=clock)
            )
        reporting.handlers |= TriggerHandlers(database, business, crm=crm, sms=sms, webhooks=webhooks).handlers()
        if crm is not None:
            reporting.handlers[EffectKind.CRM_CALL] = CrmCallSync(database, business, crm, clock=clock)
            reporting.handlers[EffectKind.CRM_PUSH] = CrmBookingPush(database, business, crm, clock=clock)
            reporting.handlers[EffectKind.CRM_ERASE] = CrmErase(database, crm)
            if settings.crm_two_way:
                reporting.handlers[EffectKind.CRM_PULL] = crm_pull_handler(
                    CrmPull(
                        crm,
                        service or _worker_service(settings, business, database, redis, clock),
                        CrmLedger(database, clock=clock),
                    )
                )
        yield reporting
