"""The calls API: a call's record and transcript. While the call is up the transcript is the live one
(what the caller has heard so far and what they said); afterwards it is the one filed in the ledger.
Every read is audited."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from booking.calls import CallRecord
from booking.ledger.api_token_repository import Role
from booking.ledger.reports_repository import AuditAction, ReportLedger
from voice_server.api.auth import principal_of
from voice_server.api.bookings import endpoint
from voice_server.api.masking import MASKED_TEXT, mask_phone
from voice_server.api.responses import JSONResponse, problem
from voice_server.components import Components


def _record(call: CallRecord) -> dict[str, Any]:
    return {
        "call_sid": call.call_sid,
        "from": call.from_number,
        "to": call.to_number,
        "direction": call.direction,
        "status": call.status.value,
        "created_at": call.created_at.isoformat(),
        "ended_at": call.ended_at.isoformat() if call.ended_at else None,
        "duration_seconds": call.duration_seconds,
        "refused_reason": call.refused_reason,
        "stream_sid": call.stream_sid,
        "end_reason": call.end_reason,
    }


async def get_call(request: Request, components: Components) -> Response:
    call_sid = request.path_params["call_sid"]
    call = await components.calls.get_call(call_sid)
    if call is None:
        return problem(404, "call_not_found", "Call not found", f"no call {call_sid}")
    live = next((s for s in components.sessions if s.info.call_sid == call_sid), None)
    turns: list[tuple[str, str, datetime, bool, str | None]]
    if live is not None:
        turns = [(t.role, t.text, t.at, t.truncated, t.tool) for t in live.transcript]
        state = live.state.value
    else:
        turns = [(t.role, t.text, t.at, t.truncated, t.tool) for t in await components.calls.transcript(call_sid)]
        state = None
    # A transcript is personal data: who read it, and when, goes to the audit trail.
    principal = principal_of(request)
    await ReportLedger(components.database, clock=components.clock).record(
        AuditAction.READ,
        "call",
        call_sid,
        principal.actor,
        {"what": "transcript", "live": live is not None} | ({} if principal.sees_pii else {"masked": True}),
    )
    record = _record(call)
    if not principal.sees_pii:  # a viewer: the numbers masked, the words not shown
        record |= {"from": mask_phone(record["from"]), "to": mask_phone(record["to"])}
        turns = [(role, MASKED_TEXT, at, truncated, tool) for role, _, at, truncated, tool in turns]
    body = record | {
        "live": live is not None,
        "state": state,
        "transcript": [
            {"role": role, "text": text, "at": at.isoformat(), "truncated": truncated, "tool": tool}
            for role, text, at, truncated, tool in turns
        ],
    }
    return JSONResponse(body)


routes = [Route("/api/calls/{call_sid}", endpoint(get_call, Role.VIEWER), methods=["GET"])]
