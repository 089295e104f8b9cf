"""Consent decisions and the wordings they were asked with (booking/consent.py).

Nothing already in the ledger becomes a decision here: the SMS answer each booking carries
(``bookings.sms_consent``) stays where it is, and calls taken before this revision were taken under
whatever notice the deployment had then, which the ledger never knew.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from booking.ledger.schema import UTCDateTime

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consents",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("subject_index", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("wording_version", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("call_sid", sa.String(64)),
        sa.Column("booking_id", sa.String(64)),
        sa.CheckConstraint("kind IN ('recording', 'transcription', 'sms')", name="ck_consents_kind_known"),
        sa.CheckConstraint("decision IN ('granted', 'declined', 'revoked')", name="ck_consents_decision_known"),
    )
    op.create_index("ix_consents_subject", "consents", ["subject_index", "kind", "at"])
    op.create_index("ix_consents_call", "consents", ["call_sid"])
    op.create_table(
        "consent_wordings",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("first_used_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("consent_wordings")
    op.drop_index("ix_consents_call", table_name="consents")
    op.drop_index("ix_consents_subject", table_name="consents")
    op.drop_table("consents")
