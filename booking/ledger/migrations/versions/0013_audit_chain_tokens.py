"""The audit log becomes a hash chain, and admin API tokens get a table with roles.

``audit_events`` gains ``prev_hash`` and ``entry_hash`` (see booking/ledger/audit.py); the entries already
there are renumbered 1, 2, 3 ... in their order (a sequence may have left gaps, and in the chain a gap
means a removal) and chained. ``audit_chain_head`` holds the newest id and hash; ``api_tokens`` the
SHA-256 of each token with its role.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from booking.ledger.audit import CHAIN, GENESIS_HASH, entry_hash
from booking.ledger.schema import JSONDocument, UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)

_audit = sa.table(
    "audit_events",
    sa.column("id", sa.BigInteger),
    sa.column("at", UTCDateTime),
    sa.column("actor", sa.Text),
    sa.column("action", sa.String),
    sa.column("subject_kind", sa.String),
    sa.column("subject_id", sa.String),
    sa.column("details", JSONDocument),
    sa.column("prev_hash", sa.String),
    sa.column("entry_hash", sa.String),
)
_head = sa.table(
    "audit_chain_head",
    sa.column("chain", sa.String),
    sa.column("last_id", sa.BigInteger),
    sa.column("entry_hash", sa.String),
)


def _chain_existing(conn: sa.Connection) -> tuple[int, str]:
    """Renumber and chain the entries written before the chain; returns the newest id and hash."""
    a = _audit.c
    rows = conn.execute(sa.select(_audit).order_by(a.id)).all()
    prev_hash, position = GENESIS_HASH, 0
    for row in rows:
        position += 1
        # Ascending order and position <= id: the new id never collides with an entry not yet renumbered.
        digest = entry_hash(
            id=position,
            at=row.at,
            actor=row.actor,
            action=row.action,
            subject_kind=row.subject_kind,
            subject_id=row.subject_id,
            details=row.details,
            prev_hash=prev_hash,
        )
        conn.execute(
            sa.update(_audit).where(a.id == row.id).values(id=position, prev_hash=prev_hash, entry_hash=digest)
        )
        prev_hash = digest
    return position, prev_hash


def upgrade() -> None:
    op.add_column("audit_events", sa.Column("prev_hash", sa.String(64)))
    op.add_column("audit_events", sa.Column("entry_hash", sa.String(64)))
    op.create_table(
        "audit_chain_head",
        sa.Column("chain", sa.String(32)),
        sa.Column("last_id", sa.BigInteger, nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("chain", name="pk_audit_chain_head"),
    )
    last_id, last_hash = _chain_existing(op.get_bind())
    op.get_bind().execute(sa.insert(_head).values(chain=CHAIN, last_id=last_id, entry_hash=last_hash))
    # SQLite cannot add NOT NULL to a column in place: the batch copies the table (it is small).
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("prev_hash", existing_type=sa.String(64), nullable=False)
        batch.alter_column("entry_hash", existing_type=sa.String(64), nullable=False)
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("tenant", sa.String(64)),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("revoked_at", _ts),
        sa.Column("last_used_at", _ts),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.CheckConstraint("role IN ('viewer', 'operator', 'admin')", name="ck_api_tokens_role_known"),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_table("audit_chain_head")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("entry_hash")
        batch.drop_column("prev_hash")
