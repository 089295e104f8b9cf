"""Google Calendar through a user's own account: the consent flow (PKCE) against the Calendar simulator
over loopback, the grant kept encrypted in the real ledger, and token refreshes written back from the
calendar's worker threads."""

from __future__ import annotations

import asyncio
import json
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from booking.business import Business
from booking.domain import Booking, BookingStatus, Customer, Interval, new_id
from booking.errors import EffectFailed
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.token_repository import TokenRepository
from integrations.google_calendar import GoogleCalendar
from integrations.google_consent import AuthorizationRequest, ConnectError, authorization_request, exchange_code
from integrations.google_oauth import (
    GoogleGrants,
    OAuthClient,
    SecretKeyError,
    StoredGrantCredentials,
    TokenCipher,
)
from integrations.simulators.google_calendar import CalendarState, create_google_calendar_simulator
from tests.conftest import TEST_NOW, serving
from voice_server.cli import main
from voice_server.google_setup import (
    ConnectOptions,
    GoogleSetupError,
    build_google_calendar,
    connect_account,
    grant_statuses,
    load_google_calendar,
    secret_keys,
)
from voice_server.settings import Settings, SettingsError

LEE = "dr-lee@riverside-clinic.example"
CLIENT_ID = "1234-voicebook.apps.googleusercontent.com"
KEY = Fernet.generate_key().decode()
OTHER_KEY = Fernet.generate_key().decode()
START = datetime(2026, 12, 1, 14, 0, tzinfo=UTC)


def make_booking() -> Booking:
    end = START + timedelta(minutes=30)
    return Booking(
        id=new_id(),
        resource_id="dr-lee",
        service_id="checkup",
        customer=Customer(id="c1", phone="+12125550142", name="Ada Lovelace"),
        start=START,
        end=end,
        block=Interval(START, end + timedelta(minutes=10)),
        status=BookingStatus.CONFIRMED,
        version=1,
        created_at=TEST_NOW,
        updated_at=TEST_NOW,
        source="phone",
    )


@pytest.fixture
async def sim() -> AsyncIterator[tuple[CalendarState, str]]:
    state = CalendarState()
    state.add_calendar(LEE)
    state.add_client(CLIENT_ID, "client-secret-1")
    async with serving(create_google_calendar_simulator(state), lifespan="off") as url:
        yield state, url


@pytest.fixture
def client_file(sim: tuple[CalendarState, str], tmp_path: Path) -> Path:
    state, url = sim
    path = tmp_path / "client.json"
    path.write_text(json.dumps(state.client_file(CLIENT_ID, url)))
    return path


@pytest.fixture
def settings(app_settings: Settings, sim: tuple[CalendarState, str], client_file: Path) -> Settings:
    return replace(
        app_settings,
        google_oauth_client_file=client_file,
        google_calendar_api_url=f"{sim[1]}/calendar/v3/",
        secret_keys=(KEY,),
    )


async def browse(url: str) -> httpx.Response:
    """The operator's browser: opens the consent URL and follows Google's redirect (to our listener)."""
    async with httpx.AsyncClient(follow_redirects=True, timeout=10) as browser:
        return await browser.get(url)


async def consent_redirect(url: str) -> str:
    """The URL Google sends the browser to, without following it (a headless server's browser is
    elsewhere: the operator copies it from the address bar)."""
    async with httpx.AsyncClient(timeout=10) as browser:
        answer = await browser.get(url)
    assert answer.status_code == 302
    return answer.headers["location"]


async def connect(settings: Settings, database: Database, account: str = "default") -> str | None:
    """The loopback flow, with a browser that consents as soon as the URL is printed."""
    printed: asyncio.Queue[str] = asyncio.Queue()

    async def browser() -> httpx.Response:
        while (match := re.search(r"http://\S+/o/oauth2/auth\?\S+", await printed.get())) is None:
            pass
        return await browse(match.group(0))

    browsing = asyncio.create_task(browser())
    options = ConnectOptions(client_file=settings.google_oauth_client_file or Path(), account=account)
    email = await connect_account(settings, database, options, out=printed.put_nowait)
    landing = await browsing
    assert landing.status_code == 200 and "You can close this window" in landing.text
    return email


async def raw_rows(database: Database) -> list[dict[str, Any]]:
    async with database.reader.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(select(t.oauth_tokens))]


def row_bytes(row: dict[str, Any]) -> bytes:
    return b"|".join(value if isinstance(value, bytes) else str(value).encode() for value in row.values())


def grants(database: Database, *keys: str) -> GoogleGrants:
    return GoogleGrants(TokenRepository(database), TokenCipher(keys or (KEY,)))


# -- encryption ----------------------------------------------------------------------------------


def test_cipher_round_trip_and_key_rotation() -> None:
    old = TokenCipher([OTHER_KEY])
    sealed_by_old = old.encrypt("1//refresh-token")
    assert b"refresh-token" not in sealed_by_old and old.decrypt(sealed_by_old) == "1//refresh-token"
    rotated = TokenCipher([KEY, OTHER_KEY])  # the new key first: it encrypts, both decrypt
    assert rotated.decrypt(sealed_by_old) == "1//refresh-token"
    sealed_by_new = rotated.encrypt("ya29.access")
    assert rotated.under_current_key(sealed_by_new) and not rotated.under_current_key(sealed_by_old)
    with pytest.raises(SecretKeyError):
        old.decrypt(sealed_by_new)
    with pytest.raises(SecretKeyError, match="secret key 2 is not a Fernet key"):
        TokenCipher([KEY, "not-a-key"])


def test_secret_keys_come_from_the_environment_and_are_checked() -> None:
    assert Settings.from_env({"VOICEBOOK_SECRET_KEY": f"{KEY}, {OTHER_KEY}"}).secret_keys == (KEY, OTHER_KEY)
    with pytest.raises(SettingsError, match="VOICEBOOK_SECRET_KEY: key 2 is not a Fernet key"):
        Settings.from_env({"VOICEBOOK_SECRET_KEY": f"{KEY},short"})


def test_oauth_settings_refuse_what_cannot_work(client_file: Path) -> None:
    both = {"GOOGLE_OAUTH_CLIENT_FILE": str(client_file), "GOOGLE_SERVICE_ACCOUNT_FILE": str(client_file)}
    with pytest.raises(SettingsError, match="GOOGLE_OAUTH_CLIENT_FILE: set either it or GOOGLE_SERVICE_ACCOUNT_FILE"):
        Settings.from_env(both)
    production = {
        "VOICEBOOK_ENV": "production",
        "VOICEBOOK_ADMIN_TOKEN": "0123456789abcdef0123",
        "GOOGLE_OAUTH_CLIENT_FILE": str(client_file),
    }
    with pytest.raises(SettingsError, match="VOICEBOOK_SECRET_KEY: required with GOOGLE_OAUTH_CLIENT_FILE"):
        Settings.from_env(production)
    with pytest.raises(SettingsError, match="GOOGLE_OAUTH_ACCOUNT"):
        Settings.from_env({"GOOGLE_OAUTH_ACCOUNT": "../elsewhere"})
    chosen = Settings.from_env({"GOOGLE_OAUTH_CLIENT_FILE": str(client_file), "GOOGLE_OAUTH_ACCOUNT": "clinic"})
    assert chosen.google_oauth_client_file == client_file and chosen.google_oauth_account == "clinic"


def test_development_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    development = Settings(data_dir=tmp_path / "var")
    first = secret_keys(development)
    assert secret_keys(development) == first and len(first) == 1
    TokenCipher(first)  # a usable Fernet key
    assert stat.S_IMODE((tmp_path / "var" / "secret-key").stat().st_mode) == 0o600
    with pytest.raises(GoogleSetupError, match="VOICEBOOK_SECRET_KEY is required"):
        secret_keys(Settings(environment="production", data_dir=tmp_path / "prod"))


# -- connecting an account -----------------------------------------------------------------------


async def test_connect_over_loopback_stores_the_grant_encrypted(
    settings: Settings, database: Database, sim: tuple[CalendarState, str]
) -> None:
    state, _ = sim
    email = await connect(settings, database)
    assert email == "frontdesk@riverside-clinic.example"
    assert state.token_grants == ["authorization_code"]
    [refresh_token] = state.refresh_tokens
    [access_token] = state.tokens
    [row] = await raw_rows(database)
    raw = row_bytes(row)
    assert refresh_token.encode() not in raw and access_token.encode() not in raw  # ciphertext only
    assert row["subject"] == email and row["client_id"] == CLIENT_ID and row["revoked_at"] is None
    assert "https://www.googleapis.com/auth/calendar" in row["scopes"].split()
    grant = await grants(database).load("default")
    assert grant is not None
    assert grant.tokens.refresh_token == refresh_token and grant.tokens.access_token == access_token


async def test_refused_consent_stores_nothing(
    settings: Settings, database: Database, sim: tuple[CalendarState, str]
) -> None:
    sim[0].deny_consent = True
    with pytest.raises(GoogleSetupError, match="access_denied"):
        await connect(settings, database)
    assert await raw_rows(database) == []


async def test_code_needs_its_pkce_verifier_and_works_once(sim: tuple[CalendarState, str], client_file: Path) -> None:
    client = OAuthClient.from_file(client_file)
    request = authorization_request(client, "http://127.0.0.1:9/")
    query = parse_qs(urlsplit(await consent_redirect(request.url)).query)
    assert query["state"] == [request.state]
    code = query["code"][0]
    forged = AuthorizationRequest(request.url, request.redirect_uri, request.state, "another-verifier" * 4)
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConnectError, match="Invalid code verifier"):
            await exchange_code(client, forged, code, http=http)
        # The failed attempt used the code up, as Google does: a second try is refused too.
        with pytest.raises(ConnectError, match="invalid_grant"):
            await exchange_code(client, request, code, http=http)
        fresh = authorization_request(client, "http://127.0.0.1:9/")
        code = parse_qs(urlsplit(await consent_redirect(fresh.url)).query)["code"][0]
        tokens = await exchange_code(client, fresh, code, http=http)
    assert tokens.refresh_token in sim[0].refresh_tokens


async def test_headless_connect_in_two_runs_of_the_command(
    sim: tuple[CalendarState, str],
    client_file: Path,
    database_url: str,
    database: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("VOICEBOOK_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("VOICEBOOK_SECRET_KEY", KEY)
    monkeypatch.setenv("GOOGLE_OAUTH_CLIENT_FILE", str(client_file))
    command = ["google", "connect", "--account", "clinic", "--redirect-uri", "http://127.0.0.1:1/"]
    assert await asyncio.to_thread(main, command) == 0
    printed = capsys.readouterr().out
    [url] = re.findall(r"http://\S+/o/oauth2/auth\?\S+", printed)
    pending = tmp_path / "var" / "google-connect-clinic.json"
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    redirected = await consent_redirect(url)  # the browser fails to open it; the operator copies it
    assert redirected.startswith("http://127.0.0.1:1/?code=")

    assert await asyncio.to_thread(main, [*command, "--code", redirected.replace("state=", "state=x")]) == 1
    assert "another connect attempt" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*command, "--code", redirected]) == 0
    assert "connected Google account 'clinic' (frontdesk@riverside-clinic.example)" in capsys.readouterr().out
    assert not pending.exists()

    monkeypatch.setenv("GOOGLE_OAUTH_ACCOUNT", "clinic")
    assert await asyncio.to_thread(main, ["google", "status"]) == 0
    status = capsys.readouterr().out
    assert "account clinic (GOOGLE_OAUTH_ACCOUNT): connected" in status
    assert "google account: frontdesk@riverside-clinic.example" in status and "encrypted with: the first key" in status
    [refresh_token] = sim[0].refresh_tokens
    assert refresh_token not in status and all(token not in status for token in sim[0].tokens)


# -- the calendar on a stored grant ---------------------------------------------------------------


async def test_stored_token_is_used_then_refreshed_once_and_written_back(
    settings: Settings, database: Database, sim: tuple[CalendarState, str], business: Business
) -> None:
    state, _ = sim
    await connect(settings, database)
    [first_token] = state.tokens
    calendar = await load_google_calendar(settings, database)
    assert calendar is not None
    await calendar.create(make_booking(), business)
    assert state.token_grants == ["authorization_code"]  # the stored access token was still good

    state.expire_tokens()  # Google forgot it; the client still believes it valid: a 401, one refresh
    await calendar.create(make_booking(), business)
    assert state.token_grants == ["authorization_code", "refresh_token"]
    [second_token] = state.tokens
    assert second_token != first_token and len(state.live_events(LEE)) == 2
    [row] = await raw_rows(database)
    assert second_token.encode() not in row_bytes(row)
    grant = await grants(database).load("default")
    assert grant is not None and grant.tokens.access_token == second_token
    assert grant.tokens.expires_at is not None and grant.tokens.expires_at > datetime.now(UTC)


async def test_threads_that_find_the_token_expired_together_refresh_once(
    settings: Settings, database: Database, sim: tuple[CalendarState, str], business: Business
) -> None:
    state, _ = sim
    await connect(settings, database)
    store = grants(database)
    grant = await store.load("default")
    assert grant is not None
    expired = replace(grant, tokens=replace(grant.tokens, expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    client = OAuthClient.from_file(client_file_of(settings))
    credentials = StoredGrantCredentials(expired, client, store, asyncio.get_running_loop())
    calendar = GoogleCalendar(credentials, api_endpoint=settings.google_calendar_api_url)
    await asyncio.gather(*(calendar.create(make_booking(), business) for _ in range(6)))
    assert state.token_grants == ["authorization_code", "refresh_token"]
    assert len(state.live_events(LEE)) == 6
    stored = await store.load("default")
    assert stored is not None and stored.tokens.access_token == credentials.token


def client_file_of(settings: Settings) -> Path:
    assert settings.google_oauth_client_file is not None
    return settings.google_oauth_client_file


async def test_revoked_grant_fails_for_good_until_the_account_is_connected_again(
    settings: Settings, database: Database, sim: tuple[CalendarState, str], business: Business
) -> None:
    state, _ = sim
    await connect(settings, database)
    calendar = await load_google_calendar(settings, database)
    assert calendar is not None
    [refresh_token] = state.refresh_tokens
    state.revoke_grant(refresh_token)  # the user removed voicebook's access
    state.expire_tokens()
    with pytest.raises(EffectFailed) as caught:
        await calendar.create(make_booking(), business)
    assert caught.value.permanent is True and caught.value.code == "calendar_auth_failed"
    assert "voicebook google connect --account default" in caught.value.detail
    [row] = await raw_rows(database)
    assert row["revoked_at"] is not None and row["access_token"] is None
    [status] = await grant_statuses(settings, database)
    assert status.revoked_at is not None

    await connect(settings, database)  # the operator connects again; the server is not restarted
    await calendar.create(make_booking(), business)
    assert len(state.live_events(LEE)) == 1
    [row] = await raw_rows(database)
    assert row["revoked_at"] is None


async def test_wrong_secret_key_is_a_clear_error_and_rotation_keeps_working(
    settings: Settings, database: Database, sim: tuple[CalendarState, str], business: Business
) -> None:
    await connect(settings, database)
    with pytest.raises(GoogleSetupError, match="cannot be decrypted with VOICEBOOK_SECRET_KEY"):
        await load_google_calendar(replace(settings, secret_keys=(OTHER_KEY,)), database)

    rotated = replace(settings, secret_keys=(OTHER_KEY, KEY))  # new key first, the old one after it
    [status] = await grant_statuses(rotated, database)
    assert status.key == "older"
    calendar = await load_google_calendar(rotated, database)  # re-encrypts under the new key
    assert calendar is not None
    [status] = await grant_statuses(rotated, database)
    assert status.key == "current"
    new_key_only = replace(settings, secret_keys=(OTHER_KEY,))
    calendar = await load_google_calendar(new_key_only, database)
    assert calendar is not None
    sim[0].expire_tokens()
    await calendar.create(make_booking(), business)  # the refresh, too, is written under the new key
    assert sim[0].token_grants == ["authorization_code", "refresh_token"]
    grant = await grants(database, OTHER_KEY).load("default")
    assert grant is not None and grant.tokens.access_token in sim[0].tokens


async def test_unconnected_account_or_another_client_is_a_clear_error(
    settings: Settings, database: Database, sim: tuple[CalendarState, str], tmp_path: Path
) -> None:
    with pytest.raises(GoogleSetupError, match="no Google account 'default' is connected"):
        await load_google_calendar(settings, database)
    await connect(settings, database)
    state, url = sim
    state.add_client("another-client", "secret-2")
    other = tmp_path / "other-client.json"
    other.write_text(json.dumps(state.client_file("another-client", url)))
    with pytest.raises(GoogleSetupError, match="was connected with OAuth client"):
        await load_google_calendar(replace(settings, google_oauth_client_file=other), database)


async def test_the_service_account_builder_refuses_rather_than_run_without_the_user_calendar(
    settings: Settings,
) -> None:
    with pytest.raises(GoogleSetupError, match="load_google_calendar"):
        build_google_calendar(settings)
    assert build_google_calendar(replace(settings, google_oauth_client_file=None)) is None
