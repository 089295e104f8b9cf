"""The transactional outbox: one row per provider call a booking change causes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    json_type = JSONB() if dialect == "postgresql" else sa.JSON()
    op.create_table(
        "effects",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column(
            "booking_id",
            sa.String(64),
            sa.ForeignKey("bookings.id", name="fk_effects_booking_id_bookings"),
            nullable=False,
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
        sa.PrimaryKeyConstraint("id", name="pk_effects"),
        sa.UniqueConstraint("idempotency_key", name="uq_effects_idempotency_key"),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'dead', 'cancelled')", name="ck_effects_status_known"
        ),
    )
    op.create_index("ix_effects_status_due", "effects", ["status", "due_at"])
    op.create_index("ix_effects_booking", "effects", ["booking_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_effects_booking", table_name="effects")
    op.drop_index("ix_effects_status_due", table_name="effects")
    op.drop_table("effects")
