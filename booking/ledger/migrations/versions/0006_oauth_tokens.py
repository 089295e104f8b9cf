"""OAuth grants (Google Calendar through a user's own account), their tokens stored encrypted.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "oauth_tokens",
        sa.Column("provider", sa.String(32)),
        sa.Column("account", sa.String(64)),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(320)),
        sa.Column("refresh_token", sa.LargeBinary, nullable=False),
        sa.Column("access_token", sa.LargeBinary),
        sa.Column("expires_at", _ts),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
        sa.Column("revoked_at", _ts),
        sa.PrimaryKeyConstraint("provider", "account", name="pk_oauth_tokens"),
    )


def downgrade() -> None:
    op.drop_table("oauth_tokens")
