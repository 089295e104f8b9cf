"""The Airtable CRM adapter through pyairtable against the Airtable simulator on loopback, and the
Redis rate limiter shared by worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
import requests
from pyairtable import Api

from booking.errors import EffectFailed
from integrations.airtable import (
    APPOINTMENTS,
    CALLS,
    CONTACTS,
    SCHEMA,
    ActivityRow,
    AirtableCRM,
    AppointmentRow,
    CallRow,
    ContactRow,
    appointment_fields,
    contact_fields,
)
from integrations.redis_rate_limit import KEY_PREFIX, RedisRateLimiter
from integrations.simulators.airtable import AirtableState, create_airtable_simulator
from tests.conftest import serving

TOKEN = "patSimulatorToken.0123456789"
BASE = "appVoicebook0001"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@dataclass
class VirtualClock:
    """Seconds on a clock only the test moves; ``sleep`` moves it."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def sim() -> AirtableState:
    state = AirtableState(token=TOKEN, rate=1000)
    state.add_base(BASE)
    return state


@pytest.fixture
async def sim_url(sim: AirtableState) -> AsyncIterator[str]:
    async with serving(create_airtable_simulator(sim)) as url:
        yield url


def make_crm(redis_client: aioredis.Redis, url: str) -> AirtableCRM:
    """An adapter whose limiter (1000 a second) never holds it back."""
    return AirtableCRM(
        TOKEN, BASE, RedisRateLimiter(redis_client, "airtable", limit=1000, window=1.0), endpoint_url=url
    )


@pytest.fixture
async def crm(redis_client: aioredis.Redis, sim_url: str) -> AsyncIterator[AirtableCRM]:
    adapter = make_crm(redis_client, sim_url)
    try:
        yield adapter
    finally:
        adapter.close()


@pytest.fixture
async def crm_with_schema(crm: AirtableCRM) -> AirtableCRM:
    report = await crm.ensure_schema(create=True)
    assert report.ok
    return crm


def fields_of(sim: AirtableState, table: str) -> list[dict[str, object]]:
    return [record.fields for record in sim.records(BASE, table)]


# -- keyed, linked upserts ----------------------------------------------------------------------------


async def test_syncing_twice_creates_no_duplicates_and_links_the_rows(
    crm_with_schema: AirtableCRM, sim: AirtableState
) -> None:
    crm = crm_with_schema
    contact = ContactRow("+15550100001", name="Ada Lovelace", lifecycle="booked", lead_score=80)
    appointment = AppointmentRow(
        "bk_1", "+15550100001", service="Haircut", start=START, end=START + timedelta(minutes=30), status="confirmed"
    )
    call = CallRow("CA0001", "+15550100001", ("bk_1",), started=START, duration_seconds=95, outcome="booked")
    activity = ActivityRow("SM0001", "+15550100001", "sms_out", START, "See you at 9")

    first = await crm.sync(contacts=[contact], appointments=[appointment], calls=[call], activities=[activity])
    second = await crm.sync(contacts=[contact], appointments=[appointment], calls=[call], activities=[activity])

    assert first == second
    for table in (CONTACTS, APPOINTMENTS, CALLS, "Activities"):
        assert len(sim.records(BASE, table)) == 1, table
    contact_id = first.contacts["+15550100001"]
    appointment_id = first.appointments["bk_1"]
    [stored_appointment] = fields_of(sim, APPOINTMENTS)
    [stored_call] = fields_of(sim, CALLS)
    [stored_activity] = fields_of(sim, "Activities")
    assert stored_appointment["Contact"] == [contact_id]
    assert stored_appointment["Start"] == "2026-03-02T09:00:00.000Z"
    assert stored_call["Contact"] == [contact_id]
    assert stored_call["Appointments"] == [appointment_id]
    assert stored_activity["Contact"] == [contact_id]
    assert fields_of(sim, CONTACTS)[0]["Name"] == "Ada Lovelace"


async def test_an_upsert_keeps_what_it_does_not_know(crm_with_schema: AirtableCRM, sim: AirtableState) -> None:
    await crm_with_schema.sync(contacts=[ContactRow("+15550100002", name="Grace", notes="prefers mornings")])
    # A later appointment only knows the phone: the contact's name and notes survive.
    await crm_with_schema.sync(appointments=[AppointmentRow("bk_2", "+15550100002")])
    [stored] = fields_of(sim, CONTACTS)
    assert stored == {"Phone": "+15550100002", "Name": "Grace", "Notes": "prefers mornings"}


async def test_a_call_links_a_booking_synced_earlier(crm_with_schema: AirtableCRM, sim: AirtableState) -> None:
    earlier = await crm_with_schema.sync(appointments=[AppointmentRow("bk_3", "+15550100003")])
    later = await crm_with_schema.sync(calls=[CallRow("CA0003", "+15550100003", ("bk_3",))])
    [stored_call] = fields_of(sim, CALLS)
    assert stored_call["Appointments"] == [earlier.appointments["bk_3"]]
    assert later.contacts == earlier.contacts


async def test_a_call_for_a_booking_not_yet_synced_is_retried(crm_with_schema: AirtableCRM, sim: AirtableState) -> None:
    with pytest.raises(EffectFailed) as caught:
        await crm_with_schema.sync(calls=[CallRow("CA0004", "+15550100004", ("bk_unsynced",))])
    assert not caught.value.permanent
    assert caught.value.code == "missing_link"
    assert sim.records(BASE, CALLS) == []


async def test_eleven_records_take_two_requests(crm_with_schema: AirtableCRM, sim: AirtableState) -> None:
    rows = [ContactRow(f"+1555020{i:04d}") for i in range(11)]
    ids = await crm_with_schema.sync(contacts=rows)
    assert len(ids.contacts) == 11
    assert [r.records for r in sim.requests_to(CONTACTS, "PATCH")] == [10, 1]
    assert len(sim.records(BASE, CONTACTS)) == 11


async def test_rows_sharing_a_key_are_merged_before_sending(crm_with_schema: AirtableCRM, sim: AirtableState) -> None:
    rows = [ContactRow("+15550300001", name="A"), ContactRow("+15550300001", email="a@example.com")]
    await crm_with_schema.sync(contacts=rows)
    assert fields_of(sim, CONTACTS) == [{"Phone": "+15550300001", "Name": "A", "Email": "a@example.com"}]


def test_mapping_leaves_out_unknown_values() -> None:
    assert contact_fields(ContactRow("+15550000000")) == {"Phone": "+15550000000"}
    assert appointment_fields(AppointmentRow("bk", "+1", start=START), "recX") == {
        "Booking ID": "bk",
        "Contact": ["recX"],
        "Start": "2026-03-02T09:00:00+00:00",
    }


# -- Airtable's refusals, translated ------------------------------------------------------------------


async def test_rate_limit_penalty_is_transient_with_retry_after(
    redis_client: aioredis.Redis, sim: AirtableState
) -> None:
    clock = VirtualClock()
    sim.rate, sim.window, sim.penalty, sim.clock = 5, 1.0, 30.0, clock
    async with serving(create_airtable_simulator(sim)) as url:
        crm = make_crm(redis_client, url)  # a limiter far looser than Airtable, to provoke it
        try:
            await crm.ensure_schema(create=True)  # 1 read + 4 tables created = 5 requests
            with pytest.raises(EffectFailed) as caught:
                await crm.sync(contacts=[ContactRow("+15550400001")])
            assert not caught.value.permanent
            assert caught.value.code == "rate_limited"
            # the penalty, plus up to half again of jitter so refused syncs do not all retry together
            assert caught.value.retry_after is not None and 30.0 <= caught.value.retry_after <= 45.0
            clock.now += 29.0  # still inside the penalty window
            with pytest.raises(EffectFailed):
                await crm.sync(contacts=[ContactRow("+15550400001")])
            clock.now += 1.5
            await crm.sync(contacts=[ContactRow("+15550400001")])
        finally:
            crm.close()
    assert [r.status for r in sim.log] == [200] * 5 + [429, 429, 200]
    assert len(sim.records(BASE, CONTACTS)) == 1


async def test_the_shared_limiter_keeps_requests_under_airtables_rate(
    redis_client: aioredis.Redis, sim: AirtableState
) -> None:
    # The simulator and the limiter share one virtual clock, which the limiter moves when it waits.
    clock = VirtualClock()
    sim.rate, sim.window, sim.clock = 5, 1.0, clock
    async with serving(create_airtable_simulator(sim)) as url:
        limiter = RedisRateLimiter(redis_client, "airtable", limit=5, window=1.0, clock=clock, sleep=clock.sleep)
        crm = AirtableCRM(TOKEN, BASE, limiter, endpoint_url=url)
        try:
            await crm.ensure_schema(create=True)
            for i in range(4):
                await crm.sync(appointments=[AppointmentRow(f"bk_{i}", f"+1555050{i:04d}")])
        finally:
            crm.close()
    assert len(sim.log) == 5 + 4 * 2
    assert {r.status for r in sim.log} == {200}
    assert clock.now >= 1000.0 + 2.0  # 13 requests at 5 a second took at least two virtual seconds


async def test_every_request_takes_a_slot(sim: AirtableState, sim_url: str, redis_client: aioredis.Redis) -> None:
    clock = VirtualClock()  # never moves: every slot taken stays in the window, to be counted
    limiter = RedisRateLimiter(redis_client, "airtable", limit=1000, window=1.0, clock=clock)
    crm = AirtableCRM(TOKEN, BASE, limiter, endpoint_url=sim_url)
    try:
        await crm.ensure_schema(create=True)
        await crm.sync(
            contacts=[ContactRow(f"+1555060{i:04d}") for i in range(12)], calls=[CallRow("CA6", "+15550600000")]
        )
    finally:
        crm.close()
    assert len(sim.log) == 5 + 2 + 1
    assert await redis_client.zcard(f"{KEY_PREFIX}airtable:{BASE}") == len(sim.log)


async def test_bad_link_is_permanent(crm_with_schema: AirtableCRM, sim: AirtableState) -> None:
    with pytest.raises(EffectFailed) as caught:
        await crm_with_schema.upsert(
            APPOINTMENTS, "Booking ID", [{"Booking ID": "bk_9", "Contact": ["recDoesNotExist01"]}]
        )
    assert caught.value.permanent
    assert caught.value.context["airtable_error"] == "ROW_DOES_NOT_EXIST"
    assert sim.records(BASE, APPOINTMENTS) == []


async def test_server_errors_are_transient_and_auth_errors_permanent(
    crm_with_schema: AirtableCRM, sim: AirtableState, redis_client: aioredis.Redis, sim_url: str
) -> None:
    sim.fail_next(503)
    with pytest.raises(EffectFailed) as caught:
        await crm_with_schema.sync(contacts=[ContactRow("+15550700001")])
    assert not caught.value.permanent and caught.value.code == "provider_error"

    wrong = AirtableCRM(
        "patWrong", BASE, RedisRateLimiter(redis_client, "t", limit=10, window=1.0), endpoint_url=sim_url
    )
    try:
        with pytest.raises(EffectFailed) as refused:
            await wrong.sync(contacts=[ContactRow("+15550700001")])
    finally:
        wrong.close()
    assert refused.value.permanent and refused.value.code == "unauthorized"


async def test_unreachable_airtable_is_transient(redis_client: aioredis.Redis) -> None:
    async with serving(create_airtable_simulator(AirtableState(token=TOKEN))) as url:
        pass  # the port is closed again
    crm = make_crm(redis_client, url)
    try:
        with pytest.raises(EffectFailed) as caught:
            await crm.sync(contacts=[ContactRow("+15550800001")])
    finally:
        crm.close()
    assert not caught.value.permanent and caught.value.code == "unreachable"


async def test_several_matches_refuse_the_upsert(
    crm_with_schema: AirtableCRM, sim: AirtableState, sim_url: str
) -> None:
    table = Api(TOKEN, endpoint_url=sim_url, retry_strategy=None).table(BASE, CONTACTS)
    await asyncio.to_thread(table.batch_create, [{"Phone": "+15550900001"}, {"Phone": "+15550900001"}])
    with pytest.raises(EffectFailed) as caught:
        await crm_with_schema.sync(contacts=[ContactRow("+15550900001", name="Twice")])
    assert caught.value.permanent
    assert all("Name" not in fields for fields in fields_of(sim, CONTACTS))


# -- the simulator's strictness, through pyairtable ---------------------------------------------------


async def test_simulator_checks_types_unless_typecast(
    crm_with_schema: AirtableCRM, sim: AirtableState, sim_url: str
) -> None:
    table = Api(TOKEN, endpoint_url=sim_url, retry_strategy=None).table(BASE, CONTACTS)
    with pytest.raises(requests.HTTPError) as caught:
        await asyncio.to_thread(table.create, {"Phone": "+15551000001", "Lead score": "42"})
    assert caught.value.response is not None and caught.value.response.status_code == 422
    assert caught.value.response.json()["error"]["type"] == "INVALID_VALUE_FOR_COLUMN"
    with pytest.raises(requests.HTTPError):
        await asyncio.to_thread(table.create, {"Phone": "+15551000001", "Lifecycle": "vip"})
    with pytest.raises(requests.HTTPError):
        await asyncio.to_thread(table.create, {"Phone": "+15551000001", "Unknown": "x"})
    assert sim.records(BASE, CONTACTS) == []

    created = await asyncio.to_thread(
        table.create, {"Phone": "+15551000001", "Lead score": "42", "Lifecycle": "vip"}, typecast=True
    )
    assert created["fields"]["Lead score"] == 42.0
    found = await asyncio.to_thread(table.all, formula="{Phone}='+15551000001'")
    assert [r["id"] for r in found] == [created["id"]]


async def test_simulator_refuses_more_than_ten_records(
    crm_with_schema: AirtableCRM, sim: AirtableState, sim_url: str
) -> None:
    api = Api(TOKEN, endpoint_url=sim_url, retry_strategy=None)
    table = api.table(BASE, CONTACTS)
    body = {"records": [{"fields": {"Phone": f"+1555110{i:04d}"}} for i in range(11)]}
    with pytest.raises(requests.HTTPError) as caught:
        await asyncio.to_thread(api.post, table.urls.records, json=body)
    assert caught.value.response is not None and caught.value.response.status_code == 422
    assert sim.records(BASE, CONTACTS) == []


async def test_simulator_wants_a_bearer_token(sim_url: str) -> None:
    table = Api("patNotTheToken", endpoint_url=sim_url, retry_strategy=None).table(BASE, CONTACTS)
    with pytest.raises(requests.HTTPError) as caught:
        await asyncio.to_thread(table.all)
    assert caught.value.response is not None and caught.value.response.status_code == 401


# -- the schema ------------------------------------------------------------------------------------


async def test_schema_check_reports_missing_tables_and_creates_them(crm: AirtableCRM, sim: AirtableState) -> None:
    report = await crm.ensure_schema(create=False)
    assert report.missing_tables == tuple(SCHEMA)
    assert not report.ok
    assert [t.name for t in sim.bases[BASE].tables] == []

    created = await crm.ensure_schema(create=True)
    assert created.created_tables == tuple(SCHEMA) and created.ok
    calls = sim.bases[BASE].table(CALLS)
    links = {f.name: f.options["linkedTableId"] for f in calls.fields if f.type == "multipleRecordLinks"}
    assert links == {
        "Contact": sim.bases[BASE].table(CONTACTS).id,
        "Appointments": sim.bases[BASE].table(APPOINTMENTS).id,
    }

    again = await crm.ensure_schema(create=False)
    assert again.ok and again.missing_tables == () and again.missing_fields == ()


async def test_schema_check_adds_missing_fields_and_reports_wrong_types(crm: AirtableCRM, sim: AirtableState) -> None:
    sim.add_table(
        BASE, CONTACTS, [{"name": "Phone", "type": "phoneNumber"}, {"name": "Email", "type": "singleLineText"}]
    )
    report = await crm.ensure_schema(create=True)
    assert ("Contacts", "Name") in report.missing_fields
    assert set(report.created_fields) == set(report.missing_fields)
    assert report.wrong_types == (("Contacts", "Email", "email", "singleLineText"),)
    assert not report.ok
    names = [f.name for f in sim.bases[BASE].table(CONTACTS).fields]
    assert names[:2] == ["Phone", "Email"] and "Lifecycle" in names


# -- the shared rate limiter -------------------------------------------------------------------------


async def test_two_limiters_share_one_budget(redis_client: aioredis.Redis) -> None:
    clock = VirtualClock()
    first = RedisRateLimiter(redis_client, "airtable", limit=5, window=1.0, clock=clock)
    second = RedisRateLimiter(redis_client, "airtable", limit=5, window=1.0, clock=clock)
    answers = [await limiter.try_acquire("appA") for limiter in (first, second, first, second, first, second, first)]
    assert answers[:5] == [0.0] * 5
    assert answers[5:] == [1.0, 1.0]  # both refused until the first slot leaves the window
    assert await second.try_acquire("appB") == 0.0  # another base has a budget of its own
    clock.now += 1.0
    assert [await second.try_acquire("appA") for _ in range(6)] == [0.0] * 5 + [1.0]


async def test_two_limiters_waiting_take_turns_in_one_budget(redis_client: aioredis.Redis) -> None:
    clock = VirtualClock()
    first, second = (
        RedisRateLimiter(redis_client, "airtable", limit=5, window=1.0, clock=clock, sleep=clock.sleep)
        for _ in range(2)
    )
    granted: list[tuple[str, float]] = []
    for _ in range(10):
        for name, limiter in (("first", first), ("second", second)):
            await limiter.acquire("appA")
            granted.append((name, clock.now))
    # Five grants a (virtual) second between the two of them, whoever asks.
    assert [when for _, when in granted] == [1000.0] * 5 + [1001.0] * 5 + [1002.0] * 5 + [1003.0] * 5
    assert [name for name, _ in granted] == ["first", "second"] * 10


async def test_limiter_on_redis_time(redis_client: aioredis.Redis) -> None:
    limiter = RedisRateLimiter(redis_client, "airtable", limit=2, window=3600.0)
    assert [await limiter.try_acquire("appA") > 0 for _ in range(3)] == [False, False, True]
