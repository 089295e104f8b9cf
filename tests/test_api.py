"""The HTTP API, run through the real app factory and lifespan against real Redis and a real ledger."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette

from booking.ledger.database import head_revision
from tests.conftest import FrozenClock, running_app
from voice_server.settings import Settings

TOKEN = "test-admin-token-0123456789"  # as in the app_settings fixture
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def app(app_settings: Settings, clock: FrozenClock) -> AsyncIterator[Starlette]:
    async with running_app(app_settings, clock) as (application, _):
        yield application


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://voicebook.test", headers=AUTH) as http:
        yield http


def booking_body(start: str = "2026-12-01T10:00", **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "service": "checkup",
        "resource": "dr-lee",
        "start": start,
        "customer": {"phone": "(212) 555-0142", "name": "Alice Rivera"},
    }
    body.update(extra)
    return body


async def count_bookings(app: Starlette) -> int:
    count: int = await app.state.components.bookings.ledger.count_bookings(active_only=False)
    return count


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["redis"]["ok"] and checks["database"]["ok"]
    assert checks["database"]["revision"] == head_revision()


async def test_readiness_fails_when_redis_stops_answering(app: Starlette, client: httpx.AsyncClient) -> None:
    components = app.state.components
    dead = aioredis.Redis(unix_socket_path="/nonexistent/voicebook.sock")
    app.state.components = dataclasses.replace(components, redis=dead)
    try:
        response = await client.get("/readyz")
    finally:
        app.state.components = components
        await dead.aclose()
    assert response.status_code == 503
    assert response.json()["checks"]["redis"]["ok"] is False


async def test_the_api_requires_the_admin_token(client: httpx.AsyncClient) -> None:
    anonymous = await client.get("/api/bookings?phone=2125550142", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    wrong = await client.get("/api/bookings?phone=2125550142", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


async def test_availability_for_a_day_in_the_callers_zone(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/api/availability",
        params={"service": "checkup", "date": "2026-12-01", "resource": "dr-lee", "tz": "Europe/London"},
    )
    assert response.status_code == 200
    slots = response.json()["slots"]
    assert slots, "Dr. Lee works Tuesday"
    # 1 December in London runs 00:00Z-24:00Z; Dr. Lee opens 08:30 New York = 13:30Z.
    assert slots[0]["start"] == "2026-12-01T13:30:00Z"
    assert slots[0]["start_local"] == "2026-12-01T08:30:00-05:00"
    assert slots[0]["start_caller"] == "2026-12-01T13:30:00+00:00"


async def test_create_replay_and_reuse_of_an_idempotency_key(app: Starlette, client: httpx.AsyncClient) -> None:
    created = await client.post("/api/bookings", json=booking_body(), headers={"Idempotency-Key": "call-7:tool-2"})
    assert created.status_code == 201, created.text
    booking = created.json()
    assert booking["start"] == "2026-12-01T15:00:00Z" and booking["status"] == "confirmed"
    assert created.headers["location"] == f"/api/bookings/{booking['id']}"
    replay = await client.post("/api/bookings", json=booking_body(), headers={"Idempotency-Key": "call-7:tool-2"})
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == booking["id"]
    reused = await client.post(
        "/api/bookings", json=booking_body("2026-12-01T11:00"), headers={"Idempotency-Key": "call-7:tool-2"}
    )
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    assert await count_bookings(app) == 1


async def test_conflict_is_a_409_with_alternatives(app: Starlette, client: httpx.AsyncClient) -> None:
    assert (await client.post("/api/bookings", json=booking_body())).status_code == 201
    clash = await client.post("/api/bookings", json=booking_body(customer={"phone": "+16465550199"}))
    assert clash.status_code == 409
    assert clash.headers["content-type"] == "application/problem+json"
    problem = clash.json()
    assert problem["type"] == "urn:voicebook:problem:slot-unavailable" and problem["status"] == 409
    assert problem["alternatives"] and all(a["start"] != "2026-12-01T15:00:00Z" for a in problem["alternatives"])
    assert await count_bookings(app) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (booking_body(service="massage"), "unknown_service"),
        (booking_body("2026-12-06T10:00"), "outside_hours"),
        (booking_body("2026-11-29T10:00"), "in_the_past"),
        (booking_body("not a time"), "invalid_time"),
        (booking_body(customer={"phone": "123456"}), "invalid_phone"),
        ({"service": "checkup"}, "invalid_body"),
        (booking_body(time_zone="Mars/Olympus"), "unknown_time_zone"),
        (booking_body(rrule="FREQ=WEEKLY"), "invalid_rrule"),
    ],
)
async def test_invalid_input_is_a_422_with_the_reason(
    app: Starlette, client: httpx.AsyncClient, body: dict[str, object], code: str
) -> None:
    response = await client.post("/api/bookings", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert await count_bookings(app) == 0


async def test_local_times_across_dst(clock: FrozenClock, client: httpx.AsyncClient) -> None:
    clock.now = datetime(2027, 3, 1, 12, tzinfo=UTC)
    gap = await client.post("/api/bookings", json=booking_body("2027-03-14T02:30"))
    assert gap.status_code == 422 and gap.json()["code"] == "nonexistent_local_time"
    assert "02:30" in gap.json()["detail"] and "03:00" in gap.json()["detail"]
    after_jump = await client.post("/api/bookings", json=booking_body("2027-03-15T10:00"))
    assert after_jump.status_code == 201 and after_jump.json()["start"] == "2027-03-15T14:00:00Z"


async def test_a_repeated_local_time_is_disambiguated_by_fold(clock: FrozenClock, client: httpx.AsyncClient) -> None:
    clock.now = datetime(2027, 10, 20, 12, tzinfo=UTC)
    first = await client.post("/api/bookings", json=booking_body("2027-11-07T01:30", fold=0))
    second = await client.post("/api/bookings", json=booking_body("2027-11-07T01:30", fold=1))
    # The clinic is closed at 01:30 either way; the reason names which 01:30 was meant.
    assert "2027-11-07T01:30-04:00" in first.json()["detail"]
    assert "2027-11-07T01:30-05:00" in second.json()["detail"]


async def test_malformed_oversized_and_wrongly_typed_bodies(client: httpx.AsyncClient) -> None:
    malformed = await client.post(
        "/api/bookings", content=b'{"service": ', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and malformed.json()["code"] == "malformed_json"
    huge = await client.post(
        "/api/bookings", content=b'{"notes": "' + b"x" * 70_000 + b'"}', headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413
    form = await client.post(
        "/api/bookings", content=b"service=checkup", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert form.status_code == 415


async def test_read_reschedule_and_cancel(client: httpx.AsyncClient) -> None:
    booking = (await client.post("/api/bookings", json=booking_body())).json()
    url = f"/api/bookings/{booking['id']}"
    read = await client.get(url)
    assert read.status_code == 200 and read.headers["etag"] == '"1"'
    assert [event["kind"] for event in read.json()["history"]] == ["created"]
    moved = await client.patch(url, json={"start": "2026-12-02T09:00"}, headers={"If-Match": '"1"'})
    assert moved.status_code == 200, moved.text
    assert moved.json()["start"] == "2026-12-02T14:00:00Z" and moved.json()["version"] == 2
    stale = await client.patch(url, json={"start": "2026-12-02T10:00"}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    listed = await client.get("/api/bookings", params={"phone": "+1 212 555 0142"})
    assert [b["id"] for b in listed.json()["bookings"]] == [booking["id"]]
    cancelled = await client.delete(url, params={"reason": "feeling better"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = await client.delete(url)
    assert again.status_code == 409 and again.json()["code"] == "invalid_transition"
    assert (await client.get("/api/bookings/does-not-exist")).status_code == 404


async def test_hold_then_book_with_its_token(client: httpx.AsyncClient) -> None:
    held = await client.post(
        "/api/holds", json={"service": "checkup", "resource": "dr-lee", "start": "2026-12-01T10:00"}
    )
    assert held.status_code == 201
    token = held.json()["token"]
    rival = await client.post("/api/bookings", json=booking_body(customer={"phone": "+16465550199"}))
    assert rival.status_code == 409
    mine = await client.post("/api/bookings", json=booking_body(hold_token=token))
    assert mine.status_code == 201
    assert (await client.delete(f"/api/holds/{token}")).status_code == 404


async def test_recurring_series_through_the_api(app: Starlette, client: httpx.AsyncClient) -> None:
    series = await client.post("/api/bookings", json=booking_body(rrule="FREQ=WEEKLY;COUNT=3"))
    assert series.status_code == 201
    assert len(series.json()["bookings"]) == 3
    clash = await client.post(
        "/api/bookings",
        json=booking_body("2026-12-08T10:00", customer={"phone": "+16465550199"}, rrule="FREQ=DAILY;COUNT=2"),
    )
    assert clash.status_code == 409
    assert [c["local"] for c in clash.json()["conflicts"]] == ["2026-12-08T10:00"]
    assert await count_bookings(app) == 3


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    wrong = await client.put("/api/bookings")
    assert wrong.status_code == 405


async def test_reindex_rebuilds_from_the_ledger(client: httpx.AsyncClient, redis_client: aioredis.Redis) -> None:
    await client.post("/api/bookings", json=booking_body())
    await redis_client.flushdb()
    rebuilt = await client.post("/api/admin/reindex")
    assert rebuilt.status_code == 200 and rebuilt.json()["rebuilt"]["dr-lee"] == 1
