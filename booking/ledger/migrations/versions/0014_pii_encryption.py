"""Personal data encrypted at rest (booking/ledger/pii.py): phone numbers, names, emails, transcripts,
report bodies and effect payloads become ciphertext, and phone lookups go through blind indexes
(``customers.phone_index``, ``calls.from_index``, ``sms_messages.to_index``, ``sms_suppressions``' key).

Rows already in the ledger are sealed here, with the keys of the process running the migration (the
server installs them before it migrates); a ledger with rows cannot be migrated without them.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-25
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


_SEALED_TABLES = (
    "customers",
    "calls",
    "call_turns",
    "call_reports",
    "effects",
    "sms_messages",
    "sms_sends",
    "sms_suppressions",
    "crm_conflicts",
)
"""The tables holding personal data: with a row in any of them, migrating either way needs the keys."""


def _rows(sql: str) -> list[Any]:
    return list(op.get_bind().execute(sa.text(sql)).mappings())


def upgrade() -> None:
    from booking.ledger import pii

    bind = op.get_bind()
    vault = pii.cipher() if _any_rows() else None

    with op.batch_alter_table("customers") as batch:
        batch.alter_column("phone", type_=sa.Text(), existing_nullable=False)
        batch.add_column(sa.Column("phone_index", sa.String(64)))
    with op.batch_alter_table("calls") as batch:
        batch.alter_column("from_number", type_=sa.Text(), existing_nullable=False)
        batch.alter_column("to_number", type_=sa.Text(), existing_nullable=False)
        batch.add_column(sa.Column("from_index", sa.String(64)))
        batch.drop_index("ix_calls_from_number")
    with op.batch_alter_table("sms_messages") as batch:
        batch.alter_column("to_number", type_=sa.Text(), existing_nullable=False)
        batch.add_column(sa.Column("to_index", sa.String(64)))
    with op.batch_alter_table("sms_sends") as batch:
        batch.alter_column("to_number", type_=sa.Text(), existing_nullable=False)

    if vault is not None:
        _seal_existing(vault)

    with op.batch_alter_table("customers") as batch:
        batch.alter_column("phone_index", existing_type=sa.String(64), nullable=False)
        batch.drop_constraint("uq_customers_phone", type_="unique")
        batch.create_unique_constraint("uq_customers_phone_index", ["phone_index"])
    with op.batch_alter_table("calls") as batch:
        batch.alter_column("from_index", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_calls_from_index", "calls", ["from_index", "created_at"])
    with op.batch_alter_table("sms_messages") as batch:
        batch.alter_column("to_index", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_sms_messages_to_index", "sms_messages", ["to_index", "created_at"])

    # The suppression list is keyed by the number: rebuilt keyed by its blind index.
    suppressions = _rows("SELECT phone, opted_out, keyword, changed_at, source FROM sms_suppressions")
    op.drop_table("sms_suppressions")
    op.create_table(
        "sms_suppressions",
        sa.Column("phone_index", sa.String(64)),
        sa.Column("phone", sa.Text(), nullable=False),
        sa.Column("opted_out", sa.Boolean, nullable=False),
        sa.Column("keyword", sa.String(32)),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("phone_index", name="pk_sms_suppressions"),
    )
    for row in suppressions:
        assert vault is not None  # rows exist, so the keys were required above
        index = vault.blind_index(row["phone"])
        sealed = vault.encrypt(row["phone"], table="sms_suppressions", column="phone", row=index)
        bind.execute(  # raw values as read (SQLite's timestamps are text), so no type conversion
            sa.text(
                "INSERT INTO sms_suppressions (phone_index, phone, opted_out, keyword, changed_at, source) "
                "VALUES (:phone_index, :phone, :opted_out, :keyword, :changed_at, :source)"
            ),
            {**row, "phone_index": index, "phone": sealed},
        )


def _seal_existing(vault: Any) -> None:
    """Every plaintext value written before this revision, sealed as the repositories now write it."""
    bind = op.get_bind()

    def update(sql: str, **values: Any) -> None:
        bind.execute(sa.text(sql), values)

    for row in _rows("SELECT id, phone, name, email FROM customers"):
        index = vault.blind_index(row["phone"])
        update(
            "UPDATE customers SET phone = :phone, phone_index = :index, name = :name, email = :email WHERE id = :id",
            id=row["id"],
            index=index,
            phone=vault.encrypt(row["phone"], table="customers", column="phone", row=index),
            name=vault.encrypt(row["name"], table="customers", column="name", row=index),
            email=vault.encrypt(row["email"], table="customers", column="email", row=index),
        )
    for row in _rows("SELECT id, notes FROM bookings WHERE notes IS NOT NULL"):
        sealed = vault.encrypt(row["notes"], table="bookings", column="notes", row=row["id"])
        update("UPDATE bookings SET notes = :notes WHERE id = :id", id=row["id"], notes=sealed)
    for row in _rows("SELECT call_sid, from_number, to_number FROM calls"):
        sid = row["call_sid"]
        update(
            "UPDATE calls SET from_number = :f, to_number = :t, from_index = :i WHERE call_sid = :sid",
            sid=sid,
            f=vault.encrypt(row["from_number"], table="calls", column="from_number", row=sid),
            t=vault.encrypt(row["to_number"], table="calls", column="to_number", row=sid),
            i=vault.blind_index(row["from_number"]),
        )
    for row in _rows("SELECT call_sid, position, text FROM call_turns"):
        sealed = vault.encrypt(
            row["text"], table="call_turns", column="text", row=f"{row['call_sid']}:{row['position']}"
        )
        update(
            "UPDATE call_turns SET text = :text WHERE call_sid = :sid AND position = :position",
            sid=row["call_sid"],
            position=row["position"],
            text=sealed,
        )
    _seal_json(
        vault, "call_reports", "body", "SELECT call_sid, version, body FROM call_reports", ("call_sid", "version")
    )
    _seal_json(vault, "effects", "payload", "SELECT idempotency_key, payload FROM effects", ("idempotency_key",))
    for row in _rows("SELECT message_sid, to_number FROM sms_messages"):
        update(
            "UPDATE sms_messages SET to_number = :t, to_index = :i WHERE message_sid = :sid",
            sid=row["message_sid"],
            t=vault.encrypt(row["to_number"], table="sms_messages", column="to_number", row=row["message_sid"]),
            i=vault.blind_index(row["to_number"]),
        )
    for row in _rows("SELECT id, record_id, field, ledger_value, airtable_value FROM crm_conflicts"):
        where = {"table": "crm_conflicts", "row": f"{row['record_id']}:{row['field']}"}
        update(
            "UPDATE crm_conflicts SET ledger_value = :l, airtable_value = :a WHERE id = :id",
            id=row["id"],
            l=vault.encrypt(row["ledger_value"], column="ledger_value", **where),
            a=vault.encrypt(row["airtable_value"], column="airtable_value", **where),
        )
    for row in _rows("SELECT effect_key, to_number FROM sms_sends"):
        update(
            "UPDATE sms_sends SET to_number = :t WHERE effect_key = :key",
            key=row["effect_key"],
            t=vault.encrypt(row["to_number"], table="sms_sends", column="to_number", row=row["effect_key"]),
        )


def _seal_json(vault: Any, table: str, column: str, query: str, keys: tuple[str, ...]) -> None:
    import orjson

    bind = op.get_bind()
    for row in _rows(query):
        document = row[column]
        if isinstance(document, str | bytes):  # SQLite hands JSON back as text through a raw query
            document = orjson.loads(document)
        row_id = ":".join(str(row[key]) for key in keys)
        sealed = orjson.dumps(vault.encrypt_json(document, table=table, column=column, row=row_id)).decode()
        where = " AND ".join(f"{key} = :{key}" for key in keys)
        cast = "CAST(:doc AS JSONB)" if bind.dialect.name == "postgresql" else ":doc"
        bind.execute(sa.text(f"UPDATE {table} SET {column} = {cast} WHERE {where}"), {"doc": sealed, **row})


def downgrade() -> None:
    """Back to plaintext and plain lookups, with the keys of the process running it (a ledger with rows
    cannot be downgraded without them). The widened columns stay ``TEXT``: an erased customer's number is
    longer than the old ``VARCHAR(32)``. An erased customer's number becomes its random index, which keeps
    the number column unique."""
    from booking.ledger import pii

    bind = op.get_bind()
    vault = pii.cipher() if _any_rows() else None

    def update(sql: str, **values: Any) -> None:
        bind.execute(sa.text(sql), values)

    if vault is not None:
        for row in _rows("SELECT id, phone_index, phone, name, email FROM customers"):
            where = {"table": "customers", "row": row["phone_index"]}
            phone = vault.decrypt(row["phone"], column="phone", **where)
            update(
                "UPDATE customers SET phone = :phone, name = :name, email = :email WHERE id = :id",
                id=row["id"],
                phone=row["phone_index"] if row["phone_index"].startswith("erased:") else phone,
                name=vault.decrypt(row["name"], column="name", **where),
                email=vault.decrypt(row["email"], column="email", **where),
            )
        _open_column(vault, "bookings", "notes", ("id",), "SELECT id, notes FROM bookings WHERE notes IS NOT NULL")
        _open_column(vault, "calls", "from_number", ("call_sid",), "SELECT call_sid, from_number FROM calls")
        _open_column(vault, "calls", "to_number", ("call_sid",), "SELECT call_sid, to_number FROM calls")
        _open_column(
            vault, "call_turns", "text", ("call_sid", "position"), "SELECT call_sid, position, text FROM call_turns"
        )
        _open_json(
            vault, "call_reports", "body", "SELECT call_sid, version, body FROM call_reports", ("call_sid", "version")
        )
        _open_json(
            vault, "effects", "payload", "SELECT id, idempotency_key, payload FROM effects", ("idempotency_key",)
        )
        _open_column(
            vault, "sms_messages", "to_number", ("message_sid",), "SELECT message_sid, to_number FROM sms_messages"
        )
        _open_column(vault, "sms_sends", "to_number", ("effect_key",), "SELECT effect_key, to_number FROM sms_sends")
        for column in ("ledger_value", "airtable_value"):
            for row in _rows(f"SELECT id, record_id, field, {column} FROM crm_conflicts"):
                plain = vault.decrypt(
                    row[column], table="crm_conflicts", column=column, row=f"{row['record_id']}:{row['field']}"
                )
                update(f"UPDATE crm_conflicts SET {column} = :value WHERE id = :id", id=row["id"], value=plain)

    suppressions = _rows("SELECT phone_index, phone, opted_out, keyword, changed_at, source FROM sms_suppressions")
    op.drop_table("sms_suppressions")
    op.create_table(
        "sms_suppressions",
        sa.Column("phone", sa.String(32)),
        sa.Column("opted_out", sa.Boolean, nullable=False),
        sa.Column("keyword", sa.String(32)),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("phone", name="pk_sms_suppressions"),
    )
    for row in suppressions:
        assert vault is not None  # rows exist, so the keys were required above
        phone = vault.decrypt(row["phone"], table="sms_suppressions", column="phone", row=row["phone_index"])
        if phone == "[erased]":
            continue  # its number is gone: a plaintext-keyed list cannot hold it
        update(
            "INSERT INTO sms_suppressions (phone, opted_out, keyword, changed_at, source) "
            "VALUES (:phone, :opted_out, :keyword, :changed_at, :source)",
            phone=phone,
            opted_out=row["opted_out"],
            keyword=row["keyword"],
            changed_at=row["changed_at"],
            source=row["source"],
        )

    op.drop_index("ix_sms_messages_to_index", table_name="sms_messages")
    with op.batch_alter_table("sms_messages") as batch:
        batch.drop_column("to_index")
    op.drop_index("ix_calls_from_index", table_name="calls")
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("from_index")
    op.create_index("ix_calls_from_number", "calls", ["from_number", "created_at"])
    with op.batch_alter_table("customers") as batch:
        batch.drop_constraint("uq_customers_phone_index", type_="unique")
        batch.drop_column("phone_index")
        batch.create_unique_constraint("uq_customers_phone", ["phone"])


def _any_rows() -> bool:
    bind = op.get_bind()
    return any(bind.execute(sa.text(f"SELECT 1 FROM {table} LIMIT 1")).first() is not None for table in _SEALED_TABLES)


def _open_column(vault: Any, table: str, column: str, keys: tuple[str, ...], query: str) -> None:
    bind = op.get_bind()
    for row in _rows(query):
        row_id = ":".join(str(row[key]) for key in keys)
        plain = vault.decrypt(row[column], table=table, column=column, row=row_id)
        where = " AND ".join(f"{key} = :{key}" for key in keys)
        bind.execute(sa.text(f"UPDATE {table} SET {column} = :value WHERE {where}"), {"value": plain, **row})


def _open_json(vault: Any, table: str, column: str, query: str, keys: tuple[str, ...]) -> None:
    import orjson

    bind = op.get_bind()
    for row in _rows(query):
        document = row[column]
        if isinstance(document, str | bytes):
            document = orjson.loads(document)
        row_id = ":".join(str(row[key]) for key in keys)
        plain = orjson.dumps(vault.decrypt_json(document, table=table, column=column, row=row_id)).decode()
        where = " AND ".join(f"{key} = :{key}" for key in keys if key != column)
        cast = "CAST(:doc AS JSONB)" if bind.dialect.name == "postgresql" else ":doc"
        values = {key: row[key] for key in keys}
        bind.execute(sa.text(f"UPDATE {table} SET {column} = {cast} WHERE {where}"), {"doc": plain, **values})
