"""The sharded httpx transport: requests spread over its pools, limits divided, connections reused, the
pool walks (httpcore's, on every request) cover a shard's connections instead of all of them, and a closed
response is freed by its reference count, not left to the cycle collector. A real uvicorn server on
loopback answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpcore
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from integrations.egress import Allowlist, httpx_client
from integrations.http_pool import ShardedTransport
from tests.conftest import cyclic_garbage, garbage_of, serving

LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=50, keepalive_expiry=30.0)


async def hello(request: Request) -> PlainTextResponse:
    await asyncio.sleep(float(request.query_params.get("hold", "0")))
    return PlainTextResponse("hello")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async with serving(Starlette(routes=[Route("/", hello)]), lifespan="off") as url:
        yield url


def test_the_limits_are_divided_between_the_shards() -> None:
    transport = ShardedTransport(limits=LIMITS, shards=8)
    assert len(transport.shards) == 8
    for shard in transport.shards:
        assert shard._pool._max_connections == 13  # 100 / 8, rounded up
        assert shard._pool._max_keepalive_connections == 7
        assert shard._pool._keepalive_expiry == 30.0
    with pytest.raises(ValueError, match="at least 1"):
        ShardedTransport(limits=LIMITS, shards=0)


async def test_requests_go_to_the_shards_in_turn_and_reuse_their_connections(server: str) -> None:
    transport = ShardedTransport(limits=LIMITS, shards=4)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(8):
            assert (await client.get(server)).text == "hello"
        assert [len(shard._pool.connections) for shard in transport.shards] == [1, 1, 1, 1]
        first = {id(connection) for connection in transport.connections()}
        # 40 at once: ten per shard, each on a connection of its own; then again, on the same ones.
        await asyncio.gather(*(client.get(server, params={"hold": "0.05"}) for _ in range(40)))
        held = {id(connection) for connection in transport.connections()}
        await asyncio.gather(*(client.get(server, params={"hold": "0.05"}) for _ in range(40)))
        again = {id(connection) for connection in transport.connections()}
    assert first <= held and len(held) == 40
    assert again == held


@pytest.fixture
def idle_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts httpcore's ``is_idle`` calls: how many connections the pool walks look at."""
    calls = [0]
    real = httpcore.AsyncHTTPConnection.is_idle

    def counting(self: httpcore.AsyncHTTPConnection) -> bool:
        calls[0] += 1
        return real(self)

    monkeypatch.setattr(httpcore.AsyncHTTPConnection, "is_idle", counting)
    yield calls


async def walks_per_request(transport: httpx.AsyncBaseTransport, url: str, checks: list[int]) -> float:
    """``is_idle`` calls per request, one request at a time, once 64 idle connections are held."""
    async with httpx.AsyncClient(transport=transport) as client:
        await asyncio.gather(*(client.get(url, params={"hold": "0.05"}) for _ in range(64)))
        checks[0] = 0
        for _ in range(32):
            await client.get(url)
        return checks[0] / 32


async def test_a_shard_walks_its_own_connections_not_all_of_them(server: str, idle_checks: list[int]) -> None:
    # One pool holding 64 idle connections counts them all again for each idle one, on every request
    # and every response closed; eight shards hold eight each. Counted, not timed, in the same run.
    one_pool = await walks_per_request(httpx.AsyncHTTPTransport(limits=LIMITS), server, idle_checks)
    sharded = await walks_per_request(ShardedTransport(limits=LIMITS, shards=8), server, idle_checks)
    assert one_pool > 1000, one_pool
    assert sharded * 20 < one_pool, (sharded, one_pool)


async def requests_of_every_kind(client: httpx.AsyncClient, url: str) -> None:
    """Read whole, streamed to the end, streamed and closed part-way, and refused by an error status."""
    for _ in range(5):
        assert (await client.get(url)).text == "hello"
        async with client.stream("GET", url) as response:
            assert b"".join([chunk async for chunk in response.aiter_bytes()]) == b"hello"
        async with client.stream("GET", url) as response:
            pass  # closed unread
        assert response.is_closed and response.elapsed.total_seconds() >= 0
        with pytest.raises(httpx.StreamClosed):
            await response.aread()
        assert (await client.get(url + "/missing")).status_code == 404


async def test_a_closed_response_is_freed_without_the_cycle_collector(server: str) -> None:
    # httpx's client binds each response's stream back to the response; the transport undoes that once
    # the response is closed. The plain transport is the control: its responses are all left to the
    # collector, so the count would catch the cycle coming back.
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport()) as client:
        await client.get(server)  # the connection is open before counting
        with cyclic_garbage() as plain:
            await requests_of_every_kind(client, server)
    async with httpx.AsyncClient(transport=ShardedTransport(limits=LIMITS, shards=2)) as client:
        await client.get(server)
        with cyclic_garbage() as sharded:
            await requests_of_every_kind(client, server)
    assert garbage_of(plain, httpx.Response) == 20
    assert garbage_of(sharded, httpx.Response) == 0
    assert garbage_of(sharded, httpx.Request) == 0


async def test_the_egress_gate_s_responses_are_freed_without_the_cycle_collector(server: str) -> None:
    async with httpx_client(Allowlist.of([server])) as client:
        await client.get(server)
        with cyclic_garbage() as found:
            await requests_of_every_kind(client, server)
    assert garbage_of(found, httpx.Response) == 0
