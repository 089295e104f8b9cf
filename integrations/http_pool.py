"""An httpx transport that spreads requests over several connection pools.

httpcore's pool (1.0.x, which httpx and the Deepgram SDK send with) does work on every request that
grows with the square of the connections it holds: each time a request starts or a response is closed it
walks every connection, and for each idle one it counts all the connections again (and asks the socket
whether it is readable, a system call). With every call of a busy server speaking through one pool, that
pool holds a connection per call speaking at once. In a 100-call load test the walks rose from 4% to 15%
of the event loop's samples while callers hung up and dialled again together, the moments the loop went
200 ms late.

:class:`ShardedTransport` keeps ``shards`` independent pools and hands requests to them in turn, so each
pool holds a share of the connections and its walks cost that share squared. Limits are divided
between the shards; a connection is reused only within its shard, which costs at most a few more idle
connections than one pool would keep.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Final

import httpx

DEFAULT_SHARDS: Final = 8


def _share(limit: int | None, shards: int) -> int | None:
    return None if limit is None else max(1, math.ceil(limit / shards))


class ShardedTransport(httpx.AsyncBaseTransport):
    """``shards`` ``httpx.AsyncHTTPTransport`` pools, used in turn (module doc). ``limits`` are for all of
    them together; ``options`` go to each (``http2``, ``retries``, ...)."""

    def __init__(self, *, limits: httpx.Limits, shards: int = DEFAULT_SHARDS, **options: Any) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        each = httpx.Limits(
            max_connections=_share(limits.max_connections, shards),
            max_keepalive_connections=_share(limits.max_keepalive_connections, shards),
            keepalive_expiry=limits.keepalive_expiry,
        )
        self.shards = tuple(httpx.AsyncHTTPTransport(limits=each, **options) for _ in range(shards))
        self._turn = itertools.cycle(self.shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._turn).handle_async_request(request)

    def connections(self) -> list[Any]:
        """Every connection the shards hold now (httpcore's connection objects), for tests and metrics."""
        return [connection for shard in self.shards for connection in shard._pool.connections]

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()


__all__ = ["DEFAULT_SHARDS", "ShardedTransport"]
