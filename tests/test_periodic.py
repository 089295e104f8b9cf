"""The periodic loop under the monitor and the reconciler: a failing step is logged and retried at the
next tick, and stop() ends the loop without waiting for the interval."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from booking.periodic import Periodic


async def test_a_failed_step_is_logged_and_the_next_tick_runs() -> None:
    calls: list[int] = []
    loop: Periodic

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("ledger unreachable")
        if len(calls) == 3:
            loop.stop()

    loop = Periodic(step, 0.001, name="probe")
    with capture_logs() as logs:
        await asyncio.wait_for(loop.run(), 10)
    assert calls == [0, 1, 2]
    assert [entry["event"] for entry in logs] == ["probe_failed"]


async def test_stop_ends_the_wait_at_once() -> None:
    ran = asyncio.Event()

    async def step() -> None:
        ran.set()

    loop = Periodic(step, 3600, name="probe")
    task = asyncio.create_task(loop.run())
    await ran.wait()
    loop.stop()
    await asyncio.wait_for(task, 10)  # an hour's interval, ended by stop()
