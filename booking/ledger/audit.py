"""The audit log: who did what to sensitive records, in a hash chain that shows any later tampering.

Every entry stores the SHA-256 of its own canonical encoding (:func:`entry_hash`) and the hash of the
entry before it (``prev_hash``; the first entry chains onto 64 zeros). Ids are assigned here, one after
the other with no gap, not by a sequence: a PostgreSQL sequence skips the values of rolled-back
transactions, and a gap must mean that someone removed an entry. So whoever edits an entry breaks its
hash, whoever removes one leaves a gap (or, renumbering, breaks the next ``prev_hash``), and whoever
swaps two entries moves contents to ids they were not hashed with. :func:`verify_audit` finds the first
such entry and says which of the three it looks like.

Appends are serialized through the one row of ``audit_chain_head`` (the newest id and hash): the
``UPDATE ... RETURNING`` that reads it also row-locks it on PostgreSQL until the transaction ends, so two
concurrent transactions can never both chain onto the same entry; SQLite has one writer anyway. Append
last in a transaction: whoever holds the head then only has its commit left, so a booking insert that
waits on another transaction never waits while holding the head.

What the chain cannot show on its own: someone with write access who rewrites the whole chain from an
entry onwards, head included. ``voicebook audit verify`` prints the head hash; keep it somewhere else
(a ticket, a log shipped off the host) and a later rewrite no longer matches it.

Usage, inside a ledger transaction (``Database.write(work)``)::

    append_audit(conn, at=now, actor="admin-api", action=AuditAction.READ, subject_kind="call",
                 subject_id=call_sid, details={"what": "transcript"})
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from sqlalchemy import Row, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from booking.ledger import schema as t
from booking.ledger.database import Database

log = structlog.get_logger("voicebook.audit")

GENESIS_HASH = "0" * 64
CHAIN = "audit"
"""The name of the one chain (``audit_chain_head.chain``)."""
VERIFY_PAGE = 1000
"""Entries read per query while verifying: the table is streamed, never loaded whole."""
REORDER_WINDOW = 64
"""How far from a broken entry :func:`verify_audit` looks for the id its contents were hashed with."""


class AuditAction(enum.StrEnum):
    GENERATED = "generated"
    EDITED = "edited"
    EXPORTED = "exported"
    READ = "read"  # a transcript, recording or report read
    DELETED = "deleted"  # a transcript or recording removed by retention
    APPROVED = "approved"  # an operator let a trigger held for review run its actions
    ERASED = "erased"  # a person's data removed or anonymised on request
    BOOKING_CHANGED = "booking_changed"  # created, rescheduled, cancelled, completed, no-show
    KEY_ROTATED = "key_rotated"
    ROLE_CHANGED = "role_changed"  # an API token created, revoked or given another role
    ACCESS_DENIED = "access_denied"  # an API request with an unknown token or too small a role


class AuditDetailsError(TypeError):
    """Details that cannot be hashed reproducibly."""


def _json_safe(value: Any, where: str) -> Any:
    """``value`` as plain JSON types. Floats are refused: JSONB may hand one back spelled otherwise
    (``1e20`` as ``100000000000000000000``), which would break its entry's hash."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        raise AuditDetailsError(f"audit details {where}: a float cannot be hashed reproducibly; give a string")
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, Sequence):
    CONSENT_CHANGED = "consent_changed"  # an operator recorded a person's grant or withdrawal of consent
        return [_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, enum.Enum):
        return _json_safe(value.value, where)
    raise AuditDetailsError(f"audit details {where}: {type(value).__name__} is not JSON")


def entry_hash(
    *,
    id: int,
    at: datetime,
    actor: str,
    action: str,
    subject_kind: str,
    subject_id: str,
    details: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """SHA-256 (hex) of the entry's canonical encoding: its fields as one JSON object, keys sorted."""
    canonical = orjson.dumps(
        {
            "id": id,
            "at": at.astimezone(UTC).isoformat(),
            "actor": actor,
            "action": action,
            "subject_kind": subject_kind,
            "subject_id": subject_id,
            "details": details,
            "prev_hash": prev_hash,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def _take_head(conn: Connection) -> tuple[int, str]:
    """Reserve the next id: the newest entry's id and hash, with the head row locked (PostgreSQL)."""
    h = t.audit_chain_head.c
    bump = update(t.audit_chain_head).where(h.chain == CHAIN).values(last_id=h.last_id + 1)
    row = conn.execute(bump.returning(h.last_id, h.entry_hash)).first()
    if row is not None:
        return int(row.last_id) - 1, str(row.entry_hash)
    # No head row: a ledger emptied by hand (tests truncate every table). Seed it from the newest entry
    # so appends go on; if entries exist, a missing head is itself worth an operator's look.
    a = t.audit_events.c
    newest = conn.execute(select(a.id, a.entry_hash).order_by(a.id.desc()).limit(1)).first()
    last_id, last_hash = (int(newest.id), str(newest.entry_hash)) if newest is not None else (0, GENESIS_HASH)
    if newest is not None:
        log.warning("audit_chain_head_missing", last_id=last_id)
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(
        dialect_insert(t.audit_chain_head)
        .values(chain=CHAIN, last_id=last_id, entry_hash=last_hash)
        .on_conflict_do_nothing(index_elements=["chain"])
    )
    row = conn.execute(bump.returning(h.last_id, h.entry_hash)).one()
    return int(row.last_id) - 1, str(row.entry_hash)


def append_audit(
    conn: Connection,
    *,
    at: datetime,
    actor: str,
    action: AuditAction | str,
    subject_kind: str,
    subject_id: str,
    details: Mapping[str, Any] | None = None,
) -> int:
    """Append one entry to the chain in the caller's transaction; returns its id. Call it last in the
    transaction (see the module's docstring). ``details`` must not hold personal data (phone numbers,
    names): the log is kept after an erasure."""
    action_value = AuditAction(action).value
    clean = _json_safe(dict(details or {}), "details")
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at.isoformat()} given as an audit entry's time")
    at = at.astimezone(UTC)
    last_id, prev_hash = _take_head(conn)
    entry_id = last_id + 1
    digest = entry_hash(
        id=entry_id,
        at=at,
        actor=actor,
        action=action_value,
        subject_kind=subject_kind,
        subject_id=subject_id,
        details=clean,
        prev_hash=prev_hash,
    )
    conn.execute(
        insert(t.audit_events).values(
            id=entry_id,
            at=at,
            actor=actor,
            action=action_value,
            subject_kind=subject_kind,
            subject_id=subject_id,
            details=clean,
            prev_hash=prev_hash,
            entry_hash=digest,
        )
    )
    h = t.audit_chain_head.c
    conn.execute(update(t.audit_chain_head).where(h.chain == CHAIN).values(entry_hash=digest))
    return entry_id


# -- verification ---------------------------------------------------------------------------------


class Breach(enum.StrEnum):
    EDITED = "edited"  # an entry's contents no longer match its hash
    REMOVED = "removed"  # an id is missing, or an entry no longer chains onto the one before it
    REORDERED = "reordered"  # an entry holds contents that were hashed under another id


@dataclass(frozen=True, slots=True)
class AuditVerification:
    entries: int
    """Entries checked (up to the head as it was when the check began)."""
    head_id: int
    head_hash: str
    broken_id: int | None = None
    """The first entry found broken (for a removal, the first missing id); None when the chain holds."""
    breach: Breach | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.breach is None


def _recomputed(row: Row[Any], *, id: int, prev_hash: str) -> str:
    return entry_hash(
        id=id,
        at=row.at,
        actor=row.actor,
        action=row.action,
        subject_kind=row.subject_kind,
        subject_id=row.subject_id,
        details=row.details,
        prev_hash=prev_hash,
    )


async def _moved_from(database: Database, row: Row[Any]) -> int | None:
    """The id ``row``'s contents were hashed under, when it is another entry's near by: its contents
    moved with their hashes (the row's own ``prev_hash``/``entry_hash`` verify under that id), or without
    them (the hashes still in that id's row do)."""
    a = t.audit_events.c
    query = (
        select(t.audit_events)
        .where(a.id.between(row.id - REORDER_WINDOW, row.id + REORDER_WINDOW), a.id != row.id)
        .order_by(a.id)
    )
    async with database.reader.connect() as conn:
        neighbours = (await conn.execute(query)).all()
    for other in neighbours:
        if _recomputed(row, id=other.id, prev_hash=row.prev_hash) == row.entry_hash:
            return int(other.id)
        if _recomputed(row, id=other.id, prev_hash=other.prev_hash) == other.entry_hash:
            return int(other.id)
    return None


async def verify_audit(database: Database, *, page: int = VERIFY_PAGE) -> AuditVerification:
    """Walk the chain from the first entry to the head, ``page`` entries per query, and report the first
    entry that was edited, removed or reordered. Entries appended while it runs are left for next time."""
    h, a = t.audit_chain_head.c, t.audit_events.c
    async with database.reader.connect() as conn:
        head = (await conn.execute(select(h.last_id, h.entry_hash).where(h.chain == CHAIN))).first()
    if head is None:
        async with database.reader.connect() as conn:
            newest = (await conn.execute(select(a.id).order_by(a.id.desc()).limit(1))).first()
        if newest is None:
            return AuditVerification(entries=0, head_id=0, head_hash=GENESIS_HASH)
        return AuditVerification(
            entries=0,
            head_id=0,
            head_hash=GENESIS_HASH,
            broken_id=int(newest.id),
            breach=Breach.REMOVED,
            detail="the chain's head row is missing while entries exist",
        )
    head_id, head_hash = int(head.last_id), str(head.entry_hash)

    def broken(entry_id: int, breach: Breach, detail: str, checked: int) -> AuditVerification:
        return AuditVerification(checked, head_id, head_hash, broken_id=entry_id, breach=breach, detail=detail)

    expected_id, prev_hash, checked = 1, GENESIS_HASH, 0
    while expected_id <= head_id:
        query = select(t.audit_events).where(a.id >= expected_id, a.id <= head_id).order_by(a.id).limit(page)
        async with database.reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return broken(
                expected_id,
                Breach.REMOVED,
                f"entries {expected_id} to {head_id} are missing (the head says the chain ends at {head_id})",
                checked,
            )
        for row in rows:
            if row.id != expected_id:
                return broken(
                    expected_id,
                    Breach.REMOVED,
                    f"entry {expected_id} is missing: the chain jumps from {expected_id - 1} to {row.id}",
                    checked,
                )
            if _recomputed(row, id=row.id, prev_hash=row.prev_hash) != row.entry_hash:
                origin = await _moved_from(database, row)
                if origin is not None:
                    return broken(
                        row.id, Breach.REORDERED, f"entry {row.id} holds the contents of entry {origin}", checked
                    )
                return broken(row.id, Breach.EDITED, f"entry {row.id} no longer matches its hash", checked)
            if row.prev_hash != prev_hash:
                return broken(
                    row.id,
                    Breach.REMOVED,
                    f"entry {row.id} does not chain onto entry {row.id - 1}: "
                    "an entry was removed and the rest renumbered, or the one before was rewritten",
                    checked,
                )
            prev_hash, expected_id, checked = row.entry_hash, expected_id + 1, checked + 1
    if prev_hash != head_hash:
        return broken(
            head_id, Breach.EDITED, f"entry {head_id} does not match the hash the chain's head recorded", checked
        )
    return AuditVerification(entries=checked, head_id=head_id, head_hash=head_hash)
