"""The business number a booking was made on: texts about the booking go from that number, so a reply
(STOP, HELP, a question) reaches the line the customer knows. Bookings made before this revision, and
through the API, have none and are texted from the configured sender.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: no batch copy of the table, which on SQLite would drop the
    # history and overlap triggers.
    op.add_column("bookings", sa.Column("line_number", sa.String(16)))


def downgrade() -> None:
    op.drop_column("bookings", "line_number")
