"""Re-encrypt the ledger's personal data under the active key (``voicebook keys rotate``).

Rotation needs no downtime: every configured key decrypts, so servers keep reading old and new values
alike while this walks each sealed column in primary-key order, a batch per transaction, re-sealing
what an older key (or no key: a value written before encryption) still holds. Each row is updated only
if it still holds the value read (compare and set): a row a server rewrote in the meantime was written
under the active key already and is left alone. Once it reports nothing left under the old key, that
key can be removed from the configuration.

The steps of a rotation across several servers are in docs/security.md: make the new key known to
every process first (as a decrypt-only key), then make it active, then run this, then drop the old key.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, and_, select, tuple_, update
from sqlalchemy.engine import Connection

from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.database import Database


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """One column of personal data: its table, the columns of the key it is paged by, the columns its
    associated-data row id is made of (joined with ``:``), and whether it holds a JSON document."""

    table: Table
    column: str
    key: tuple[str, ...]
    row: tuple[str, ...]
    json: bool = False

    @property
    def name(self) -> str:
        return f"{self.table.name}.{self.column}"

    def row_id(self, row: Mapping[str, Any]) -> str:
        return ":".join(str(row[name]) for name in self.row)


SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn(t.customers, "phone", ("id",), ("phone_index",)),
    SealedColumn(t.customers, "name", ("id",), ("phone_index",)),
    SealedColumn(t.customers, "email", ("id",), ("phone_index",)),
    SealedColumn(t.bookings, "notes", ("id",), ("id",)),
    SealedColumn(t.calls, "from_number", ("call_sid",), ("call_sid",)),
    SealedColumn(t.calls, "to_number", ("call_sid",), ("call_sid",)),
    SealedColumn(t.call_turns, "text", ("call_sid", "position"), ("call_sid", "position")),
    SealedColumn(t.call_reports, "body", ("call_sid", "version"), ("call_sid", "version"), json=True),
    SealedColumn(t.effects, "payload", ("id",), ("idempotency_key",), json=True),
    SealedColumn(t.sms_messages, "to_number", ("message_sid",), ("message_sid",)),
    SealedColumn(t.sms_sends, "to_number", ("effect_key",), ("effect_key",)),
    SealedColumn(t.sms_suppressions, "phone", ("phone_index",), ("phone_index",)),
    SealedColumn(t.crm_conflicts, "ledger_value", ("id",), ("record_id", "field")),
    SealedColumn(t.crm_conflicts, "airtable_value", ("id",), ("record_id", "field")),
)
"""Every sealed column of the ledger (tests/test_pii.py checks a dump of the ledger holds no plaintext)."""


@dataclass(frozen=True, slots=True)
class RotationReport:
    active: str
    resealed: Mapping[str, int]  # column -> values re-sealed under the active key
    skipped: Mapping[str, int]  # column -> rows changed by someone else meanwhile (already current)

    @property
    def total(self) -> int:
        return sum(self.resealed.values())


def _reseal(cipher: pii.FieldCipher, spec: SealedColumn, row: Mapping[str, Any]) -> Any:
    value = row[spec.column]
    row_id = spec.row_id(row)
    where = {"table": spec.table.name, "column": spec.column, "row": row_id}
    if spec.json:
        return cipher.encrypt_json(cipher.decrypt_json(value, **where), **where)
    plain = cipher.decrypt(value, **where) if pii.is_sealed(value) else value
    return cipher.encrypt(plain, **where)


async def rotate_keys(
    database: Database, *, batch: int = 500, actor: str = "cli", clock: Callable[[], datetime] | None = None
) -> RotationReport:
    """Re-seal every value not under the active key; audited as one ``key_rotated`` entry."""
    cipher = pii.cipher()
    resealed: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for spec in SEALED_COLUMNS:
        keys = [spec.table.c[name] for name in spec.key]
        wanted = {*spec.key, spec.column, *spec.row}
        columns = [spec.table.c[name] for name in sorted(wanted)]
        after: tuple[Any, ...] | None = None
        while True:
            query = select(*columns).order_by(*keys).limit(batch)
            if after is not None:
                query = query.where(tuple_(*keys) > tuple_(*after) if len(keys) > 1 else keys[0] > after[0])
            async with database.reader.connect() as conn:
                rows = [dict(row._mapping) for row in await conn.execute(query)]
            if not rows:
                break
            after = tuple(rows[-1][name] for name in spec.key)
            stale = [row for row in rows if row[spec.column] is not None and cipher.needs_rotation(row[spec.column])]
            if stale:
                done = await database.write(functools.partial(_write_batch, cipher=cipher, spec=spec, rows=stale))
                resealed[spec.name] += done
                skipped[spec.name] += len(stale) - done
    now = (clock or (lambda: datetime.now(UTC)))()
    await database.write(
        lambda conn: append_audit(
            conn,
            at=now,
            actor=actor,
            action=AuditAction.KEY_ROTATED,
            subject_kind="pii_keys",
            subject_id=cipher.active,
            details={"resealed": dict(resealed), "skipped": dict(skipped)},
        )
    )
    return RotationReport(cipher.active, dict(resealed), dict(skipped))


def _write_batch(conn: Connection, *, cipher: pii.FieldCipher, spec: SealedColumn, rows: list[dict[str, Any]]) -> int:
    done = 0
    column = spec.table.c[spec.column]
    for row in rows:
        match = and_(*(spec.table.c[name] == row[name] for name in spec.key))
        # Compare and set: JSON columns compare as text on neither database, so a JSON row is matched by
        # key and re-read under the transaction instead.
        if spec.json:
            read = select(column).where(match)
            if conn.dialect.name == "postgresql":
                read = read.with_for_update()
            current = conn.execute(read).scalar_one_or_none()
            if current is None or current != row[spec.column]:
                continue
            same = match
        else:
            same = and_(match, column == row[spec.column])
        result = conn.execute(update(spec.table).where(same).values({spec.column: _reseal(cipher, spec, row)}))
        done += result.rowcount
    return done


__all__ = ["SEALED_COLUMNS", "RotationReport", "SealedColumn", "rotate_keys"]
