"""From hang-up to a stored report: the ``report.build`` effect enqueued with the transcript, run by the
outbox worker against a real ledger (SQLite and PostgreSQL) and Redis, the transcript archived in a real
folder, versions and the audit trail, the report API and CLI, and the retention sweep."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from booking.business import Business
from booking.calls import CallStatus, CallTurn
from booking.ledger import schema as t
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from booking.ledger.reports_repository import AuditAction, ReportLedger
from booking.ledger.repository import CustomerDetails
from booking.outbox import EffectKind, EffectStatus, Outbox
from booking.reports.pipeline import HANG_UP, ReportPipeline, open_archived, transcript_key
from booking.reports.schema import CallReport
from booking.reports.vocabulary import BookingAction, Outcome
from booking.retention import sweep
from booking.service import Booked, BookingService, BookRequest
from booking.worker import Worker
from integrations.storage import LocalFolderStorage
from tests.conftest import FrozenClock, running_app
from voice_server.report_cli import report_audit, report_show
from voice_server.report_effects import report_handler
from voice_server.settings import Settings

CALL = "CA" + "7" * 32
CALLER = "+12125550142"
BUSINESS_NUMBER = "+12125550100"


async def ring(database: Database, clock: FrozenClock, call_sid: str = CALL) -> CallLedger:
    calls = CallLedger(database, clock=clock)
    await calls.record_call(
        call_sid=call_sid,
        account_sid="AC" + "0" * 32,
        from_number=CALLER,
        to_number=BUSINESS_NUMBER,
        direction="inbound",
        status=CallStatus.IN_PROGRESS,
    )
    return calls


def turns(at: datetime) -> list[CallTurn]:
    lines = [
        ("agent", "Thank you for calling Riverside Clinic. How can I help you today?", None),
        ("caller", "Hi, I'd like to book a check-up, my number is 212 555 0142.", None),
        ("tool", '{"booked": true}', "book_appointment"),
        ("agent", "You're booked for a check-up on Tuesday at ten. Anything else?", None),
        ("caller", "No, that's great, thank you!", None),
    ]
    return [
        CallTurn(role, text, at + timedelta(seconds=5 * i), tool=tool) for i, (role, text, tool) in enumerate(lines)
    ]


async def hang_up(calls: CallLedger, clock: FrozenClock, call_sid: str = CALL) -> None:
    await calls.finish_call(
        call_sid,
        stream_sid="MZ" + "0" * 32,
        end_reason="caller_hung_up",
        turns=turns(clock()),
        latencies=[{"trigger": "speech", "parts": {"voice_to_voice_server": 0.42, "tool": 0.05}}],
    )


async def book_in_call(service: BookingService, call_sid: str = CALL) -> str:
    outcome = await service.book(
        BookRequest(
            "checkup",
            datetime(2026, 12, 1, 15, 0, tzinfo=UTC),
            CustomerDetails(CALLER, "Alice"),
            source="phone",
            actor=f"call:{call_sid}",
        )
    )
    assert isinstance(outcome, Booked)
    return outcome.booking.id


def run_reports(database: Database, redis_client: object, pipeline: ReportPipeline, clock: FrozenClock) -> Worker:
    return Worker(
        database,
        redis_client,  # type: ignore[arg-type]
        {EffectKind.REPORT_BUILD: report_handler(pipeline)},
        clock=clock,
    )


async def test_hang_up_enqueues_one_report_and_the_worker_stores_it_once(
    database: Database,
    service: BookingService,
    business: Business,
    clock: FrozenClock,
    redis_client: object,
    tmp_path: Path,
) -> None:
    calls = await ring(database, clock)
    booking_id = await book_in_call(service)
    await hang_up(calls, clock)
    await hang_up(calls, clock)  # the stream's end filed twice (a retry): still one report effect
    [effect] = await Outbox(database).for_call(CALL)
    assert (effect.kind, effect.booking_id, effect.call_sid) == ("report.build", None, CALL)
    archive = LocalFolderStorage(tmp_path / "archive")
    pipeline = ReportPipeline(database, business, archive=archive, clock=clock)
    worker = run_reports(database, redis_client, pipeline, clock)
    assert await worker.run_until_idle() == 1
    [stored] = await pipeline.reports.versions(CALL)
    assert (stored.version, stored.reason) == (1, HANG_UP)
    report = CallReport.model_validate(stored.body)
    assert report.outcome.value is Outcome.BOOKED
    assert [(b.booking_id, b.action) for b in report.bookings_touched] == [(booking_id, BookingAction.BOOKED)]
    assert report.turn_latencies is not None and report.turn_latencies[0].parts["voice_to_voice_server"] == 0.42
    assert "555" not in " ".join(turn.text for turn in report.cleaned_transcript.value)  # the number is masked
    call = await calls.require_call(CALL)
    key = transcript_key(call)
    stored = await archive.get(key)
    assert b"transcript" not in stored  # sealed: the archive alone holds no words
    archived = json.loads(open_archived(key, stored))
    assert archived["call_sid"] == CALL and len(archived["transcript"]) == 5
    # The effect run again (a worker died after storing): the hang-up's version is found, not doubled.
    again = await pipeline.build(CALL)
    assert not again.new and again.stored.version == 1
    assert len(await pipeline.reports.versions(CALL)) == 1
    assert (await Outbox(database).get(effect.id)).status is EffectStatus.DONE  # type: ignore[union-attr]


async def test_regeneration_is_a_new_version_and_every_step_is_audited(
    database: Database, business: Business, clock: FrozenClock
) -> None:
    calls = await ring(database, clock)
    await hang_up(calls, clock)
    pipeline = ReportPipeline(database, business, clock=clock)
    first = await pipeline.build(CALL, latencies=[{"trigger": "dtmf", "parts": {"tool": 0.01}}])
    clock.advance(timedelta(minutes=5))
    second = await pipeline.regenerate(CALL, actor="admin", reason="analyser upgraded")
    assert (first.stored.version, second.stored.version) == (1, 2)
    assert second.report.turn_latencies == first.report.turn_latencies  # measured once, carried over
    versions = await pipeline.reports.versions(CALL)
    assert [v.reason for v in versions] == [HANG_UP, "analyser upgraded"]
    assert versions[0].body == first.stored.body  # the first version is untouched
    trail = await ReportLedger(database).audit_trail("call", CALL)
    assert [(e.action, e.actor, e.details["version"]) for e in trail] == [
        (AuditAction.GENERATED, "worker", 1),
        (AuditAction.GENERATED, "admin", 2),
    ]


async def test_a_follow_up_is_enqueued_with_the_version_and_only_once(
    database: Database, business: Business, clock: FrozenClock
) -> None:
    from voice_server.report_effects import crm_call_row

    calls = await ring(database, clock)
    await hang_up(calls, clock)
    pipeline = ReportPipeline(
        database, business, clock=clock, follow_ups=lambda report, version, now: [crm_call_row(report, version, now)]
    )
    await pipeline.build(CALL)
    await pipeline.build(CALL)  # found: no second follow-up
    await pipeline.regenerate(CALL, actor="admin")  # a new version: its own follow-up
    effects = [e for e in await Outbox(database).for_call(CALL) if e.kind == EffectKind.CRM_CALL]
    assert [e.payload["version"] for e in effects] == [1, 2]
    assert {e.idempotency_key for e in effects} == {f"call:{CALL}:crm.call:v1", f"call:{CALL}:crm.call:v2"}


async def test_retention_removes_old_transcripts_everywhere_and_records_it(
    database: Database, business: Business, clock: FrozenClock, tmp_path: Path
) -> None:
    archive = LocalFolderStorage(tmp_path / "archive")
    calls = await ring(database, clock)
    await hang_up(calls, clock)
    pipeline = ReportPipeline(database, business, archive=archive, clock=clock)
    await pipeline.build(CALL)
    recent = "CA" + "8" * 32
    clock.advance(timedelta(days=40))
    await ring(database, clock, recent)
    await hang_up(calls, clock, recent)
    await pipeline.build(recent)
    # A file's age is its mtime: set each to when its call was archived on the test's clock.
    for call_sid, archived_at in ((CALL, clock() - timedelta(days=40)), (recent, clock())):
        path = archive.root / transcript_key(await calls.require_call(call_sid))
        os.utime(path, (archived_at.timestamp(), archived_at.timestamp()))
    now = clock()
    result = await sweep(database, archive, now - timedelta(days=30), now=now)
    assert result.calls_purged == [CALL]
    assert [key.rsplit("/", 1)[-1] for key in result.objects_deleted] == [f"{CALL}.json"]
    assert await calls.transcript(CALL) == [] and len(await calls.transcript(recent)) == 5
    [old_version] = await pipeline.reports.versions(CALL)
    kept = CallReport.model_validate(old_version.body)
    assert kept.transcript == () and kept.cleaned_transcript.value == ()
    assert kept.outcome.value is not None and kept.summary.value  # the rest of the report stays
    assert (await calls.require_call(CALL)).transcript_deleted_at == now
    trail = await ReportLedger(database).audit_trail("call", CALL)
    assert trail[-1].action is AuditAction.DELETED and trail[-1].details["turns"] == 5
    again = await sweep(database, archive, now - timedelta(days=30), now=now)
    assert again.calls_purged == [] and again.objects_deleted == []


def admin(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_token}"}


async def test_the_report_api_serves_versions_to_admins_and_audits_reads(
    app_settings: Settings, clock: FrozenClock
) -> None:
    settings = dataclasses.replace(app_settings, retention_days=0)
    async with running_app(settings, clock) as (app, client):
        database = app.state.components.database
        calls = await ring(database, clock)
        missing = await client.get(f"/api/calls/{CALL}/report", headers=admin(settings))
        assert missing.status_code == 404 and missing.json()["code"] == "report_not_ready"
        await hang_up(calls, clock)
        body = await _wait_for_report(client, settings)
        assert body["version"] == 1 and body["report"]["call_sid"] == CALL and body["reason"] == HANG_UP
        assert (await client.get(f"/api/calls/{CALL}/report")).status_code == 401
        assert (await client.get("/api/calls/CAnope/report", headers=admin(settings))).status_code == 404
        created = await client.post(f"/api/calls/{CALL}/report", headers=admin(settings))
        assert created.status_code == 201 and created.json()["version"] == 2
        older = await client.get(f"/api/calls/{CALL}/report?version=1", headers=admin(settings))
        assert older.json()["version"] == 1 and older.json()["versions"] == 2
        bad = await client.get(f"/api/calls/{CALL}/report?version=x", headers=admin(settings))
        assert bad.status_code == 400
        transcript = await client.get(f"/api/calls/{CALL}", headers=admin(settings))
        assert transcript.status_code == 200 and len(transcript.json()["transcript"]) == 5
        audit = (await client.get(f"/api/calls/{CALL}/report/audit", headers=admin(settings))).json()
        assert {"what": "transcript", "live": False} in [e["details"] for e in audit["events"]]
        actions = [(e["action"], e["actor"]) for e in audit["events"]]
        assert ("generated", "worker") in actions and ("generated", "admin-api") in actions
        assert actions.count(("read", "admin-api")) >= 2
        assert [e["kind"] for e in audit["effects"]] == ["report.build"]
        out, err = io.StringIO(), io.StringIO()
        assert await report_show(settings, CALL, out=out, err=err) == 0
        assert json.loads(out.getvalue())["version"] == 2
        assert await report_show(settings, CALL, version=9, out=io.StringIO(), err=err) == 1
        assert "no version 9" in err.getvalue()
        assert await report_show(settings, "CAnope", out=io.StringIO(), err=io.StringIO()) == 1
        trail = io.StringIO()
        assert await report_audit(settings, CALL, out=trail, err=io.StringIO()) == 0
        assert "read" in trail.getvalue() and "cli" in trail.getvalue()


async def _wait_for_report(client: httpx.AsyncClient, settings: Settings) -> dict[str, object]:
    for _ in range(300):
        response = await client.get(f"/api/calls/{CALL}/report", headers=admin(settings))
        if response.status_code == 200:
            body: dict[str, object] = response.json()
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"no report: {response.text}")


async def test_effects_of_calls_and_of_nothing_survive_the_migration(database: Database) -> None:
    # booking_id is optional now; call_sid is its own column with an index.
    async with database.reader.connect() as conn:
        rows = (await conn.execute(select(t.effects.c.call_sid).limit(1))).all()
    assert rows == []


@pytest.mark.parametrize("days", [0])
def test_retention_can_be_switched_off(app_settings: Settings, days: int) -> None:
    from voice_server.effect_workers import housekeeping

    settings = dataclasses.replace(app_settings, retention_days=days)
    schedules = housekeeping(settings, None, None, clock=lambda: datetime.now(UTC), crm=False)  # type: ignore[arg-type]
    assert schedules == []


async def test_a_trigger_held_for_review_runs_only_once_approved(
    app_settings: Settings, clock: FrozenClock, tmp_path: Path
) -> None:
    from booking.business import EXAMPLE_BUSINESS_FILE

    rules = tmp_path / "clinic.toml"
    rules.write_text(
        EXAMPLE_BUSINESS_FILE.read_text()
        + '\n[[crm.triggers]]\nname = "every-booking"\nwhen = ["outcome:booked"]\nactions = ["follow_up"]\n'
        + "review = true\n"
    )
    settings = dataclasses.replace(app_settings, business_file=rules, retention_days=0)
    async with running_app(settings, clock) as (app, client):
        components = app.state.components
        calls = await ring(components.database, clock)
        await book_in_call(components.bookings)
        await hang_up(calls, clock)
        await _wait_for_report(client, settings)
        outbox = Outbox(components.database)

        async def triggers() -> list[tuple[str, str]]:
            return sorted((e.kind, e.status.value) for e in await outbox.for_call(CALL) if e.kind.startswith("trigger"))

        for _ in range(300):  # the review request is filed by the server's worker
            if await triggers() == [("trigger.review", "done")]:
                break
            await asyncio.sleep(0.02)
        assert await triggers() == [("trigger.review", "done")]  # held: no follow-up yet
        url = f"/api/calls/{CALL}/triggers/every-booking/approve"
        approved = await client.post(url, headers=admin(settings))
        assert approved.status_code == 202 and approved.json()["enqueued"] == 1
        again = await client.post(url, headers=admin(settings))
        assert again.status_code == 202 and again.json()["enqueued"] == 0
        for _ in range(300):
            if ("trigger.follow_up", "done") in await triggers():
                break
            await asyncio.sleep(0.02)
        assert await triggers() == [("trigger.follow_up", "done"), ("trigger.review", "done")]
        missing = await client.post(f"/api/calls/{CALL}/triggers/no-such-rule/approve", headers=admin(settings))
        assert missing.status_code == 404 and missing.json()["code"] == "trigger_not_fired"
        trail = await ReportLedger(components.database).audit_trail("call", CALL)
        assert [e.details["new"] for e in trail if e.action is AuditAction.APPROVED] == [1, 0]


async def test_an_operator_edit_is_a_new_version_that_says_who_changed_what(
    app_settings: Settings, clock: FrozenClock
) -> None:
    settings = dataclasses.replace(app_settings, retention_days=0)
    async with running_app(settings, clock) as (app, client):
        calls = await ring(app.state.components.database, clock)
        await hang_up(calls, clock)
        await _wait_for_report(client, settings)
        url = f"/api/calls/{CALL}/report"
        edited = await client.patch(
            url,
            headers=admin(settings),
            json={"summary": "Wants a call back about billing.", "lifecycle": {"stage": "nurture", "reason": "asked"}},
        )
        assert edited.status_code == 201, edited.text
        body = edited.json()
        assert body["version"] == 2 and body["reason"] == "edited through the API"
        summary = body["report"]["summary"]
        assert summary["value"] == "Wants a call back about billing." and summary["confidence"] == 1.0
        assert summary["provenance"]["component"] == "operator:admin-api"
        assert body["report"]["lifecycle"]["value"]["stage"] == "nurture"
        first = (await client.get(f"{url}?version=1", headers=admin(settings))).json()
        assert first["report"]["summary"]["provenance"]["component"] != "operator:admin-api"  # untouched
        for bad in ({}, {"summary": ""}, {"lifecycle": {"stage": "famous", "reason": "x"}}, {"colour": "red"}):
            refused = await client.patch(url, headers=admin(settings), json=bad)
            assert refused.status_code == 422, bad
        trail = await ReportLedger(app.state.components.database).audit_trail("call", CALL)
        assert [(e.action, e.details["version"]) for e in trail if e.action is AuditAction.EDITED] == [
            (AuditAction.EDITED, 2)
        ]


async def test_crm_conflicts_are_listed_and_resolved_through_the_api_and_cli(
    app_settings: Settings, clock: FrozenClock
) -> None:
    from booking.ledger.crm_repository import ConflictReason, CrmLedger, NewConflict, Winner
    from voice_server.report_cli import crm_conflicts

    async with running_app(app_settings, clock) as (app, client):
        store = CrmLedger(app.state.components.database, clock=clock)
        conflict = NewConflict(
            booking_id=None,
            record_id="recA1",
            field="booking",
            ledger_value=None,
            airtable_value="bk_unknown",
            ledger_at=None,
            airtable_at=clock(),
            winner=Winner.NEITHER,
            reason=ConflictReason.UNKNOWN_BOOKING,
        )
        [recorded] = await store.finish_pull("airtable.appointments", [conflict], watermark=clock())
        listed = (await client.get("/api/crm/conflicts", headers=admin(app_settings))).json()["conflicts"]
        assert [(c["id"], c["record_id"], c["winner"]) for c in listed] == [(recorded.id, "recA1", "neither")]
        out = io.StringIO()
        assert await crm_conflicts(app_settings, out=out, err=io.StringIO()) == 0
        assert json.loads(out.getvalue())[0]["reason"] == recorded.reason.value
        resolved = await client.post(f"/api/crm/conflicts/{recorded.id}/resolve", headers=admin(app_settings))
        assert resolved.status_code == 200 and resolved.json()["resolved_at"] is not None
        assert (await client.get("/api/crm/conflicts", headers=admin(app_settings))).json()["conflicts"] == []
        assert (
            len((await client.get("/api/crm/conflicts?all=true", headers=admin(app_settings))).json()["conflicts"]) == 1
        )
        missing = await client.post("/api/crm/conflicts/999/resolve", headers=admin(app_settings))
        assert missing.status_code == 404
