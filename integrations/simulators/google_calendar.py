"""Google Calendar v3 on loopback, as much of it as voicebook uses: events insert/get/patch/delete/list,
freeBusy, and OAuth: the token endpoint that service-account (JWT bearer) and user (refresh token)
credentials call, and the installed-app consent flow (an authorization endpoint that consents at once
and redirects with a code, then the ``authorization_code`` grant with PKCE verification). Strict where
Google is: a client-chosen event id must be base32hex (``a-v``, ``0-9``, 5 to 1024 long), a reused id
answers 409 ``duplicate`` (even after the event was deleted), deleting a deleted event answers 410,
every API call needs a live ``Authorization: Bearer`` token, the consent flow needs PKCE, and errors use
Google's body ``{"error": {"errors": [{domain, reason, message}], code, message}}``.

Faults come from :class:`CalendarFaults`: "the next N requests" (a list consumed in order) or a seeded
random fraction, each one of ``429``, ``403`` (rateLimitExceeded), ``403user`` (userRateLimitExceeded),
``403daily`` (dailyLimitExceeded), ``403quota`` (quotaExceeded: Calendar's own usage limits),
``403forbidden`` (forbidden: no access to the calendar), ``500``, ``503`` or ``timeout`` (the request
hangs until the client gives up). Events stay in memory in
:class:`CalendarState` so tests can count them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from integrations.simulators.calendar_recurrence import busy_spans, materialise_instance, parse_instant

API = "/calendar/v3"
TOKEN_PATH = "/token"
AUTH_PATH = "/o/oauth2/auth"
GOOGLE_TOKEN_ENDPOINT = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
EVENT_ID = re.compile(r"^[a-v0-9]{5,1024}$")
SIMULATED_SCOPES = ("https://www.googleapis.com/auth/calendar", "https://www.googleapis.com/auth/calendar.events")

FaultKind = Literal["429", "403", "403user", "403daily", "403quota", "403forbidden", "500", "503", "timeout"]

# status, domain, reason, message: what Google answers for each injected fault
_FAULT_ANSWERS: dict[str, tuple[int, str, str, str]] = {
    "429": (429, "usageLimits", "rateLimitExceeded", "Rate Limit Exceeded"),
    "403": (403, "usageLimits", "rateLimitExceeded", "Rate Limit Exceeded"),
    "403user": (403, "usageLimits", "userRateLimitExceeded", "User Rate Limit Exceeded"),
    "403daily": (403, "usageLimits", "dailyLimitExceeded", "Daily Limit Exceeded"),
    "403quota": (403, "usageLimits", "quotaExceeded", "Calendar usage limits exceeded."),
    "403forbidden": (403, "global", "forbidden", "Forbidden"),
    "500": (500, "global", "backendError", "Backend Error"),
    "503": (503, "global", "backendError", "Backend Error"),
}


@dataclass
class CalendarFaults:
    """``next`` faults the next API requests, one each, in order; then ``fraction`` of the rest get a
    fault drawn from ``kinds`` (seeded, so a run repeats). ``retry_after`` adds that header to the
    usage-limit answers (429 and the 403s but ``403forbidden``). A ``timeout`` fault holds the request
    until the client disconnects or ``hang_seconds``."""

    next: list[FaultKind] = field(default_factory=list)
    fraction: float = 0.0
    kinds: tuple[FaultKind, ...] = ("500",)
    seed: int = 0
    retry_after: int | None = None
    latency_ms: int = 0  # added before every API answer
    hang_seconds: float = 30.0
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def draw(self) -> FaultKind | None:
        if self.next:
            return self.next.pop(0)
        if self.fraction > 0 and self._random.random() < self.fraction:
            return self._random.choice(self.kinds)
        return None


@dataclass
class CalendarState:
    """Calendars (id -> event id -> event), the credentials the token endpoint accepts, live access
    tokens and what was asked. ``reject_tokens`` makes every API call answer 401 (a revoked grant)."""

    calendars: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    service_accounts: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)  # client_email -> key
    clients: dict[str, str] = field(default_factory=dict)  # OAuth client id -> secret
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> client id
    tokens: dict[str, float] = field(default_factory=dict)  # access token -> expiry (monotonic)
    token_lifetime: float = 3600.0
    reject_tokens: bool = False
    external_busy: dict[str, list[tuple[datetime, datetime]]] = field(default_factory=dict)
    faults: CalendarFaults = field(default_factory=CalendarFaults)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of API calls
    token_grants: list[str] = field(default_factory=list)  # grant_type of every token request
    subjects: list[str | None] = field(default_factory=list)  # "sub" of every JWT grant (delegation)
    consent_email: str = "frontdesk@riverside-clinic.example"  # the account that consents in the browser
    deny_consent: bool = False  # the user clicks "Cancel": the redirect carries error=access_denied
    codes: dict[str, dict[str, str]] = field(default_factory=dict)  # unused authorization codes

    def add_calendar(self, calendar_id: str) -> dict[str, dict[str, Any]]:
        return self.calendars.setdefault(calendar_id, {})

    def add_service_account(self, client_email: str, private_key_pem: str) -> None:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("service account keys are RSA keys")
        self.service_accounts[client_email] = key.public_key()

    def add_user_grant(self, client_id: str, client_secret: str, refresh_token: str) -> None:
        self.clients[client_id] = client_secret
        self.refresh_tokens[refresh_token] = client_id

    def add_client(self, client_id: str, client_secret: str) -> None:
        """An OAuth client that may run the consent flow (its refresh tokens come from the code grant)."""
        self.clients[client_id] = client_secret

    def revoke_grant(self, refresh_token: str) -> None:
        """The user removed the app's access: the refresh token answers ``invalid_grant`` from now on."""
        self.refresh_tokens.pop(refresh_token, None)

    def client_file(self, client_id: str, base_url: str) -> dict[str, Any]:
        """The client as Google's console downloads it, pointing at this simulator."""
        return {
            "installed": {
                "client_id": client_id,
                "project_id": "voicebook-test",
                "auth_uri": f"{base_url}{AUTH_PATH}",
                "token_uri": f"{base_url}{TOKEN_PATH}",
                "client_secret": self.clients[client_id],
                "redirect_uris": ["http://localhost"],
            }
        }

    def expire_tokens(self) -> None:
        """Every access token handed out so far stops working (the client still believes it valid)."""
        self.tokens.clear()

    def live_events(self, calendar_id: str) -> list[dict[str, Any]]:
        return [event for event in self.calendars.get(calendar_id, {}).values() if event["status"] != "cancelled"]

    def busy_times(
        self, calendar_id: str, until: datetime = datetime(2100, 1, 1, tzinfo=UTC)
    ) -> list[tuple[datetime, datetime]]:
        """Every busy span of the calendar's events, series expanded with their exceptions, in order."""
        return sorted(busy_spans(self.calendars.get(calendar_id, {}), until))


SERVICE_ACCOUNT_EMAIL = "voicebook@voicebook-test.iam.gserviceaccount.com"


def new_private_key_pem() -> str:
    """A fresh RSA key (PKCS#8 PEM) for a simulated service account."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def service_account_info(
    simulator_url: str, private_key_pem: str, client_email: str = SERVICE_ACCOUNT_EMAIL
) -> dict[str, Any]:
    """A service-account key file's contents, as Google's console downloads it, whose token endpoint is the
    simulator's (register the key with :meth:`CalendarState.add_service_account` first)."""
    return {
        "type": "service_account",
        "project_id": "voicebook-test",
        "private_key_id": "0123456789abcdef",
        "private_key": private_key_pem,
        "client_email": client_email,
        "client_id": "1234567890",
        "token_uri": f"{simulator_url}{TOKEN_PATH}",
    }


def google_error(
    status: int, reason: str, message: str, *, domain: str = "global", headers: dict[str, str] | None = None
) -> Response:
    body = {
        "error": {
            "errors": [{"domain": domain, "reason": reason, "message": message}],
            "code": status,
            "message": message,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Invalid(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _event_time(event: dict[str, Any], key: str, *, recurring: bool) -> datetime:
    value = event.get(key)
    if not isinstance(value, dict) or "dateTime" not in value:
        raise _Invalid("required", f"Missing {key} time.")
    zone = value.get("timeZone")
    if zone is not None:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise _Invalid("invalid", f"Invalid time zone definition for {key} time.") from None
    elif recurring:
        raise _Invalid("required", f"Missing time zone definition for {key} time.")
    try:
        return parse_instant(str(value["dateTime"]))
    except ValueError:
        raise _Invalid("invalid", f"Invalid {key} time.") from None


def _validate(event: dict[str, Any]) -> None:
    recurring = bool(event.get("recurrence"))
    start = _event_time(event, "start", recurring=recurring)
    end = _event_time(event, "end", recurring=recurring)
    if end <= start:
        raise _Invalid("timeRangeEmpty", "The specified time range is empty.")
    for line in event.get("recurrence") or []:
        if not isinstance(line, str) or not line.startswith(("RRULE:", "EXRULE:", "RDATE", "EXDATE")):
            raise _Invalid("invalid", "Invalid recurrence rule.")
        if "DTSTART" in line:
            raise _Invalid("invalid", "Invalid recurrence rule.")
    private = (event.get("extendedProperties") or {}).get("private") or {}
    if not all(isinstance(key, str) and isinstance(value, str) for key, value in private.items()):
        raise _Invalid("invalid", "Invalid extended property value.")


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Patch semantics: nested objects merge, everything else (arrays too) is replaced."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _verify_jwt(assertion: str, state: CalendarState, audience: str) -> dict[str, Any]:
    try:
        header_b64, claims_b64, signature_b64 = assertion.split(".")
        claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
        signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
        header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise _Invalid("invalid_grant", f"malformed assertion: {exc}") from None
    key = state.service_accounts.get(str(claims.get("iss")))
    if key is None or header.get("alg") != "RS256":
        raise _Invalid("invalid_grant", "Invalid JWT Signature.")
    try:
        key.verify(signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise _Invalid("invalid_grant", "Invalid JWT Signature.") from None
    # google-auth always names Google's own endpoint as the audience, wherever token_uri points.
    if claims.get("aud") not in (GOOGLE_TOKEN_ENDPOINT, audience):
        raise _Invalid("invalid_grant", f"Invalid JWT: audience must be {GOOGLE_TOKEN_ENDPOINT}")
    if float(claims.get("exp", 0)) < time.time():
        raise _Invalid("invalid_grant", "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe.")
    if not claims.get("scope"):
        raise _Invalid("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
    return claims


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _id_token(email: str, client_id: str, client_secret: str) -> str:
    """An ID token naming ``email``, signed HS256 with the client secret (OpenID Connect allows that
    for confidential clients; Google signs RS256, which voicebook does not check either way)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com",
        "aud": client_id,
        "sub": hashlib.sha256(email.encode()).hexdigest()[:21],
        "email": email,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
    }
    payload = _b64url(json.dumps(claims).encode())
    signature = hmac.new(client_secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def _loopback(redirect_uri: str) -> bool:
    """Installed apps redirect to the loopback interface on any port (Google's rule for desktop clients)."""
    parts = urlsplit(redirect_uri)
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")


def create_google_calendar_simulator(state: CalendarState) -> Starlette:
    def issue_token() -> dict[str, Any]:
        token = "ya29.sim-" + secrets.token_urlsafe(24)
        state.tokens[token] = time.monotonic() + state.token_lifetime
        return {"access_token": token, "expires_in": int(state.token_lifetime), "token_type": "Bearer"}

    async def authorize(request: Request) -> Response:
        """The consent screen, consenting at once: a redirect to ``redirect_uri`` with a code (or, when
        the user refuses, ``error=access_denied``). Invalid requests are answered here, not redirected,
        as Google does when it cannot trust the redirect."""
        params = request.query_params
        client_id = params.get("client_id", "")
        redirect_uri = params.get("redirect_uri", "")
        if client_id not in state.clients:
            return JSONResponse(
                {"error": "invalid_client", "error_description": "The OAuth client was not found."}, 401
            )
        if not _loopback(redirect_uri):
            return JSONResponse({"error": "redirect_uri_mismatch", "error_description": redirect_uri}, 400)
        answer: dict[str, str] = {}
        if params.get("response_type") != "code":
            answer = {"error": "unsupported_response_type"}
        elif params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            answer = {"error": "invalid_request", "error_description": "code_challenge (S256) is required"}
        elif not set(SIMULATED_SCOPES).intersection(params.get("scope", "").split()):
            answer = {"error": "invalid_scope"}
        elif state.deny_consent:
            answer = {"error": "access_denied"}
        else:
            code = "4/sim-" + secrets.token_urlsafe(24)
            state.codes[code] = {
                "client_id": client_id,
                "redirect_uri": redirect_uri,
                "challenge": params["code_challenge"],
                "scope": params.get("scope", ""),
            }
            answer = {"code": code, "scope": params.get("scope", "")}
        if "state" in params:
            answer["state"] = params["state"]
        separator = "&" if "?" in redirect_uri else "?"
        return RedirectResponse(f"{redirect_uri}{separator}{urlencode(answer)}", status_code=302)

    def exchange(form: Any) -> JSONResponse:
        """The ``authorization_code`` grant: a code is good once, for its client and redirect, with the
        verifier whose S256 hash was the challenge."""
        client_id = str(form.get("client_id", ""))
        pending = state.codes.pop(str(form.get("code", "")), None)
        if pending is None or pending["client_id"] != client_id:
            raise _Invalid("invalid_grant", "Malformed auth code.")
        if pending["redirect_uri"] != form.get("redirect_uri"):
            raise _Invalid("redirect_uri_mismatch", "Bad Request")
        verifier = str(form.get("code_verifier", ""))
        if not verifier or _b64url(hashlib.sha256(verifier.encode()).digest()) != pending["challenge"]:
            raise _Invalid("invalid_grant", "Invalid code verifier.")
        refresh_token = "1//sim-" + secrets.token_urlsafe(32)
        state.refresh_tokens[refresh_token] = client_id
        body = issue_token() | {"refresh_token": refresh_token, "scope": pending["scope"]}
        if "openid" in pending["scope"].split():
            body["id_token"] = _id_token(state.consent_email, client_id, state.clients[client_id])
        return JSONResponse(body)

    async def token(request: Request) -> Response:
        form = await request.form()
        grant = str(form.get("grant_type", ""))
        state.token_grants.append(grant)
        try:
            if grant in ("refresh_token", "authorization_code") and state.clients.get(
                str(form.get("client_id", ""))
            ) != form.get("client_secret"):
                return JSONResponse({"error": "invalid_client", "error_description": "Unauthorized"}, status_code=401)
            if grant == "authorization_code":
                return exchange(form)
            if grant == JWT_BEARER:
                claims = _verify_jwt(str(form.get("assertion", "")), state, str(request.url))
                state.subjects.append(claims.get("sub"))
                return JSONResponse(issue_token())
            if grant == "refresh_token":
                client_id = str(form.get("client_id", ""))
                if state.refresh_tokens.get(str(form.get("refresh_token", ""))) != client_id:
                    raise _Invalid("invalid_grant", "Token has been expired or revoked.")
                return JSONResponse(issue_token())
        except _Invalid as invalid:
            return JSONResponse({"error": invalid.reason, "error_description": invalid.message}, status_code=400)
        return JSONResponse({"error": "unsupported_grant_type", "error_description": grant}, status_code=400)

    async def hang(request: Request) -> None:
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        try:
            await asyncio.wait_for(disconnected(), state.faults.hang_seconds)
        except TimeoutError:
            pass

    async def guard(request: Request) -> Response | None:
        """Latency, faults and authentication shared by every API call; None lets the call through."""
        state.requests.append((request.method, request.url.path))
        if state.faults.latency_ms:
            await asyncio.sleep(state.faults.latency_ms / 1000)
        fault = state.faults.draw()
        if fault == "timeout":
            await hang(request)
            return google_error(503, "backendError", "Backend Error")
        if fault is not None:
            status, domain, reason, message = _FAULT_ANSWERS[fault]
            headers = (
                {"Retry-After": str(state.faults.retry_after)}
                if state.faults.retry_after is not None and domain == "usageLimits"
                else {}
            )
            return google_error(status, reason, message, domain=domain, headers=headers)
        scheme, _, token_value = request.headers.get("authorization", "").partition(" ")
        expiry = state.tokens.get(token_value)
        if state.reject_tokens or scheme.lower() != "bearer" or expiry is None or expiry < time.monotonic():
            return google_error(
                401,
                "authError",
                "Invalid Credentials",
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'},
            )
        return None

    def calendar_or_404(calendar_id: str) -> dict[str, dict[str, Any]] | Response:
        events = state.calendars.get(calendar_id)
        return google_error(404, "notFound", "Not Found") if events is None else events

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise _Invalid("parseError", "Parse Error") from None
        if not isinstance(body, dict):
            raise _Invalid("parseError", "Parse Error")
        return body

    async def events_collection(request: Request) -> Response:
        if (refused := await guard(request)) is not None:
            return refused
        events = calendar_or_404(request.path_params["calendar_id"])
        if isinstance(events, Response):
            return events
        if request.method == "GET":
            return list_events(request, events)
        try:
            event = await json_body(request)
            event_id = event.get("id")
            if event_id is not None and (not isinstance(event_id, str) or not EVENT_ID.match(event_id)):
                raise _Invalid("invalid", "Invalid resource id value.")
            _validate(event)
        except _Invalid as invalid:
            return google_error(400, invalid.reason, invalid.message)
        if event_id is None:
            event_id = base64.b32hexencode(secrets.token_bytes(10)).decode().lower()
        if event_id in events:  # Google keeps deleted ids too: they can never be reused
            return google_error(409, "duplicate", "The requested identifier already exists.")
        now = _rfc3339(datetime.now(UTC))
        stored = {
            **event,
            "kind": "calendar#event",
            "id": event_id,
            "status": "confirmed",
            "etag": f'"{secrets.randbits(48)}"',
            "created": now,
            "updated": now,
            "sequence": 0,
            "iCalUID": f"{event_id}@google.com",
            "htmlLink": f"https://www.google.com/calendar/event?eid={event_id}",
        }
        events[event_id] = stored
        return JSONResponse(stored)

    def list_events(request: Request, events: dict[str, dict[str, Any]]) -> Response:
        wanted: list[tuple[str, str]] = []
        for item in request.query_params.getlist("privateExtendedProperty"):
            key, separator, value = item.partition("=")
            if not separator:
                return google_error(400, "invalid", "Invalid extended property constraint.")
            wanted.append((key, value))
        show_deleted = request.query_params.get("showDeleted") == "true"
        items = [
            event
            for event in events.values()
            if (show_deleted or event["status"] != "cancelled")
            and all(((event.get("extendedProperties") or {}).get("private") or {}).get(k) == v for k, v in wanted)
        ]
        return JSONResponse({"kind": "calendar#events", "summary": request.path_params["calendar_id"], "items": items})

    async def event_item(request: Request) -> Response:
        if (refused := await guard(request)) is not None:
            return refused
        events = calendar_or_404(request.path_params["calendar_id"])
        if isinstance(events, Response):
            return events
        event = events.get(request.path_params["event_id"]) or materialise_instance(
            events, request.path_params["event_id"]
        )
        if event is None:
            return google_error(404, "notFound", "Not Found")
        if request.method == "GET":
            return JSONResponse(event)
        if event["status"] == "cancelled":
            return google_error(410, "deleted", "Resource has been deleted")
        if request.method == "DELETE":
            event["status"] = "cancelled"
            event["updated"] = _rfc3339(datetime.now(UTC))
            return Response(status_code=204)
        try:
            patched = json.loads(json.dumps(event))
            _merge(patched, await json_body(request))
            if patched["id"] != event["id"]:
                raise _Invalid("invalid", "The event id cannot be changed.")
            _validate(patched)
        except _Invalid as invalid:
            return google_error(400, invalid.reason, invalid.message)
        patched["sequence"] = int(event["sequence"]) + 1
        patched["updated"] = _rfc3339(datetime.now(UTC))
        events[event["id"]] = patched
        return JSONResponse(patched)

    async def move_event(request: Request) -> Response:
        """events.move: the event leaves this calendar for ``destination``, keeping its id."""
        if (refused := await guard(request)) is not None:
            return refused
        events = calendar_or_404(request.path_params["calendar_id"])
        if isinstance(events, Response):
            return events
        destination = state.calendars.get(request.query_params.get("destination", ""))
        if destination is None:
            return google_error(404, "notFound", "Not Found")
        event = events.get(request.path_params["event_id"])
        if event is None or event["status"] == "cancelled" or event.get("recurringEventId"):
            return google_error(404, "notFound", "Not Found")
        if event["id"] in destination:
            return google_error(409, "duplicate", "The requested identifier already exists.")
        del events[event["id"]]
        event["updated"] = _rfc3339(datetime.now(UTC))
        destination[event["id"]] = event
        return JSONResponse(event)

    async def free_busy(request: Request) -> Response:
        if (refused := await guard(request)) is not None:
            return refused
        try:
            body = await json_body(request)
            window_start = parse_instant(str(body["timeMin"]))
            window_end = parse_instant(str(body["timeMax"]))
        except _Invalid as invalid:
            return google_error(400, invalid.reason, invalid.message)
        except (KeyError, ValueError):
            return google_error(400, "required", "Missing timeMin or timeMax.")
        if window_end <= window_start:
            return google_error(400, "timeRangeEmpty", "The specified time range is empty.")
        calendars: dict[str, Any] = {}
        for item in body.get("items") or []:
            calendar_id = str(item.get("id"))
            if calendar_id not in state.calendars:
                calendars[calendar_id] = {"errors": [{"domain": "global", "reason": "notFound"}], "busy": []}
                continue
            spans = list(state.external_busy.get(calendar_id, []))
            spans.extend(busy_spans(state.calendars[calendar_id], window_end))
            clipped = sorted(
                (max(start, window_start), min(end, window_end))
                for start, end in spans
                if start < window_end and window_start < end
            )
            merged: list[list[datetime]] = []
            for start, end in clipped:
                if merged and start <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            calendars[calendar_id] = {"busy": [{"start": _rfc3339(s), "end": _rfc3339(e)} for s, e in merged]}
        return JSONResponse(
            {
                "kind": "calendar#freeBusy",
                "timeMin": _rfc3339(window_start),
                "timeMax": _rfc3339(window_end),
                "calendars": calendars,
            }
        )

    return Starlette(
        routes=[
            Route(TOKEN_PATH, token, methods=["POST"]),
            Route(AUTH_PATH, authorize, methods=["GET"]),
            Route(f"{API}/freeBusy", free_busy, methods=["POST"]),
            Route(f"{API}/calendars/{{calendar_id}}/events", events_collection, methods=["GET", "POST"]),
            Route(
                f"{API}/calendars/{{calendar_id}}/events/{{event_id}}", event_item, methods=["GET", "PATCH", "DELETE"]
            ),
            Route(f"{API}/calendars/{{calendar_id}}/events/{{event_id}}/move", move_event, methods=["POST"]),
        ]
    )
