"""Roles on the admin API's tokens: each role against representative routes (reads, bookings, dead
letters, reports, CRM), unknown and revoked tokens refused, personal data masked for a viewer, every
refusal logged and audited, tokens kept only as hashes; and the ``voicebook tokens`` commands."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import select
from starlette.applications import Starlette

from booking.calls import CallStatus, CallTurn
from booking.ledger import schema as t
from booking.ledger.api_token_repository import ApiTokenLedger, Role, token_hash
from booking.ledger.audit import AuditAction, verify_audit
from booking.ledger.database import Database
from booking.ledger.reports_repository import ReportLedger
from tests.conftest import FrozenClock, running_app
from voice_server import audit_cli
from voice_server.api.auth import TokenCache
from voice_server.api.masking import mask_name, mask_phone
from voice_server.settings import Settings

CALL = "CA" + "7" * 32
PHONE = "+12125550142"
BOOKING = {
    "service": "checkup",
    "start": "2026-12-01T10:00",
    "customer": {"phone": PHONE, "name": "Alice Example", "email": "alice@example.com"},
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def app(app_settings: Settings, clock: FrozenClock) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    async with running_app(app_settings, clock) as running:
        yield running


async def tokens_for(app: Starlette) -> dict[Role, str]:
    ledger = ApiTokenLedger(app.state.components.database)
    return {role: (await ledger.create(f"{role.value}-test", role, actor="test")).token for role in Role}


async def seed(app: Starlette, client: httpx.AsyncClient, settings: Settings) -> str:
    """A booking (made with the bootstrap token) and a finished call with a transcript; the booking's id."""
    made = await client.post(
        "/api/bookings", json=BOOKING, headers=bearer(str(settings.admin_token)) | {"Idempotency-Key": "roles-1"}
    )
    assert made.status_code == 201, made.text
    calls = app.state.components.calls
    await calls.record_call(
        call_sid=CALL,
        account_sid="AC" + "0" * 32,
        from_number=PHONE,
        to_number="+12125550100",
        direction="inbound",
        status=CallStatus.IN_PROGRESS,
    )
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    turns = [CallTurn("caller", "Hi, this is Alice Example, I need a checkup", at), CallTurn("agent", "Sure.", at)]
    await calls.finish_call(CALL, stream_sid="MZ" + "0" * 32, end_reason="hangup", turns=turns)
    # The server's workers build the call's report from the transcript.
    reports = ReportLedger(app.state.components.database)
    for _ in range(500):
        if await reports.versions(CALL):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the call's report was never built")
    booking_id: str = made.json()["id"]
    return booking_id


# (method, path, body, needed role, status when allowed)
ROUTES: list[tuple[str, str, dict[str, Any] | None, Role, int | tuple[int, int]]] = [
    ("GET", "/api/bookings/{booking}", None, Role.VIEWER, 200),
    ("GET", "/api/bookings?phone=%2B12125550142", None, Role.VIEWER, 200),
    ("GET", "/api/availability?service=checkup&date=2026-12-02", None, Role.VIEWER, 200),
    ("GET", "/api/calls/{call}", None, Role.VIEWER, 200),
    ("GET", "/api/calls/{call}/report", None, Role.VIEWER, 200),
    ("POST", "/api/holds", {"service": "checkup", "start": "2026-12-02T11:00"}, Role.OPERATOR, 201),
    # The first allowed role marks the no-show; for the next one it is done already.
    ("PATCH", "/api/bookings/{booking}", {"status": "no_show"}, Role.OPERATOR, (200, 409)),
    ("GET", "/api/admin/effects/dead", None, Role.OPERATOR, 200),
    ("GET", "/api/admin/effects/depth", None, Role.OPERATOR, 200),
    ("GET", "/api/calls/{call}/report/audit", None, Role.OPERATOR, 200),
    ("GET", "/api/crm/conflicts", None, Role.OPERATOR, 200),
    ("POST", "/api/crm/conflicts/999/resolve", None, Role.OPERATOR, 404),  # allowed in: no such conflict
]


async def test_each_role_against_each_kind_of_route(
    app: tuple[Starlette, httpx.AsyncClient], app_settings: Settings
) -> None:
    application, client = app
    booking_id = await seed(application, client, app_settings)
    await each_route_by_role(client, await tokens_for(application), booking_id)


async def each_route_by_role(client: httpx.AsyncClient, tokens: dict[Role, str], booking_id: str) -> None:
    """Every route of :data:`ROUTES` with each role's token: in when the role allows the route, else 403
    for the role (its detail names the role needed)."""
    for method, template, body, needed, allowed_status in ROUTES:
        path = template.format(booking=booking_id, call=CALL)
        for role in Role:
            response = await client.request(method, path, json=body, headers=bearer(tokens[role]))
            allowed = allowed_status if isinstance(allowed_status, tuple) else (allowed_status,)
            expected = allowed if role.allows(needed) else (403,)
            assert response.status_code in expected, (role, method, path, response.text)
            if expected == (403,):
                problem = response.json()
                assert problem["code"] == "forbidden" and needed.value in problem["detail"]


async def test_unknown_missing_and_revoked_tokens_get_401(
    app: tuple[Starlette, httpx.AsyncClient], app_settings: Settings
) -> None:
    application, client = app
    database: Database = application.state.components.database
    ledger = ApiTokenLedger(database)
    assert (await client.get("/api/admin/effects/depth")).status_code == 401
    unknown = await client.get("/api/admin/effects/depth", headers=bearer("vb_not-a-token-at-all"))
    assert unknown.status_code == 401 and unknown.headers["www-authenticate"].startswith("Bearer")

    never_used = await ledger.create("gone", Role.ADMIN, actor="test")
    assert await ledger.revoke(never_used.record.id, actor="test") is not None
    assert (await client.get("/api/admin/effects/depth", headers=bearer(never_used.token))).status_code == 401

    # A token the server has just seen keeps working until its cache entry lapses (CACHE_SECONDS).
    used = await ledger.create("cached", Role.OPERATOR, actor="test")
    assert (await client.get("/api/admin/effects/depth", headers=bearer(used.token))).status_code == 200
    await ledger.revoke(used.record.id, actor="test")
    assert (await client.get("/api/admin/effects/depth", headers=bearer(used.token))).status_code == 200
    cache: TokenCache = application.state.api_token_cache
    cache.forget()  # what the lapse of CACHE_SECONDS does
    assert (await client.get("/api/admin/effects/depth", headers=bearer(used.token))).status_code == 401
    assert (await ledger.get(used.record.id)).last_used_at is not None  # type: ignore[union-attr]
    # The bootstrap token is an admin and needs no row.
    bootstrap = await client.get("/api/admin/effects/depth", headers=bearer(str(app_settings.admin_token)))
    assert bootstrap.status_code == 200


async def test_a_viewer_sees_personal_data_masked_and_an_operator_in_full(
    app: tuple[Starlette, httpx.AsyncClient], app_settings: Settings
) -> None:
    application, client = app
    booking_id = await seed(application, client, app_settings)
    tokens = await tokens_for(application)

    viewer_booking = (await client.get(f"/api/bookings/{booking_id}", headers=bearer(tokens[Role.VIEWER]))).json()
    assert viewer_booking["customer"] == {"phone": "+1******0142", "name": "A. E.", "email": "a***@example.com"}
    listed = await client.get("/api/bookings?phone=%2B12125550142", headers=bearer(tokens[Role.VIEWER]))
    assert [b["customer"]["phone"] for b in listed.json()["bookings"]] == ["+1******0142"]
    viewer_call = (await client.get(f"/api/calls/{CALL}", headers=bearer(tokens[Role.VIEWER]))).json()
    assert viewer_call["from"] == "+1******0142"
    assert [turn["text"] for turn in viewer_call["transcript"]] == ["[masked]", "[masked]"]
    viewer_report = (await client.get(f"/api/calls/{CALL}/report", headers=bearer(tokens[Role.VIEWER]))).json()
    report = viewer_report["report"]
    assert report["caller_number"] == "+1******0142"
    assert {turn["text"] for turn in report["transcript"]} == {"[masked]"}
    assert report["summary"]["value"] == "[masked]"
    seen = str(viewer_booking) + str(viewer_call) + listed.text + str(viewer_report)
    assert "Alice" not in seen and "2125550142" not in seen

    for role in (Role.OPERATOR, Role.ADMIN):
        booking = (await client.get(f"/api/bookings/{booking_id}", headers=bearer(tokens[role]))).json()
        assert booking["customer"] == BOOKING["customer"]
        call = (await client.get(f"/api/calls/{CALL}", headers=bearer(tokens[role]))).json()
        assert call["from"] == PHONE and call["transcript"][0]["text"].startswith("Hi, this is Alice")
        full = (await client.get(f"/api/calls/{CALL}/report", headers=bearer(tokens[role]))).json()["report"]
        assert full["caller_number"] == PHONE and full["transcript"][0]["text"].startswith("Hi, this is Alice")

    # The transcript reads are audited under each token, the viewer's marked as masked.
    database: Database = application.state.components.database
    async with database.reader.connect() as conn:
        reads = (
            await conn.execute(
                select(t.audit_events.c.actor, t.audit_events.c.details).where(
                    t.audit_events.c.action == AuditAction.READ.value, t.audit_events.c.subject_id == CALL
                )
            )
        ).all()
    ledger = ApiTokenLedger(database)
    ids = {token.role: token.id for token in await ledger.list()}
    transcript_reads = [
        (actor, details.get("masked", False)) for actor, details in reads if details.get("what") == "transcript"
    ]
    assert transcript_reads == [
        (f"token:{ids[Role.VIEWER]}", True),
        (f"token:{ids[Role.OPERATOR]}", False),
        (f"token:{ids[Role.ADMIN]}", False),
    ]


def test_masks() -> None:
    assert mask_phone("+12125550123") == "+1******0123"
    assert mask_phone("(212) 555-0142") == "(2**) ***-0142"
    assert mask_name("Mary Ann Smith") == "M. A. S."
    assert mask_name(None) is None


async def test_denied_access_is_logged_and_audited_without_the_token(
    app: tuple[Starlette, httpx.AsyncClient], app_settings: Settings
) -> None:
    application, client = app
    tokens = await tokens_for(application)
    database: Database = application.state.components.database
    viewer_id = next(tok.id for tok in await ApiTokenLedger(database).list() if tok.role is Role.VIEWER)
    with structlog.testing.capture_logs() as logs:
        forbidden = await client.post(
            "/api/bookings", json=BOOKING, headers=bearer(tokens[Role.VIEWER]) | {"Idempotency-Key": "no"}
        )
        unknown = await client.get("/api/admin/effects/dead", headers=bearer("vb_guessed-token-value"))
    assert (forbidden.status_code, unknown.status_code) == (403, 401)
    denied = [entry for entry in logs if entry["event"] == "access_denied"]
    assert [(d["status"], d["route"], d["role"], d["needed_role"], d["token_id"]) for d in denied] == [
        (403, "/api/bookings", "viewer", "operator", viewer_id),
        (401, "/api/admin/effects/dead", None, "operator", None),
    ]
    assert tokens[Role.VIEWER] not in repr(logs) and "vb_guessed-token-value" not in repr(logs)

    async with database.reader.connect() as conn:
        entries = (
            await conn.execute(select(t.audit_events).where(t.audit_events.c.action == AuditAction.ACCESS_DENIED.value))
        ).all()
    assert [(e.actor, e.subject_id, e.details["status"]) for e in entries] == [
        (f"token:{viewer_id}", "POST /api/bookings", 403),
        ("anonymous", "GET /api/admin/effects/dead", 401),
    ]
    assert "vb_" not in repr([dict(e._mapping) for e in entries])
    assert (await verify_audit(database)).ok


async def test_tokens_are_stored_only_as_hashes(app: tuple[Starlette, httpx.AsyncClient]) -> None:
    application, _ = app
    tokens = await tokens_for(application)
    database: Database = application.state.components.database
    dumped: list[str] = []
    async with database.reader.connect() as conn:
        for table in t.metadata.sorted_tables:
            dumped.extend(repr(tuple(row)) for row in await conn.execute(select(table)))
    everything = "\n".join(dumped)
    for token in tokens.values():
        assert token.startswith("vb_") and len(token) > 40
        assert token not in everything and token[3:] not in everything
        assert token_hash(token) in everything


async def test_tokens_commands_create_list_set_role_and_revoke(
    database: Database, database_url: str, tmp_path: Any
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    out = io.StringIO()
    assert await audit_cli.tokens_create(settings, "ops laptop", Role.VIEWER, tenant="clinic-1", out=out) == 0
    printed = out.getvalue()
    token = printed.split("keep it now): ")[1].strip()
    ledger = ApiTokenLedger(database)
    [stored] = await ledger.list()
    assert (await ledger.find(token)) == stored and stored.tenant == "clinic-1"
    assert await audit_cli.tokens_set_role(settings, stored.id, Role.OPERATOR, out=io.StringIO()) == 0
    assert await audit_cli.tokens_revoke(settings, stored.id, out=io.StringIO()) == 0
    err = io.StringIO()
    assert await audit_cli.tokens_revoke(settings, stored.id, err=err) == 1
    assert f"no live token {stored.id}" in err.getvalue()
    out = io.StringIO()
    assert await audit_cli.tokens_list(settings, out=out) == 0
    assert "operator" in out.getvalue() and "revoked" in out.getvalue()
    assert await ledger.find(token) is None
    async with database.reader.connect() as conn:
        changes = (
            await conn.execute(
                select(t.audit_events.c.actor, t.audit_events.c.details).where(
                    t.audit_events.c.action == AuditAction.ROLE_CHANGED.value
                )
            )
        ).all()
    assert [(actor, details["change"], details["role"]) for actor, details in changes] == [
        ("cli", "created", "viewer"),
        ("cli", "role", "operator"),
        ("cli", "revoked", "operator"),
    ]
    assert (await verify_audit(database)).ok
