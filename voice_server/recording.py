"""A call's recording: every Twilio message in and out with its time, and the session's turns, as JSON
lines. Kept in memory during the call and written once when it ends, off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson


class CallRecording:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._started = clock()
        self._lines: list[bytes] = []

    def _add(self, entry: dict[str, Any]) -> None:
        entry["t"] = round(self._clock() - self._started, 4)
        self._lines.append(orjson.dumps(entry))

    def inbound(self, raw: str | bytes) -> None:
        """A message from Twilio, as it arrived (text as is; a binary frame as its length)."""
        self._add({"dir": "in", "msg": raw} if isinstance(raw, str) else {"dir": "in", "binary": len(raw)})

    def outbound(self, text: str) -> None:
        self._add({"dir": "out", "msg": text})

    def event(self, kind: str, **fields: Any) -> None:
        """A session event (a turn, the end of the call)."""
        self._add({"event": kind, **fields})

    async def save(self) -> Path:
        data = b"\n".join(self._lines) + b"\n"
        path = self.path

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(write)
        return path


def load_recording(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
