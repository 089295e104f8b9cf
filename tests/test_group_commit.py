"""Group commit on the real ledger: concurrent writes share transactions, and one write's failure never
becomes another's."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.group_commit import GroupCommit
from booking.ledger.repository import CustomerDetails, seal_customer
from booking.metrics import sample

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def add_customer(number: int) -> object:
    def work(connection: Connection) -> int:
        connection.execute(
            insert(t.customers).values(
                id=f"c{number}",
                **seal_customer(CustomerDetails(f"+1212555{number:04d}")),
                created_at=NOW,
                updated_at=NOW,
            )
        )
        return number

    return work


def failing(connection: Connection) -> None:
    sealed = seal_customer(CustomerDetails("+12125559999"))
    connection.execute(insert(t.customers).values(id="doomed", **sealed, created_at=NOW, updated_at=NOW))
    raise LookupError("this write changes its mind after writing")


async def customers(database: Database) -> int:
    async with database.reader.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(t.customers))).scalar_one())


async def test_concurrent_writes_share_transactions(database: Database) -> None:
    before = database.group_commit.batches
    results = await asyncio.gather(*(database.write(add_customer(n)) for n in range(40)))  # type: ignore[arg-type]
    assert results == list(range(40))
    assert await customers(database) == 40
    assert database.group_commit.batches - before < 40, "writes queued together commit together"


async def test_a_failing_write_fails_alone(database: Database) -> None:
    writes = [database.write(add_customer(n)) for n in range(5)]  # type: ignore[arg-type]
    writes.insert(2, database.write(failing))
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["int", "int", "LookupError", "int", "int", "int"]
    assert await customers(database) == 5, "the failing write's row was rolled back, the others kept"
    async with database.reader.connect() as connection:
        doomed = await connection.execute(select(t.customers.c.id).where(t.customers.c.id == "doomed"))
        assert doomed.first() is None


async def test_a_write_whose_caller_left_before_it_started_is_not_run() -> None:
    """Unit test of the queue alone, with an in-memory transaction that the test holds open."""
    gate = asyncio.Event()
    ran: list[list[object]] = []

    async def transaction(works: list[object]) -> list[object]:
        ran.append(works)
        await gate.wait()
        return [None for _ in works]

    group = GroupCommit(transaction, lanes=1)  # type: ignore[arg-type]
    first_work, second_work = object(), object()
    first = asyncio.ensure_future(group.submit(first_work))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the lane starts and holds the first transaction open
    second = asyncio.ensure_future(group.submit(second_work))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    second.cancel()
    gate.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    await group.drain()
    assert ran == [[first_work]]


async def test_waits_transactions_and_batch_sizes_are_measured() -> None:
    """Unit test of the queue alone: one write holds the transaction open while three queue behind it, and a
    fourth gives up before its turn (it is neither waited for nor counted in a batch)."""
    gate = asyncio.Event()

    async def transaction(works: list[object]) -> list[object]:
        await gate.wait()
        return [None for _ in works]

    def figures() -> tuple[float, ...]:
        return (
            sample("voicebook_ledger_write_wait_seconds_count"),
            sample("voicebook_ledger_transaction_seconds_count"),
            sample("voicebook_ledger_batch_writes_count"),
            sample("voicebook_ledger_batch_writes_sum"),
        )

    before = figures()
    group = GroupCommit(transaction, lanes=1)  # type: ignore[arg-type]
    first = asyncio.ensure_future(group.submit(object()))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(group.submit(object())) for _ in range(4)]  # type: ignore[arg-type]
    await asyncio.sleep(0)
    queued[-1].cancel()
    gate.set()
    await asyncio.gather(first, *queued[:-1])
    await group.drain()
    waits, transactions, batches, writes = (a - b for a, b in zip(figures(), before, strict=True))
    assert (waits, transactions, batches, writes) == (4, 2, 2, 4)
