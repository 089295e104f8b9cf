"""The Google Calendar client the settings ask for, built once per process and shared by the calendar
effects and the free/busy refresher; and connecting a user's own Google account to it.

Two ways in:

- a service-account key (``GOOGLE_SERVICE_ACCOUNT_FILE``, optionally impersonating
  ``GOOGLE_DELEGATED_SUBJECT``), server to server;
- a user's own account (``GOOGLE_OAUTH_CLIENT_FILE``): ``voicebook google connect`` runs the consent
  flow once and keeps the grant in the ledger, encrypted with ``VOICEBOOK_SECRET_KEY`` (in development
  without one, a key made once in ``data_dir/secret-key``); the server then acts as that account
  (``GOOGLE_OAUTH_ACCOUNT``) and writes every token refresh back.

Without Google credentials there is no client: the ledger is the calendar and nothing external is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from booking.ledger.database import Database
from integrations.egress import httpx_client
from voice_server import egress_policy
from voice_server.settings import Settings, development_file

if TYPE_CHECKING:
    from integrations.google_calendar import GoogleCalendar
    from integrations.google_consent import AuthorizationRequest
    from integrations.google_oauth import GoogleGrants, GrantStatus, OAuthClient

ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # it names a file too (a headless attempt)
SECRET_KEY_FILE = "secret-key"
CONNECT_TIMEOUT_SECONDS = 300.0

log = structlog.get_logger("voicebook.google")


class GoogleSetupError(Exception):
    """Google is configured but cannot be used as configured; the message says what to do."""


def build_google_calendar(settings: Settings) -> GoogleCalendar | None:
    """The service-account client, or None when Google is not configured. The user-account client
    needs the ledger: with ``GOOGLE_OAUTH_CLIENT_FILE`` this refuses (rather than run without a
    calendar), and :func:`load_google_calendar` is the way."""
    if settings.google_oauth_client_file is not None:
        raise GoogleSetupError(
            "GOOGLE_OAUTH_CLIENT_FILE: the calendar is built by load_google_calendar(settings, database)"
        )
    if settings.google_service_account_file is None:
        return None
    from integrations.google_calendar import GoogleCalendar

    info = json.loads(settings.google_service_account_file.read_text(encoding="utf-8"))
    return GoogleCalendar.from_service_account(
        info,
        subject=settings.google_delegated_subject,
        api_endpoint=settings.google_calendar_api_url,
        egress=egress_policy.google(settings),
    )


async def load_google_calendar(settings: Settings, database: Database) -> GoogleCalendar | None:
    """The configured Google Calendar client (service account or the connected user account), or None
    when Google is not configured. Call it on the event loop that will run the calendar effects: the
    user account's token refreshes are written back to ``database`` through that loop."""
    if settings.google_oauth_client_file is None:
        return build_google_calendar(settings)
    from integrations.google_calendar import GoogleCalendar
    from integrations.google_oauth import SecretKeyError, StoredGrantCredentials

    client = _client(settings.google_oauth_client_file)
    grants = _grants(settings, database)
    account = settings.google_oauth_account
    try:
        grant = await grants.load(account)
        if grant is not None and await grants.reencrypt(account):
            log.info("google_grant_reencrypted", account=account)
    except SecretKeyError as exc:
        raise GoogleSetupError(str(exc)) from None
    connect = f"voicebook google connect --client-file {settings.google_oauth_client_file} --account {account}"
    if grant is None:
        raise GoogleSetupError(
            f"GOOGLE_OAUTH_CLIENT_FILE is set but no Google account {account!r} is connected: run `{connect}`"
        )
    if grant.client_id != client.client_id:
        raise GoogleSetupError(
            f"the Google account {account!r} was connected with OAuth client {grant.client_id}, not with "
            f"{client.client_id} of GOOGLE_OAUTH_CLIENT_FILE: run `{connect}`"
        )
    credentials = StoredGrantCredentials(grant, client, grants, asyncio.get_running_loop())
    return GoogleCalendar(
        credentials, api_endpoint=settings.google_calendar_api_url, egress=egress_policy.google(settings)
    )


def secret_keys(settings: Settings) -> tuple[str, ...]:
    """``VOICEBOOK_SECRET_KEY``'s keys; in development without them, a key made once and kept in
    ``data_dir/secret-key`` (0600), like the development admin token."""
    if settings.secret_keys:
        return settings.secret_keys
    if settings.environment != "development":
        raise GoogleSetupError("VOICEBOOK_SECRET_KEY is required to store Google tokens in production")
    from integrations.google_oauth import new_secret_key

    stored = development_file(settings.data_dir, SECRET_KEY_FILE, lambda: new_secret_key() + "\n")
    return tuple(key.strip() for key in stored.split(",") if key.strip())


def _client(path: Path) -> OAuthClient:
    from integrations.google_oauth import OAuthClient, OAuthClientError

    try:
        return OAuthClient.from_file(path)
    except OAuthClientError as exc:
        raise GoogleSetupError(str(exc)) from None


def _grants(settings: Settings, database: Database) -> GoogleGrants:
    from booking.ledger.token_repository import TokenRepository
    from integrations.google_oauth import GoogleGrants, SecretKeyError, TokenCipher

    try:
        cipher = TokenCipher(secret_keys(settings))
    except SecretKeyError as exc:
        raise GoogleSetupError(f"VOICEBOOK_SECRET_KEY: {exc}") from None
    return GoogleGrants(TokenRepository(database), cipher)


# -- voicebook google connect / status ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    client_file: Path
    account: str = "default"
    redirect_uri: str | None = None
    """Headless: the redirect registered for the consent (the browser is elsewhere); with ``code``
    unset, the URL is printed and the attempt kept for a second run that passes ``code``."""
    code: str | None = None
    """Headless second step: the code (or the whole URL the browser was sent to)."""
    timeout: float = CONNECT_TIMEOUT_SECONDS


async def connect_account(
    settings: Settings, database: Database, options: ConnectOptions, *, out: Callable[[str], None] = print
) -> str | None:
    """Run the consent flow and store the grant; returns the connected account's email (None when
    Google did not say, and also after the first headless step, which only prints the URL)."""
    from integrations.google_consent import ConnectError, authorization_request, code_from_redirect, exchange_code

    if not ACCOUNT_NAME.fullmatch(options.account):
        raise GoogleSetupError(f"account name {options.account!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
    client = _client(options.client_file)
    grants = _grants(settings, database)
    pending = settings.data_dir / f"google-connect-{options.account}.json"
    try:
        if options.code is not None:
            request = _read_pending(pending, client.client_id, options.redirect_uri)
            code = code_from_redirect(options.code, request.state)
        elif options.redirect_uri is not None:
            request = authorization_request(client, options.redirect_uri)
            _write_pending(pending, client.client_id, request)
            out(f"Open this URL in a browser and consent:\n\n  {request.url}\n")
            out("Then run this command again with --code '<the URL the browser was sent to, or its code>'.")
            return None
        else:
            async with _loopback_redirect() as (redirect_uri, redirected):
                request = authorization_request(client, redirect_uri)
                out(f"Open this URL in a browser and consent:\n\n  {request.url}\n")
                out(f"Waiting for Google to send the browser back to {redirect_uri} ...")
                try:
                    query = await asyncio.wait_for(redirected, options.timeout)
                except TimeoutError:
                    raise ConnectError(f"no answer from the browser within {options.timeout:.0f} s") from None
            code = code_from_redirect(query, request.state)
        # Only to Google's hosts and the client file's token endpoint, never following a redirect.
        async with httpx_client(egress_policy.google_connect(settings, options.client_file), timeout=30.0) as http:
            tokens = await exchange_code(client, request, code, http=http)
    except ConnectError as exc:
        raise GoogleSetupError(f"connecting the Google account failed: {exc}") from None
    await grants.save_connected(options.account, client.client_id, tokens)
    pending.unlink(missing_ok=True)
    return tokens.subject


async def grant_statuses(settings: Settings, database: Database) -> list[GrantStatus]:
    return await _grants(settings, database).statuses()


def _write_pending(path: Path, client_id: str, request: AuthorizationRequest) -> None:
    """The headless attempt, kept between its two runs (0600: the PKCE verifier is in it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "client_id": client_id,
        "redirect_uri": request.redirect_uri,
        "state": request.state,
        "code_verifier": request.code_verifier,
        "url": request.url,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle)


def _read_pending(path: Path, client_id: str, redirect_uri: str | None) -> AuthorizationRequest:
    from integrations.google_consent import AuthorizationRequest, ConnectError

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConnectError("no connect attempt is waiting for a code: run it first with --redirect-uri only") from None
    if document.get("client_id") != client_id:
        raise ConnectError("the waiting connect attempt was started with another OAuth client")
    if redirect_uri is not None and document.get("redirect_uri") != redirect_uri:
        raise ConnectError(f"the waiting connect attempt used --redirect-uri {document.get('redirect_uri')}")
    return AuthorizationRequest(document["url"], document["redirect_uri"], document["state"], document["code_verifier"])


@contextlib.asynccontextmanager
async def _loopback_redirect() -> AsyncIterator[tuple[str, asyncio.Future[str]]]:
    """Listen on 127.0.0.1 at a free port for the browser's redirect; yields the redirect URI and a
    future of the query string the browser brought back (other requests, a favicon, get a 404)."""
    redirected: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("ascii", "replace")
            parts = urlsplit(target)
            if parts.path == "/" and parts.query and not redirected.done():
                redirected.set_result(parts.query)
                status, text = "200 OK", "voicebook: Google answered. You can close this window."
            else:
                status, text = "404 Not Found", "not found"
            body = text.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, IndexError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a stray or broken connection: keep waiting for the real redirect
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/", redirected
    finally:
        server.close()
        await server.wait_closed()
