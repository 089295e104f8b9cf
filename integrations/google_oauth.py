"""Google Calendar through a user's own account: the OAuth grant, stored encrypted in the ledger.

- :class:`TokenCipher` encrypts tokens before they reach the ledger (``cryptography``'s MultiFernet:
  the first key encrypts, every key decrypts, so a key is rotated by putting the new one first).
- :class:`GoogleGrants` reads and writes grants through the ledger's :class:`TokenRepository`,
  decrypting and encrypting on the way; the ledger only ever sees ciphertext.
- :class:`StoredGrantCredentials` are google-auth user credentials that write every refresh back to the
  ledger, refresh once for all the worker threads that need it, and turn a refused grant
  (``invalid_grant``) into a permanent error that tells the operator what to run.

Connecting an account (the consent flow that yields the first grant) is :mod:`integrations.google_consent`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import google.auth.exceptions
import google.oauth2.credentials
import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from booking.ledger.token_repository import StoredToken, TokenRepository
from integrations.google_calendar import SCOPES

T = TypeVar("T")

PROVIDER = "google"
LEDGER_TIMEOUT_SECONDS = 30.0

log = structlog.get_logger("voicebook.google_oauth")


class SecretKeyError(ValueError):
    """A secret key is malformed, or stored tokens were encrypted with a key that was not given."""


class OAuthClientError(ValueError):
    """The OAuth client file is missing, unreadable or not a Google client; the message says which."""



# -- encryption ----------------------------------------------------------------------------------


def new_secret_key() -> str:
    return Fernet.generate_key().decode()


class TokenCipher:
    """Encrypts tokens with the first of ``keys`` and decrypts with any of them (key rotation)."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise SecretKeyError("no secret key given")
        fernets = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key.strip()))
            except ValueError:
                raise SecretKeyError(f"secret key {position} is not a Fernet key (32 url-safe base64 bytes)") from None
        self._primary = fernets[0]
        self._all = MultiFernet(fernets)

    def encrypt(self, plaintext: str) -> bytes:
        return self._primary.encrypt(plaintext.encode())

    def decrypt(self, ciphertext: bytes) -> str:
        try:
            return self._all.decrypt(ciphertext).decode()
        except InvalidToken:
            raise SecretKeyError("none of the secret keys decrypts it") from None

    def under_current_key(self, ciphertext: bytes) -> bool:
        """Whether the first key decrypts ``ciphertext`` (once every grant is, older keys can go)."""
        try:
            self._primary.decrypt(ciphertext)
        except InvalidToken:
            return False
        return True


# -- the client and the consent flow -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OAuthClient:
    """An OAuth client as Google's console downloads it (``{"installed": {...}}`` or ``{"web": ...}``)."""

    client_id: str
    client_secret: str = field(repr=False)
    auth_uri: str
    token_uri: str

    @classmethod
    def from_file(cls, path: Path) -> OAuthClient:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise OAuthClientError(f"{path}: cannot read the OAuth client file: {exc.strerror}") from None
        except ValueError as exc:
            raise OAuthClientError(f"{path}: not JSON: {exc}") from None
        section = document.get("installed") or document.get("web") if isinstance(document, dict) else None
        if not isinstance(section, dict):
            raise OAuthClientError(f"{path}: not a Google OAuth client file (no 'installed' or 'web' section)")
        missing = [name for name in ("client_id", "client_secret", "auth_uri", "token_uri") if not section.get(name)]
        if missing:
            raise OAuthClientError(f"{path}: the client lacks {', '.join(missing)}")
        return cls(
            client_id=str(section["client_id"]),
            client_secret=str(section["client_secret"]),
            auth_uri=str(section["auth_uri"]),
            token_uri=str(section["token_uri"]),
        )


@dataclass(frozen=True, slots=True)
class GrantTokens:
    refresh_token: str = field(repr=False)
    access_token: str | None = field(repr=False)
    expires_at: datetime | None
    scopes: tuple[str, ...]
    subject: str | None = None
    """The Google account (its email), when the answer carried an ID token."""


@dataclass(frozen=True, slots=True)
class Grant:
    """A stored grant, decrypted."""

    account: str
    client_id: str
    subject: str | None
    tokens: GrantTokens
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class GrantStatus:
    """What ``voicebook google status`` shows: never a token."""

    account: str
    client_id: str
    subject: str | None
    scopes: tuple[str, ...]
    access_expires_at: datetime | None
    connected_at: datetime
    updated_at: datetime
    revoked_at: datetime | None
    key: Literal["current", "older", "unknown"]
    """Which secret key decrypts it: the first, a later one (re-encrypted at the next refresh), none."""


class GoogleGrants:
    def __init__(self, repository: TokenRepository, cipher: TokenCipher) -> None:
        self._repository = repository
        self._cipher = cipher

    async def save_connected(self, account: str, client_id: str, tokens: GrantTokens) -> None:
        await self._repository.put(
            PROVIDER,
            account,
            client_id=client_id,
            subject=tokens.subject,
            refresh_token=self._cipher.encrypt(tokens.refresh_token),
            access_token=self._cipher.encrypt(tokens.access_token) if tokens.access_token else None,
            expires_at=tokens.expires_at,
            scopes=tokens.scopes,
        )

    async def load(self, account: str) -> Grant | None:
        stored = await self._repository.get(PROVIDER, account)
        return None if stored is None else self._decrypted(stored)

    async def save_refreshed(self, account: str, previous_refresh_token: str, tokens: GrantTokens) -> bool:
        """Write a refresh back, unless the account was connected anew meanwhile (its stored refresh
        token is no longer ``previous_refresh_token``): the newer grant wins."""
        stored = await self._holding(account, previous_refresh_token)
        if stored is None or tokens.access_token is None:
            return False
        return await self._repository.record_refresh(
            PROVIDER,
            account,
            expected_refresh_token=stored.refresh_token,
            refresh_token=self._cipher.encrypt(tokens.refresh_token),
            access_token=self._cipher.encrypt(tokens.access_token),
            expires_at=tokens.expires_at,
            scopes=tokens.scopes or None,
        )

    async def reencrypt(self, account: str) -> bool:
        """Write the grant again under the first key if an older key encrypted it (after a rotation, so
        the older key can be dropped). Returns whether it was rewritten."""
        stored = await self._repository.get(PROVIDER, account)
        if stored is None or all(
            self._cipher.under_current_key(sealed) for sealed in (stored.refresh_token, stored.access_token) if sealed
        ):
            return False
        tokens = self._decrypted(stored).tokens
        return await self._repository.record_refresh(
            PROVIDER,
            account,
            expected_refresh_token=stored.refresh_token,
            refresh_token=self._cipher.encrypt(tokens.refresh_token),
            access_token=self._cipher.encrypt(tokens.access_token) if tokens.access_token else None,
            expires_at=tokens.expires_at,
            scopes=None,
        )

    async def mark_revoked(self, account: str, refresh_token: str) -> bool:
        stored = await self._holding(account, refresh_token)
        if stored is None:
            return False
        return await self._repository.mark_revoked(PROVIDER, account, expected_refresh_token=stored.refresh_token)

    async def statuses(self) -> list[GrantStatus]:
        statuses = []
        for stored in await self._repository.list(PROVIDER):
            try:
                self._cipher.decrypt(stored.refresh_token)
                key: Literal["current", "older", "unknown"] = (
                    "current" if self._cipher.under_current_key(stored.refresh_token) else "older"
                )
            except SecretKeyError:
                key = "unknown"
            statuses.append(
                GrantStatus(
                    account=stored.account,
                    client_id=stored.client_id,
                    subject=stored.subject,
                    scopes=stored.scopes,
                    access_expires_at=stored.expires_at,
                    connected_at=stored.created_at,
                    updated_at=stored.updated_at,
                    revoked_at=stored.revoked_at,
                    key=key,
                )
            )
        return statuses

    async def _holding(self, account: str, refresh_token: str) -> StoredToken | None:
        stored = await self._repository.get(PROVIDER, account)
        if stored is None or self._decrypted(stored).tokens.refresh_token != refresh_token:
            return None
        return stored

    def _decrypted(self, stored: StoredToken) -> Grant:
        try:
            refresh_token = self._cipher.decrypt(stored.refresh_token)
            access_token = self._cipher.decrypt(stored.access_token) if stored.access_token is not None else None
        except SecretKeyError:
            raise SecretKeyError(
                f"the Google grant {stored.account!r} cannot be decrypted with VOICEBOOK_SECRET_KEY: it was "
                "encrypted with another key. Give the old key after the new one (comma-separated), or run "
                f"`voicebook google connect --account {stored.account}` again"
            ) from None
        tokens = GrantTokens(refresh_token, access_token, stored.expires_at, stored.scopes, stored.subject)
        return Grant(stored.account, stored.client_id, stored.subject, tokens, stored.revoked_at)


# -- credentials that keep the ledger up to date ---------------------------------------------------


def _naive_utc(value: datetime | None) -> datetime | None:
    """google-auth compares expiries with a naive UTC "now"."""
    return value.astimezone(UTC).replace(tzinfo=None) if value is not None else None


def _is_refused_grant(error: google.auth.exceptions.RefreshError) -> bool:
    details = error.args[1] if len(error.args) > 1 else None
    return isinstance(details, dict) and details.get("error") == "invalid_grant"


class StoredGrantCredentials(google.oauth2.credentials.Credentials):
    """User credentials of a grant stored in the ledger, for :class:`GoogleCalendar`.

    google-auth refreshes inside ``AuthorizedHttp`` in the calendar's worker threads, so:

    - refreshes take a lock, and a thread skips its refresh when the token changed since it last sent
      one (another thread refreshed meanwhile): threads that find the token expired together, or all get
      a 401 for it, cause one refresh, not one each;
    - each refresh is written back, encrypted, before the new token is used: the write runs on the
      event loop ``loop`` (the ledger is async), and the worker thread waits for it. Must not be
      refreshed on that loop's own thread (it would wait for itself); a failed write is logged and the
      token still used (the stored refresh token stays valid);
    - a refused grant (``invalid_grant``: revoked, expired, password changed) is looked up again: if the
      account was connected anew meanwhile, that grant is adopted; otherwise it is marked revoked and
      the refresh fails for good, saying which command to run.
    """

    def __init__(
        self,
        grant: Grant,
        client: OAuthClient,
        grants: GoogleGrants,
        loop: asyncio.AbstractEventLoop,
        *,
        ledger_timeout: float = LEDGER_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]  # untyped in google-auth
            grant.tokens.access_token,
            refresh_token=grant.tokens.refresh_token,
            token_uri=client.token_uri,
            client_id=client.client_id,
            client_secret=client.client_secret,
            scopes=list(SCOPES),
            expiry=_naive_utc(grant.tokens.expires_at),
        )
        self._account = grant.account
        self._grants = grants
        self._loop = loop
        self._ledger_timeout = ledger_timeout
        self._lock = threading.Lock()
        self._sent = threading.local()  # the token this thread last put on a request

    def apply(self, headers: Any, token: str | None = None) -> None:
        super().apply(headers, token)  # type: ignore[no-untyped-call]  # untyped in google-auth
        self._sent.token = token or self.token

    def refresh(self, request: Any) -> None:
        with self._lock:
            if self.valid and self.token != getattr(self._sent, "token", None):
                return  # another thread refreshed since this one last sent the token
            self._refresh_locked(request)

    def _refresh_locked(self, request: Any) -> None:
        refresh_token: str = self.refresh_token
        try:
            super().refresh(request)  # type: ignore[no-untyped-call]  # untyped in google-auth
        except google.auth.exceptions.RefreshError as error:
            if not _is_refused_grant(error):
                raise
            if self._adopt_newer_grant(refresh_token):
                self._refresh_locked(request)
                return
            try:
                self._on_loop(self._grants.mark_revoked(self._account, refresh_token))
            except Exception as exc:  # the refusal stands whether or not the ledger heard of it
                log.warning("google_revocation_not_saved", account=self._account, error=repr(exc))
            raise google.auth.exceptions.RefreshError(  # type: ignore[no-untyped-call]  # untyped in google-auth
                f"Google refused the stored grant of account {self._account!r} ({error.args[0]}): it was "
                f"revoked or has expired. Run `voicebook google connect --account {self._account}` again",
                retryable=False,
            ) from error
        tokens = GrantTokens(self.refresh_token, self.token, _aware(self.expiry), tuple(self.granted_scopes or ()))
        try:
            self._on_loop(self._grants.save_refreshed(self._account, refresh_token, tokens))
        except Exception as exc:  # the ledger is down or slow: the new token works all the same
            log.warning("google_token_not_saved", account=self._account, error=repr(exc))

    def _adopt_newer_grant(self, refused: str) -> bool:
        """Take the stored grant when it is not the refused one (the account was connected again)."""
        try:
            grant = self._on_loop(self._grants.load(self._account))
        except SecretKeyError as exc:
            raise google.auth.exceptions.RefreshError(str(exc), retryable=False) from None  # type: ignore[no-untyped-call]
        except Exception as exc:  # the ledger cannot say whether a newer grant exists: try again later
            raise google.auth.exceptions.RefreshError(  # type: ignore[no-untyped-call]  # untyped in google-auth
                f"Google refused the grant of account {self._account!r}, and the ledger could not be read for a "
                f"newer one: {exc!r}",
                retryable=True,
            ) from exc
        if grant is None or grant.revoked_at is not None or grant.client_id != self.client_id:
            return False
        if grant.tokens.refresh_token == refused:
            return False
        # google-auth keeps the refresh token private and read-only; a new grant replaces it here only.
        self._refresh_token = grant.tokens.refresh_token
        self.token = None  # refresh with the new grant rather than trust its stored access token
        log.info("google_grant_adopted", account=self._account)
        return True

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coroutine.close()
            raise RuntimeError("StoredGrantCredentials must refresh in a worker thread, not on the event loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=self._ledger_timeout)


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None else None
