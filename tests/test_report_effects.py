"""A report's follow-on effects through the product's wiring (``voice_server.reporting.build_reporting``
and the outbox worker): the call, its contact and appointment linked in the Airtable simulator (through
pyairtable), no duplicates when a sync runs twice, bookings made outside calls pushed, triggers that
file follow-ups, post signed webhooks to a real receiver and wait for an operator's approval."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from booking.business import Business, parse_business
from booking.calls import CallStatus, CallTurn
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from booking.ledger.reports_repository import AuditAction, ReportLedger
from booking.ledger.repository import CustomerDetails
from booking.outbox import EffectStatus, Outbox
from booking.service import Booked, BookingService, BookRequest
from booking.worker import Worker
from integrations.airtable import ACTIVITIES, APPOINTMENTS, CALLS, CONTACTS
from integrations.redis_rate_limit import RedisRateLimiter
from integrations.simulators.airtable import AirtableState, create_airtable_simulator
from integrations.webhooks import verify
from tests.conftest import FrozenClock, serving
from voice_server.reporting import Reporting, build_reporting
from voice_server.settings import Settings

TOKEN = "patSimulatorToken.0123456789"
BASE = "appVoicebookTest1"[:17]
CALL = "CA" + "6" * 32
CALLER = "+12125550142"
SECRET = "whsec-0123456789abcdef"


@pytest.fixture
def sim() -> AirtableState:
    state = AirtableState(token=TOKEN, rate=1000)
    state.add_base(BASE)
    return state


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        body = await request.body()
        now = int(datetime.now(UTC).timestamp())
        if not verify(SECRET.encode(), request.headers.get("x-voicebook-signature", ""), body, now=now):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        received.append({"headers": dict(request.headers), "body": await request.json()})
        return JSONResponse({"ok": True})

    async with serving(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), lifespan="off") as url:
        yield f"{url}/hook", received


def business_with(base: Business, triggers: list[dict[str, Any]], **crm: Any) -> Business:
    data = base.model_dump(mode="json")
    data["crm"] = data["crm"] | crm | {"triggers": triggers}
    return parse_business({"business": {k: data.pop(k) for k in ("name", "timezone", "phone")}, **data})


@contextlib.asynccontextmanager
async def reporting_for(
    settings: Settings, business: Business, database: Database, redis_client: aioredis.Redis, clock: FrozenClock
) -> AsyncIterator[tuple[Reporting, Worker]]:
    async with build_reporting(settings, business, database, redis_client, clock=clock) as reporting:
        assert reporting.crm is not None
        # The shared limiter at 1000 a second: these tests are about what is written, not the pace.
        reporting.crm._limiter = RedisRateLimiter(redis_client, "airtable", limit=1000, window=1.0)
        worker = Worker(database, redis_client, reporting.handlers, clock=clock)
        yield reporting, worker


async def a_call(database: Database, service: BookingService, clock: FrozenClock, lines: list[str]) -> str:
    calls = CallLedger(database, clock=clock)
    await calls.record_call(
        call_sid=CALL,
        account_sid="AC" + "0" * 32,
        from_number=CALLER,
        to_number="+12125550100",
        direction="inbound",
        status=CallStatus.IN_PROGRESS,
    )
    outcome = await service.book(
        BookRequest(
            "checkup",
            datetime(2026, 12, 1, 15, 0, tzinfo=UTC),
            CustomerDetails(CALLER, "Alice Moreno"),
            source="phone",
            actor=f"call:{CALL}",
        )
    )
    assert isinstance(outcome, Booked)
    turns = [
        CallTurn("caller" if index % 2 else "agent", text, clock() + timedelta(seconds=4 * index))
        for index, text in enumerate(lines)
    ]
    await calls.finish_call(CALL, stream_sid="MZ" + "0" * 32, end_reason="stop", turns=turns)
    return outcome.booking.id


HAPPY = [
    "Thank you for calling Riverside Clinic, how can I help?",
    "I'd like to book a check-up please.",
    "You're booked for Tuesday at ten. Anything else?",
    "No, that's lovely, thank you!",
]
UNHAPPY = [
    "Thank you for calling Riverside Clinic, how can I help?",
    "I want to make a complaint, I waited an hour last time and it was rude and unacceptable.",
    "I'm sorry. I have booked you with Dr. Lee on Tuesday at ten.",
    "Fine. I'm still very disappointed.",
]


def settings_for(app_settings: Settings, url: str, tmp_path: Path, **changes: Any) -> Settings:
    return dataclasses.replace(
        app_settings,
        airtable_api_key=TOKEN,
        airtable_base_id=BASE,
        airtable_api_url=url,
        data_dir=tmp_path,
        **changes,
    )


def fields(sim: AirtableState, table: str) -> list[dict[str, Any]]:
    return [record.fields for record in sim.records(BASE, table)]


async def test_a_call_reaches_airtable_linked_and_a_second_sync_duplicates_nothing(
    app_settings: Settings,
    business: Business,
    database: Database,
    service: BookingService,
    redis_client: aioredis.Redis,
    clock: FrozenClock,
    sim: AirtableState,
    tmp_path: Path,
) -> None:
    async with serving(create_airtable_simulator(sim), lifespan="off") as url:
        settings = settings_for(app_settings, url, tmp_path)
        async with reporting_for(settings, business, database, redis_client, clock) as (reporting, worker):
            assert (await reporting.crm.ensure_schema(create=True)).ok  # type: ignore[union-attr]
            booking_id = await a_call(database, service, clock, HAPPY)
            await worker.run_until_idle()
            effects = {e.kind: e for e in await Outbox(database).for_call(CALL)}
            assert {kind: e.status for kind, e in effects.items()} == {
                "report.build": EffectStatus.DONE,
                "crm.call": EffectStatus.DONE,
            }
            [contact] = fields(sim, CONTACTS)
            [appointment] = fields(sim, APPOINTMENTS)
            [call] = fields(sim, CALLS)
            contact_id = sim.records(BASE, CONTACTS)[0].id
            appointment_id = sim.records(BASE, APPOINTMENTS)[0].id
            assert contact["Phone"] == CALLER and contact["Name"] == "Alice Moreno"
            assert contact["Lifecycle"] == "booked" and contact["Lead score"] > 0
            assert appointment["Booking ID"] == booking_id and appointment["Contact"] == [contact_id]
            assert appointment["Status"] == "confirmed"
            assert call["Call SID"] == CALL and call["Outcome"] == "booked" and call["Report version"] == 1
            assert call["Contact"] == [contact_id] and call["Appointments"] == [appointment_id]
            # The sync delivered again (a lost acknowledgement, a replayed dead letter): the same rows.
            await reporting.handlers["crm.call"](effects["crm.call"])
            assert [len(fields(sim, table)) for table in (CONTACTS, APPOINTMENTS, CALLS)] == [1, 1, 1]
            trail = await ReportLedger(database).audit_trail("call", CALL)
            exports = [e for e in trail if e.action is AuditAction.EXPORTED]
            assert len(exports) == 2 and exports[0].details == {"version": 1, "to": "airtable"}
            # A booking made online is pushed by the periodic push; pushing again duplicates nothing.
            online = await service.book(
                BookRequest("checkup", datetime(2026, 12, 2, 15, 0, tzinfo=UTC), CustomerDetails("+12125550777", "Bo"))
            )
            assert isinstance(online, Booked)
            push = reporting.handlers["crm.push"]
            effect = effects["crm.call"]
            await push(effect)
            await push(effect)
            assert sorted(a["Booking ID"] for a in fields(sim, APPOINTMENTS)) == sorted([booking_id, online.booking.id])
            assert len(fields(sim, CONTACTS)) == 2


async def test_triggers_file_follow_ups_post_signed_webhooks_and_wait_for_approval(
    app_settings: Settings,
    business: Business,
    database: Database,
    service: BookingService,
    redis_client: aioredis.Redis,
    clock: FrozenClock,
    sim: AirtableState,
    tmp_path: Path,
) -> None:
    async with (
        serving(create_airtable_simulator(sim), lifespan="off") as url,
        webhook_receiver() as (hook_url, received),
    ):
        rules = business_with(
            business,
            [
                {
                    "name": "unhappy",
                    "when": ["sentiment:negative", "tag:complaint"],
                    "actions": ["follow_up", "webhook"],
                    "webhook_url": hook_url,
                },
                {
                    "name": "any-booking",
                    "when": ["outcome:booked"],
                    "actions": ["webhook"],
                    "webhook_url": hook_url,
                    "review": True,
                },
            ],
        )
        settings = settings_for(app_settings, url, tmp_path, webhook_secrets=(SECRET,))
        async with reporting_for(settings, rules, database, redis_client, clock) as (reporting, worker):
            assert (await reporting.crm.ensure_schema(create=True)).ok  # type: ignore[union-attr]
            await a_call(database, service, clock, UNHAPPY)
            await worker.run_until_idle()
            kinds = sorted((e.kind, e.status.value) for e in await Outbox(database).for_call(CALL))
            assert kinds == [
                ("crm.call", "done"),
                ("report.build", "done"),
                ("trigger.follow_up", "done"),
                ("trigger.review", "done"),
                ("trigger.webhook", "done"),
            ]
            activities = fields(sim, ACTIVITIES)
            assert sorted(a["Kind"] for a in activities) == ["follow_up", "review"]
            assert all(a["Contact"] == [sim.records(BASE, CONTACTS)[0].id] for a in activities)
            [delivery] = received  # only the unhappy rule's: the other waits for review
            assert delivery["body"]["trigger"]["rule"] == "unhappy"
            assert "transcript" not in delivery["body"]
            assert delivery["headers"]["idempotency-key"] == f"{CALL}:trigger:unhappy:v1:webhook"
