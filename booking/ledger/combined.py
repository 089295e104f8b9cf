"""Writes that need no answer back, sent to PostgreSQL together as one statement.

On PostgreSQL every statement of a transaction is a round trip to the server: the client waits for the
answer before it sends the next. A booking made on the phone wrote its booking, its effects, the caller's
yes to texts and that question's wording in four statements, and the audit log two more after reserving
its ids: ten round trips with BEGIN and COMMIT. Under load each round trip is also a chance to wait for a
core behind other processes (docs/benchmarks.md, sixteenth measurement).

:class:`CombinedWrite` collects such writes (inserts, and updates whose values are known) and sends them
as one statement: the first ones become data-modifying ``WITH`` clauses of the last, each run exactly
once, whether or not anything reads it. They see the same snapshot and none sees the others' rows, so
only writes that do not read one another's rows belong together. Foreign keys are checked once the whole
statement has run, so a booking and the effects that refer to it can go together. A refused row
(an overlap, a duplicate key) fails the whole statement with the same error as it would alone.

Each insert's rows arrive as one array per column, turned back into rows by ``unnest``: the statement's
text depends on which tables and columns it writes, never on how many rows, so SQLAlchemy compiles each
shape once (a multi-row ``VALUES`` has no cache key, and compiling it on every booking cost more than
the round trips it saved) and asyncpg prepares it once per connection.

SQLite cannot put a write inside ``WITH``, and its statements are calls into the same process, not round
trips, so there they run one after the other in the order given.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import JSON, Table, bindparam, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.types import TypeEngine

# What a part of a combined write is, for the cache of built statements: an insert's table, columns and
# conflict target, or an update statement built once by its caller.
InsertShape = tuple[Table, tuple[str, ...], tuple[str, ...] | None]
Shape = InsertShape | Update


class CombinedWrite:
    """Inserts and updates of one transaction, sent by :meth:`send` (as one statement on PostgreSQL)."""

    def __init__(self) -> None:
        self._parts: list[tuple[Shape, Any]] = []

    def insert(
        self, table: Table, rows: Sequence[Mapping[str, Any]], *, skip_conflicts_on: Sequence[str] | None = None
    ) -> None:
        """Insert ``rows`` into ``table``, in their order (a serial id follows it). Every row has the
        same columns. ``skip_conflicts_on``: the unique columns on which a row already there makes this
        one skipped (``ON CONFLICT DO NOTHING``)."""
        if not rows:
            return
        columns = tuple(rows[0])
        if any(tuple(row) != columns for row in rows):
            raise ValueError(f"rows for {table.name} do not all have the same columns")
        skip = tuple(skip_conflicts_on) if skip_conflicts_on is not None else None
        self._parts.append(((table, columns, skip), rows))

    def update(self, statement: Update, parameters: Mapping[str, Any]) -> None:
        """Run ``statement``, an ``UPDATE`` built once (module level) with named bound parameters, with
        ``parameters``. Their names must not start with ``write_``, which the inserts' use."""
        self._parts.append((statement, dict(parameters)))

    def __len__(self) -> int:
        return len(self._parts)

    def send(self, conn: Connection) -> None:
        """Run the writes collected so far on ``conn`` and forget them."""
        parts, self._parts = self._parts, []
        if not parts:
            return
        dialect = conn.dialect.name
        if dialect != "postgresql" or len(parts) == 1:
            for shape, values in parts:
                if isinstance(shape, Update):
                    conn.execute(shape, values)
                else:
                    conn.execute(_plain_insert(dialect, shape[0], shape[2]), list(values))
            return
        parameters: dict[str, Any] = {}
        for number, (shape, values) in enumerate(parts):
            if isinstance(shape, Update):
                parameters.update(values)
            else:
                _table, columns, _skip = shape
                parameters.update(
                    {f"write_{number}_{column}": [row[column] for row in values] for column in columns}
                )
        conn.execute(_combined(tuple(shape for shape, _ in parts)), parameters)


@functools.lru_cache(maxsize=64)
def _plain_insert(dialect: str, table: Table, skip: tuple[str, ...] | None) -> Insert:
    if skip is None:
        return insert(table)
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return dialect_insert(table).on_conflict_do_nothing(index_elements=list(skip))


@functools.lru_cache(maxsize=64)
def _combined(shapes: tuple[Shape, ...]) -> Insert | Update:
    """The one PostgreSQL statement for ``shapes``: every part but the last a ``WITH`` clause of the last.
    Built once per shape: building it took longer than running it."""
    built = [_pg_part(shape, number) for number, shape in enumerate(shapes)]
    clauses = [part.cte(f"write_{number}") for number, part in enumerate(built[:-1])]
    return built[-1].add_cte(*clauses)


def _pg_part(shape: Shape, number: int) -> Insert | Update:
    if isinstance(shape, Update):
        return shape
    table, columns, skip = shape
    arrays = [
        bindparam(f"write_{number}_{column}", type_=postgresql.ARRAY(_element_type(table.c[column].type)))
        for column in columns
    ]
    rows = func.unnest(*arrays).table_valued(*columns).render_derived(name=f"write_{number}_rows")
    statement = _plain_insert("postgresql", table, skip)
    return statement.from_select(list(columns), select(*[rows.c[column] for column in columns]))


def _element_type(kind: TypeEngine[Any]) -> TypeEngine[Any]:
    """The type of an array's elements for a column of ``kind`` (JSON documents are ``jsonb`` there)."""
    return postgresql.JSONB() if isinstance(kind, JSON) else kind
