"""Running the app under uvicorn with a graceful drain for live calls.

uvicorn alone, on SIGTERM, closes every WebSocket at once, which would cut callers off mid-sentence. On
the first SIGTERM or SIGINT this server stops taking new calls (the voice webhook answers with a polite
"call back shortly") and lets calls in progress finish for up to ``drain_seconds``. Calls still going
then hear a short goodbye and are hung up, and only then does uvicorn shut down. A second signal skips
the wait.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from types import FrameType

import structlog
import uvicorn
from starlette.applications import Starlette

from voice_server.components import Components

log = structlog.get_logger("voicebook.server")

SHUTDOWN_GOODBYE = "I'm sorry, we have to end the call now. Please call us back in a few minutes. Goodbye."
GOODBYE_SECONDS = 8.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette, *, drain_seconds: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        # Everything alive after start-up (modules, the app, its clients) lives as long as the process:
        # moved out of the collector's generations, a full collection no longer walks it while calls run.
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None:
            super().handle_exit(sig, frame)  # second signal (or not started): stop now
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """Stop taking calls, wait for the ones in progress, then end the rest politely and stop."""
        components: Components | None = getattr(self._app.state, "components", None)
        if components is not None:
            components.draining.set()
            deadline = time.monotonic() + self._drain_seconds
            log.info("draining", active_calls=len(components.sessions), seconds=self._drain_seconds)
            # Calls answered just before the drain may still connect: wait for whoever is on the line.
            while components.sessions and (left := deadline - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(left):
                        await asyncio.gather(*(session.ended.wait() for session in list(components.sessions)))
                except TimeoutError:
                    break
            remaining = list(components.sessions)
            if remaining:
                log.info("ending_calls_for_shutdown", active_calls=len(remaining))
                for session in remaining:
                    await session.close_politely(SHUTDOWN_GOODBYE, reason="server_shutdown")
                waits = [session.ended.wait() for session in remaining]
                try:
                    async with asyncio.timeout(GOODBYE_SECONDS):
                        await asyncio.gather(*waits)
                except TimeoutError:
                    log.warning("goodbyes_unfinished", active_calls=len(components.sessions))
        self.should_exit = True
