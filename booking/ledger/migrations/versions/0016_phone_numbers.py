"""The registry of the business's phone numbers (booking/ledger/numbers_repository.py).

Numbers bought before this revision are not known to the ledger; ``voicebook numbers buy`` records new
ones, and an existing number joins when its owner runs ``voicebook numbers configure`` on it.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from booking.ledger.schema import JSONDocument, UTCDateTime

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "phone_numbers",
        sa.Column("number", sa.String(16), nullable=False),
        sa.Column("sid", sa.String(34), nullable=False),
        sa.Column("country", sa.String(2), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("voice", sa.Boolean, nullable=False),
        sa.Column("sms", sa.Boolean, nullable=False),
        sa.Column("mms", sa.Boolean, nullable=False),
        sa.Column("messaging_service_sid", sa.String(34)),
        sa.Column("friendly_name", sa.Text),
        sa.Column("resources", JSONDocument, nullable=False),
        sa.Column("a2p_status", sa.String(16), nullable=False),
        sa.Column("toll_free_verification", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("last_verified_at", UTCDateTime),
        sa.Column("last_verification", JSONDocument),
        sa.PrimaryKeyConstraint("number", name="pk_phone_numbers"),
        sa.CheckConstraint("type IN ('local', 'mobile', 'toll-free')", name="ck_phone_numbers_type_known"),
        sa.CheckConstraint(
            "a2p_status IN ('not_required', 'unregistered', 'pending', 'approved', 'failed')",
            name="ck_phone_numbers_a2p_status_known",
        ),
        sa.CheckConstraint(
            "toll_free_verification IN ('not_required', 'unverified', 'pending', 'approved', 'rejected')",
            name="ck_phone_numbers_toll_free_verification_known",
        ),
    )
    op.create_index("ix_phone_numbers_sid", "phone_numbers", ["sid"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_phone_numbers_sid", table_name="phone_numbers")
    op.drop_table("phone_numbers")
