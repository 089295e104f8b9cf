"""Alembic environment. Migrations run on a connection handed in by :func:`booking.ledger.database.migrate`
(``config.attributes["connection"]``), so the same code path serves the CLI, the app start-up and tests."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from booking.ledger.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations with `voicebook migrate`; offline SQL generation is not supported")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
