"""Each effect keeps the W3C trace context of the change that enqueued it (``effects.traceparent``), so
its attempts show in the trace of the call that made the booking.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable ADD COLUMN on both databases: no table copy on SQLite, no rewrite on PostgreSQL.
    op.add_column("effects", sa.Column("traceparent", sa.String(55)))


def downgrade() -> None:
    op.drop_column("effects", "traceparent")
