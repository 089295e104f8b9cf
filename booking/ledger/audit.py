"""The audit log: who did what to sensitive records, in a hash chain that shows any later tampering.

Every entry stores the SHA-256 of its own canonical encoding (:func:`entry_hash`) and the hash of the
entry before it (``prev_hash``; the first entry chains onto 64 zeros). Ids are assigned here, one after
the other with no gap, not by a sequence: a PostgreSQL sequence skips the values of rolled-back
transactions, and a gap must mean that someone removed an entry. So whoever edits an entry breaks its
hash, whoever removes one leaves a gap (or, renumbering, breaks the next ``prev_hash``), and whoever
swaps two entries moves contents to ids they were not hashed with. :func:`verify_audit` finds the first
such entry and says which of the three it looks like.

Entries are written once per transaction, not once per call. :func:`append_audit` checks the entry and
keeps it on the connection (``Connection.info``); :func:`flush_audit`, which the ledger's transaction
runner (``Database.write``, group commit's shared transactions included) calls after the last write and
just before COMMIT, takes the head once for all of them, hashes them in order, inserts them in one
statement and moves the head once. Written one entry at a time (two head statements and an insert per
booking), the audit log took a quarter to two fifths of a booking transaction's time in profiles of the
SQLite writer (docs/benchmarks.md).

The head is one row, ``audit_chain_head`` (the newest id and hash): the ``UPDATE ... RETURNING`` that
reserves the ids also row-locks it on PostgreSQL until the transaction ends, so two concurrent
transactions can never both chain onto the same entry; SQLite has one writer anyway. The flush comes last
in the transaction: whoever holds the head then only has its commit left, so a booking insert that waits
on another transaction never waits while holding the head. Pending entries live exactly as long as their
transaction: :func:`track_pending_entries` drops them when a transaction begins or rolls back (a group
commit batch that failed and is re-run one write at a time leaves none behind; a rolled-back savepoint
drops the entries appended since it), and refuses a COMMIT that would leave some unwritten.

What the chain cannot show on its own: someone with write access who rewrites the whole chain from an
entry onwards, head included. ``voicebook audit verify`` prints the head hash; keep it somewhere else
(a ticket, a log shipped off the host) and a later rewrite no longer matches it.

Usage, inside a ledger transaction (``Database.write(work)``), anywhere in ``work``::

    append_audit(conn, at=now, actor="admin-api", action=AuditAction.READ, subject_kind="call",
                 subject_id=call_sid, details={"what": "transcript"})
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from sqlalchemy import Engine, Integer, Row, bindparam, event, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from booking.ledger import schema as t
from booking.ledger.combined import CombinedWrite

if TYPE_CHECKING:  # database.py runs the flush, so it imports this module
    from booking.ledger.database import Database

log = structlog.get_logger("voicebook.audit")

GENESIS_HASH = "0" * 64
CHAIN = "audit"
"""The name of the one chain (``audit_chain_head.chain``)."""
VERIFY_PAGE = 1000
"""Entries read per query while verifying: the table is streamed, never loaded whole."""
REORDER_WINDOW = 64
"""How far from a broken entry :func:`verify_audit` looks for the id its contents were hashed with."""
PENDING = "voicebook.audit.pending"
"""``Connection.info`` key: the entries appended in the connection's transaction, not yet written."""
SAVEPOINTS = "voicebook.audit.savepoints"
"""``Connection.info`` key: how many entries were pending when each open savepoint began."""


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
    CONSENT_CHANGED = "consent_changed"  # an operator recorded a person's grant or withdrawal of consent


class AuditDetailsError(TypeError):
    """Details that cannot be hashed reproducibly."""


class UnflushedAuditError(RuntimeError):
    """A transaction tried to commit with audit entries it never wrote (it did not run through
    ``Database.write``, whose commit flushes them)."""


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """An entry checked by :func:`append_audit`, waiting for its transaction's flush to get an id."""

    at: datetime
    actor: str
    action: str
    subject_kind: str
    subject_id: str
    details: dict[str, Any]


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


_h = t.audit_chain_head.c
# Built once: constructing the statements per flush cost more than running them.
_RESERVE = (
    update(t.audit_chain_head)
    .where(_h.chain == CHAIN)
    .values(last_id=_h.last_id + bindparam("reserved", type_=Integer))
    .returning(_h.last_id, _h.entry_hash)
)
_MOVE_HEAD = update(t.audit_chain_head).where(_h.chain == CHAIN).values(entry_hash=bindparam("newest_hash"))


def _take_head(conn: Connection, count: int) -> tuple[int, str]:
    """Reserve the next ``count`` ids: returns the newest entry's id and hash, with the head row locked
    (PostgreSQL) until the transaction ends."""
    row = conn.execute(_RESERVE, {"reserved": count}).first()
    if row is not None:
        return int(row.last_id) - count, str(row.entry_hash)
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
    row = conn.execute(_RESERVE, {"reserved": count}).one()
    return int(row.last_id) - count, str(row.entry_hash)


def append_audit(
    conn: Connection,
    *,
    at: datetime,
    actor: str,
    action: AuditAction | str,
    subject_kind: str,
    subject_id: str,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Add one entry to the chain in the caller's transaction. The entry is checked now (a bad one fails
    the caller's write, not its batch) and written, with its id, by the transaction's flush just before
    COMMIT (see the module's docstring); the id is not known before. ``details`` must not hold personal
    data (phone numbers, names): the log is kept after an erasure."""
    action_value = AuditAction(action).value
    clean = _json_safe(dict(details or {}), "details")
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at.isoformat()} given as an audit entry's time")
    entry = PendingEntry(at.astimezone(UTC), actor, action_value, subject_kind, subject_id, clean)
    conn.info.setdefault(PENDING, []).append(entry)


def pending_entries(conn: Connection) -> tuple[PendingEntry, ...]:
    """The entries appended in ``conn``'s transaction that its flush has not written yet."""
    return tuple(conn.info.get(PENDING, ()))


def flush_audit(conn: Connection) -> int:
    """Write the entries appended in ``conn``'s transaction: one head update reserving their ids, one
    multi-row insert, one head update to the newest hash (the last two one statement on PostgreSQL).
    Returns how many. Call it last, right before COMMIT: from here on the transaction holds the head
    (PostgreSQL)."""
    pending: list[PendingEntry] = conn.info.pop(PENDING, None) or []
    conn.info.pop(SAVEPOINTS, None)
    if not pending:
        return 0
    last_id, prev_hash = _take_head(conn, len(pending))
    rows: list[dict[str, Any]] = []
    for entry_id, entry in enumerate(pending, start=last_id + 1):
        digest = entry_hash(
            id=entry_id,
            at=entry.at,
            actor=entry.actor,
            action=entry.action,
            subject_kind=entry.subject_kind,
            subject_id=entry.subject_id,
            details=entry.details,
            prev_hash=prev_hash,
        )
        rows.append(
            {
                "id": entry_id,
                "at": entry.at,
                "actor": entry.actor,
                "action": entry.action,
                "subject_kind": entry.subject_kind,
                "subject_id": entry.subject_id,
                "details": entry.details,
                "prev_hash": prev_hash,
                "entry_hash": digest,
            }
        )
        prev_hash = digest
    # The entries and the head's new hash in one statement on PostgreSQL (booking/ledger/combined.py).
    writes = CombinedWrite()
    writes.insert(t.audit_events, rows)
    writes.update(_MOVE_HEAD, {"newest_hash": prev_hash})
    writes.send(conn)
    return len(rows)


# -- the pending entries' lifetime ----------------------------------------------------------------


def _drop_pending(conn: Connection, *_: Any) -> None:
    """A transaction begins or rolls back: whatever was appended before belongs to no transaction."""
    info = conn.info
    if PENDING in info or SAVEPOINTS in info:
        info.pop(PENDING, None)
        info.pop(SAVEPOINTS, None)


def _refuse_unflushed(conn: Connection) -> None:
    pending = conn.info.get(PENDING)
    if pending:
        raise UnflushedAuditError(
            f"{len(pending)} audit entries (the first: {pending[0].action} {pending[0].subject_kind} "
            f"{pending[0].subject_id}) were appended in a transaction that commits without writing them: "
            "run it through Database.write"
        )
    conn.info.pop(SAVEPOINTS, None)


def _savepoint(conn: Connection, name: str | None) -> None:
    conn.info.setdefault(SAVEPOINTS, []).append(len(conn.info.get(PENDING, ())))


def _rollback_savepoint(conn: Connection, name: str | None, context: Any) -> None:
    marks: list[int] = conn.info.get(SAVEPOINTS, [])
    if marks:
        del conn.info.get(PENDING, [])[marks.pop() :]


def _release_savepoint(conn: Connection, name: str | None, context: Any) -> None:
    marks: list[int] = conn.info.get(SAVEPOINTS, [])
    if marks:
        marks.pop()


def track_pending_entries(engine: Engine) -> None:
    """Tie the entries :func:`append_audit` keeps on ``engine``'s connections to their transaction:
    dropped when it begins or rolls back (a rolled-back savepoint drops those appended since it), and a
    COMMIT with some still unwritten raises :class:`UnflushedAuditError` (the transaction then rolls
    back). Idempotent."""
    listeners = (
        ("begin", _drop_pending),
        ("rollback", _drop_pending),
        ("commit", _refuse_unflushed),
        ("savepoint", _savepoint),
        ("rollback_savepoint", _rollback_savepoint),
        ("release_savepoint", _release_savepoint),
    )
    for name, listener in listeners:
        if not event.contains(engine, name, listener):
            event.listen(engine, name, listener)


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
