"""The outbox's promise under fire: with 30% of provider requests failing transiently and a worker killed
with SIGKILL mid-run, every confirmed booking ends with exactly one calendar event and exactly one
confirmation text; permanent failures wait in the dead letters and a replay delivers them once.

Everything is real: the Calendar and Messages simulators served by uvicorn on loopback (called through
google-api-python-client and twilio), separate ``voicebook worker`` processes on the test's ledger and
Redis, bookings made through :class:`BookingService` on the wall clock (the workers' clock). The workers
run with a 2-second lease and 1% of the normal backoff (``VOICEBOOK_EFFECT_LEASE_SECONDS``,
``VOICEBOOK_EFFECT_BACKOFF_PERCENT``) so a lost lease and a retry come back within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from booking.business import Business
from booking.domain import Booking, Interval
from booking.freebusy import FreeBusyIndex
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import CustomerDetails, Ledger
from booking.ledger.sms_repository import SmsLedger
from booking.messages import booking_reference
from booking.outbox import EffectKind, EffectStatus, Outbox, RedisNotifier
from booking.service import Booked, BookingService, BookRequest
from integrations.google_calendar import BOOKING_ID_PROPERTY
from integrations.simulators.google_calendar import (
    CalendarFaults,
    CalendarState,
    create_google_calendar_simulator,
    new_private_key_pem,
    service_account_info,
)
from integrations.simulators.twilio_messages import (
    Fault,
    MessagesState,
    Outcome,
    SimulatedMessage,
    create_twilio_messages_simulator,
)
from tests.conftest import serving

# The settle wait below is bounded at 90 s; the test itself normally ends in well under a minute.
pytestmark = pytest.mark.timeout(180)

ACCOUNT = "AC" + "5" * 32
TOKEN = "fedcba9876543210fedcba9876543210"
SENDER = "+12125550100"
SA_EMAIL = "voicebook-proof@voicebook-test.iam.gserviceaccount.com"
LEE = "dr-lee@riverside-clinic.example"
PATEL = "dr-patel@riverside-clinic.example"
FAULT_FRACTION = 0.3
LATENCY_MS = 100  # every provider answer takes this long, so effects are in flight when the kill lands
SETTLE_SECONDS = 90.0
# Reminders are due a day before the start: they stay pending for the whole test, by design.
DUE_NOW = frozenset(kind.value for kind in EffectKind if kind is not EffectKind.SMS_REMINDER)


@dataclass
class FlakyMessages(MessagesState):
    """The Messages simulator refusing a seeded fraction of requests, each with a fault drawn from a mix
    (the simulator's own fraction knob injects a single kind of fault). Counts the faults it answered."""

    drawn: Counter[Fault] = field(default_factory=Counter)
    _mix: tuple[float, tuple[Fault, ...], random.Random] | None = None

    def fail_mixed(self, fraction: float, mix: tuple[Fault, ...], *, seed: int) -> None:
        self._mix = (fraction, mix, random.Random(seed))

    def next_fault(self) -> Fault | None:
        fault = super().next_fault()
        if fault is None and self._mix is not None:
            fraction, mix, rng = self._mix
            if rng.random() < fraction:
                fault = rng.choice(mix)
        if fault is not None:
            self.drawn[fault] += 1
        return fault


@dataclass
class Providers:
    calendar: CalendarState
    messages: FlakyMessages
    env: dict[str, str]


@pytest.fixture
async def providers(tmp_path: Path) -> AsyncIterator[Providers]:
    pem = new_private_key_pem()
    calendar = CalendarState()
    calendar.add_calendar(LEE)  # Dr Patel's calendar is missing: a permanent 404 until a test adds it
    calendar.add_service_account(SA_EMAIL, pem)
    # No delivery receipts: nothing listens for them here, and they are not what this proves.
    messages = FlakyMessages(ACCOUNT, TOKEN, outcome=Outcome(statuses=()))
    async with (
        serving(create_google_calendar_simulator(calendar), lifespan="off") as calendar_url,
        serving(create_twilio_messages_simulator(messages), lifespan="on") as twilio_url,
    ):
        key_file = tmp_path / "service-account.json"
        key_file.write_text(json.dumps(service_account_info(calendar_url, pem, SA_EMAIL)))
        yield Providers(
            calendar,
            messages,
            {
                "GOOGLE_SERVICE_ACCOUNT_FILE": str(key_file),
                "GOOGLE_CALENDAR_API_URL": f"{calendar_url}/calendar/v3/",
                "TWILIO_ACCOUNT_SID": ACCOUNT,
                "TWILIO_AUTH_TOKEN": TOKEN,
                "TWILIO_API_BASE_URL": twilio_url,
                "TWILIO_SMS_FROM": SENDER,
            },
        )


@pytest.fixture
def prefix() -> str:
    return f"p{uuid.uuid4().hex[:8]}"


@pytest.fixture
def worker_env(database_url: str, redis_url: str, prefix: str, tmp_path: Path, providers: Providers) -> dict[str, str]:
    return {
        **os.environ,
        **providers.env,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "VOICEBOOK_REDIS_PREFIX": prefix,
        "VOICEBOOK_DATA_DIR": str(tmp_path),
        # Port 1 on loopback refuses at once: no status callback can reach anything by accident.
        "VOICEBOOK_PUBLIC_URL": "http://127.0.0.1:1",
        "VOICEBOOK_LOG_FORMAT": "json",
        "VOICEBOOK_LOG_LEVEL": "INFO",
        "VOICEBOOK_WORKER_CONCURRENCY": "4",
        "VOICEBOOK_EFFECT_LEASE_SECONDS": "2",
        "VOICEBOOK_EFFECT_BACKOFF_PERCENT": "1",
        # A Messaging Service pool, not one long code: the proof is about faults, not carrier pacing.
        "VOICEBOOK_SMS_PER_MINUTE": "6000",
    }


@pytest.fixture
async def bookings(database: Database, redis_client: aioredis.Redis, business: Business, prefix: str) -> BookingService:
    """Bookings on the wall clock (the workers' clock), waking the workers through the shared Redis."""
    ledger = Ledger(database, notify_effects=RedisNotifier(redis_client, f"{prefix}:effects"))
    service = BookingService(business, ledger, FreeBusyIndex(redis_client, prefix=prefix))
    await service.start()
    return service


# -- worker processes ---------------------------------------------------------------------------


class WorkerProcess:
    """One ``voicebook worker`` subprocess; its log lines are read as they come (a full pipe would stall
    it) and kept for the failure summary."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.owner: str | None = None
        self.lines: list[str] = []
        self.started = asyncio.Event()
        self.killed = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "worker_started":
                    self.owner = str(record["owner"])
                    self.started.set()

    def records(self) -> list[dict[str, Any]]:
        """The log lines that are JSON objects (all but a crash's traceback)."""
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    found.append(record)
        return found

    def events(self, name: str) -> list[dict[str, Any]]:
        return [record for record in self.records() if record.get("event") == name]

    async def kill(self) -> None:
        """SIGKILL: no handler runs, no lease is given back, nothing is recorded."""
        self.killed = True
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._reader


def worker_logs(workers: Sequence[WorkerProcess], last: int = 15) -> list[str]:
    """The tail of each worker's own log (voicebook's loggers, not the provider clients' chatter)."""
    lines = []
    for worker in workers:
        ours = [
            json.dumps(record)[:300]
            for record in worker.records()
            if str(record.get("logger", "")).startswith("voicebook")
        ]
        lines.append(f"-- worker {worker.owner} (killed={worker.killed}, exit {worker.process.returncode}):")
        lines += [f"  {line}" for line in ours[-last:]]
        if not worker.records():
            lines += [f"  {line[:300]}" for line in worker.lines[-last:]]
    return lines


async def voicebook(env: Mapping[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voice_server.cli",
        *args,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


@contextlib.asynccontextmanager
async def running_workers(env: Mapping[str, str], count: int) -> AsyncIterator[list[WorkerProcess]]:
    workers = [WorkerProcess(await voicebook(env, "worker")) for _ in range(count)]
    try:
        # Fresh interpreters importing the Google and Twilio clients take a while on a busy machine.
        async with asyncio.timeout(60):
            for worker in workers:
                waiting = asyncio.ensure_future(worker.started.wait())
                exited = asyncio.ensure_future(worker.process.wait())
                await asyncio.wait({waiting, exited}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                exited.cancel()
                assert worker.owner is not None, "a worker did not start:\n" + "\n".join(worker.lines)
        yield workers
    finally:
        await asyncio.gather(*(worker.stop() for worker in workers))


# -- the ledger's view --------------------------------------------------------------------------


async def effect_rows(database: Database) -> list[dict[str, Any]]:
    e = t.effects.c
    query = select(
        e.id, e.booking_id, e.kind, e.status, e.attempts, e.max_attempts, e.lease_owner, e.last_error, e.updated_at
    ).order_by(e.id)
    async with database.reader.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]


def unsettled(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    active = (EffectStatus.PENDING.value, EffectStatus.RUNNING.value)
    return [row for row in rows if row["kind"] in DUE_NOW and row["status"] in active]


async def settle(database: Database, describe: Callable[[], Awaitable[str]]) -> list[dict[str, Any]]:
    """Wait until no effect that is due is pending or running (reminders wait for their day)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while True:
        rows = await effect_rows(database)
        if not unsettled(rows):
            return rows
        if loop.time() > deadline:
            raise AssertionError(f"effects still unsettled after {SETTLE_SECONDS:.0f} s\n{await describe()}")
        await asyncio.sleep(0.1)


async def kill_a_busy_worker(database: Database, workers: Sequence[WorkerProcess]) -> tuple[WorkerProcess, list[int]]:
    """SIGKILL the worker holding the most recently claimed effect; returns it and the effects it still
    held when it died (read after its death, so none of them can have been recorded since)."""
    owners = {worker.owner: worker for worker in workers}
    async with asyncio.timeout(60):
        while True:
            running = [
                row
                for row in await effect_rows(database)
                if row["status"] == EffectStatus.RUNNING.value and row["lease_owner"] in owners
            ]
            if running:
                newest = max(running, key=lambda row: (row["updated_at"], row["id"]))
                victim = owners[newest["lease_owner"]]
                await victim.kill()
                held = [
                    row["id"]
                    for row in await effect_rows(database)
                    if row["status"] == EffectStatus.RUNNING.value and row["lease_owner"] == victim.owner
                ]
                if held:
                    return victim, held
                # It finished everything in the instant before the kill: a dead worker all the same,
                # but not the proof wanted. Kill another while at least one would remain.
                del owners[victim.owner]
                assert len(owners) > 1, "no worker was caught with an effect in flight"
            await asyncio.sleep(0.005)


async def until(condition: Callable[[], bool], *, seconds: float) -> None:
    """Poll ``condition`` (a simulator's state, changed by this process's own event loop)."""
    async with asyncio.timeout(seconds):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


def live_events_of(calendar: CalendarState, calendar_id: str, booking_id: str) -> list[dict[str, Any]]:
    return [
        event
        for event in calendar.live_events(calendar_id)
        if event.get("extendedProperties", {}).get("private", {}).get(BOOKING_ID_PROPERTY) == booking_id
    ]


def texts_of(messages: MessagesState, booking: Booking) -> list[SimulatedMessage]:
    reference = booking_reference(booking.id)
    return [message for message in messages.sent_to(booking.customer.phone) if reference in message.body]


# -- making bookings ----------------------------------------------------------------------------


async def free_starts(service: BookingService, resource_id: str, count: int) -> list[datetime]:
    """``count`` start times of a check-up with ``resource_id`` whose blocks do not overlap, from tomorrow on
    (a slot found this afternoon may be inside the booking notice by the time a slow run books it)."""
    begin = datetime.now(UTC) + timedelta(days=1)
    found = await service.find_slots(
        "checkup", window=Interval(begin, begin + timedelta(days=30)), resource_id=resource_id, limit=2000
    )
    starts: list[datetime] = []
    free_from: datetime | None = None
    for slot in sorted(found.slots, key=lambda s: s.start):
        if slot.resource_id == resource_id and (free_from is None or slot.block.start >= free_from):
            starts.append(slot.start)
            free_from = slot.block.end
    assert len(starts) >= count, f"only {len(starts)} free slots for {resource_id}"
    return starts[:count]


async def book(service: BookingService, resource_id: str, start: datetime, phone: str, key: str) -> Booking:
    outcome = await service.book(
        BookRequest(
            "checkup", start, CustomerDetails(phone=phone, name="Proof"), resource_id=resource_id, idempotency_key=key
        )
    )
    assert isinstance(outcome, Booked), outcome
    return outcome.booking


# -- the proof ----------------------------------------------------------------------------------


async def test_thirty_percent_faults_and_a_killed_worker_still_give_one_event_and_one_text_each(
    providers: Providers,
    worker_env: dict[str, str],
    bookings: BookingService,
    database: Database,
    redis_client: aioredis.Redis,
    prefix: str,
) -> None:
    calendar, messages = providers.calendar, providers.messages
    calendar.faults = CalendarFaults(
        fraction=FAULT_FRACTION, kinds=("429", "403", "403user", "500", "503"), seed=5, latency_ms=LATENCY_MS
    )
    messages.fail_mixed(FAULT_FRACTION, (Fault.RATE_LIMIT, Fault.SERVER_ERROR), seed=7)
    messages.latency = LATENCY_MS / 1000
    landlines = ["+13105550170", "+13105550171"]
    messages.landlines.update(landlines)  # Twilio refuses these for good: 21614, not a mobile number

    lee_starts = await free_starts(bookings, "dr-lee", 42)
    patel_starts = await free_starts(bookings, "dr-patel", 2)
    good: list[Booking] = []
    no_calendar: list[Booking] = []  # Dr Patel's calendar does not exist: calendar.create answers 404
    no_mobile: list[Booking] = []  # the customer's number cannot take texts
    kills: list[tuple[str | None, list[int]]] = []
    workers: list[WorkerProcess] = []

    async def describe() -> str:
        rows = await effect_rows(database)
        attempts = Counter[str]()
        for row in rows:
            attempts[row["kind"]] += row["attempts"]
        lines = [
            f"kills (owner, effects it held): {kills}",
            f"effects by status: {Counter((row['kind'], row['status']) for row in rows)}",
            f"attempts by kind: {dict(attempts)}; retries: {sum(max(row['attempts'] - 1, 0) for row in rows)}",
            f"calendar requests: {len(calendar.requests)}; twilio requests: {messages.requests}; "
            f"twilio faults drawn: {dict(messages.drawn)}; texts: {len(messages.messages)}",
        ]
        lines += [
            f"  effect {row['id']} {row['kind']} {row['status']} attempts={row['attempts']}/{row['max_attempts']}"
            f" owner={row['lease_owner']} error={(row['last_error'] or '')[:160]}"
            for row in rows
            if row["status"] != EffectStatus.DONE.value and row["kind"] in DUE_NOW
        ]
        lines += worker_logs(workers)
        return "\n".join(lines)

    async with running_workers(worker_env, 3) as started:
        workers.extend(started)

        async def book_everything() -> None:
            for i, start in enumerate(lee_starts[:40]):
                good.append(await book(bookings, "dr-lee", start, f"+1212555{1000 + i:04d}", f"proof-{i}"))
            for i, start in enumerate(patel_starts):
                no_calendar.append(await book(bookings, "dr-patel", start, f"+1646555{1000 + i:04d}", f"patel-{i}"))
            for i, (start, phone) in enumerate(zip(lee_starts[40:], landlines, strict=True)):
                no_mobile.append(await book(bookings, "dr-lee", start, phone, f"landline-{i}"))

        booking_task = asyncio.create_task(book_everything())
        try:
            victim, held = await kill_a_busy_worker(database, workers)
            kills.append((victim.owner, held))
        finally:
            await booking_task
        rows = await settle(database, describe)

        # The permanent failures, and only those (and any effect that ran out of attempts), are dead.
        outbox = Outbox(database, notify=RedisNotifier(redis_client, f"{prefix}:effects"))
        dead = await outbox.dead_letters(limit=1000)
        dead_by = {(effect.booking_id, effect.kind): effect for effect in dead}
        for booking in no_calendar:
            effect = dead_by.get((booking.id, EffectKind.CALENDAR_CREATE.value))
            assert effect is not None and "404" in (effect.last_error or ""), await describe()
            assert live_events_of(calendar, PATEL, booking.id) == []
        for booking in no_mobile:
            effect = dead_by.get((booking.id, EffectKind.SMS_CONFIRMATION.value))
            assert effect is not None and "21614" in (effect.last_error or ""), await describe()
            assert messages.sent_to(booking.customer.phone) == []
        permanent = {(b.id, EffectKind.CALENDAR_CREATE.value) for b in no_calendar} | {
            (b.id, EffectKind.SMS_CONFIRMATION.value) for b in no_mobile
        }
        exhausted = [effect for key, effect in dead_by.items() if key not in permanent]
        # 30% faults on every request can, rarely, outlast an effect's attempts; those are dead letters
        # too and the operator's replay below covers them. Said here so a run that needed it shows it.
        for effect in exhausted:
            assert effect.attempts >= effect.max_attempts, await describe()
            history = [
                f"attempt {event.get('attempts')}: {event.get('error', '')[:120]}"
                for worker in workers
                for event in worker.events("outbox_effect_failed")
                if event.get("effect_id") == effect.id
            ]
            print(f"transient failures exhausted effect {effect.id} ({effect.kind}):", *history, sep="\n  ")

        # The operator fixes the causes and replays: one of each through `voicebook dlq retry`, the rest
        # through the outbox's API.
        calendar.add_calendar(PATEL)
        messages.landlines.clear()
        by_cli = [dead_by[(no_calendar[0].id, "calendar.create")], dead_by[(no_mobile[0].id, "sms.confirmation")]]
        for effect in by_cli:
            process = await voicebook(worker_env, "dlq", "retry", str(effect.id))
            output, _ = await process.communicate()
            assert process.returncode == 0, output.decode()
            assert b"pending again; workers notified" in output
        for effect in dead:
            if effect not in by_cli:
                assert await outbox.retry(effect.id) is not None
        rows = await settle(database, describe)
        assert await outbox.dead_letters() == [], await describe()

    # Nobody is left holding a lease, and what the killed worker held was run again by another worker.
    assert all(row["status"] != EffectStatus.RUNNING.value for row in rows)
    status_of = {row["id"]: row for row in rows}
    for effect_id in held:
        assert status_of[effect_id]["status"] == EffectStatus.DONE.value, await describe()
        assert status_of[effect_id]["attempts"] >= 2, await describe()
    # Every confirmed booking: exactly one live event, exactly one text, and that text its confirmation.
    summary = await describe()
    for booking in good + no_mobile:
        assert len(live_events_of(calendar, LEE, booking.id)) == 1, f"booking {booking.id}\n{summary}"
    for booking in no_calendar:
        assert len(live_events_of(calendar, PATEL, booking.id)) == 1, f"booking {booking.id}\n{summary}"
    for booking in good + no_calendar + no_mobile:
        texts = messages.sent_to(booking.customer.phone)
        assert len(texts) == 1 and texts_of(messages, booking) == texts, f"booking {booking.id}\n{summary}"
        assert "confirmed" in texts[0].body
    assert len(calendar.live_events(LEE)) == len(good) + len(no_mobile)
    assert len(messages.messages) == len(good) + len(no_calendar) + len(no_mobile)
    # The faults really were there, on both providers: calendar effects were retried too.
    assert messages.drawn[Fault.RATE_LIMIT] and messages.drawn[Fault.SERVER_ERROR], summary
    calendar_retries = [row for row in rows if row["kind"] == EffectKind.CALENDAR_CREATE.value and row["attempts"] > 1]
    assert calendar_retries, summary


def describer(
    messages: MessagesState, database: Database, workers: list[WorkerProcess]
) -> Callable[[], Awaitable[str]]:
    """What a failed assertion prints: the texts Twilio holds, every effect row, the workers' logs."""

    async def describe() -> str:
        lines = [f"texts: {[(m.sid, m.to) for m in messages.messages.values()]}"]
        lines += [f"  {row}" for row in await effect_rows(database)]
        lines += worker_logs(workers)
        return "\n".join(lines)

    return describe


@pytest.mark.parametrize("lost", ["worker killed", "answer timed out"])
async def test_a_text_twilio_accepted_but_the_outbox_never_heard_of_is_not_sent_again(
    lost: str, providers: Providers, worker_env: dict[str, str], bookings: BookingService, database: Database
) -> None:
    """The hard case: Twilio has created the message, but its answer never reaches the outbox (the worker
    is SIGKILLed while waiting for it, or gives up waiting). The retry must find the message, not send
    a second one."""
    messages = providers.messages
    [start] = await free_starts(bookings, "dr-lee", 1)
    phone = "+12125552000"
    workers: list[WorkerProcess] = []
    describe = describer(messages, database, workers)

    async with running_workers(worker_env, 2) as started:
        workers.extend(started)
        # The next send is accepted (the message exists at Twilio) and its answer is held back.
        messages.fail_next(Fault.TIMEOUT)
        booking = await book(bookings, "dr-lee", start, phone, "lost-answer")
        await until(lambda: bool(messages.sent_to(phone)), seconds=30)
        [row] = [
            row
            for row in await effect_rows(database)
            if row["booking_id"] == booking.id and row["kind"] == EffectKind.SMS_CONFIRMATION.value
        ]
        assert row["status"] == EffectStatus.RUNNING.value and row["attempts"] == 1, await describe()
        if lost == "worker killed":
            victim = next(worker for worker in workers if worker.owner == row["lease_owner"])
            await victim.kill()
            messages.release_hung()  # the answer goes to a dead connection
            rows = await settle(database, describe)
        else:
            # The handler gives up at 80% of the lease; the retry runs while the first request still waits.
            rows = await settle(database, describe)
            messages.release_hung()
        effect = await Outbox(database).get(row["id"])

    assert effect is not None and effect.status is EffectStatus.DONE, await describe()
    assert effect.attempts >= 2, await describe()
    texts = messages.sent_to(phone)
    assert len(texts) == 1, f"{len(texts)} texts for one confirmation\n{await describe()}"
    [text] = texts
    assert texts_of(messages, booking) == [text]
    recorded = await SmsLedger(database).message_for_effect(effect.idempotency_key)
    assert recorded is not None and recorded.message_sid == text.sid, await describe()
    found = [event for worker in workers for event in worker.events("sms_already_sent")]
    assert [event.get("via") for event in found] == ["twilio"], await describe()
    assert all(row["status"] == EffectStatus.DONE.value for row in rows if row["kind"] in DUE_NOW)


async def test_a_replayed_text_whose_first_send_landed_is_not_sent_again(
    providers: Providers, worker_env: dict[str, str], bookings: BookingService, database: Database
) -> None:
    """A Twilio outage: the first send is accepted but its answer never comes, and every later attempt
    fails to read Twilio's message list, until the effect runs out of attempts. The operator replays it
    once Twilio is back: the customer still gets one text, not two."""
    messages = providers.messages
    [start] = await free_starts(bookings, "dr-lee", 1)
    phone = "+12125552001"
    workers: list[WorkerProcess] = []
    describe = describer(messages, database, workers)

    async with running_workers(worker_env, 1) as started:
        workers.extend(started)
        # The send lands and hangs; each of the remaining attempts finds the list unreadable (500).
        messages.fail_next(Fault.TIMEOUT)
        booking = await book(bookings, "dr-lee", start, phone, "outage")
        [row] = [
            row
            for row in await effect_rows(database)
            if row["booking_id"] == booking.id and row["kind"] == EffectKind.SMS_CONFIRMATION.value
        ]
        outbox = Outbox(database)
        effect = await outbox.get(row["id"])
        assert effect is not None
        messages.fail_next(Fault.SERVER_ERROR, effect.max_attempts - 1)
        await settle(database, describe)
        dead = await outbox.get(effect.id)
        assert dead is not None and dead.status is EffectStatus.DEAD, await describe()
        assert dead.attempts == dead.max_attempts and len(messages.sent_to(phone)) == 1, await describe()

        process = await voicebook(worker_env, "dlq", "retry", str(effect.id))
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()
        await settle(database, describe)
        messages.release_hung()
        replayed = await outbox.get(effect.id)

    assert replayed is not None and replayed.status is EffectStatus.DONE, await describe()
    texts = messages.sent_to(phone)
    assert len(texts) == 1, f"{len(texts)} texts for one confirmation\n{await describe()}"
    recorded = await SmsLedger(database).message_for_effect(effect.idempotency_key)
    assert recorded is not None and recorded.message_sid == texts[0].sid, await describe()
