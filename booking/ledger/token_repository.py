"""OAuth grants kept in the ledger: one row per (provider, account name), the tokens as ciphertext.

The ledger stores and returns bytes only. Encrypting and decrypting is the caller's business (the
integration that owns the grant), so the booking package never holds a key or a usable token.

Usage::

    tokens = TokenRepository(database)
    await tokens.put("google", "default", client_id=..., subject="frontdesk@example.com",
                     refresh_token=b"gAAAA...", access_token=None, expires_at=None, scopes=("...",))
    stored = await tokens.get("google", "default")     # StoredToken (ciphertext) or None
    await tokens.record_refresh("google", "default", expected_refresh_token=stored.refresh_token,
                                refresh_token=b"gAAAA...", access_token=b"gAAAA...", expires_at=expiry,
                                scopes=None)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now


@dataclass(frozen=True, slots=True)
class StoredToken:
    """A grant as the ledger holds it: ``refresh_token`` and ``access_token`` are ciphertext."""

    provider: str
    account: str
    client_id: str
    subject: str | None
    refresh_token: bytes
    access_token: bytes | None
    expires_at: datetime | None
    scopes: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None


def _stored(row: Row[Any]) -> StoredToken:
    m = row._mapping
    return StoredToken(
        provider=m["provider"],
        account=m["account"],
        client_id=m["client_id"],
        subject=m["subject"],
        refresh_token=bytes(m["refresh_token"]),
        access_token=bytes(m["access_token"]) if m["access_token"] is not None else None,
        expires_at=m["expires_at"],
        scopes=tuple(str(m["scopes"]).split()),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        revoked_at=m["revoked_at"],
    )


class TokenRepository:
    def __init__(self, database: Database, *, clock: Clock = utc_now) -> None:
        self._db = database
        self._clock = clock
        self._insert: Callable[..., Any] = postgresql.insert if database.dialect == "postgresql" else sqlite.insert

    async def put(
        self,
        provider: str,
        account: str,
        *,
        client_id: str,
        subject: str | None,
        refresh_token: bytes,
        access_token: bytes | None,
        expires_at: datetime | None,
        scopes: tuple[str, ...],
    ) -> StoredToken:
        """Store a new grant for ``account``, replacing whatever grant it had (connecting again after a
        revocation clears the revocation); ``created_at`` is when the account was first connected."""
        now = self._clock()
        values = {
            "client_id": client_id,
            "subject": subject,
            "refresh_token": refresh_token,
            "access_token": access_token,
            "expires_at": expires_at,
            "scopes": " ".join(scopes),
            "updated_at": now,
            "revoked_at": None,
        }
        stmt = (
            self._insert(t.oauth_tokens)
            .values(provider=provider, account=account, created_at=now, **values)
            .on_conflict_do_update(index_elements=["provider", "account"], set_=values)
        )

        def work(conn: Connection) -> None:
            conn.execute(stmt)

        await self._db.write(work)
        stored = await self.get(provider, account)
        assert stored is not None  # written above in a committed transaction
        return stored

    async def record_refresh(
        self,
        provider: str,
        account: str,
        *,
        expected_refresh_token: bytes,
        refresh_token: bytes,
        access_token: bytes | None,
        expires_at: datetime | None,
        scopes: tuple[str, ...] | None,
    ) -> bool:
        """Write back the tokens of a refresh (or the same tokens re-encrypted under a new key), the
        refresh token too (it may have been rotated). Compare-and-set: only while the row still
        holds ``expected_refresh_token`` (the ciphertext the caller just read), so a grant connected
        meanwhile is never overwritten by the old one. Returns whether it was written."""
        values: dict[str, Any] = {
            "refresh_token": refresh_token,
            "access_token": access_token,
            "expires_at": expires_at,
            "updated_at": self._clock(),
        }
        if scopes is not None:
            values["scopes"] = " ".join(scopes)
        return await self._update_if_holding(provider, account, expected_refresh_token, values)

    async def mark_revoked(self, provider: str, account: str, *, expected_refresh_token: bytes) -> bool:
        """Record that the provider refused the grant (``invalid_grant``); compare-and-set like
        :meth:`record_refresh`, so a grant connected since is left alone. Returns whether it was marked."""
        now = self._clock()
        values = {"revoked_at": now, "access_token": None, "expires_at": None, "updated_at": now}
        return await self._update_if_holding(provider, account, expected_refresh_token, values)

    async def _update_if_holding(self, provider: str, account: str, expected: bytes, values: dict[str, Any]) -> bool:
        stmt = (
            update(t.oauth_tokens)
            .where(
                t.oauth_tokens.c.provider == provider,
                t.oauth_tokens.c.account == account,
                t.oauth_tokens.c.refresh_token == expected,
            )
            .values(**values)
        )

        def work(conn: Connection) -> bool:
            return bool(conn.execute(stmt).rowcount)

        return await self._db.write(work)

    async def get(self, provider: str, account: str) -> StoredToken | None:
        query = select(t.oauth_tokens).where(t.oauth_tokens.c.provider == provider, t.oauth_tokens.c.account == account)
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(query)).first()
        return _stored(row) if row is not None else None

    async def list(self, provider: str) -> list[StoredToken]:
        query = select(t.oauth_tokens).where(t.oauth_tokens.c.provider == provider).order_by(t.oauth_tokens.c.account)
        async with self._db.reader.connect() as conn:
            return [_stored(row) for row in await conn.execute(query)]
