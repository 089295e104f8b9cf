"""Effects that belong to a call (its report, its CRM sync, its triggers) or to nothing (the retention
sweep): ``effects.booking_id`` becomes optional and ``effects.call_sid`` names the call. Also the index
that finds what a call did to bookings (booking events by actor), the one that finds bookings changed
since the last CRM push, and when retention removed a call's transcript.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)
_COLUMNS = (
    "id, booking_id, kind, payload, status, attempts, max_attempts, due_at, lease_owner, lease_expires_at, "
    "last_error, created_at, updated_at, done_at, idempotency_key"
)


def _effects_table(name: str, *, booking_required: bool) -> None:
    json_type = JSONB() if op.get_bind().dialect.name == "postgresql" else sa.JSON()
    op.create_table(
        name,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column(
            "booking_id",
            sa.String(64),
            sa.ForeignKey("bookings.id", name="fk_effects_booking_id_bookings"),
            nullable=not booking_required,
        ),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", json_type, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("due_at", _ts, nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires_at", _ts),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
        sa.Column("done_at", _ts),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        *([] if booking_required else [sa.Column("call_sid", sa.String(64))]),
        sa.PrimaryKeyConstraint("id", name="pk_effects"),
        sa.UniqueConstraint("idempotency_key", name="uq_effects_idempotency_key"),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'dead', 'cancelled')", name="ck_effects_status_known"
        ),
    )


def _rebuild_on_sqlite(*, booking_required: bool) -> None:
    # SQLite cannot drop NOT NULL in place: copy into a new table (ids kept, so effect order is kept).
    op.drop_index("ix_effects_booking", table_name="effects")
    op.drop_index("ix_effects_status_due", table_name="effects")
    op.rename_table("effects", "effects_old")
    _effects_table("effects", booking_required=booking_required)
    op.execute(f"INSERT INTO effects ({_COLUMNS}) SELECT {_COLUMNS} FROM effects_old")
    op.drop_table("effects_old")
    op.create_index("ix_effects_status_due", "effects", ["status", "due_at"])
    op.create_index("ix_effects_booking", "effects", ["booking_id", "id"])


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_on_sqlite(booking_required=False)
    else:
        op.alter_column("effects", "booking_id", existing_type=sa.String(64), nullable=True)
        op.add_column("effects", sa.Column("call_sid", sa.String(64)))
    op.create_index("ix_effects_call", "effects", ["call_sid", "id"])
    op.create_index("ix_booking_events_actor", "booking_events", ["actor"])
    op.create_index("ix_bookings_updated_at", "bookings", ["updated_at"])
    op.add_column("calls", sa.Column("transcript_deleted_at", _ts))


def downgrade() -> None:
    op.drop_column("calls", "transcript_deleted_at")
    op.drop_index("ix_bookings_updated_at", table_name="bookings")
    op.drop_index("ix_booking_events_actor", table_name="booking_events")
    op.drop_index("ix_effects_call", table_name="effects")
    op.execute("DELETE FROM effects WHERE booking_id IS NULL")
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_on_sqlite(booking_required=True)
    else:
        op.drop_column("effects", "call_sid")
        op.alter_column("effects", "booking_id", existing_type=sa.String(64), nullable=False)
