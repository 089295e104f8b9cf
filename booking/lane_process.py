"""The calls' booking writes in a process of their own, reached over a Unix socket.

The booking lane's thread (``booking.lane``) gave the writes a loop of their own, but not an interpreter:
each hop of a booking (the Redis hold, the ledger transaction, the index) still waited for the call
loop to hand over the GIL, and under 100 calls that set the booking's tail (p99 100 to 200 ms against a
10 ms target). With several server processes each had its own lane, and their ledger writes queued for
SQLite's one write lock across processes. ``voicebook serve`` therefore runs one *booking process* beside
its server processes (``voice_server.booking_process``): a :class:`LaneServer` around a
:class:`~booking.service.BookingService` and the ledger's call and SMS records, and every server process
sends its calls' writes (bookings, and the records of its calls and their texts) to it through a
:class:`LaneClient`.

Wire format, both ways: a 4-byte big-endian length, then a pickle. A request is ``("run", id, op,
log_context, trace_carrier)`` or ``("cancel", id)``; a reply is ``(id, ok, value)``, the value being the
write's result or the exception it raised. Pickle is the right codec here because both ends are this
program, the values are the service's own dataclasses and errors, and the socket lives in a folder only
the server's user can enter (``0700``); it is never a network protocol.

Nothing is lost when the booking process is not there: a client that cannot connect, whose connection
breaks with a write in flight, or whose write has no reply within ``reply_timeout`` (a process alive but
stuck), runs the write on its own process's service and records instead (``fallback``), as the server did
before the lane existed; so does a write too large for a frame (the transcript of a very long call). A
write whose reply was lost may then run twice: a booking is idempotent by its key (a second run returns
the first one's booking), a release or a cancellation finds the work done, a hold left behind expires
with its TTL, and the call records are idempotent by design (Twilio retries its webhooks too): the call
offered is one row, a status callback or receipt applies once, a second hang-up replaces the transcript
and enqueues no second report.

The write runs in the caller's log context (call SID, correlation id) and as a child of the caller's
trace span, carried in the request; its Prometheus figures are written by the booking process into the
shared multi-process folder, so ``/metrics`` of any server process counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import pickle
import struct
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate

from booking.domain import BookingStatus
from booking.errors import InvalidTransition
from booking.writes import WriteOp, Writers

T = TypeVar("T")

log = structlog.get_logger("voicebook.booking_process")

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 20  # a write and its reply are a few KB (a transcript tens of KB); anything larger is not ours
RECONNECT_SECONDS = 1.0  # after a failed connect, writes run locally this long before the next try


class LaneLost(ConnectionError):
    """The connection to the booking process broke (or never opened) with the write unanswered."""


def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


async def _read(reader: asyncio.StreamReader) -> Any:
    """The next message, or EOFError at the end of the stream; ValueError for a frame over the limit."""
    try:
        header = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(header)
        if length > MAX_FRAME:
            raise ValueError(f"a booking lane frame of {length} bytes (at most {MAX_FRAME})")
        return pickle.loads(await reader.readexactly(length))
    except asyncio.IncompleteReadError:
        raise EOFError from None


def _picklable(error: BaseException) -> BaseException:
    """The error itself when it crosses the socket intact, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _forget(running: dict[int, asyncio.Task[None]], request_id: int, _: asyncio.Task[None]) -> None:
    running.pop(request_id, None)


# -- the booking process's side ---------------------------------------------------------------------


class LaneServer:
    """Serves booking writes from the server processes on a Unix socket (see module doc)."""

    def __init__(self, writers: Writers) -> None:
        self.writers = writers
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # writes in flight, over every connection
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, path: Path) -> None:
        await asyncio.to_thread(path.unlink, missing_ok=True)  # a socket file left by a process that died
        self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        await asyncio.to_thread(path.chmod, 0o600)
        log.info("booking_process_listening", socket=str(path))

    async def stop(self) -> None:
        """Stop accepting, let every write in flight finish (its reply still goes out), then close."""
        if self._server is not None:
            self._server.close()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.writers.service.drain()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        running: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                message = await _read(reader)
                if message[0] == "run":
                    _, request_id, op, log_context, carrier = message
                    task = asyncio.get_running_loop().create_task(
                        self._run(writer, request_id, op, log_context, carrier)
                    )
                    running[request_id] = task
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    task.add_done_callback(functools.partial(_forget, running, request_id))
                elif message[0] == "cancel" and (cancelled := running.get(message[1])) is not None:
                    cancelled.cancel()
        except (EOFError, ConnectionError):
            pass  # the server process went away; its writes in flight still finish
        except Exception as error:  # a frame we cannot read: this peer is not ours, or is broken
            log.error("booking_process_bad_frame", error=repr(error))
        finally:
            writer.close()

    async def _run(
        self, writer: asyncio.StreamWriter, request_id: int, op: WriteOp[Any], log_context: dict[str, Any], carrier: Any
    ) -> None:
        structlog.contextvars.bind_contextvars(**log_context)
        otel_context.attach(propagate.extract(carrier))
        try:
            reply = (request_id, True, await op.apply(self.writers))
        except asyncio.CancelledError:
            return  # the caller gave up (a commit in progress is shielded by the service and goes on)
        except Exception as error:
            reply = (request_id, False, _picklable(error))
        if not writer.is_closing():
            writer.write(_frame(reply))


# -- a server process's side -------------------------------------------------------------------------


class LaneClient:
    """A server process's connection to the booking process: :meth:`write` sends a write and awaits its
    reply, or runs it on ``fallback`` (the process's own service) when the booking process cannot be
    reached (see module doc)."""

    def __init__(
        self, path: Path, fallback: Writers, *, connect_timeout: float = 1.0, reply_timeout: float = 10.0
    ) -> None:
        self.path = path
        self._fallback = fallback
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout  # a booking process that is alive but stuck: book here instead
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._retry_after = 0.0
        self.local_writes = 0  # writes run on the fallback service (for tests and the log)

    async def __aenter__(self) -> LaneClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self) -> bool:
        """Open the connection now (at start-up); False, and writes run locally, if it cannot be."""
        return await self._connection() is not None

    async def write(self, op: WriteOp[T]) -> T:
        writer = await self._connection()
        if writer is None:
            return await self._locally(op, "unavailable")
        request_id = next(self._ids)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        request = _frame(("run", request_id, op, structlog.contextvars.get_contextvars(), carrier))
        if len(request) - _LENGTH.size > MAX_FRAME:  # the booking process would refuse it and hang up
            return await self._locally(op, "too_large")
        reply: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        try:
            writer.write(request)
            async with asyncio.timeout(self._reply_timeout):
                ok, value = await reply
        except LaneLost:
            return await self._locally(op, "lost")
        except TimeoutError:
            if not writer.is_closing():
                writer.write(_frame(("cancel", request_id)))  # it stops there unless its commit has begun
            return await self._locally(op, "no_reply")
        except asyncio.CancelledError:
            if not writer.is_closing():
                writer.write(_frame(("cancel", request_id)))
            raise
        finally:
            self._pending.pop(request_id, None)
        if ok:
            return value  # type: ignore[no-any-return]  # the op's result type, as its constructor says
        raise value

    async def aclose(self, *, wait: float = 10.0) -> None:
        """Close the connection once the writes in flight have their replies (at most ``wait`` seconds)."""
        if self._pending:
            await asyncio.wait(list(self._pending.values()), timeout=wait)
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._writer = self._reader_task = None

    async def _locally(self, op: WriteOp[T], why: str) -> T:
        self.local_writes += 1
        log.warning("booking_process_write_local", reason=why, op=op.describe())
        try:
            return await op.apply(self._fallback)
        except InvalidTransition:
            # A cancellation whose reply was lost may have been done by the booking process: then it is
            # done, and the caller hears so.
            if why in ("lost", "no_reply") and op.operation == "cancel":
                booking = await self._fallback.service.get_booking(op.args[0])
                if booking.status is BookingStatus.CANCELLED:
                    return cast(T, booking)
            raise

    async def _connection(self) -> asyncio.StreamWriter | None:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if time.monotonic() < self._retry_after:
            return None
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connect at a time; the others wait for its outcome
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                async with asyncio.timeout(self._connect_timeout):
                    reader, writer = await asyncio.open_unix_connection(str(self.path))
            except (OSError, TimeoutError) as error:
                self._retry_after = time.monotonic() + RECONNECT_SECONDS
                log.warning("booking_process_unreachable", socket=str(self.path), error=repr(error))
                return None
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(self._read_replies(reader, writer))
            log.info("booking_process_connected", socket=str(self.path))
            return writer

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_id, ok, value = await _read(reader)
                reply = self._pending.get(request_id)
                if reply is not None and not reply.done():
                    reply.set_result((ok, value))
        except (EOFError, ConnectionError, ValueError, pickle.UnpicklingError) as error:
            if not isinstance(error, EOFError):
                log.error("booking_process_bad_reply", error=repr(error))
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            for reply in self._pending.values():
                if not reply.done():
                    reply.set_exception(LaneLost("the booking process connection closed"))


async def serve_until(stopped: Awaitable[Any], writers: Writers, path: Path) -> None:
    """Run a :class:`LaneServer` on ``path`` until ``stopped`` completes, then stop it gracefully."""
    server = LaneServer(writers)
    await server.start(path)
    try:
        await stopped
    finally:
        await server.stop()
        await asyncio.to_thread(path.unlink, missing_ok=True)
