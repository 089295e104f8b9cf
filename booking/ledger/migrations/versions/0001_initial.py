"""Initial ledger: catalog mirror, customers, bookings with history, idempotency keys.

No two confirmed bookings of one resource may overlap (blocks include buffers). PostgreSQL enforces it
with an exclusion constraint over a ``tstzrange``; SQLite with BEFORE INSERT/UPDATE triggers that run
inside the writing transaction (SQLite has a single writer, so check and write cannot interleave).

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def _id(
    name: str = "id", *constraints: sa.ForeignKey, nullable: bool = True, primary_key: bool = False
) -> sa.Column[str]:
    return sa.Column(name, sa.String(64), *constraints, nullable=nullable, primary_key=primary_key)


# History: every insert, status change and move of a booking appends to booking_events, written by the
# database itself so that no code path (nor a hand-written UPDATE) can change a booking silently. Times in
# the details are ISO 8601 UTC ("2026-12-01T15:00:00Z") on both databases.
_PG_UTC = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
_PG_HISTORY_FUNCTION = f"""
CREATE FUNCTION bookings_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO booking_events (booking_id, at, kind, from_status, to_status, actor, details)
    VALUES (NEW.id, NEW.updated_at, 'created', NULL, NEW.status, NEW.changed_by,
            jsonb_build_object('start', {_PG_UTC.format("NEW.start_at")}, 'end', {_PG_UTC.format("NEW.end_at")},
                               'resource_id', NEW.resource_id, 'series_id', NEW.series_id));
  ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
    INSERT INTO booking_events (booking_id, at, kind, from_status, to_status, actor, details)
    VALUES (NEW.id, NEW.updated_at, NEW.status, OLD.status, NEW.status, NEW.changed_by,
            jsonb_strip_nulls(jsonb_build_object('reason', NEW.change_reason)));
  ELSIF (NEW.start_at, NEW.end_at, NEW.resource_id) IS DISTINCT FROM (OLD.start_at, OLD.end_at, OLD.resource_id) THEN
    INSERT INTO booking_events (booking_id, at, kind, from_status, to_status, actor, details)
    VALUES (NEW.id, NEW.updated_at, 'rescheduled', OLD.status, NEW.status, NEW.changed_by,
            jsonb_build_object(
              'from', jsonb_build_object('start', {_PG_UTC.format("OLD.start_at")},
                                         'end', {_PG_UTC.format("OLD.end_at")}, 'resource_id', OLD.resource_id),
              'to', jsonb_build_object('start', {_PG_UTC.format("NEW.start_at")},
                                       'end', {_PG_UTC.format("NEW.end_at")}, 'resource_id', NEW.resource_id)));
  END IF;
  RETURN NULL;
END
$$
"""

_SQLITE_UTC = "strftime('%Y-%m-%dT%H:%M:%SZ', {})"
_SQLITE_EVENT = "INSERT INTO booking_events (booking_id, at, kind, from_status, to_status, actor, details) VALUES "
_SQLITE_HISTORY_TRIGGERS = (
    "CREATE TRIGGER bookings_history_insert AFTER INSERT ON bookings BEGIN "
    + _SQLITE_EVENT
    + "(NEW.id, NEW.updated_at, 'created', NULL, NEW.status, NEW.changed_by, json_object("
    f"'start', {_SQLITE_UTC.format('NEW.start_at')}, 'end', {_SQLITE_UTC.format('NEW.end_at')}, "
    "'resource_id', NEW.resource_id, 'series_id', NEW.series_id)); END",
    "CREATE TRIGGER bookings_history_status AFTER UPDATE ON bookings WHEN NEW.status IS NOT OLD.status BEGIN "
    + _SQLITE_EVENT
    + "(NEW.id, NEW.updated_at, NEW.status, OLD.status, NEW.status, NEW.changed_by, CASE WHEN "
    "NEW.change_reason IS NULL THEN json_object() ELSE json_object('reason', NEW.change_reason) END); END",
    "CREATE TRIGGER bookings_history_move AFTER UPDATE ON bookings WHEN NEW.status IS OLD.status AND ("
    "NEW.start_at IS NOT OLD.start_at OR NEW.end_at IS NOT OLD.end_at OR NEW.resource_id IS NOT OLD.resource_id) "
    "BEGIN "
    + _SQLITE_EVENT
    + "(NEW.id, NEW.updated_at, 'rescheduled', OLD.status, NEW.status, NEW.changed_by, json_object("
    f"'from', json_object('start', {_SQLITE_UTC.format('OLD.start_at')}, 'end', {_SQLITE_UTC.format('OLD.end_at')}, "
    "'resource_id', OLD.resource_id), "
    f"'to', json_object('start', {_SQLITE_UTC.format('NEW.start_at')}, 'end', {_SQLITE_UTC.format('NEW.end_at')}, "
    "'resource_id', NEW.resource_id))); END",
)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    json_type = JSONB() if dialect == "postgresql" else sa.JSON()
    op.create_table(
        "resources",
        _id(primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("calendar_id", sa.Text),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("synced_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_resources"),
    )
    op.create_table(
        "services",
        _id(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("duration_minutes", sa.Integer, nullable=False),
        sa.Column("buffer_before_minutes", sa.Integer, nullable=False),
        sa.Column("buffer_after_minutes", sa.Integer, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("synced_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_services"),
    )
    op.create_table(
        "service_resources",
        _id("service_id", sa.ForeignKey("services.id", name="fk_service_resources_service_id_services")),
        _id("resource_id", sa.ForeignKey("resources.id", name="fk_service_resources_resource_id_resources")),
        sa.PrimaryKeyConstraint("service_id", "resource_id", name="pk_service_resources"),
    )
    op.create_table(
        "customers",
        _id(),
        sa.Column("phone", sa.String(32), nullable=False),
        sa.Column("name", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("time_zone", sa.String(64)),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_customers"),
        sa.UniqueConstraint("phone", name="uq_customers_phone"),
    )
    op.create_table(
        "booking_series",
        _id(),
        sa.Column("rrule", sa.Text, nullable=False),
        sa.Column("time_zone", sa.String(64), nullable=False),
        sa.Column("first_start_local", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("created_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_booking_series"),
        sa.UniqueConstraint("idempotency_key", name="uq_booking_series_idempotency_key"),
    )
    op.create_table(
        "bookings",
        _id(),
        _id("resource_id", sa.ForeignKey("resources.id", name="fk_bookings_resource_id_resources"), nullable=False),
        _id("service_id", sa.ForeignKey("services.id", name="fk_bookings_service_id_services"), nullable=False),
        _id("customer_id", sa.ForeignKey("customers.id", name="fk_bookings_customer_id_customers"), nullable=False),
        _id("series_id", sa.ForeignKey("booking_series.id", name="fk_bookings_series_id_booking_series")),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("start_at", _ts, nullable=False),
        sa.Column("end_at", _ts, nullable=False),
        sa.Column("block_start", _ts, nullable=False),
        sa.Column("block_end", _ts, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("notes", sa.Text),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("changed_by", sa.Text, nullable=False),
        sa.Column("change_reason", sa.Text),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bookings"),
        sa.UniqueConstraint("idempotency_key", name="uq_bookings_idempotency_key"),
        sa.CheckConstraint(
            "block_start <= start_at AND start_at < end_at AND end_at <= block_end",
            name="times_ordered",
        ),
        sa.CheckConstraint("status IN ('confirmed', 'cancelled', 'completed', 'no_show')", name="status_known"),
    )
    op.create_index("ix_bookings_resource_block", "bookings", ["resource_id", "block_start"])
    op.create_index("ix_bookings_customer", "bookings", ["customer_id", "start_at"])
    op.create_index("ix_bookings_series", "bookings", ["series_id"])
    op.create_table(
        "booking_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        _id("booking_id", sa.ForeignKey("bookings.id", name="fk_booking_events_booking_id_bookings"), nullable=False),
        sa.Column("at", _ts, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(16)),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("details", json_type, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_booking_events"),
    )
    op.create_index("ix_booking_events_booking", "booking_events", ["booking_id", "id"])
    if dialect == "postgresql":
        op.execute(
            "ALTER TABLE bookings ADD CONSTRAINT ck_bookings_block_length "
            "CHECK (block_end - block_start <= interval '3 days')"
        )
        op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
        op.execute(
            "ALTER TABLE bookings ADD CONSTRAINT bookings_no_overlap EXCLUDE USING gist "
            "(resource_id WITH =, tstzrange(block_start, block_end, '[)') WITH &&) "
            "WHERE (status = 'confirmed')"
        )
        op.execute(_PG_HISTORY_FUNCTION)
        op.execute(
            "CREATE TRIGGER bookings_history AFTER INSERT OR UPDATE ON bookings "
            "FOR EACH ROW EXECUTE FUNCTION bookings_history()"
        )
    elif dialect == "sqlite":
        overlap = (
            "SELECT RAISE(ABORT, 'bookings_no_overlap') WHERE EXISTS ("
            " SELECT 1 FROM bookings AS other WHERE other.id != NEW.id"
            " AND other.resource_id = NEW.resource_id AND other.status = 'confirmed'"
            " AND other.block_start < NEW.block_end AND other.block_end > NEW.block_start"
            # Bounded below by the longest possible block (ck_bookings_block_length), so the index on
            # (resource_id, block_start) scans days, not the resource's whole past.
            " AND other.block_start > datetime(NEW.block_start, '-3 days'));"
        )
        op.execute(
            "CREATE TRIGGER bookings_block_length BEFORE INSERT ON bookings "
            "WHEN julianday(NEW.block_end) - julianday(NEW.block_start) > 3 "
            "BEGIN SELECT RAISE(ABORT, 'ck_bookings_block_length: a block may last at most 3 days'); END"
        )
        op.execute(
            "CREATE TRIGGER bookings_block_length_update BEFORE UPDATE OF block_start, block_end ON bookings "
            "WHEN julianday(NEW.block_end) - julianday(NEW.block_start) > 3 "
            "BEGIN SELECT RAISE(ABORT, 'ck_bookings_block_length: a block may last at most 3 days'); END"
        )
        op.execute(
            "CREATE TRIGGER bookings_no_overlap_insert BEFORE INSERT ON bookings "
            f"WHEN NEW.status = 'confirmed' BEGIN {overlap} END"
        )
        op.execute(
            "CREATE TRIGGER bookings_no_overlap_update "
            "BEFORE UPDATE OF status, resource_id, block_start, block_end ON bookings "
            f"WHEN NEW.status = 'confirmed' BEGIN {overlap} END"
        )
        for statement in _SQLITE_HISTORY_TRIGGERS:
            op.execute(statement)
    else:
        raise RuntimeError(f"voicebook's ledger supports sqlite and postgresql, not {dialect}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS bookings_history ON bookings")
        op.execute("DROP FUNCTION IF EXISTS bookings_history()")
    for table in (
        "booking_events",
        "bookings",
        "booking_series",
        "customers",
        "service_resources",
        "services",
        "resources",
    ):
        op.drop_table(table)
