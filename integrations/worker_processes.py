"""CPU-bound work for the calls, run in worker processes rather than on the server's interpreter.

The offline engines (libespeak-ng speaking, pocketsphinx decoding) are C libraries whose Python
bindings hold the interpreter lock while they work: a 2.5 s utterance decoded on a worker thread held
the event loop for 0.4 s, every call on the server waiting behind it. :class:`WorkerProcesses` runs such
work in ``spawn`` processes (the server has threads, which ``fork`` would copy mid-state), so the server's
side of a job is one request and one reply.

A worker that dies fails the jobs it held with :class:`WorkerDied`, and the next job starts a new pool;
the caller decides what a lost job means (a sentence unspoken, an utterance unheard).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")


class WorkerDied(RuntimeError):
    """The process running a job died (killed, out of memory) before answering."""


class WorkerProcesses:
    """``workers`` spawn processes, started on the first job or at once with :meth:`start`."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in a worker (both must pickle: a module-level function and plain data)."""
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
        except BrokenProcessPool as error:
            if self._pool is pool:
                self._pool = None  # the next job starts a new pool
                pool.shutdown(wait=False, cancel_futures=True)
            raise WorkerDied(str(error) or "a worker process died") from error

    async def start(self, ready: Callable[..., int], *args: object) -> list[int]:
        """Start the workers by running ``ready(*args)`` once per worker (it loads what the jobs need and
        returns the worker's process id); returns the process ids. A worker that finishes first may take
        a second turn, so this warms most workers, not always all: a cold one pays on its first job."""
        return list(await asyncio.gather(*(self.run(ready, *args) for _ in range(self.workers))))

    async def aclose(self) -> None:
        """Stop the workers (jobs still queued are dropped)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


__all__ = ["WorkerDied", "WorkerProcesses"]
