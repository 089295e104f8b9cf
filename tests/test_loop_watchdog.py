"""The loop watchdog names the code that blocked the event loop, once per stall, and stays quiet while
the loop keeps ticking."""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from voice_server.loop_watchdog import LoopWatchdog, watching_for_stalls


def hold_the_loop(seconds: float) -> None:
    """Blocking work on the loop thread: what a synchronous call in a coroutine does."""
    time.sleep(seconds)


async def test_a_blocking_call_is_reported_with_its_stack() -> None:
    with capture_logs() as logs:
        async with watching_for_stalls(0.05, interval=0.01, cooldown=0.0) as watchdog:
            assert watchdog is not None
            await asyncio.sleep(0.05)
            hold_the_loop(0.3)
            await asyncio.sleep(0.1)  # the loop ticks again: the stall is over and reported
    stalls = [entry for entry in logs if entry["event"] == "event_loop_stalled"]
    assert len(stalls) == 1, logs
    [stall] = stalls
    assert any("hold_the_loop" in frame for frame in stall["loop_stack"]), stall["loop_stack"]
    assert any("test_a_blocking_call_is_reported_with_its_stack" in frame for frame in stall["loop_stack"])
    # The whole stall, not the moment it was noticed: close to the 0.3 s the loop was held.
    assert stall["stalled_ms"] > 0.5 * 300, stall
    assert watchdog.stalls[-1].seconds == pytest.approx(stall["stalled_ms"] / 1000, abs=0.001)


async def test_a_ticking_loop_is_not_reported() -> None:
    with capture_logs() as logs:
        async with watching_for_stalls(0.2, interval=0.01) as watchdog:
            assert watchdog is not None
            for _ in range(20):
                hold_the_loop(0.01)  # short blocks, well under the threshold
                await asyncio.sleep(0.01)
    assert not [entry for entry in logs if entry["event"] == "event_loop_stalled"]
    assert watchdog.stalls == []


async def test_reports_are_rate_limited_but_every_stall_is_kept() -> None:
    with capture_logs() as logs:
        async with watching_for_stalls(0.03, interval=0.01, cooldown=60.0) as watchdog:
            assert watchdog is not None
            for _ in range(2):
                await asyncio.sleep(0.05)
                hold_the_loop(0.15)
            await asyncio.sleep(0.1)
    assert len([entry for entry in logs if entry["event"] == "event_loop_stalled"]) == 1
    assert len(watchdog.stalls) == 2


async def test_zero_switches_it_off() -> None:
    async with watching_for_stalls(0) as watchdog:
        assert watchdog is None


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LoopWatchdog(threshold=-1)
