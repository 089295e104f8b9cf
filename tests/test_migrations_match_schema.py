"""The migrations build exactly the schema ``booking/ledger/schema.py`` declares (tables, columns,
nullability, indexes, foreign keys), on SQLite and PostgreSQL: a hand-written migration that forgets an
index or a column fails here, not in production."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from booking.ledger.database import Database
from booking.ledger.schema import metadata


def _differences(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": False})
    return list(compare_metadata(context, metadata))


def _sqlite_primary_key_noise(difference: Any) -> bool:
    # SQLite reports a TEXT PRIMARY KEY column as nullable (it is, in SQLite, unless declared NOT NULL);
    # the metadata says not null. Every other difference counts.
    return (
        isinstance(difference, list)
        and len(difference) == 1
        and difference[0][0] == "modify_nullable"
        and difference[0][5] is True  # nullable in the database
        and difference[0][6] is False  # not nullable in the metadata
    )


async def test_the_migrated_ledger_is_the_declared_schema(database: Database) -> None:
    differences = await database.write(_differences)
    if database.dialect == "sqlite":
        differences = [d for d in differences if not _sqlite_primary_key_noise(d)]
    assert differences == []
