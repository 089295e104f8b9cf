"""A task that runs one step every so often until it is told to stop (the outbox monitor, the
reconciler): a failed step is logged and the next tick tries again, so the loop outlives any one error."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog


class Periodic:
    def __init__(self, step: Callable[[], Awaitable[object]], interval: float, *, name: str) -> None:
        self._step = step
        self._interval = interval
        self._name = name
        self._stopping = asyncio.Event()
        self._log = structlog.get_logger(f"voicebook.{name}")

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run the step now and then every ``interval`` seconds until :meth:`stop`."""
        while not self._stopping.is_set():
            try:
                await self._step()
            except Exception:  # e.g. the ledger briefly unreachable: the next tick tries again
                self._log.exception(f"{self._name}_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._stopping.wait()
