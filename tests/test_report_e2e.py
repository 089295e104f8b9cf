"""The proof of the end-of-call report and the CRM, through the phone path: real calls (the softphone on
the Media Streams WebSocket, the production stack with the Deepgram and OpenAI simulators, as in
tests/test_phone_e2e.py) hang up, and

* the report is in the ledger within seconds, built by the server's own worker;
* the contact, the appointment and the call are in the Airtable simulator, linked (pyairtable);
* delivering the sync again creates no duplicate;
* with the simulator refusing every request for a minute (of the server's clock, which the test moves),
  the next call's report is stored at once and its CRM sync arrives once Airtable is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from booking.business import Business
from booking.ledger.reports_repository import ReportLedger
from booking.outbox import EffectKind, Outbox
from booking.reports.schema import CallReport
from integrations.airtable import APPOINTMENTS, CALLS, CONTACTS, AirtableCRM
from integrations.redis_rate_limit import RedisRateLimiter
from integrations.simulators.airtable import AirtableState, create_airtable_simulator
from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock, serving
from tests.test_phone_e2e import AUTH_TOKEN, Line, _simulators, dial, say
from voice_server.app import create_app
from voice_server.report_effects import CrmCallSync
from voice_server.settings import Settings

pytestmark = pytest.mark.timeout(300)

TOKEN = "patSimulatorToken.0123456789"
BASE = "appVoicebookE2E01"


@dataclasses.dataclass
class Office:
    line: Line
    airtable: AirtableState
    clock: FrozenClock
    settings: Settings


@pytest.fixture
async def office(app_settings: Settings, clock: FrozenClock, business: Business) -> AsyncIterator[Office]:
    # Airtable on the server's clock, so an outage lasts a minute of the time the test moves; its rate
    # limit is tested in tests/test_airtable.py, so it is out of the way here.
    airtable = AirtableState(token=TOKEN, rate=1_000_000, clock=lambda: clock().timestamp())
    airtable.add_base(BASE)
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with contextlib.AsyncExitStack() as stack:
        providers = await stack.enter_async_context(_simulators(business, clock))
        airtable_url = await stack.enter_async_context(serving(create_airtable_simulator(airtable), lifespan="off"))
        settings = dataclasses.replace(
            app_settings,
            public_url=base,
            twilio_auth_token=AUTH_TOKEN,
            silence_seconds=3.0,
            silence_reprompts=1,
            airtable_api_key=TOKEN,
            airtable_base_id=BASE,
            airtable_api_url=airtable_url,
            effect_backoff_scale=0.1,
            retention_days=0,
            **providers,
        )
        crm = AirtableCRM(TOKEN, BASE, _fast_limiter(stack, settings), endpoint_url=airtable_url)
        stack.callback(crm.close)
        assert (await crm.ensure_schema(create=True)).ok  # `voicebook crm create`, before the first call
        app = create_app(settings, clock=clock)
        await stack.enter_async_context(serving(app, sock, lifespan="on", ws="websockets-sansio"))
        yield Office(Line(base, app), airtable, clock, settings)


def _fast_limiter(stack: contextlib.AsyncExitStack, settings: Settings) -> RedisRateLimiter:
    import redis.asyncio as aioredis

    assert settings.redis_url is not None
    client = aioredis.Redis.from_url(settings.redis_url)
    stack.push_async_callback(client.aclose)
    return RedisRateLimiter(client, "airtable-test", limit=1000, window=1.0)


async def eventually(check: Callable[[], Awaitable[Any]], *, within: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.05)


def records(office: Office, table: str) -> list[Any]:
    return office.airtable.records(BASE, table)


def call_row(office: Office, call_sid: str) -> dict[str, Any] | None:
    return next((r.fields for r in records(office, CALLS) if r.fields.get("Call SID") == call_sid), None)


async def test_a_call_is_reported_and_reaches_airtable_linked_even_through_an_outage(office: Office) -> None:
    line, database = office.line, office.line.components.database
    reports = ReportLedger(database)

    # -- a booking call, end to end -----------------------------------------------------------------
    caller = "+16465550111"
    async with dial(line, caller) as phone:
        await say(phone, "I would like to make an appointment")
        await say(phone, "a check up")
        await say(phone, "tomorrow at nine o'clock")
        await say(phone, "my name is john")
        await say(phone, "yes")
        await say(phone, "that is all thank you")
        await asyncio.wait_for(phone.closed.wait(), 15)
    sid = phone.call_sid
    [stored] = await eventually(lambda: reports.versions(sid), within=10, what="the report in the ledger")
    report = CallReport.model_validate(stored.body)
    [booking] = await line.bookings_of(caller)
    assert report.outcome.value.value == "booked"
    assert [b.booking_id for b in report.bookings_touched] == [booking.id]
    assert report.caller_number == caller and report.turn_latencies  # measured by the live session
    assert report.summary.provenance.component.startswith("openai:")  # the production analyser answered
    row = await eventually(lambda: asyncio.sleep(0, call_row(office, sid)), within=10, what="the call in Airtable")
    contact_id = next(r.id for r in records(office, CONTACTS) if r.fields["Phone"] == caller)
    appointment = next(r for r in records(office, APPOINTMENTS) if r.fields["Booking ID"] == booking.id)
    assert appointment.fields["Contact"] == [contact_id] and appointment.fields["Status"] == "confirmed"
    assert row["Contact"] == [contact_id] and row["Appointments"] == [appointment.id]
    assert row["Outcome"] == "booked" and row["Report version"] == 1

    # -- the sync delivered a second time: nothing new ----------------------------------------------
    counts = [len(records(office, table)) for table in (CONTACTS, APPOINTMENTS, CALLS)]
    [sync] = [e for e in await Outbox(database).for_call(sid) if e.kind == EffectKind.CRM_CALL]
    redelivery = AirtableCRM(TOKEN, BASE, _limiter_for(line), endpoint_url=office.settings.airtable_api_url or "")
    try:
        await CrmCallSync(database, line.components.business, redelivery)(sync)
    finally:
        redelivery.close()
    assert [len(records(office, table)) for table in (CONTACTS, APPOINTMENTS, CALLS)] == counts

    # -- Airtable refuses everything for a minute: the report is stored, the sync waits it out --------
    office.airtable.refuse_until(office.clock().timestamp() + 60)
    second = "+16465550112"
    async with dial(line, second) as phone:  # a short call: the greeting, a question, and the caller is gone
        await say(phone, "I need to make an appointment")
        await phone.hang_up()
    later = phone.call_sid
    [late] = await eventually(lambda: reports.versions(later), within=10, what="the report during the outage")
    refused = await eventually(
        lambda: _sync_attempts(line, later), within=10, what="a refused sync attempt during the outage"
    )
    assert refused.last_error and "503" in refused.last_error and call_row(office, later) is None
    # A minute and more passes on the server's clock; workers are woken as it moves.
    for _ in range(40):
        office.clock.advance(timedelta(seconds=5))
        await line.components.redis.publish(office.settings.effects_channel, b"1")
        await asyncio.sleep(0.05)
        if call_row(office, later) is not None:
            break
    arrived = await eventually(lambda: asyncio.sleep(0, call_row(office, later)), within=10, what="the late sync")
    assert arrived["Outcome"] == late.body["outcome"]["value"]
    assert office.clock().timestamp() >= refused.created_at.timestamp() + 60
    assert sum(1 for r in records(office, CALLS) if r.fields["Call SID"] == later) == 1


def _limiter_for(line: Line) -> RedisRateLimiter:
    return RedisRateLimiter(line.components.redis, "airtable-test", limit=1000, window=1.0)


async def _sync_attempts(line: Line, call_sid: str) -> Any:
    effects = [e for e in await Outbox(line.components.database).for_call(call_sid) if e.kind == EffectKind.CRM_CALL]
    return next((e for e in effects if e.attempts >= 1 and e.last_error), None)
