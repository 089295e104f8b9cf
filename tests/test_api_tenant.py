"""Tenants on the admin API's tokens: a token of this server's tenant works as far as its role goes, a
token of another tenant is refused on every route whatever its role (logged and audited with both
tenants), and a token without a tenant (like the bootstrap token) works everywhere; the server's tenant
defaults to the slug of the business's name; ``voicebook tokens create --tenant`` warns of a foreign one."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import structlog
from sqlalchemy import select
from starlette.applications import Starlette

from booking.ledger import schema as t
from booking.ledger.api_token_repository import ApiTokenLedger, Role
from booking.ledger.audit import AuditAction, verify_audit
from booking.ledger.database import Database
from tests.conftest import FrozenClock, running_app
from tests.test_api_roles import CALL, ROUTES, bearer, each_route_by_role, seed
from voice_server import audit_cli
from voice_server.api.auth import business_slug
from voice_server.settings import Settings, SettingsError

TENANT = "clinic-a"
OTHER = "clinic-b"
EXAMPLE_SLUG = "riverside-family-clinic"
"""The example business is "Riverside Family Clinic"."""


@pytest.fixture
async def app(app_settings: Settings, clock: FrozenClock) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    async with running_app(dataclasses.replace(app_settings, tenant=TENANT), clock) as running:
        yield running


async def tenant_tokens(app: Starlette, tenant: str | None) -> dict[Role, str]:
    ledger = ApiTokenLedger(app.state.components.database)
    return {
        role: (await ledger.create(f"{role.value}-{tenant}", role, actor="test", tenant=tenant)).token
        for role in Role
    }


async def test_a_token_of_this_servers_tenant_works_as_far_as_its_role_goes(
    app: tuple[Starlette, httpx.AsyncClient], app_settings: Settings
) -> None:
    application, client = app
    booking_id = await seed(application, client, app_settings)
    # Refused only where the role is too small: the 403 names the role needed, not the tenant.
    await each_route_by_role(client, await tenant_tokens(application, TENANT), booking_id)


async def test_a_token_of_another_tenant_is_refused_at_every_role_and_audited(
    app: tuple[Starlette, httpx.AsyncClient], app_settings: Settings
) -> None:
    application, client = app
    booking_id = await seed(application, client, app_settings)
    tokens = await tenant_tokens(application, OTHER)
    database: Database = application.state.components.database
    ids = {token.role: token.id for token in await ApiTokenLedger(database).list()}
    with structlog.testing.capture_logs() as logs:
        for method, template, body, _needed, _allowed in ROUTES:
            path = template.format(booking=booking_id, call=CALL)
            for role in Role:
                response = await client.request(method, path, json=body, headers=bearer(tokens[role]))
                assert response.status_code == 403, (role, method, path, response.text)
                problem = response.json()
                assert problem["code"] == "forbidden" and "another tenant" in problem["detail"]
                assert OTHER not in response.text and TENANT not in response.text

    attempts = len(ROUTES) * len(Role)
    denied = [entry for entry in logs if entry["event"] == "access_denied"]
    assert len(denied) == attempts
    assert {(d["status"], d["token_tenant"], d["server_tenant"], d["reason"]) for d in denied} == {
        (403, OTHER, TENANT, "token of another tenant")
    }
    assert {d["token_id"] for d in denied} == set(ids.values())
    assert not any(token in repr(logs) for token in tokens.values())

    async with database.reader.connect() as conn:
        entries = (
            await conn.execute(select(t.audit_events).where(t.audit_events.c.action == AuditAction.ACCESS_DENIED.value))
        ).all()
    assert len(entries) == attempts
    assert {e.actor for e in entries} == {f"token:{token_id}" for token_id in ids.values()}
    assert {(e.details["status"], e.details["token_tenant"], e.details["server_tenant"]) for e in entries} == {
        (403, OTHER, TENANT)
    }
    assert (await verify_audit(database)).ok
    # Nothing the refused requests asked for happened: the seeded booking is still booked.
    still = await client.get(f"/api/bookings/{booking_id}", headers=bearer(str(app_settings.admin_token)))
    assert still.json()["status"] == "confirmed", still.text


async def test_tokens_without_a_tenant_and_the_bootstrap_token_work_on_a_tenants_server(
    app: tuple[Starlette, httpx.AsyncClient], app_settings: Settings
) -> None:
    application, client = app
    tokens = await tenant_tokens(application, None)
    for role in Role:
        depth = await client.get("/api/admin/effects/depth", headers=bearer(tokens[role]))
        assert depth.status_code == (200 if role.allows(Role.OPERATOR) else 403), (role, depth.text)
        availability = await client.get(
            "/api/availability?service=checkup&date=2026-12-02", headers=bearer(tokens[role])
        )
        assert availability.status_code == 200, (role, availability.text)
    bootstrap = await client.get("/api/admin/effects/depth", headers=bearer(str(app_settings.admin_token)))
    assert bootstrap.status_code == 200


async def test_without_voicebook_tenant_the_server_serves_its_business_names_slug(
    app_settings: Settings, clock: FrozenClock
) -> None:
    assert app_settings.tenant is None
    async with running_app(app_settings, clock) as (application, client):
        ours = await tenant_tokens(application, EXAMPLE_SLUG)
        theirs = await tenant_tokens(application, "riverside")
        assert (await client.get("/api/admin/effects/depth", headers=bearer(ours[Role.ADMIN]))).status_code == 200
        refused = await client.get("/api/admin/effects/depth", headers=bearer(theirs[Role.ADMIN]))
        assert refused.status_code == 403 and "another tenant" in refused.json()["detail"]


def test_business_slugs() -> None:
    assert business_slug("Riverside Family Clinic") == EXAMPLE_SLUG
    assert business_slug("  Café Ñandú & Sons, Ltd. ") == "cafe-nandu-sons-ltd"
    assert len(business_slug("x " * 100)) <= 64 and not business_slug("x " * 100).endswith("-")
    # A name with no Latin letters or digits still gets an id, the same each time, and not another's.
    assert business_slug("東京歯科").startswith("business-")
    assert business_slug("東京歯科") == business_slug("東京歯科") != business_slug("大阪歯科")


def test_voicebook_tenant_is_read_and_checked() -> None:
    assert Settings.from_env({}).tenant is None
    assert Settings.from_env({"VOICEBOOK_TENANT": "clinic-a"}).tenant == "clinic-a"
    with pytest.raises(SettingsError, match="VOICEBOOK_TENANT: 'two words' is not allowed"):
        Settings.from_env({"VOICEBOOK_TENANT": "two words"})


@pytest.mark.parametrize(
    ("configured", "tenant", "warned"),
    [
        (None, EXAMPLE_SLUG, False),
        (None, "riverside", True),
        (TENANT, TENANT, False),
        (TENANT, EXAMPLE_SLUG, True),
    ],
)
async def test_tokens_create_warns_of_a_tenant_that_is_not_this_servers(
    database: Database, database_url: str, tmp_path: Path, configured: str | None, tenant: str, warned: bool
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=database_url, tenant=configured)
    out, err = io.StringIO(), io.StringIO()
    assert await audit_cli.tokens_create(settings, "front desk", Role.VIEWER, tenant=tenant, out=out, err=err) == 0
    assert ("is not this server's" in err.getvalue()) is warned, err.getvalue()
    assert "keep it now" in out.getvalue()  # made either way: the ledger may serve other tenants' servers
    [stored] = await ApiTokenLedger(database).list()
    assert stored.tenant == tenant
