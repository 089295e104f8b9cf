"""Calls and their status callbacks.

``call_status_events`` keeps every distinct callback once: its key is the call and Twilio's
SequenceNumber (or the status itself when a callback has none), so a replayed callback is recognised
and changes nothing twice.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_sid", sa.String(64)),
        sa.Column("account_sid", sa.String(64), nullable=False),
        sa.Column("from_number", sa.String(32), nullable=False),
        sa.Column("to_number", sa.String(32), nullable=False),
        sa.Column("direction", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("refused_reason", sa.Text),
        sa.Column("ended_at", _ts),
        sa.Column("duration_seconds", sa.Integer),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("call_sid", name="pk_calls"),
    )
    op.create_index("ix_calls_from_number", "calls", ["from_number", "created_at"])
    op.create_table(
        "call_status_events",
        sa.Column(
            "call_sid",
            sa.String(64),
            sa.ForeignKey("calls.call_sid", name="fk_call_status_events_call_sid_calls"),
            nullable=False,
        ),
        sa.Column("dedupe_key", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("sequence", sa.Integer),
        sa.Column("duration_seconds", sa.Integer),
        sa.Column("at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("call_sid", "dedupe_key", name="pk_call_status_events"),
    )


def downgrade() -> None:
    op.drop_table("call_status_events")
    op.drop_table("calls")
