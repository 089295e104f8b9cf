"""Consent to texts recorded with each booking: given, implied (the number was given for this booking)
or declined. Bookings made before this revision gave their number for the booking: implied.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases (SQLite allows NOT NULL with a default): no batch copy of the
    # table, which on SQLite would drop the history and overlap triggers.
    op.add_column("bookings", sa.Column("sms_consent", sa.String(16), nullable=False, server_default="implied"))


def downgrade() -> None:
    op.drop_column("bookings", "sms_consent")
