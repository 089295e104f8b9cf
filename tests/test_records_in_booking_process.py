"""A server process's call and SMS records written by the booking process (``booking.writes`` says why):
:class:`CallLedger` and :class:`SmsLedger` built with ``via`` a :class:`LaneClient`, a :class:`LaneServer`
with ledgers of its own on a real Unix socket, real Redis and ledger. Which process wrote a record is read
from each side's own database engines (their group-commit counters), not assumed from the code path."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from booking import writes
from booking.calls import CallRecord, CallStatus, CallTurn, StatusUpdate
from booking.lane_process import MAX_FRAME, LaneClient, LaneServer
from booking.ledger import schema as t
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from booking.ledger.sms_repository import SmsLedger
from booking.service import BookingService
from tests.conftest import FrozenClock, running_app
from tests.test_twilio_webhooks import AUTH_TOKEN, CALL, PUBLIC, post
from voice_server.settings import Settings

CALL_SID = "CA" + "7" * 32
MESSAGE_SID = "SM" + "7" * 32
CALLER = "+16465550199"
OUR_NUMBER = "+12125550100"


class Wakes:
    """Counts the effect workers' wake-ups (the Redis notifier's place)."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


@dataclasses.dataclass
class Side:
    """One process's view: its database engines, its ledgers, and how often it woke the workers."""

    database: Database
    writers: writes.Writers
    wakes: Wakes

    @property
    def transactions(self) -> int:
        return self.database.group_commit.batches


def side(database: Database, service: BookingService, clock: FrozenClock) -> Side:
    wakes = Wakes()
    calls = CallLedger(database, clock=clock, notify_effects=wakes)
    return Side(database, writes.Writers(service, calls, SmsLedger(database, clock=clock)), wakes)


@pytest.fixture
async def far(database_url: str, service: BookingService, clock: FrozenClock) -> AsyncIterator[Side]:
    """The booking process's side: ledger engines of its own on the same ledger."""
    database = Database.connect(database_url)
    try:
        yield side(database, service, clock)
    finally:
        await database.dispose()


@pytest.fixture
def near(database: Database, service: BookingService, clock: FrozenClock) -> Side:
    """The server process's side: where its records are written while the booking process is away."""
    return side(database, service, clock)


@contextlib.asynccontextmanager
async def booking_process(far: Side, socket_path: Path) -> AsyncIterator[None]:
    server = LaneServer(far.writers)
    await server.start(socket_path)
    try:
        yield
    finally:
        await server.stop()


@pytest.fixture
async def client(near: Side, socket_path: Path) -> AsyncIterator[LaneClient]:
    async with LaneClient(socket_path, fallback=near.writers) as lane:
        yield lane


def routed(near: Side, via: LaneClient, clock: FrozenClock) -> tuple[CallLedger, SmsLedger]:
    """The ledgers a server process's webhooks and calls use when a booking process runs."""
    database = near.database
    return CallLedger(database, clock=clock, via=via), SmsLedger(database, clock=clock, via=via)


def transcript(clock: FrozenClock, words: str = "I'd like a checkup on Tuesday") -> list[CallTurn]:
    return [
        CallTurn("agent", "Hello, how can I help?", clock()),
        CallTurn("caller", words, clock() + timedelta(seconds=3)),
    ]


async def offer(calls: CallLedger) -> CallRecord:
    """The voice webhook's record of a ringing call."""
    return await calls.record_call(
        call_sid=CALL_SID,
        account_sid="AC" + "0" * 32,
        from_number=CALLER,
        to_number=OUR_NUMBER,
        direction="inbound",
        status=CallStatus.RINGING,
    )


async def hang_up(calls: CallLedger, clock: FrozenClock, call_sid: str = CALL_SID) -> None:
    stream_sid = "MZ" + call_sid[2:]
    await calls.finish_call(
        call_sid, stream_sid=stream_sid, end_reason="caller_hung_up", turns=transcript(clock), latencies=()
    )


async def report_effects(database: Database, call_sid: str) -> int:
    query = select(func.count()).select_from(t.effects).where(t.effects.c.idempotency_key.like(f"call:{call_sid}:%"))
    return int(await database.read(lambda conn: conn.execute(query).scalar_one()))


async def test_a_calls_records_are_written_by_the_booking_process_and_read_back_here(
    far: Side, near: Side, client: LaneClient, socket_path: Path, clock: FrozenClock
) -> None:
    calls, sms = routed(near, client, clock)
    async with booking_process(far, socket_path):
        before = near.transactions
        offered = await offer(calls)
        assert (offered.status, offered.from_number, offered.to_number) == (CallStatus.RINGING, CALLER, OUR_NUMBER)

        answered = StatusUpdate(CALL_SID, CallStatus.IN_PROGRESS, sequence=1, duration_seconds=None, at=clock())
        fields = {"account_sid": "AC" + "0" * 32, "from_number": CALLER, "to_number": OUR_NUMBER}
        record, applied = await calls.apply_status(answered, **fields, direction="inbound")
        assert applied and record.status is CallStatus.IN_PROGRESS
        assert (await calls.apply_status(answered, **fields, direction="inbound"))[1] is False  # a replay

        for _ in range(2):  # a retried hang-up: one transcript, one report, one wake-up
            await hang_up(calls, clock)

        message, applied = await sms.apply_status(
            message_sid=MESSAGE_SID, status="delivered", error_code=None, to_number=CALLER, effect_key=None
        )
        assert applied and (message.status, message.to_number) == ("delivered", CALLER)

        assert near.transactions == before, "the server process committed none of them"
        assert far.transactions >= 6 and client.local_writes == 0
    assert [turn.text for turn in await calls.transcript(CALL_SID)] == [turn.text for turn in transcript(clock)]
    assert (await calls.require_call(CALL_SID)).end_reason == "caller_hung_up"
    assert await report_effects(near.database, CALL_SID) == 1
    assert (far.wakes.count, near.wakes.count) == (1, 0)  # the process that enqueued the report woke the workers


async def test_with_the_booking_process_away_the_records_are_written_here(
    far: Side, near: Side, client: LaneClient, clock: FrozenClock
) -> None:
    calls, sms = routed(near, client, clock)  # nothing listens on the socket
    await offer(calls)
    await hang_up(calls, clock)
    _, applied = await sms.apply_status(
        message_sid=MESSAGE_SID, status="sent", error_code=None, to_number=CALLER, effect_key=None
    )
    assert applied and client.local_writes == 3 and far.transactions == 0
    assert await report_effects(near.database, CALL_SID) == 1 and near.wakes.count == 1
    assert len(await calls.transcript(CALL_SID)) == 2


async def test_a_transcript_too_large_for_a_frame_is_written_here_and_the_connection_stays(
    far: Side, near: Side, client: LaneClient, socket_path: Path, clock: FrozenClock
) -> None:
    calls, _ = routed(near, client, clock)
    async with booking_process(far, socket_path):
        long_call = transcript(clock, words="and another thing " * (MAX_FRAME // 16))
        await calls.finish_call(
            CALL_SID, stream_sid="MZ" + "7" * 32, end_reason="caller_hung_up", turns=long_call, latencies=()
        )
        assert client.local_writes == 1 and far.transactions == 0
        assert (await calls.transcript(CALL_SID))[1].text == long_call[1].text

        await hang_up(calls, clock, "CA" + "8" * 32)
        assert client.local_writes == 1 and far.transactions == 1  # the next one went through, as before


async def test_a_writer_for_bookings_only_refuses_a_record_rather_than_dropping_it(
    service: BookingService, clock: FrozenClock
) -> None:
    """The booking lane's thread and a call's own tools apply writes to a service alone; a call record
    sent there by mistake fails loudly."""
    op = writes.record_call(
        call_sid=CALL_SID,
        account_sid="",
        from_number=CALLER,
        to_number=OUR_NUMBER,
        direction="inbound",
        status=CallStatus.RINGING,
    )
    with pytest.raises(RuntimeError, match="booking writes only"):
        await op.apply(writes.Writers(service))
    with pytest.raises(RuntimeError, match="booking writes only"):
        await writes.apply_sms_status(message_sid=MESSAGE_SID).apply(writes.Writers(service))


async def test_the_apps_webhooks_send_their_records_to_the_booking_process(
    app_settings: Settings, far: Side, socket_path: Path, clock: FrozenClock
) -> None:
    """``voicebook serve`` passes the booking process's socket to the server (VOICEBOOK_BOOKING_SOCKET): the
    voice webhook's call record, the call's status callbacks and the texts' receipts are written there."""
    settings = dataclasses.replace(
        app_settings, public_url=PUBLIC, twilio_auth_token=AUTH_TOKEN, booking_socket=socket_path
    )
    async with booking_process(far, socket_path), running_app(settings, clock) as (application, http):
        components = application.state.components
        client = components.records_via
        assert isinstance(client, LaneClient)
        # Not the app's own commit count: its effect workers and periodic jobs commit in the background.
        before = far.transactions
        assert (await post(http, "/twilio/voice", CALL)).status_code == 200
        completed = CALL | {"CallStatus": "completed", "SequenceNumber": "3", "CallDuration": "42"}
        assert (await post(http, "/twilio/call-status", completed)).status_code == 204
        receipt = {
            "MessageSid": MESSAGE_SID,
            "MessageStatus": "delivered",
            "AccountSid": CALL["AccountSid"],
            "From": CALL["To"],
            "To": CALL["From"],
        }
        assert (await post(http, "/twilio/message-status", receipt)).status_code == 204

        assert far.transactions >= before + 3 and client.local_writes == 0
        call = await components.calls.require_call(CALL["CallSid"])
        assert (call.status, call.duration_seconds) == (CallStatus.COMPLETED, 42)
        message = await components.sms.get_message(MESSAGE_SID)
        assert message is not None and message.status == "delivered"
