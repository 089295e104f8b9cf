"""``voicebook serve --processes N``: one port, N server processes, each with its own event loop.

One Python process carries its calls on one event loop, so it uses at most one core, and every call on it
waits behind the others' audio for its turn on that loop. Spreading calls over several processes uses the
other cores and keeps each loop lightly loaded (shorter queues, so lower tail latency for turns and
bookings). The processes share nothing in memory: calls, holds and bookings live in Redis and the ledger,
and a Media Streams connection stays on the process that accepted it.

The supervisor (this module, the parent process):

* starts the embedded Redis once, when ``REDIS_URL`` is not set, and hands its URL to every process;
* applies the ledger's migrations once (``VOICEBOOK_AUTO_MIGRATE``), so the processes do not race to;
* gives the processes a shared ``PROMETHEUS_MULTIPROC_DIR`` (a fresh one under the data directory unless
  one is configured), so ``/metrics`` on any of them adds up all of them;
* starts the booking process (``voice_server.booking_process``) when the calls' writes go to one, waits
  until its socket answers, and hands that socket to every server process (``VOICEBOOK_BOOKING_SOCKET``);
  it runs even with a single server process, since its point is an interpreter of its own;
* checks the port is free, then starts the processes: each binds its own listening socket to the same
  address with ``SO_REUSEPORT``, and the kernel spreads new connections evenly over them;
* restarts a process that dies (a second after, backing off to 30 s), and gives up when processes keep
  dying within seconds of starting (a configuration the parent could not see is wrong); while the booking
  process is down, the server processes book on their own service;
* on SIGTERM, SIGINT or SIGHUP passes the signal on: every server process drains its own calls
  (``VOICEBOOK_DRAIN_SECONDS``) and exits; a second signal is passed on too (stop now). The booking process
  is stopped once every server process has exited, so the bookings of calls that ended during the drain
  still commit there; then the embedded Redis stops. The processes run in process groups of their own, so
  a signal sent to the supervisor's group (Ctrl-C in a terminal, a closed terminal's SIGHUP) reaches them
  once, from the supervisor: had they received it from the terminal as well, the one passed on would count
  as the second, and cut calls off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from voice_server.settings import Settings
from voice_server.socket_paths import socket_folder

log = structlog.get_logger("voicebook.supervisor")

CHILD_VARIABLE = "VOICEBOOK_SERVE_REUSE_PORT"
"""Set by the supervisor for its processes: bind with ``SO_REUSEPORT`` (other processes share the port)."""
BOOKING_SOCKET_VARIABLE = "VOICEBOOK_BOOKING_SOCKET"
BOOKING = -1
"""The booking process's key among the children (server processes are 0 to N-1)."""
BOOKING_READY_SECONDS = 30.0
QUICK_DEATH_SECONDS = 10.0
QUICK_DEATHS_TO_GIVE_UP = 5
MAX_RESTART_DELAY = 30.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that stop the supervisor, each passed on to the processes as SIGTERM."""


class SupervisorError(RuntimeError):
    """The processes could not be started or kept running; the message says why."""


def reuse_port_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (listening unless ``listen`` is False)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise SupervisorError("--processes needs SO_REUSEPORT, which this platform does not have")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
            sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Child:
    index: int
    process: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs ``processes`` copies of ``voicebook serve`` on one address until told to stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str,
        port: int,
        processes: int,
        argv: Sequence[str],
        booking_argv: Sequence[str] | None = None,
    ) -> None:
        if processes < 1 or (processes < 2 and booking_argv is None):
            raise ValueError("a supervisor is for two processes or more, or one beside the booking process")
        self.settings = settings
        self.host = host
        self.port = port
        self.processes = processes
        self._argv = list(argv)  # the command a process runs (voicebook serve with its options)
        self._booking_argv = None if booking_argv is None else list(booking_argv)
        self.booking_socket: Path | None = None
        self._children: dict[int, Child] = {}
        self._stopping = 0  # signals received
        self._quick_deaths = 0
        self._restarts: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self.metrics_dir: Path | None = None

    async def run(self) -> int:
        from voice_server.embedded_redis import EmbeddedRedis

        # Held (bound, not listening) while the processes start: a port taken by something else fails
        # here with one clear message, and no connection is ever queued on this socket.
        try:
            guard = reuse_port_socket(self.host, self.port, listen=False)
        except OSError as exc:
            raise SupervisorError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(guard.close)
            env = dict(os.environ)
            env[CHILD_VARIABLE] = "1"
            env["VOICEBOOK_PROCESSES"] = "1"
            if self.settings.redis_url is None:
                embedded = EmbeddedRedis(self.settings.data_dir / "redis")
                await embedded.start()
                stack.push_async_callback(embedded.stop)
                env["REDIS_URL"] = embedded.url
                log.info("embedded_redis_started", socket=str(embedded.socket_path))
            if self.settings.auto_migrate:
                await self._migrate()
                env["VOICEBOOK_AUTO_MIGRATE"] = "false"
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir(stack))
            loop = asyncio.get_running_loop()
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
            stack.callback(self._remove_signal_handlers, loop)
            if self._booking_argv is not None:
                folder = socket_folder("voicebook-booking-", "booking.sock")
                stack.callback(shutil.rmtree, folder, True)
                self.booking_socket = folder / "booking.sock"
                env[BOOKING_SOCKET_VARIABLE] = str(self.booking_socket)
                await self._start(BOOKING, env)
                await self._booking_ready()
            for index in range(self.processes):
                await self._start(index, env)
            log.info("supervisor_started", processes=self.processes, host=self.host, port=self.port)
            return await self._watch(env)

    async def _migrate(self) -> None:
        from booking.ledger.database import Database, migrate
        from voice_server.privacy_keys import install_pii_cipher

        install_pii_cipher(self.settings)  # rows written before encryption are sealed by the migration
        database = Database.connect(self.settings.effective_database_url)
        try:
            await migrate(database)
        finally:
            await database.dispose()

    def _metrics_dir(self, stack: contextlib.AsyncExitStack) -> Path:
        configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if configured:
            self.metrics_dir = Path(configured)
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            return self.metrics_dir
        # A folder of this supervisor's own, empty at the start: stale files of an earlier run would
        # otherwise be added into the totals.
        folder = self.settings.data_dir / f"metrics-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        stack.callback(shutil.rmtree, folder, True)
        self.metrics_dir = folder
        return folder

    def _command(self, index: int) -> list[str]:
        if index == BOOKING:
            assert self._booking_argv is not None and self.booking_socket is not None
            return [*self._booking_argv, "--socket", str(self.booking_socket)]
        return self._argv

    async def _booking_ready(self) -> None:
        """Wait until the booking process's socket accepts a connection; fail if the process exits first."""
        assert self.booking_socket is not None
        deadline = time.monotonic() + BOOKING_READY_SECONDS
        while True:
            child = self._children.get(BOOKING)
            if child is None or child.process.returncode is not None:
                raise SupervisorError("the booking process exited at start-up (its log says why)")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_unix_connection(str(self.booking_socket))
                writer.close()
                log.info("booking_process_ready", pid=child.process.pid, socket=str(self.booking_socket))
                return
            if time.monotonic() > deadline:
                raise SupervisorError(f"the booking process did not listen within {BOOKING_READY_SECONDS:.0f} s")
            await asyncio.sleep(0.05)

    async def _start(self, index: int, env: dict[str, str]) -> None:
        # process_group=0: a group of its own, out of reach of signals sent to the supervisor's group.
        process = await asyncio.create_subprocess_exec(
            *self._command(index), env=env, stdin=asyncio.subprocess.DEVNULL, process_group=0
        )
        self._children[index] = Child(index, process)
        if self._stopping and (index != BOOKING or not self._servers()):
            process.send_signal(signal.SIGTERM)  # the stop signal came while it was starting: it was not told
        asyncio.get_running_loop().create_task(self._reap(index, process))

    async def _reap(self, index: int, process: asyncio.subprocess.Process) -> None:
        await process.wait()
        self._changed.set()

    async def _watch(self, env: dict[str, str]) -> int:
        failure = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            for index, child in list(self._children.items()):
                code = child.process.returncode
                if code is None:
                    continue
                del self._children[index]
                self._mark_dead(child.process.pid)
                if self._stopping:
                    continue
                lived = time.monotonic() - child.started
                self._quick_deaths = self._quick_deaths + 1 if lived < QUICK_DEATH_SECONDS else 0
                log.error(
                    "booking_process_died" if index == BOOKING else "server_process_died",
                    process=index,
                    pid=child.process.pid,
                    exit_code=code,
                    lived_s=round(lived, 1),
                )
                if self._quick_deaths >= QUICK_DEATHS_TO_GIVE_UP:
                    log.error("supervisor_giving_up", reason="processes keep dying right after they start")
                    failure = 1
                    self._on_signal(signal.SIGTERM)
                    continue
                delay = min(MAX_RESTART_DELAY, 2.0 ** max(0, self._quick_deaths - 1))
                task = asyncio.get_running_loop().create_task(self._restart(index, env, delay))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)
            if self._stopping and not self._servers() and (booking := self._children.get(BOOKING)) is not None:
                # Every server process has drained and exited: their last bookings are in; now the booking
                # process finishes what it has in flight and exits.
                with contextlib.suppress(ProcessLookupError):
                    booking.process.send_signal(signal.SIGTERM)
            if self._stopping and not self._children:
                for task in self._restarts:
                    task.cancel()
                log.info("supervisor_stopped")
                return failure

    async def _restart(self, index: int, env: dict[str, str], delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._stopping:
            await self._start(index, env)
            log.info(
                "booking_process_restarted" if index == BOOKING else "server_process_restarted",
                process=index,
                pid=self._children[index].process.pid,
            )

    def _on_signal(self, sig: int) -> None:
        self._stopping += 1
        log.info("supervisor_stopping", signal=signal.Signals(sig).name, processes=len(self._servers()))
        for child in self._servers():
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        self._changed.set()

    def _servers(self) -> list[Child]:
        return [child for index, child in self._children.items() if index != BOOKING]

    def _mark_dead(self, pid: int) -> None:
        """A dead process's live gauges leave the totals (its counters stay: they happened)."""
        if self.metrics_dir is None:
            return
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]  # untyped upstream

    @staticmethod
    def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def booking_process_argv() -> list[str]:
    """What the booking process runs (the supervisor adds ``--socket``)."""
    return [sys.executable, "-m", "voice_server.cli", "booking-process"]


def child_command(host: str, port: int, forwarded_allow_ips: str | None) -> list[str]:
    """What each process runs: this same ``voicebook serve``, for one process, on the shared address."""
    argv = [sys.executable, "-m", "voice_server.cli", "serve", "--host", host, "--port", str(port)]
    if forwarded_allow_ips is not None:
        argv += ["--forwarded-allow-ips", forwarded_allow_ips]
    return argv
