"""Bearer tokens of the admin API, each with a role and an optional tenant.

The tenant, when set, limits the token to the servers of that tenant (voice_server/api/auth.py checks it
against the server's own); a token without one opens every server of the deployment.

A token is ``vb_`` and 43 url-safe characters (32 random bytes), shown once when it is created. The ledger
keeps only its SHA-256: a token is high-entropy random, so nobody can guess one back from its hash, and a
slow password hash (bcrypt, scrypt) would only add milliseconds to every request. Creating, revoking and
changing the role of a token are audited (``role_changed``) in the same transaction.

Usage::

    tokens = ApiTokenLedger(database)
    created = await tokens.create("ops-laptop", Role.OPERATOR, actor="cli")
    print(created.token)                      # the only time it is shown
    found = await tokens.find(created.token)  # ApiToken, or None for an unknown or revoked token
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, insert, select, update
from sqlalchemy.engine import Connection

from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now

TOKEN_PREFIX = "vb_"


class Role(enum.StrEnum):
    """What a token may do; each role may do everything the ones before it may."""

    VIEWER = "viewer"  # read bookings, calls and reports, personal data masked
    OPERATOR = "operator"  # also bookings, dead letters and effects; personal data in full
    ADMIN = "admin"  # everything, keys and erasure included

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: int
    name: str
    role: Role
    tenant: str | None
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreatedToken:
    record: ApiToken
    token: str
    """The token itself: shown once, stored nowhere."""


def _token(row: Row[Any]) -> ApiToken:
    return ApiToken(
        id=int(row.id),
        name=row.name,
        role=Role(row.role),
        tenant=row.tenant,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


class ApiTokenLedger:
    def __init__(self, database: Database, *, clock: Clock = utc_now) -> None:
        self._db = database
        self._clock = clock

    async def create(self, name: str, role: Role, *, actor: str, tenant: str | None = None) -> CreatedToken:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()

        def work(conn: Connection) -> ApiToken:
            row = conn.execute(
                insert(t.api_tokens)
                .values(name=name, token_hash=token_hash(token), role=role.value, tenant=tenant, created_at=now)
                .returning(*t.api_tokens.c)
            ).one()
            append_audit(
                conn,
                at=now,
                actor=actor,
                action=AuditAction.ROLE_CHANGED,
                subject_kind="api_token",
                subject_id=str(row.id),
                details={"change": "created", "name": name, "role": role.value, "tenant": tenant},
            )
            return _token(row)

        return CreatedToken(await self._db.write(work), token)

    async def set_role(self, token_id: int, role: Role, *, actor: str) -> ApiToken | None:
        """Give a live token another role; None when there is no such live token."""
        return await self._change(token_id, actor, {"role": role.value}, change="role")

    async def revoke(self, token_id: int, *, actor: str) -> ApiToken | None:
        """Revoke a live token; None when there is no such live token (unknown, or revoked already)."""
        return await self._change(token_id, actor, {"revoked_at": self._clock()}, change="revoked")

    async def _change(self, token_id: int, actor: str, values: dict[str, Any], *, change: str) -> ApiToken | None:
        c = t.api_tokens.c
        now = self._clock()

        def work(conn: Connection) -> ApiToken | None:
            before = conn.execute(select(c.role).where(c.id == token_id, c.revoked_at.is_(None))).first()
            if before is None:
                return None
            row = conn.execute(
                update(t.api_tokens).where(c.id == token_id).values(**values).returning(*t.api_tokens.c)
            ).one()
            append_audit(
                conn,
                at=now,
                actor=actor,
                action=AuditAction.ROLE_CHANGED,
                subject_kind="api_token",
                subject_id=str(token_id),
                details={"change": change, "from_role": before.role, "role": row.role},
            )
            return _token(row)

        return await self._db.write(work)

    async def find(self, token: str) -> ApiToken | None:
        """The live token ``token`` is, or None (unknown or revoked). One indexed read."""
        c = t.api_tokens.c
        query = select(t.api_tokens).where(c.token_hash == token_hash(token), c.revoked_at.is_(None))
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(query)).first()
        return _token(row) if row is not None else None

    async def get(self, token_id: int) -> ApiToken | None:
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(select(t.api_tokens).where(t.api_tokens.c.id == token_id))).first()
        return _token(row) if row is not None else None

    async def list(self) -> list[ApiToken]:
        async with self._db.reader.connect() as conn:
            return [_token(row) for row in await conn.execute(select(t.api_tokens).order_by(t.api_tokens.c.id))]

    async def touch(self, token_id: int) -> None:
        """Record that the token was used now (the API calls it at most once per cache period)."""
        now = self._clock()
        c = t.api_tokens.c
        await self._db.write(
            lambda conn: conn.execute(update(t.api_tokens).where(c.id == token_id).values(last_used_at=now))
        )
