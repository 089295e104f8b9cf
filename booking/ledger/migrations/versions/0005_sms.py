"""Text messages: what was sent and how far it got, each delivery receipt once, and the opt-out list.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sms_messages",
        sa.Column("message_sid", sa.String(64)),
        sa.Column("effect_key", sa.String(255)),
        sa.Column("booking_id", sa.String(64)),
        sa.Column("to_number", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.Integer),
        sa.Column("segments", sa.Integer),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("message_sid", name="pk_sms_messages"),
    )
    op.create_index("ix_sms_messages_effect_key", "sms_messages", ["effect_key"])
    op.create_index("ix_sms_messages_updated", "sms_messages", ["updated_at"])
    op.create_table(
        "sms_status_events",
        sa.Column(
            "message_sid",
            sa.String(64),
            sa.ForeignKey("sms_messages.message_sid", name="fk_sms_status_events_message_sid_sms_messages"),
        ),
        sa.Column("status", sa.String(16)),
        sa.Column("error_code", sa.Integer),
        sa.Column("received_at", _ts, nullable=False),
        sa.PrimaryKeyConstraint("message_sid", "status", name="pk_sms_status_events"),
    )
    op.create_table(
        "sms_suppressions",
        sa.Column("phone", sa.String(32)),
        sa.Column("opted_out", sa.Boolean, nullable=False),
        sa.Column("keyword", sa.String(32)),
        sa.Column("changed_at", _ts, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("phone", name="pk_sms_suppressions"),
    )


def downgrade() -> None:
    op.drop_table("sms_suppressions")
    op.drop_table("sms_status_events")
    op.drop_index("ix_sms_messages_updated", table_name="sms_messages")
    op.drop_index("ix_sms_messages_effect_key", table_name="sms_messages")
    op.drop_table("sms_messages")
