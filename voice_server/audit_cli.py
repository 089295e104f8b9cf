"""``voicebook audit verify`` (is the audit log's hash chain whole?) and ``voicebook tokens`` (the admin
API's tokens and their roles).

Exit codes of ``audit verify``: 0 the chain holds, 1 an entry was edited, removed or reordered (printed),
2 the configuration is unusable. ``tokens``: 0 done, 1 no such live token, 2 the configuration is
unusable. Token changes made here are audited with the actor ``cli``. ``tokens create --tenant`` warns on
stderr (and still makes the token) when the tenant is not the one this configuration's server serves: such
a token opens only that other tenant's servers.
"""

from __future__ import annotations

from typing import TextIO

from booking.business import load_business
from booking.errors import ConfigurationError
from booking.ledger.api_token_repository import ApiToken, ApiTokenLedger, Role
from booking.ledger.audit import verify_audit
from voice_server.api.auth import server_tenant
from voice_server.dlq_cli import CONFIGURATION, NOT_FOUND, OK, Unusable, open_ledger, streams
from voice_server.settings import Settings

BROKEN = 1
CLI_ACTOR = "cli"


async def audit_verify(settings: Settings, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = streams(out, err)
    try:
        async with open_ledger(settings) as database:
            result = await verify_audit(database)
    except Unusable as exc:
        print(f"voicebook audit: {exc}", file=err)
        return CONFIGURATION
    if not result.ok:
        assert result.breach is not None
        print(
            f"audit log BROKEN at entry {result.broken_id} ({result.breach.value}): {result.detail}; "
            f"{result.entries} entries before it verified",
            file=out,
        )
        return BROKEN
    # The head hash is worth keeping elsewhere: a later rewrite of the whole chain no longer matches it.
    print(f"audit log ok: {result.entries} entries, head {result.head_id} {result.head_hash}", file=out)
    return OK


def _line(token: ApiToken) -> str:
    state = f"revoked {token.revoked_at.isoformat()}" if token.revoked_at else "live"
    used = token.last_used_at.isoformat() if token.last_used_at else "never"
    return (
        f"{token.id}  {token.name}  {token.role.value}  tenant={token.tenant or '-'}  "
        f"created {token.created_at.isoformat()}  last used {used}  {state}"
    )


async def tokens_create(
    settings: Settings,
    name: str,
    role: Role,
    *,
    tenant: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out, err = streams(out, err)
    if tenant is not None:
        _warn_of_another_tenant(settings, tenant, err)
    try:
        async with open_ledger(settings) as database:
            created = await ApiTokenLedger(database).create(name, role, actor=CLI_ACTOR, tenant=tenant)
    except Unusable as exc:
        print(f"voicebook tokens: {exc}", file=err)
        return CONFIGURATION
    print(_line(created.record), file=out)
    print(f"token (shown once, keep it now): {created.token}", file=out)
    return OK


def _warn_of_another_tenant(settings: Settings, tenant: str, err: TextIO) -> None:
    """Say so when ``tenant`` is not this server's: most often a typo, which makes a token no server takes.
    Only a warning, since one ledger may be shared by the servers of several tenants."""
    try:
        ours = settings.tenant or server_tenant(settings, load_business(settings.business_file))
    except ConfigurationError as exc:
        print(f"voicebook tokens: warning: cannot tell this server's tenant ({exc})", file=err)
        return
    if tenant != ours:
        print(
            f"voicebook tokens: warning: tenant {tenant!r} is not this server's ({ours!r}, from "
            f"{'VOICEBOOK_TENANT' if settings.tenant else 'the business name'}); this server will refuse the token",
            file=err,
        )


async def tokens_list(settings: Settings, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = streams(out, err)
    try:
        async with open_ledger(settings) as database:
            tokens = await ApiTokenLedger(database).list()
    except Unusable as exc:
        print(f"voicebook tokens: {exc}", file=err)
        return CONFIGURATION
    for token in tokens:
        print(_line(token), file=out)
    if not tokens:
        print("no tokens (VOICEBOOK_ADMIN_TOKEN is the only way in)", file=out)
    return OK


async def tokens_revoke(
    settings: Settings, token_id: int, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = streams(out, err)
    try:
        async with open_ledger(settings) as database:
            revoked = await ApiTokenLedger(database).revoke(token_id, actor=CLI_ACTOR)
    except Unusable as exc:
        print(f"voicebook tokens: {exc}", file=err)
        return CONFIGURATION
    if revoked is None:
        print(f"voicebook tokens: no live token {token_id}", file=err)
        return NOT_FOUND
    # Servers may keep accepting it for up to voice_server.api.auth.CACHE_SECONDS.
    print(_line(revoked), file=out)
    return OK


async def tokens_set_role(
    settings: Settings, token_id: int, role: Role, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = streams(out, err)
    try:
        async with open_ledger(settings) as database:
            changed = await ApiTokenLedger(database).set_role(token_id, role, actor=CLI_ACTOR)
    except Unusable as exc:
        print(f"voicebook tokens: {exc}", file=err)
        return CONFIGURATION
    if changed is None:
        print(f"voicebook tokens: no live token {token_id}", file=err)
        return NOT_FOUND
    print(_line(changed), file=out)
    return OK
