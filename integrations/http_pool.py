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

:func:`unbound_on_close` is for garbage. httpx 0.28's client binds each response's body stream to the
response (``BoundAsyncStream``, which sets ``response.elapsed``), and the response holds the stream: a
reference cycle. Every finished response, with its request, headers, URLs and httpcore's request state
(about 30 objects), was then freed only by the cycle collector: in a 100-call load test 36 such responses
a second, two thirds of the server's cyclic garbage, and a pause of the event loop at each of the
collector's passes. A response this module's transports return drops its stream once closed, so it is
freed at once. (``httpx2``, which the OpenAI SDK sends with, no longer binds the stream to the response.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from typing import Any, Final

import httpx

DEFAULT_SHARDS: Final = 8


def _share(limit: int | None, shards: int) -> int | None:
    return None if limit is None else max(1, math.ceil(limit / shards))


_CLOSED: Final = httpx.ByteStream(b"")


class _UnbindingStream(httpx.AsyncByteStream):
    """A response's body stream that, once closed, takes the response's stream away (module doc)."""

    def __init__(self, inner: httpx.AsyncByteStream, response: httpx.Response) -> None:
        self._inner = inner
        self._response: httpx.Response | None = response

    def __aiter__(self) -> AsyncIterator[bytes]:  # the inner stream's own iterator: no extra step per chunk
        return self._inner.__aiter__()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            response, self._response = self._response, None
            if response is not None:
                # By now the client's BoundAsyncStream, which holds the response back: the cycle ends here.
                # The response is closed, so httpx never reads this stream again.
                response.stream = _CLOSED


def unbound_on_close(response: httpx.Response) -> httpx.Response:
    """``response``, its stream made to let go of it once closed (module doc). Idempotent."""
    if isinstance(response.stream, httpx.AsyncByteStream) and not isinstance(response.stream, _UnbindingStream):
        response.stream = _UnbindingStream(response.stream, response)
    return response


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
        return unbound_on_close(await next(self._turn).handle_async_request(request))

    def connections(self) -> list[Any]:
        """Every connection the shards hold now (httpcore's connection objects), for tests and metrics."""
        return [connection for shard in self.shards for connection in shard._pool.connections]

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()


__all__ = ["DEFAULT_SHARDS", "ShardedTransport", "unbound_on_close"]
