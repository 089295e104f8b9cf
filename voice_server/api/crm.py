"""The CRM API (admin token): disagreements the two-way sync found between the ledger and Airtable.

``GET /api/crm/conflicts`` lists the unresolved ones (``?all=true`` every one); ``POST
/api/crm/conflicts/{id}/resolve`` marks one dealt with. The sync already applied the winner (last
writer wins); these are what an operator should look at, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from booking.ledger.api_token_repository import Role
from booking.ledger.crm_repository import Conflict, CrmLedger
from voice_server.api.bookings import endpoint
from voice_server.api.responses import JSONResponse, problem
from voice_server.components import Components


def render_conflict(conflict: Conflict) -> dict[str, Any]:
    body = dataclasses.asdict(conflict)
    for name, value in body.items():
        if hasattr(value, "isoformat"):
            body[name] = value.isoformat()
        elif hasattr(value, "value"):
            body[name] = value.value
    return body


async def list_conflicts(request: Request, components: Components) -> Response:
    every = request.query_params.get("all", "").lower() in ("1", "true", "yes")
    conflicts = await CrmLedger(components.database, clock=components.clock).conflicts(unresolved_only=not every)
    return JSONResponse({"conflicts": [render_conflict(conflict) for conflict in conflicts]})


async def resolve_conflict(request: Request, components: Components) -> Response:
    raw = request.path_params["conflict_id"]
    if not raw.isdigit():
        return problem(404, "conflict_not_found", "Conflict not found", f"no conflict {raw}")
    resolved = await CrmLedger(components.database, clock=components.clock).resolve(int(raw))
    if resolved is None:
        return problem(404, "conflict_not_found", "Conflict not found", f"no conflict {raw}")
    return JSONResponse(render_conflict(resolved))


routes = [
    # Operators: a conflict's values can be a booking's notes, free text a viewer may not read.
    Route("/api/crm/conflicts", endpoint(list_conflicts, Role.OPERATOR), methods=["GET"]),
    Route("/api/crm/conflicts/{conflict_id}/resolve", endpoint(resolve_conflict, Role.OPERATOR), methods=["POST"]),
]
