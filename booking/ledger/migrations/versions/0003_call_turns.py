"""The transcript of each call, one row per turn, written as soon as the call ends.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "call_turns",
        sa.Column(
            "call_sid",
            sa.String(64),
            sa.ForeignKey("calls.call_sid", name="fk_call_turns_call_sid_calls"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False),
        sa.Column("tool", sa.String(64)),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("call_sid", "position", name="pk_call_turns"),
    )
    op.add_column("calls", sa.Column("stream_sid", sa.String(64)))
    op.add_column("calls", sa.Column("end_reason", sa.String(64)))


def downgrade() -> None:
    op.drop_column("calls", "end_reason")
    op.drop_column("calls", "stream_sid")
    op.drop_table("call_turns")
