"""A rate limit shared by every worker process: at most ``limit`` requests in any ``window`` seconds per
key (an Airtable base), kept in Redis by one Lua script so that taking a slot is atomic across processes.

A sliding-window log rather than a token bucket: a provider that counts "5 requests per second" over any
second (Airtable) refuses a bucket's burst followed by its steady rate, while a log never grants more than
``limit`` slots in one window. The script reads Redis's own clock, so processes on hosts whose clocks
disagree still share one timeline; tests may pass their own ``clock`` instead.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

KEY_PREFIX = "voicebook:ratelimit:"
"""Followed by the limiter's name and the key (``airtable:appXXXX``): one sorted set of granted slots."""

# KEYS[1] the window's sorted set; ARGV limit, window (s), now (s, or -1 for Redis's TIME), a unique member.
# Returns "0" when a slot was granted, else the seconds until the oldest slot leaves the window (as a
# string: Lua numbers become integers on the way back to Redis).
_SCRIPT = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(math.max(tonumber(oldest[2]) + window - now, 0.001))
"""


class RedisRateLimiter:
    """``await limiter.acquire(key)`` waits until a slot of ``limit`` per ``window`` seconds is free
    for ``key`` across every process sharing ``redis``; ``try_acquire`` asks once without waiting.

    Usage: ``RedisRateLimiter(redis, "airtable", limit=5, window=1.0)``.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        name: str,
        *,
        limit: int,
        window: float,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError(f"limit must be >= 1 and window > 0, not {limit} and {window}")
        self.limit = limit
        self.window = window
        self._prefix = f"{KEY_PREFIX}{name}:"
        self._script = redis.register_script(_SCRIPT)
        self._clock = clock
        self._sleep = sleep

    async def try_acquire(self, key: str) -> float:
        """Take a slot now and return 0.0, or take nothing and return the seconds until one frees up."""
        now = -1.0 if self._clock is None else self._clock()
        member = f"{now}:{secrets.token_hex(8)}"
        answer = await self._script(keys=[self._prefix + key], args=[self.limit, self.window, now, member])
        return float(answer.decode() if isinstance(answer, bytes) else answer)

    async def acquire(self, key: str) -> float:
        """Wait for a slot; returns the seconds spent waiting."""
        waited = 0.0
        while (wait := await self.try_acquire(key)) > 0:
            await self._sleep(wait)
            waited += wait
        return waited
