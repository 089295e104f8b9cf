"""Texts on their way: a mark per SMS effect written before Twilio is asked, so a lost answer is known.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sms_sends",
        sa.Column("effect_key", sa.String(255)),
        sa.Column("to_number", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("effect_key", name="pk_sms_sends"),
    )


def downgrade() -> None:
    op.drop_table("sms_sends")
