"""The two-way CRM sync: the pull's watermark, and the CRM edits the ledger did not take (conflicts).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "crm_sync_state",
        sa.Column("name", sa.String(64)),
        sa.Column("watermark", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_crm_sync_state"),
    )
    op.create_table(
        "crm_conflicts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column("booking_id", sa.String(64)),
        sa.Column("record_id", sa.String(64), nullable=False),
        sa.Column("field", sa.String(32), nullable=False),
        sa.Column("ledger_value", sa.Text),
        sa.Column("airtable_value", sa.Text),
        sa.Column("ledger_at", _ts),
        sa.Column("airtable_at", _ts, nullable=False),
        sa.Column("winner", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detected_at", _ts, nullable=False),
        sa.Column("resolved_at", _ts),
        sa.PrimaryKeyConstraint("id", name="pk_crm_conflicts"),
        sa.CheckConstraint("winner IN ('ledger', 'neither')", name="ck_crm_conflicts_winner_known"),
    )
    op.create_index("ix_crm_conflicts_change", "crm_conflicts", ["record_id", "field", "airtable_at"], unique=True)
    op.create_index("ix_crm_conflicts_resolved_at", "crm_conflicts", ["resolved_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_crm_conflicts_resolved_at", table_name="crm_conflicts")
    op.drop_index("ix_crm_conflicts_change", table_name="crm_conflicts")
    op.drop_table("crm_conflicts")
    op.drop_table("crm_sync_state")
