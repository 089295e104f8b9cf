"""Dead letters: an effect that failed for good is listed, shown (phone masked), retried back into the
queue or discarded, through the admin API and through ``voicebook dlq``; ``voicebook worker`` runs
effects as a process of its own and stops cleanly on SIGTERM.

Effects die the real way: a booking made through the app enqueues them, and a worker's claim followed
by a permanent :class:`EffectFailed` sends one to the dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette

from booking.errors import EffectFailed
from booking.ledger.database import Database
from booking.outbox import Effect, EffectStatus, Outbox
from tests.conftest import TEST_PII_ENV, FrozenClock, running_app
from voice_server import dlq_cli
from voice_server.cli import main
from voice_server.settings import Settings

BOOKING = {"service": "checkup", "start": "2026-12-01T10:00", "customer": {"phone": "(212) 555-0142", "name": "Alice"}}


def admin(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_token}"}


async def kill_calendar_create(
    app: Starlette, client: httpx.AsyncClient, settings: Settings, clock: FrozenClock
) -> Effect:
    """Book through the API, then claim the booking's calendar event as a worker would and fail it for good."""
    response = await client.post("/api/bookings", json=BOOKING, headers=admin(settings) | {"Idempotency-Key": "dlq-1"})
    assert response.status_code == 201, response.text
    outbox = Outbox(app.state.components.database, clock=clock)
    [claimed] = await outbox.claim("test-worker", ["calendar.create"], limit=1, lease=timedelta(minutes=2))
    outcome = await outbox.fail(claimed, EffectFailed("calendar not found", permanent=True))
    assert outcome is EffectStatus.DEAD
    dead = await outbox.get(claimed.id)
    assert dead is not None
    return dead


async def kill_again(app: Starlette, effect: Effect, clock: FrozenClock) -> None:
    """Fail a retried effect for good once more (the test's clock first brought up to its due time)."""
    outbox = Outbox(app.state.components.database, clock=clock)
    pending = await outbox.get(effect.id)
    assert pending is not None and pending.status is EffectStatus.PENDING
    clock.now = max(clock.now, pending.due_at)
    [claimed] = await outbox.claim("test-worker", [effect.kind], limit=1, lease=timedelta(minutes=2))
    assert claimed.id == effect.id
    assert await outbox.fail(claimed, EffectFailed("still no calendar", permanent=True)) is EffectStatus.DEAD


@contextlib.asynccontextmanager
async def app_without_workers(
    settings: Settings, clock: FrozenClock
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient, Settings]]:
    # No in-app worker: the test, not a worker, decides what happens to each effect.
    quiet = dataclasses.replace(settings, run_workers=False)
    async with running_app(quiet, clock) as (app, client):
        yield app, client, quiet


async def test_api_lists_shows_and_discards_dead_effects(app_settings: Settings, clock: FrozenClock) -> None:
    async with app_without_workers(app_settings, clock) as (app, client, settings):
        dead = await kill_calendar_create(app, client, settings, clock)

        listed = await client.get("/api/admin/effects/dead", headers=admin(settings))
        assert listed.status_code == 200
        [entry] = listed.json()["effects"]
        assert entry["id"] == dead.id and entry["status"] == "dead" and entry["kind"] == "calendar.create"
        assert "calendar not found" in entry["last_error"]
        assert "payload" not in entry  # the list carries no customer details

        shown = await client.get(f"/api/admin/effects/{dead.id}", headers=admin(settings))
        assert shown.status_code == 200
        customer = shown.json()["payload"]["customer"]
        assert customer["phone"].endswith("0142")
        assert "555" not in customer["phone"] and "212" not in customer["phone"]
        assert dead.payload["customer"]["phone"].endswith("2125550142")  # the ledger keeps the real number

        depth = await client.get("/api/admin/effects/depth", headers=admin(settings))
        assert depth.status_code == 200
        assert "calendar.create" not in depth.json()["pending_due"]  # dead is not queued
        retried = await client.post(f"/api/admin/effects/{dead.id}/retry", headers=admin(settings))
        assert retried.status_code == 200, retried.text
        assert retried.json()["status"] == "pending" and retried.json()["attempts"] == 0
        assert "payload" not in retried.json()
        # A retry is due at once (by the wall clock, which the depth endpoint counts by).
        depth = await client.get("/api/admin/effects/depth", headers=admin(settings))
        assert depth.json()["pending_due"]["calendar.create"] == 1
        listed = await client.get("/api/admin/effects/dead", headers=admin(settings))
        assert listed.json()["effects"] == []

        await kill_again(app, dead, clock)
        empty_note = await client.post(f"/api/admin/effects/{dead.id}/discard", json={}, headers=admin(settings))
        assert empty_note.status_code == 422
        discarded = await client.post(
            f"/api/admin/effects/{dead.id}/discard",
            json={"note": "calendar deleted by the clinic"},
            headers=admin(settings),
        )
        assert discarded.status_code == 200, discarded.text
        assert discarded.json()["status"] == "cancelled"
        assert "discarded: calendar deleted by the clinic" in discarded.json()["last_error"]

        again = await client.post(
            f"/api/admin/effects/{dead.id}/discard", json={"note": "twice"}, headers=admin(settings)
        )
        assert again.status_code == 409
        assert again.headers["content-type"] == "application/problem+json"
        assert again.json()["code"] == "effect_not_dead" and again.json()["effect_status"] == "cancelled"
        listed = await client.get("/api/admin/effects/dead", headers=admin(settings))
        assert listed.json()["effects"] == []


async def test_api_refuses_what_is_not_a_dead_letter(app_settings: Settings, clock: FrozenClock) -> None:
    async with app_without_workers(app_settings, clock) as (app, client, settings):
        dead = await kill_calendar_create(app, client, settings, clock)
        effects = await Outbox(app.state.components.database).for_booking(dead.booking_id)
        pending = next(e for e in effects if e.kind == "sms.confirmation")

        retried = await client.post(f"/api/admin/effects/{pending.id}/retry", headers=admin(settings))
        assert retried.status_code == 409 and retried.json()["effect_status"] == "pending"
        missing = await client.post("/api/admin/effects/999999/retry", headers=admin(settings))
        assert missing.status_code == 404 and missing.json()["code"] == "effect_not_found"
        assert (await client.get("/api/admin/effects/999999", headers=admin(settings))).status_code == 404
        bad_id = await client.get("/api/admin/effects/abc", headers=admin(settings))
        assert bad_id.status_code == 422

        for method, path in [
            ("GET", "/api/admin/effects/dead"),
            ("GET", f"/api/admin/effects/{dead.id}"),
            ("GET", "/api/admin/effects/depth"),
            ("POST", f"/api/admin/effects/{dead.id}/retry"),
            ("POST", f"/api/admin/effects/{dead.id}/discard"),
        ]:
            denied = await client.request(method, path, json={"note": "x"} if "discard" in path else None)
            assert denied.status_code == 401, path
            assert denied.headers["content-type"] == "application/problem+json"
        still = await Outbox(app.state.components.database).get(dead.id)
        assert still is not None and still.status is EffectStatus.DEAD


async def wait_for(outbox: Outbox, effect_id: int, status: EffectStatus, *, tries: int = 500) -> Effect:
    seen: Effect | None = None
    for _ in range(tries):
        seen = await outbox.get(effect_id)
        assert seen is not None
        if seen.status is status:
            return seen
        await asyncio.sleep(0.02)
    assert seen is not None
    raise AssertionError(f"effect {effect_id} stayed {seen.status.value} ({seen.last_error})")


async def test_api_retry_sends_it_back_and_the_servers_worker_runs_it(
    app_settings: Settings, clock: FrozenClock
) -> None:
    async with app_without_workers(app_settings, clock) as (app, client, settings):
        dead = await kill_calendar_create(app, client, settings, clock)
    async with running_app(app_settings, clock) as (app, client):
        retried = await client.post(f"/api/admin/effects/{dead.id}/retry", headers=admin(app_settings))
        assert retried.status_code == 200, retried.text
        body = retried.json()
        assert body["status"] == "pending" and body["attempts"] == 0
        # The retry is due at the wall-clock now; the server's clock is frozen, so bring it there.
        outbox = Outbox(app.state.components.database)
        effect = await outbox.get(dead.id)
        assert effect is not None
        clock.now = max(clock.now, effect.due_at)
        done = await wait_for(outbox, dead.id, EffectStatus.DONE)
    assert done.attempts == 1


async def test_cli_lists_shows_retries_and_discards(
    app_settings: Settings, clock: FrozenClock, redis_client: aioredis.Redis
) -> None:
    async with app_without_workers(app_settings, clock) as (app, client, settings):
        first = await kill_calendar_create(app, client, settings, clock)
        effects = await Outbox(app.state.components.database).for_booking(first.booking_id)
        pending = next(e for e in effects if e.kind == "sms.confirmation")

    out, err = io.StringIO(), io.StringIO()
    assert await dlq_cli.dlq_list(app_settings, limit=10, out=out, err=err) == 0
    header, row = out.getvalue().splitlines()
    assert header.split()[:3] == ["ID", "KIND", "FOR"]
    assert row.split()[:3] == [str(first.id), "calendar.create", first.booking_id]
    assert "EffectFailed: calendar not found" in row

    out = io.StringIO()
    assert await dlq_cli.dlq_show(app_settings, first.id, out=out) == 0
    shown: dict[str, Any] = json.loads(out.getvalue())
    assert shown["status"] == "dead" and shown["payload"]["customer"]["phone"].endswith("0142")
    assert "555" not in shown["payload"]["customer"]["phone"]
    err = io.StringIO()
    assert await dlq_cli.dlq_show(app_settings, 999999, err=err) == 1
    assert "no effect 999999" in err.getvalue()

    err = io.StringIO()
    assert await dlq_cli.dlq_retry(app_settings, pending.id, err=err) == 1
    assert "is pending, not dead" in err.getvalue()

    # With a shared Redis the retry wakes the workers on the server's channel.
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(app_settings.effects_channel)
    try:
        out = io.StringIO()
        assert await dlq_cli.dlq_retry(app_settings, first.id, out=out) == 0
        assert "workers notified" in out.getvalue()
        message = None
        for _ in range(100):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if message is not None:
                break
        assert message is not None and message["type"] == "message"
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    out = io.StringIO()
    assert await dlq_cli.dlq_list(app_settings, out=out) == 0
    assert out.getvalue().strip() == "no dead letters"

    # Kill it again and discard it; with the embedded redis there is nobody to notify.
    async with app_without_workers(app_settings, clock) as (app, _client, _settings):
        await kill_again(app, first, clock)
    err = io.StringIO()
    assert await dlq_cli.dlq_discard(app_settings, first.id, "   ", err=err) == 2
    out = io.StringIO()
    assert await dlq_cli.dlq_discard(app_settings, first.id, "calendar retired", out=out) == 0
    assert "discarded" in out.getvalue()
    err = io.StringIO()
    assert await dlq_cli.dlq_discard(app_settings, first.id, "again", err=err) == 1
    assert "is cancelled, not dead" in err.getvalue()
    assert await dlq_cli.dlq_retry(app_settings, first.id, err=io.StringIO()) == 1


async def test_cli_retry_without_shared_redis_leaves_it_to_the_next_poll(
    app_settings: Settings, clock: FrozenClock
) -> None:
    async with app_without_workers(app_settings, clock) as (app, client, settings):
        dead = await kill_calendar_create(app, client, settings, clock)
    out = io.StringIO()
    embedded = dataclasses.replace(app_settings, redis_url=None)
    assert await dlq_cli.dlq_retry(embedded, dead.id, out=out) == 0
    assert "next poll" in out.getvalue()


async def test_cli_refuses_an_unmigrated_ledger(tmp_path: Path, app_settings: Settings) -> None:
    settings = dataclasses.replace(app_settings, database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    err = io.StringIO()
    assert await dlq_cli.dlq_list(settings, err=err) == 2
    assert "voicebook migrate" in err.getvalue()


async def test_worker_refuses_without_redis_url(app_settings: Settings) -> None:
    err = io.StringIO()
    assert await dlq_cli.run_worker(dataclasses.replace(app_settings, redis_url=None), concurrency=2, err=err) == 2
    assert "REDIS_URL is required" in err.getvalue()


def test_worker_command_refuses_without_redis_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("VOICEBOOK_DATA_DIR", str(tmp_path))
    assert main(["worker"]) == 2
    assert "REDIS_URL is required" in capsys.readouterr().err


def test_dlq_command_reports_bad_settings_as_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VOICEBOOK_REDIS_PREFIX", "not an identifier")
    assert main(["dlq", "list"]) == 2
    assert "VOICEBOOK_REDIS_PREFIX" in capsys.readouterr().err


async def test_worker_process_runs_a_retried_effect_and_stops_on_sigterm(
    app_settings: Settings, clock: FrozenClock, tmp_path: Path, database: Database
) -> None:
    async with app_without_workers(app_settings, clock) as (app, client, settings):
        dead = await kill_calendar_create(app, client, settings, clock)
    assert app_settings.database_url is not None and app_settings.redis_url is not None
    env = {
        **os.environ,
        "REDIS_URL": app_settings.redis_url,
        "DATABASE_URL": app_settings.database_url,
        "VOICEBOOK_REDIS_PREFIX": app_settings.redis_prefix,
        "VOICEBOOK_DATA_DIR": str(tmp_path),
        "VOICEBOOK_LOG_FORMAT": "console",
        **TEST_PII_ENV,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voice_server.cli",
        "worker",
        "--concurrency",
        "2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        # The worker's clock is the wall clock, and a retry is due at the wall-clock now.
        assert await dlq_cli.dlq_retry(app_settings, dead.id, out=io.StringIO()) == 0
        # A fresh interpreter takes a while to start: allow it up to 30 s.
        done = await wait_for(Outbox(database), dead.id, EffectStatus.DONE, tries=1500)
        assert done.lease_owner is None and done.attempts == 1
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    assert b"worker_stopped" in output


async def test_cli_reports_an_unreachable_ledger_as_a_configuration_error(app_settings: Settings) -> None:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    settings = dataclasses.replace(app_settings, database_url="postgresql://voicebook@127.0.0.1:1/none")
    err = io.StringIO()
    assert await dlq_cli.dlq_show(settings, 1, err=err) == 2
    assert "cannot reach the ledger" in err.getvalue()
