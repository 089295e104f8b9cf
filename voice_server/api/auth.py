"""Who is calling the admin API, and whether their role allows the route.

Two kinds of bearer token:

* tokens made with ``voicebook tokens create``: a role (viewer, operator, admin) and an optional tenant,
  kept in the ledger as a SHA-256 (booking/ledger/api_token_repository.py);
* ``VOICEBOOK_ADMIN_TOKEN``, the bootstrap token: an admin, so a fresh deployment can be used (and
  tokens made) before any exists.

A server serves one business, its tenant (:func:`server_tenant`). A token made for a tenant opens only
that tenant's servers, whatever its role: one business's staff cannot read another's bookings with a token
that happens to reach its server. A token without a tenant, like the bootstrap token, belongs to whoever
runs the deployment and opens every server.

Lookups are cached in the process for :data:`CACHE_SECONDS`: the booking API is a hot path, and a ledger
read on every request would cost as much as the booking's own. The price is that a revoked token keeps
working for up to that long on a server that saw it recently.

Every refusal (401: no, unknown or revoked token; 403: a role too small for the route, or a token of
another tenant) is logged as ``access_denied`` (the token's id, never the token) and appended to the
audit log.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response

from booking.business import Business
from booking.ledger.api_token_repository import ApiToken, ApiTokenLedger, Role, token_hash
from booking.ledger.audit import AuditAction, append_audit
from voice_server.api.responses import problem
from voice_server.components import Components
from voice_server.settings import Settings

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


def server_tenant(settings: Settings, business: Business) -> str:
    """The tenant this server serves: ``VOICEBOOK_TENANT``, else the slug of the business's name.

    A business has no id of its own (booking/business.py keeps a name, a time zone, a phone number), and
    its name is what its operator chose to tell it apart, so "Riverside Family Clinic" serves the tenant
    ``riverside-family-clinic``. Renaming the business changes that slug and locks out its tokens: pin
    ``VOICEBOOK_TENANT`` to the old slug before a rename."""
    return settings.tenant or business_slug(business.name)


@functools.cache  # one business per process: computed once, not on every request
def business_slug(name: str) -> str:
    """``name`` as lower-case ASCII letters and digits joined by hyphens, at most 64 characters; accents
    are dropped ("Café Ñandú" is ``cafe-nandu``). A name with none of those characters (written in another
    script) is ``business-`` and 12 hex digits of its SHA-256: still stable, still told apart."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:64].rstrip("-")
    return slug or "business-" + hashlib.sha256(name.encode()).hexdigest()[:12]


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
    *,
    detail: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """Log, audit and answer one refusal. ``detail`` replaces the 403's "role too small" text; ``extra``
    adds fields to the log line and the audit entry."""
    route = request.url.path  # never the query: ?phone= is personal data
    fields: dict[str, Any] = {
        "route": route,
        "method": request.method,
        "role": principal.role.value if principal else None,
        "needed_role": needs.value,
        "token_id": principal.token_id if principal else None,
        "reason": why,
        **(extra or {}),
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
            detail or f"this route needs the {needs.value} role; the token has {principal.role.value}",
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
    """The caller when their token is of this server's tenant (or of none) and their role allows
    ``needs``; otherwise the 401 or 403 to send (logged, audited)."""
    principal = await identify(request, components)
    if principal is None:
        why = "no bearer token" if _bearer(request) is None else "unknown or revoked token"
        return await _deny(request, components, 401, needs, None, why)
    tenant = server_tenant(components.settings, components.business)
    if principal.tenant is not None and principal.tenant != tenant:
        # The response names neither tenant (it would tell a stranger's token whose server this is);
        # the log line and the audit entry carry both.
        return await _deny(
            request,
            components,
            403,
            needs,
            principal,
            "token of another tenant",
            detail="this token belongs to another tenant than this server's",
            extra={"token_tenant": principal.tenant, "server_tenant": tenant},
        )
    if not principal.role.allows(needs):
        return await _deny(request, components, 403, needs, principal, "role too small")
    request.state.principal = principal
    return principal


def principal_of(request: Request) -> Principal:
    """The caller :func:`authorize` let through for this request."""
    principal: Principal = request.state.principal
    return principal
