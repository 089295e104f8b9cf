"""The report API (admin token): a call's end-of-call report, its versions and its audit trail.

``GET /api/calls/{sid}/report`` serves the newest version (``?version=N`` an older one); every read is
audited. ``POST /api/calls/{sid}/report`` regenerates it from what the ledger holds now (a new version).
``GET /api/calls/{sid}/report/audit`` lists who generated, edited, exported, read or deleted what, and
the call's effects. ``POST /api/calls/{sid}/triggers/{rule}/approve`` runs a trigger held for review.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from booking.ledger.api_token_repository import Role
from booking.ledger.reports_repository import AuditAction, ReportLedger, StoredReport, pick_version
from booking.outbox import Outbox, RedisNotifier, insert_effects_once
from booking.reports.schema import CallReport, Lifecycle
from voice_server.api.auth import principal_of
from voice_server.api.bookings import BadRequest, endpoint, json_body
from voice_server.api.effects import render_effect
from voice_server.api.masking import mask_report
from voice_server.api.responses import JSONResponse, problem
from voice_server.components import Components
from voice_server.trigger_effects import approved_rows

API_ACTOR = "admin-api"
"""The actor of the bootstrap token (``VOICEBOOK_ADMIN_TOKEN``); other tokens are ``token:<id>``."""


def render_report(stored: StoredReport, *, versions: int, transcript_deleted_at: Any) -> dict[str, Any]:
    return {
        "call_sid": stored.call_sid,
        "version": stored.version,
        "versions": versions,
        "schema_version": stored.schema_version,
        "produced_by": stored.produced_by,
        "reason": stored.reason,
        "created_at": stored.created_at.isoformat(),
        "transcript_deleted_at": transcript_deleted_at.isoformat() if transcript_deleted_at else None,
        "report": stored.body,
    }


def requested_version(request: Request) -> int | None:
    """``?version=N``: None when absent; a 400 when it is not a positive whole number."""
    wanted = request.query_params.get("version")
    if wanted is None:
        return None
    if not wanted.isdigit() or int(wanted) < 1:
        raise BadRequest(400, "invalid_version", "Invalid version", "version must be a positive whole number")
    return int(wanted)


async def get_report(request: Request, components: Components) -> Response:
    call_sid = request.path_params["call_sid"]
    call = await components.calls.get_call(call_sid)
    if call is None:
        return problem(404, "call_not_found", "Call not found", f"no call {call_sid}")
    reports = ReportLedger(components.database, clock=components.clock)
    versions = await reports.versions(call_sid)
    if not versions:
        pending = [e for e in await Outbox(components.database).for_call(call_sid) if e.kind == "report.build"]
        detail = f"call {call_sid} has no report yet" + (
            f" (its build is {pending[0].status.value})" if pending else ""
        )
        return problem(404, "report_not_ready", "Report not ready", detail)
    wanted = requested_version(request)
    chosen = pick_version(versions, wanted)
    if chosen is None:
        return problem(404, "version_not_found", "Version not found", f"no version {wanted} of {call_sid}")
    principal = principal_of(request)
    await reports.record(
        AuditAction.READ,
        "call",
        call_sid,
        principal.actor,
        {"version": chosen.version} | ({} if principal.sees_pii else {"masked": True}),
    )
    body = render_report(chosen, versions=len(versions), transcript_deleted_at=call.transcript_deleted_at)
    if not principal.sees_pii:
        body["report"] = mask_report(body["report"])
    return JSONResponse(body)


async def regenerate_report(request: Request, components: Components) -> Response:
    call_sid = request.path_params["call_sid"]
    if await components.calls.get_call(call_sid) is None:
        return problem(404, "call_not_found", "Call not found", f"no call {call_sid}")
    pipeline = components.reports
    if pipeline is None:
        return problem(503, "reports_unavailable", "Reports unavailable", "this server builds no reports")
    built = await pipeline.regenerate(
        call_sid, actor=principal_of(request).actor, reason="regenerated through the API"
    )
    call = await components.calls.require_call(call_sid)
    versions = len(await pipeline.reports.versions(call_sid))
    body = render_report(built.stored, versions=versions, transcript_deleted_at=call.transcript_deleted_at)
    return JSONResponse(body, status_code=201)


class ReportEdit(BaseModel):
    """A person's corrections to a report (each optional; at least one)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    summary: str | None = Field(default=None, min_length=1, max_length=4000)
    lifecycle: Lifecycle | None = None
    reason: str = Field(default="edited through the API", min_length=1, max_length=500)


async def edit_report(request: Request, components: Components) -> Response:
    call_sid = request.path_params["call_sid"]
    if await components.calls.get_call(call_sid) is None:
        return problem(404, "call_not_found", "Call not found", f"no call {call_sid}")
    pipeline = components.reports
    if pipeline is None:
        return problem(503, "reports_unavailable", "Reports unavailable", "this server builds no reports")
    try:
        edit = ReportEdit.model_validate(await json_body(request))
    except ValidationError as error:
        return problem(422, "invalid_edit", "Invalid edit", "; ".join(e["msg"] for e in error.errors()))
    if edit.summary is None and edit.lifecycle is None:
        return problem(422, "invalid_edit", "Invalid edit", "give a summary or a lifecycle to change")
    built = await pipeline.edit(
        call_sid, actor=principal_of(request).actor, summary=edit.summary, lifecycle=edit.lifecycle, reason=edit.reason
    )
    call = await components.calls.require_call(call_sid)
    versions = len(await pipeline.reports.versions(call_sid))
    return JSONResponse(
        render_report(built.stored, versions=versions, transcript_deleted_at=call.transcript_deleted_at),
        status_code=201,
    )


async def report_audit(request: Request, components: Components) -> Response:
    call_sid = request.path_params["call_sid"]
    if await components.calls.get_call(call_sid) is None:
        return problem(404, "call_not_found", "Call not found", f"no call {call_sid}")
    trail = await ReportLedger(components.database).audit_trail("call", call_sid)
    effects = await Outbox(components.database).for_call(call_sid)
    return JSONResponse(
        {
            "call_sid": call_sid,
            "events": [
                {"at": e.at.isoformat(), "actor": e.actor, "action": e.action.value, "details": e.details}
                for e in trail
            ],
            "effects": [render_effect(effect) for effect in effects],
        }
    )


async def approve_trigger(request: Request, components: Components) -> Response:
    """Run the actions of a trigger that was held for review, for the report's newest version (or
    ``?version=N``). Approving twice enqueues nothing more."""
    call_sid, rule = request.path_params["call_sid"], request.path_params["rule"]
    reports = ReportLedger(components.database, clock=components.clock)
    versions = await reports.versions(call_sid)
    if not versions:
        return problem(404, "report_not_ready", "Report not ready", f"call {call_sid} has no report yet")
    wanted = requested_version(request)
    chosen = pick_version(versions, wanted)
    if chosen is None:
        return problem(404, "version_not_found", "Version not found", f"no version {wanted} of {call_sid}")
    report = CallReport.model_validate(chosen.body)
    now = components.clock()
    rows = approved_rows(report, chosen.version, rule, now, components.business)
    if not rows:
        detail = f"trigger {rule!r} did not fire for version {chosen.version} of {call_sid}'s report"
        return problem(404, "trigger_not_fired", "Trigger not fired", detail)

    def enqueue(conn: Connection) -> int:
        return insert_effects_once(conn, rows)

    added = await components.database.write(enqueue)
    await reports.record(
        AuditAction.APPROVED,
        "call",
        call_sid,
        principal_of(request).actor,
        {"rule": rule, "version": chosen.version, "new": added},
    )
    if added:
        await RedisNotifier(components.redis, components.settings.effects_channel)()
    effects = [e for e in await Outbox(components.database).for_call(call_sid) if e.kind.startswith("trigger.")]
    keys = {row["idempotency_key"] for row in rows}
    return JSONResponse(
        {
            "call_sid": call_sid,
            "rule": rule,
            "version": chosen.version,
            "enqueued": added,
            "effects": [render_effect(e) for e in effects if e.idempotency_key in keys],
        },
        status_code=202,
    )


routes = [
    Route("/api/calls/{call_sid}/report", endpoint(get_report, Role.VIEWER), methods=["GET"]),
    Route("/api/calls/{call_sid}/report", endpoint(regenerate_report, Role.OPERATOR), methods=["POST"]),
    Route("/api/calls/{call_sid}/report", endpoint(edit_report, Role.OPERATOR), methods=["PATCH"]),
    # Operators: the effects listed carry their last errors, which can quote a phone number.
    Route("/api/calls/{call_sid}/report/audit", endpoint(report_audit, Role.OPERATOR), methods=["GET"]),
    Route("/api/calls/{call_sid}/triggers/{rule}/approve", endpoint(approve_trigger, Role.OPERATOR), methods=["POST"]),
]
