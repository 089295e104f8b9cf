"""Who is calling the admin API, and whether their role allows the route.

Two kinds of bearer token:

* tokens made with ``voicebook tokens create``: a role (viewer, operator, admin) and an optional tenant,
  kept in the ledger as a SHA-256 (booking/ledger/api_token_repository.py);
* ``VOICEBOOK_ADMIN_TOKEN``, the bootstrap token: an admin, so a fresh deployment can be used (and
  tokens made) before any exists.

Lookups are cached in the process for :data:`CACHE_SECONDS`: the booking API is a hot path, and a ledger
read on every request would cost as much as the booking's own. The price is that a revoked token keeps
working for up to that long on a server that saw it recently.

Every refusal (401: no, unknown or revoked token; 403: a role too small for the route) is logged as
``access_denied`` (the token's id, never the token) and appended to the audit log.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from starlette.requests import Request
from starlette.responses import Response

from booking.ledger.api_token_repository import ApiToken, ApiTokenLedger, Role, token_hash
from booking.ledger.audit import AuditAction, append_audit
from voice_server.api.responses import problem
from voice_server.components import Components

log = structlog.get_logger("voicebook.api.auth")

CACHE_SECONDS = 30.0
"""How long a token lookup (found or not) is reused: also how long a revocation may take to bite."""
CACHE_ENTRIES = 1024
BOOTSTRAP_ACTOR = "admin-api"
"""The actor the bootstrap token's actions are audited under (as before tokens had roles)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request."""

    role: Role
    token_id: int | None
    """None for the bootstrap token (``VOICEBOOK_ADMIN_TOKEN``)."""
    name: str
    tenant: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return BOOTSTRAP_ACTOR if self.token_id is None else f"token:{self.token_id}"

    @property
    def sees_pii(self) -> bool:
        """Whether responses show personal data unmasked (operators and admins; viewers see it masked)."""
        return self.role.allows(Role.OPERATOR)


BOOTSTRAP = Principal(Role.ADMIN, None, "VOICEBOOK_ADMIN_TOKEN")


class TokenCache:
    """Token lookups of the last :data:`CACHE_SECONDS`, by the token's hash, at most ``entries`` of them.
    Unknown tokens are cached too, so a client retrying a bad token does not read the ledger each time."""

    def __init__(self, tokens: ApiTokenLedger, *, ttl: float = CACHE_SECONDS, entries: int = CACHE_ENTRIES) -> None:
        self._tokens = tokens
        self._ttl = ttl
        self._entries = entries
        self._found: OrderedDict[str, tuple[float, ApiToken | None]] = OrderedDict()

    async def lookup(self, token: str) -> ApiToken | None:
        key = token_hash(token)
        now = time.monotonic()
        cached = self._found.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._tokens.find(token)
        if found is not None:
            await self._tokens.touch(found.id)  # once per cache period, not per request
        self._found[key] = (now + self._ttl, found)
        self._found.move_to_end(key)
        while len(self._found) > self._entries:
            self._found.popitem(last=False)
        return found

    def forget(self) -> None:
        self._found.clear()


def token_cache(request: Request, components: Components) -> TokenCache:
    """The app's cache, made on first use (it lives as long as the app's state)."""
    cache: TokenCache | None = getattr(request.app.state, "api_token_cache", None)
    if cache is None:
        cache = TokenCache(ApiTokenLedger(components.database, clock=components.clock))
        request.app.state.api_token_cache = cache
    return cache


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


async def _deny(
    request: Request,
    components: Components,
    status: int,
    needs: Role,
    principal: Principal | None,
    why: str,
) -> Response:
    route = request.url.path  # never the query: ?phone= is personal data
    fields = {
        "route": route,
        "method": request.method,
        "role": principal.role.value if principal else None,
        "needed_role": needs.value,
        "token_id": principal.token_id if principal else None,
        "reason": why,
    }
    log.warning("access_denied", status=status, **fields)
    actor = principal.actor if principal else "anonymous"
    await components.database.write(
        lambda conn: append_audit(
            conn,
            at=components.clock(),
            actor=actor,
            action=AuditAction.ACCESS_DENIED,
            subject_kind="api",
            subject_id=f"{request.method} {route}"[:255],
            details={"status": status, **fields},
        )
    )
    if status == 403:
        assert principal is not None
        return problem(
            403,
            "forbidden",
            "Forbidden",
            f"this route needs the {needs.value} role; the token has {principal.role.value}",
        )
    response = problem(401, "unauthorized", "Unauthorized", "a valid admin bearer token is required")
    response.headers["WWW-Authenticate"] = 'Bearer realm="voicebook"'
    return response


async def identify(request: Request, components: Components) -> Principal | None:
    """The caller the request's bearer token names, or None (no token, unknown or revoked)."""
    given = _bearer(request)
    if given is None:
        return None
    bootstrap = components.settings.admin_token
    if bootstrap is not None and hmac.compare_digest(given.encode(), bootstrap.encode()):
        return BOOTSTRAP
    found = await token_cache(request, components).lookup(given)
    if found is None:
        return None
    return Principal(found.role, found.id, found.name, found.tenant)


async def authorize(request: Request, components: Components, needs: Role) -> Principal | Response:
    """The caller when their role allows ``needs``; otherwise the 401 or 403 to send (logged, audited)."""
    principal = await identify(request, components)
    if principal is None:
        why = "no bearer token" if _bearer(request) is None else "unknown or revoked token"
        return await _deny(request, components, 401, needs, None, why)
    if not principal.role.allows(needs):
        return await _deny(request, components, 403, needs, principal, "role too small")
    request.state.principal = principal
    return principal


def principal_of(request: Request) -> Principal:
    """The caller :func:`authorize` let through for this request."""
    principal: Principal = request.state.principal
    return principal
