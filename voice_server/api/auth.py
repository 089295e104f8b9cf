"""Bearer-token check for the admin API (roles arrive with the security work; one token for now)."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response

from voice_server.api.responses import problem


def admin_denied(request: Request, token: str | None) -> Response | None:
    """None when the request carries the admin token; otherwise the 401 to send."""
    if token is None:
        return problem(
            401, "admin_api_disabled", "Admin API disabled", "set VOICEBOOK_ADMIN_TOKEN to enable the admin API"
        )
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        response = problem(401, "unauthorized", "Unauthorized", "a valid admin bearer token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="voicebook"'
        return response
    return None
