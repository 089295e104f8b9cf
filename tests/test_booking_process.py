"""The booking process's protocol (``booking.lane_process``): a :class:`LaneServer` around a real booking
service on a real Unix socket, and :class:`LaneClient` s as the server processes use them. Real Redis and
ledger; the server's service has its own Redis client and ledger engines, as in the booking process. The
last test runs ``voicebook booking-process`` itself as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text

from booking import lane_process, writes
from booking.domain import BookingStatus
from booking.errors import InvalidRequest
from booking.freebusy import FreeBusyIndex
from booking.lane_process import LaneClient, LaneServer, _frame, _read
from booking.ledger.database import Database
from booking.ledger.repository import CustomerDetails, Ledger
from booking.service import Booked, BookingService, BookOutcome, BookRequest, SlotUnavailable
from tests.conftest import TEST_PII_ENV, FrozenClock

VOICEBOOK = Path(sys.executable).parent / "voicebook"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


class RecordingService(BookingService):
    """The real service; it also notes the log context each booking ran in (what a log line would carry)."""

    seen: list[dict[str, Any]]

    async def book(self, request: BookRequest) -> BookOutcome:
        self.seen.append(structlog.contextvars.get_contextvars())
        return await super().book(request)


@pytest.fixture
async def far_service(
    service: BookingService, index: FreeBusyIndex, clock: FrozenClock, database_url: str, redis_url: str
) -> AsyncIterator[RecordingService]:
    """The booking process's service: its own Redis client and ledger engines on the same Redis and ledger."""
    redis = aioredis.Redis.from_url(redis_url)
    database = Database.connect(database_url)
    far = RecordingService(
        service.business, Ledger(database, clock=clock), FreeBusyIndex(redis, prefix=index.prefix), clock=clock
    )
    far.seen = []
    try:
        yield far
    finally:
        await redis.aclose()
        await database.dispose()


@pytest.fixture
async def lane_server(far_service: RecordingService, socket_path: Path) -> AsyncIterator[LaneServer]:
    server = LaneServer(writes.Writers(far_service))
    await server.start(socket_path)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(lane_server: LaneServer, service: BookingService, socket_path: Path) -> AsyncIterator[LaneClient]:
    lane = LaneClient(socket_path, fallback=writes.Writers(service))
    assert await lane.connect()
    try:
        yield lane
    finally:
        await lane.aclose()


def _request(service: BookingService, start: datetime, key: str, phone: str = "+12125550142") -> BookRequest:
    first = service.business.services[0]
    return BookRequest(first.id, start, CustomerDetails(phone=phone, name="Alice"), idempotency_key=key)


def _at(hour: int) -> datetime:
    """``hour`` o'clock on a weekday, in the business's time zone (a Tuesday: within opening hours from 8 to 16)."""
    return datetime(2026, 12, 1, hour, 0, tzinfo=ZoneInfo("America/New_York"))


async def test_a_booking_crosses_the_socket_in_the_callers_log_and_trace_context(
    client: LaneClient, far_service: RecordingService, service: BookingService, database: Database
) -> None:
    parent = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        with structlog.contextvars.bound_contextvars(call_sid="CA-process", correlation_id="c-42"):
            outcome = await client.write(writes.book(_request(service, _at(15), "process-1")))
    finally:
        otel_context.detach(token)

    assert isinstance(outcome, Booked)
    assert client.local_writes == 0
    assert (await service.get_booking(outcome.booking.id)).start == _at(15)  # one ledger, seen from here
    assert far_service.seen == [{"call_sid": "CA-process", "correlation_id": "c-42"}]
    # The effects it enqueued carry the caller's trace: the worker's spans will join the call's trace.
    async with database.reader.connect() as connection:
        rows = await connection.execute(
            text("SELECT traceparent FROM effects WHERE booking_id = :id"), {"id": outcome.booking.id}
        )
        parents = {row.traceparent for row in rows}
    assert parents == {f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"}


async def test_every_write_comes_back_with_its_own_result_type(client: LaneClient, service: BookingService) -> None:
    first = service.business.services[0]
    held = await client.write(writes.hold(first.id, _at(10), owner="call:CA-1"))
    assert not isinstance(held, SlotUnavailable)
    assert await client.write(writes.release_holds([held.token, "no-such-token"])) == 1
    booked = await client.write(writes.book(_request(service, _at(10), "process-2")))
    assert isinstance(booked, Booked)
    moved = await client.write(writes.reschedule(booked.booking.id, _at(11), actor="call:CA-1"))
    assert isinstance(moved, Booked) and moved.booking.start == _at(11)
    cancelled = await client.write(writes.cancel(booked.booking.id, reason="test", actor="call:CA-1"))
    assert cancelled.status is BookingStatus.CANCELLED


async def test_a_booking_error_crosses_with_its_code_and_context(client: LaneClient, service: BookingService) -> None:
    with pytest.raises(InvalidRequest) as raised:
        await client.write(writes.hold("no-such-service", _at(10)))
    assert raised.value.code == "unknown_service"  # an instance's own code, not only its class's
    assert "no-such-service" in str(raised.value)


async def test_two_server_processes_racing_for_one_slot_get_one_booking(
    lane_server: LaneServer, service: BookingService, socket_path: Path
) -> None:
    async with (
        LaneClient(socket_path, fallback=writes.Writers(service)) as one,
        LaneClient(socket_path, fallback=writes.Writers(service)) as two,
    ):
        outcomes = await asyncio.gather(
            *(
                lane.write(writes.book(_request(service, _at(14), f"race-{n}", phone=f"+1212555010{n}")))
                for n, lane in enumerate((one, two, one, two))
            )
        )
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["Booked"] + ["SlotUnavailable"] * 3
    assert one.local_writes == two.local_writes == 0


async def test_without_the_booking_process_writes_run_here_until_it_answers(
    service: BookingService,
    far_service: RecordingService,
    socket_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lane_process, "RECONNECT_SECONDS", 0.0)
    async with LaneClient(socket_path, fallback=writes.Writers(service)) as lane:
        assert not await lane.connect()
        first = await lane.write(writes.book(_request(service, _at(9), "local-1")))
        assert isinstance(first, Booked) and lane.local_writes == 1
        assert far_service.seen == []

        server = LaneServer(writes.Writers(far_service))
        await server.start(socket_path)
        try:
            second = await lane.write(writes.book(_request(service, _at(10), "remote-1")))
        finally:
            await server.stop()
    assert isinstance(second, Booked)
    assert lane.local_writes == 1 and len(far_service.seen) == 1


@contextlib.asynccontextmanager
async def lossy_peer(
    path: Path, far: BookingService, *, before_reply: Callable[[], None] = lambda: None
) -> AsyncIterator[None]:
    """A booking process that does each write and then drops the connection instead of replying (as one
    killed between its commit and its reply would)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, op, _, _ = await _read(reader)
        await op.apply(writes.Writers(far))
        before_reply()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def test_a_booking_whose_reply_is_lost_is_not_made_twice(
    service: BookingService, far_service: RecordingService, socket_path: Path
) -> None:
    phone = "+12125550177"
    async with lossy_peer(socket_path, far_service), LaneClient(socket_path, fallback=writes.Writers(service)) as lane:
        outcome = await lane.write(writes.book(_request(service, _at(13), "lost-1", phone=phone)))
    assert isinstance(outcome, Booked)
    assert len(far_service.seen) == 1 and lane.local_writes == 1  # done there, then asked again here
    assert [booking.id for booking in await service.find_bookings(phone, upcoming_only=False)] == [outcome.booking.id]
    assert outcome.booking.start == _at(13)


async def test_a_cancellation_whose_reply_is_lost_is_reported_done(
    service: BookingService, far_service: RecordingService, socket_path: Path
) -> None:
    booked = await service.book(_request(service, _at(9), "to-cancel"))
    assert isinstance(booked, Booked)
    async with lossy_peer(socket_path, far_service), LaneClient(socket_path, fallback=writes.Writers(service)) as lane:
        cancelled = await lane.write(writes.cancel(booked.booking.id, reason="lost reply", actor="test"))
    assert cancelled.id == booked.booking.id and cancelled.status is BookingStatus.CANCELLED
    assert lane.local_writes == 1


async def test_a_booking_process_that_does_not_answer_is_not_waited_for(
    service: BookingService, socket_path: Path
) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the write, never answers, until the client hangs up
        writer.close()

    server = await asyncio.start_unix_server(mute, path=str(socket_path))
    try:
        async with LaneClient(socket_path, fallback=writes.Writers(service), reply_timeout=0.2) as lane:
            outcome = await lane.write(writes.book(_request(service, _at(10), "mute-1")))
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(outcome, Booked) and lane.local_writes == 1


async def test_cancelling_the_caller_cancels_the_write_in_the_booking_process(
    far_service: RecordingService, service: BookingService, socket_path: Path
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow_hold(*args: Any, **kwargs: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    far_service.hold = slow_hold  # type: ignore[method-assign]  # to hold the write open; the real hold is tested above
    server = LaneServer(writes.Writers(far_service))
    await server.start(socket_path)
    try:
        async with LaneClient(socket_path, fallback=writes.Writers(service)) as lane:
            caller = asyncio.create_task(lane.write(writes.hold(service.business.services[0].id, _at(10))))
            await asyncio.wait_for(started.wait(), 5)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            await asyncio.wait_for(cancelled.wait(), 5)
    finally:
        await server.stop()


async def test_stop_lets_a_booking_in_flight_commit_and_reply(
    far_service: RecordingService, service: BookingService, socket_path: Path
) -> None:
    server = LaneServer(writes.Writers(far_service))
    await server.start(socket_path)
    async with LaneClient(socket_path, fallback=writes.Writers(service)) as lane:
        caller = asyncio.create_task(lane.write(writes.book(_request(service, _at(16), "stopping"))))
        async with asyncio.timeout(10):
            while not far_service.seen:  # noqa: ASYNC110  # the service's own code has no event to wait on
                await asyncio.sleep(0.001)
        await server.stop()
        outcome = await caller
    assert isinstance(outcome, Booked) and lane.local_writes == 0
    assert (await service.get_booking(outcome.booking.id)).start == _at(16)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x05hello",  # not a pickle
        (lane_process.MAX_FRAME + 1).to_bytes(4, "big"),  # a frame over the limit
        _frame(("run",)),  # a pickle of the wrong shape
    ],
    ids=["not a pickle", "oversized", "wrong shape"],
)
async def test_a_peer_sending_garbage_is_dropped_and_the_others_are_served(
    client: LaneClient, socket_path: Path, service: BookingService, garbage: bytes
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    writer.write(garbage)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the booking process hung up on it
    writer.close()
    outcome = await client.write(writes.book(_request(service, _at(16), "after-garbage")))
    assert isinstance(outcome, Booked) and client.local_writes == 0


async def test_voicebook_booking_process_serves_writes_counts_them_and_stops_on_sigterm(
    service: BookingService, database_url: str, redis_url: str, index: FreeBusyIndex, socket_path: Path, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("VOICEBOOK_")}
    env |= {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "VOICEBOOK_REDIS_PREFIX": index.prefix,
        "VOICEBOOK_DATA_DIR": str(tmp_path / "data"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        **TEST_PII_ENV,  # the ledger's personal data is sealed with the test session's keys
    }
    process = await asyncio.create_subprocess_exec(
        str(VOICEBOOK), "booking-process", "--socket", str(socket_path), env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            while not os.path.exists(socket_path):  # noqa: ASYNC240  # a stat, polled while it starts
                assert process.returncode is None, "the booking process exited at start-up"
                await asyncio.sleep(0.05)
        async with LaneClient(socket_path, fallback=writes.Writers(service)) as lane:
            outcome = await lane.write(writes.book(_request(service, _at(15), "subprocess-1")))
        assert isinstance(outcome, Booked) and lane.local_writes == 0
        assert (await service.get_booking(outcome.booking.id)).start == _at(15)

        # Its figures are in the shared folder, where /metrics of every server process reads them.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]  # untyped upstream
        assert registry.get_sample_value("voicebook_bookings_total", {"operation": "book", "outcome": "done"}) == 1
        assert registry.get_sample_value("voicebook_booking_seconds_count", {"operation": "book"}) == 1

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert not os.path.exists(socket_path)  # noqa: ASYNC240  # one stat
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
