"""Effects under load: from the booking tool call to the calendar event written and the SMS accepted.

    python load_tests/bench_effects.py [--rate 50] [--seconds 60] [--burst 100] [--latency-ms 150]
        [--concurrency 32] [--threads 32] [--sms-mps 100] [--database-url URL] [--redis-url URL]

What runs is the product's own path, in this process: the LLM's booking tools (``BookingTools``: one
``check_availability`` that holds the slot, then ``book_appointment`` as the caller confirms) commit each
booking and its outbox rows (``BookingService`` on a real ledger and Redis), the commit PUBLISHes, and the
real ``Worker`` runs the real handlers of ``voice_server.effects.build_handlers``: google-api-python-client
inserts the event, twilio's client sends the text. The Calendar and Messages simulators answer each API
call after ``--latency-ms`` and run in a child process: the figures are about our side, so the providers
must not take CPU from, or add lag to, the event loop being measured.

Arrivals are open loop: booking ``n`` calls ``check_availability`` at its scheduled time and
``book_appointment`` ``CONFIRM_SECONDS`` later, whatever the server is doing; every latency counts from
the scheduled start of ``book_appointment`` (t0), so queueing is included. Phases: ``--rate`` bookings per
second for ``--seconds``, then (once those effects have finished) ``--burst`` bookings at random instants
within one second. Customers, rooms and slots are distinct, so no booking collides with another.

Instrumentation wraps the handler map given to the Worker (nothing in the product is patched): the
calendar time of a booking is when its ``calendar.create`` handler returned (the simulator answered
200), the SMS time when its ``sms.confirmation`` handler returned (Twilio's 201, recorded in the ledger).
The same wrapper counts handlers in flight per integration (the worker's concurrency in use), retries
(attempts after the first) and failures. ``--sms-mps`` sets the sender's rate limit
(``VOICEBOOK_SMS_PER_MINUTE``): a Messaging Service with a number pool or a short code is allowed about
100 messages per second.

Printed per phase, besides those latencies: the wait from commit to each handler's start (the worker's
share), each handler's own time (the provider's share plus our threads), the event loop's lag, and this
process's CPU per booking; at the end, effect counts by status, and what one ``Outbox.claim`` costs on
the table the run left behind. The Google client is built here (``build_handlers(google=...)``) with
``--threads`` request threads, and so is the Twilio client (``build_twilio_sms``).

Defaults: the embedded redis-server and a temporary SQLite ledger; with ``--database-url postgresql://``
it creates and drops a scratch database next to the one named.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from common import free_slots, redis_and_ledger, rooms_business, summary  # load_tests/common.py
from sqlalchemy import func, select

from booking.freebusy import FreeBusyIndex
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import Ledger
from booking.outbox import Effect, EffectKind, Outbox, RedisNotifier, scaled_policies
from booking.service import BookingService
from booking.worker import Worker
from integrations.google_calendar import GoogleCalendar
from integrations.simulators.google_calendar import new_private_key_pem, service_account_info
from integrations.simulators.loopback import loopback_socket
from voice_server.effects import build_handlers, build_twilio_sms
from voice_server.ports import CallInfo, ToolCall
from voice_server.settings import Settings
from voice_server.tools import BookingTools

RESOURCES = 40
CONFIRM_SECONDS = 0.5
"""Between the hold (``check_availability``) and ``book_appointment``: the caller saying yes."""
WARM_UP = 20
ACCOUNT = "AC" + "7" * 32
TOKEN = "0123456789abcdef0123456789abcdef"
MESSAGING_SERVICE = "MG" + "7" * 32
SA_EMAIL = "voicebook-bench@voicebook-bench.iam.gserviceaccount.com"
BUSINESS_PHONE = "+12125550100"
SETTLE_TIMEOUT = 120.0


def calendar(room: int) -> str:
    return f"room-{room}@bench.example"


# -- the simulators, in their own process ------------------------------------------------------------


def _simulators_main(connection: Connection, pem: str, latency: float) -> None:
    asyncio.run(_simulators(connection, pem, latency))


async def _simulators(connection: Connection, pem: str, latency: float) -> None:
    import uvicorn

    from integrations.simulators.google_calendar import (
        CalendarState,
        create_google_calendar_simulator,
    )
    from integrations.simulators.twilio_messages import MessagesState, Outcome, create_twilio_messages_simulator

    calendars = CalendarState()
    for room in range(RESOURCES):
        calendars.add_calendar(calendar(room))
    calendars.add_service_account(SA_EMAIL, pem)
    calendars.faults.latency_ms = round(latency * 1000)
    # No delivery receipts: nothing listens for them here, and they are not part of "accepted".
    messages = MessagesState(ACCOUNT, TOKEN, latency=latency, outcome=Outcome(statuses=()))
    apps = [create_google_calendar_simulator(calendars), create_twilio_messages_simulator(messages)]
    sockets, servers, tasks = [], [], []
    for app in apps:
        # loopback_socket sets the protocol, so answers are not held for the client's delayed ACK: 44 ms
        # per Twilio send instead of 0.3 ms (measured).
        sock = loopback_socket()
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on", backlog=2048))
        sockets.append(sock)
        servers.append(server)
        tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
    while not all(server.started for server in servers):  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    connection.send([f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in sockets])
    await asyncio.get_running_loop().run_in_executor(None, connection.recv)  # the bench is done
    events = sum(len(calendars.live_events(calendar(room))) for room in range(RESOURCES))
    connection.send({"events": events, "texts": len(messages.messages)})
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)


@contextlib.contextmanager
def simulator_process(pem: str, latency: float) -> Iterator[tuple[str, str, Connection]]:
    """Yields the Calendar and Messages base URLs and a pipe: send anything to get the counts back."""
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_simulators_main, args=(theirs, pem, latency), daemon=True
    )
    process.start()
    try:
        calendar_url, twilio_url = ours.recv()
        yield calendar_url, twilio_url, ours
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


# -- measuring -----------------------------------------------------------------------------------------


Handler = Callable[[Effect], Awaitable[None]]


@dataclass
class Probe:
    """What the wrapped handlers saw, by booking id (``loop.time()`` seconds)."""

    calendar_done: dict[str, float] = field(default_factory=dict)
    sms_done: dict[str, float] = field(default_factory=dict)
    started: dict[tuple[str, str], float] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    failures: int = 0
    failed: set[str] = field(default_factory=set)

    def wrap(self, handlers: Mapping[str, Handler]) -> dict[str, Handler]:
        return {kind: self._wrapped(kind, handler) for kind, handler in handlers.items()}

    def _wrapped(self, kind: str, handler: Handler) -> Handler:
        integration = kind.partition(".")[0]
        finished: dict[str, dict[str, float]] = {
            EffectKind.CALENDAR_CREATE: self.calendar_done,
            EffectKind.SMS_CONFIRMATION: self.sms_done,
        }
        done = finished.get(kind)
        loop = asyncio.get_running_loop()

        async def measured(effect: Effect) -> None:
            self.started[(kind, effect.booking_id)] = loop.time()
            self.retries += effect.attempts > 1
            self.in_flight[integration] = self.in_flight.get(integration, 0) + 1
            self.peak[integration] = max(self.peak.get(integration, 0), self.in_flight[integration])
            try:
                await handler(effect)
            except BaseException:
                self.failures += 1
                self.failed.add(effect.booking_id)
                raise
            finally:
                self.in_flight[integration] -= 1
            if done is not None:
                done[effect.booking_id] = loop.time()

        return measured


@dataclass
class Phase:
    label: str
    cpu: float = 0.0  # this process's CPU seconds (all threads) from the first arrival until settled
    wall: float = 0.0
    lags: list[float] = field(default_factory=list)  # event loop lag samples
    t0: dict[str, float] = field(default_factory=dict)  # booking id -> scheduled start of book_appointment
    committed: dict[str, float] = field(default_factory=dict)  # booking id -> book_appointment returned
    not_booked: int = 0


async def drive(
    tools: BookingTools, slots: Iterator[tuple[str, datetime]], arrivals: list[float], phase: Phase
) -> None:
    """One caller per arrival (seconds from now): hold the slot, then book it ``CONFIRM_SECONDS`` later."""
    loop = asyncio.get_running_loop()
    begin = loop.time() + 0.05

    async def caller(number: int, offset: float) -> None:
        resource, start = next(slots)
        call_id = f"{phase.label}-{number}"
        info = CallInfo(f"CA{uuid.uuid4().hex}", f"MZ{uuid.uuid4().hex}", _phone(phase.label, number), BUSINESS_PHONE)
        await asyncio.sleep(max(0.0, begin + offset - loop.time()))
        checked = await tools.run(
            ToolCall(f"{call_id}-check", "check_availability", _check_arguments(resource, start)), info
        )
        t0 = begin + offset + CONFIRM_SECONDS
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        arguments = {
            "service": "visit",
            "start": f"{start:%Y-%m-%dT%H:%M}",
            "customer_name": f"Caller {call_id}",
            "resource": resource,
        }
        booked = await tools.run(ToolCall(f"{call_id}-book", "book_appointment", arguments), info)
        if not checked.get("held") or booked.get("status") != "booked":
            phase.not_booked += 1
            return
        phase.t0[booked["booking_id"]] = t0
        phase.committed[booked["booking_id"]] = loop.time()

    await asyncio.gather(*(caller(n, offset) for n, offset in enumerate(arrivals)))


def _check_arguments(resource: str, start: datetime) -> dict[str, Any]:
    return {"service": "visit", "date": f"{start:%Y-%m-%d}", "time": f"{start:%H:%M}", "resource": resource}


_PHONE_BLOCKS = {"warm-up": 3, "steady": 4, "burst": 5}


def _phone(label: str, number: int) -> str:
    """A distinct, valid New York number per caller and phase."""
    return f"+1212{_PHONE_BLOCKS[label]}{number % 1_000_000:06d}"


async def settle(probe: Probe, phase: Phase) -> bool:
    """Wait until every booked booking's calendar event and text are done (or failed); False on timeout."""
    deadline = asyncio.get_running_loop().time() + SETTLE_TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        pending = [
            b for b in phase.t0 if b not in probe.failed and (b not in probe.calendar_done or b not in probe.sms_done)
        ]
        if not pending:
            return True
        await asyncio.sleep(0.05)
    return False


@contextlib.asynccontextmanager
async def measured(phase: Phase) -> AsyncIterator[None]:
    """Samples the event loop's lag (how late a 10 ms sleep wakes) and this process's CPU time."""
    loop = asyncio.get_running_loop()

    async def sample() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            phase.lags.append(loop.time() - before - 0.01)

    sampler = loop.create_task(sample())
    cpu, wall = time.process_time(), loop.time()
    try:
        yield
    finally:
        phase.cpu, phase.wall = time.process_time() - cpu, loop.time() - wall
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)


def report(probe: Probe, phase: Phase, title: str) -> None:
    booked = list(phase.t0)
    calendar = [probe.calendar_done[b] - phase.t0[b] for b in booked if b in probe.calendar_done]
    sms = [probe.sms_done[b] - phase.t0[b] for b in booked if b in probe.sms_done]
    both = [
        max(probe.calendar_done[b], probe.sms_done[b]) - phase.t0[b]
        for b in booked
        if b in probe.calendar_done and b in probe.sms_done
    ]
    waits = {
        kind: [probe.started[(kind, b)] - phase.committed[b] for b in booked if (kind, b) in probe.started]
        for kind in (EffectKind.CALENDAR_CREATE, EffectKind.SMS_CONFIRMATION)
    }
    print(f"{title}: {len(booked)} booked, {phase.not_booked} not booked")
    print(f"  tool call (commit)       {summary([phase.committed[b] - phase.t0[b] for b in booked], decimals=1)}")
    print(f"  to calendar written      {summary(calendar, decimals=1)}")
    print(f"  to SMS accepted          {summary(sms, decimals=1)}")
    print(f"  to both                  {summary(both, decimals=1)}")
    print(f"  commit -> calendar start {summary(waits[EffectKind.CALENDAR_CREATE], decimals=1)}")
    print(f"  commit -> SMS start      {summary(waits[EffectKind.SMS_CONFIRMATION], decimals=1)}")
    for kind, finished, name in (
        (EffectKind.CALENDAR_CREATE, probe.calendar_done, "calendar handler"),
        (EffectKind.SMS_CONFIRMATION, probe.sms_done, "SMS handler"),
    ):
        spans = [finished[b] - probe.started[(kind, b)] for b in booked if b in finished and (kind, b) in probe.started]
        print(f"  {name:<24} {summary(spans, decimals=1)}")
    print(f"  event loop lag           {summary(phase.lags, decimals=1)}")
    print(
        f"  CPU of this process      {phase.cpu / max(len(booked), 1) * 1e3:.1f} ms per booking, "
        f"{phase.cpu / phase.wall:.0%} of one core over {phase.wall:.1f} s"
    )


# -- the stack -----------------------------------------------------------------------------------------


async def claim_cost(database: Database, kinds: list[str], times: int = 200) -> tuple[float, float]:
    """Wall and CPU seconds of one ``Outbox.claim`` with nothing due, on the table the run left: the worker
    claims after every notification and every finished effect, so this is paid several times a booking."""
    outbox = Outbox(database)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(times):
        await outbox.claim("bench-probe", kinds, limit=32, lease=timedelta(minutes=2))
    return (time.perf_counter() - wall) / times, (time.process_time() - cpu) / times


async def effect_counts(database: Database) -> dict[tuple[str, str], int]:
    e = t.effects.c
    query = select(e.kind, e.status, func.count()).group_by(e.kind, e.status)
    async with database.reader.connect() as conn:
        return {(kind, status): int(count) for kind, status, count in await conn.execute(query)}


def _service_account(folder: Path, calendar_url: str, pem: str) -> Path:
    path = folder / "service-account.json"
    path.write_text(json.dumps(service_account_info(calendar_url, pem, SA_EMAIL)))
    return path


async def main(args: argparse.Namespace) -> None:
    pem = new_private_key_pem()
    business = rooms_business(RESOURCES, timezone="UTC", calendar_of=calendar)
    rng = random.Random(args.seed)
    with (
        tempfile.TemporaryDirectory(prefix="voicebook-bench-") as scratch,
        simulator_process(pem, args.latency_ms / 1000) as (calendar_url, twilio_url, simulators),
    ):
        folder = Path(scratch)
        async with redis_and_ledger(args.database_url, args.redis_url, folder) as (redis, database, prefix):
            settings = Settings(
                redis_prefix=prefix,
                worker_concurrency=args.concurrency,
                google_service_account_file=_service_account(folder, calendar_url, pem),
                google_calendar_api_url=f"{calendar_url}/calendar/v3/",
                twilio_account_sid=ACCOUNT,
                twilio_auth_token=TOKEN,
                twilio_api_base_url=twilio_url,
                twilio_messaging_service_sid=MESSAGING_SERVICE,
                # A Messaging Service with a number pool or a short code sends about 100 a second.
                sms_per_minute=min(round(args.sms_mps * 60), 60_000) if args.sms_mps > 0 else 60_000,
                sms_burst=args.sms_burst,
            )
            assert settings.google_service_account_file is not None
            info = json.loads(settings.google_service_account_file.read_text())
            google = GoogleCalendar.from_service_account(
                info, api_endpoint=settings.google_calendar_api_url, threads=args.threads
            )
            sms = build_twilio_sms(settings, threads=args.threads)
            probe = Probe()
            handlers = probe.wrap(build_handlers(settings, business, database=database, google=google, sms=sms))
            channel = f"{prefix}:effects"
            worker = Worker(
                database,
                redis,
                handlers,
                channel=channel,
                concurrency=settings.worker_concurrency,
                lease=timedelta(seconds=settings.effect_lease_seconds),
                policies=scaled_policies(settings.effect_backoff_scale),
            )
            ledger = Ledger(database, notify_effects=RedisNotifier(redis, channel))
            service = BookingService(business, ledger, FreeBusyIndex(redis, prefix=prefix))
            await service.start()
            tools = BookingTools(service)
            worker_task = asyncio.get_running_loop().create_task(worker.run())
            try:
                await asyncio.wait_for(worker.listening.wait(), 10)
                first_day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
                slots = free_slots(first_day, RESOURCES)
                print(
                    f"ledger: {database.dialect}; redis: {'embedded' if args.redis_url is None else args.redis_url}; "
                    f"simulators: {args.latency_ms} ms per API call, own process"
                )
                print(
                    f"worker concurrency per integration: {args.concurrency}; SMS sender limit: "
                    + (f"{args.sms_mps:g} msg/s, burst {args.sms_burst}" if args.sms_mps > 0 else "none")
                )
                warm = Phase("warm-up")
                await drive(tools, slots, [n / WARM_UP for n in range(WARM_UP)], warm)
                await settle(probe, warm)
                probe.peak.clear()
                steady = Phase("steady")
                total = int(args.rate * args.seconds)
                async with measured(steady):
                    await drive(tools, slots, [n / args.rate for n in range(total)], steady)
                    settled = await settle(probe, steady)
                report(probe, steady, f"steady {args.rate:g}/s for {args.seconds:g} s")
                print(f"  in flight peak           {dict(sorted(probe.peak.items()))}")
                if not settled:
                    print(f"  NOT SETTLED within {SETTLE_TIMEOUT:.0f} s")
                probe.peak.clear()
                burst = Phase("burst")
                async with measured(burst):
                    await drive(tools, slots, sorted(rng.uniform(0.0, 1.0) for _ in range(args.burst)), burst)
                    settled = await settle(probe, burst)
                report(probe, burst, f"burst of {args.burst} within 1 s")
                print(f"  in flight peak           {dict(sorted(probe.peak.items()))}")
                if not settled:
                    print(f"  NOT SETTLED within {SETTLE_TIMEOUT:.0f} s")
            finally:
                worker.stop()
                await worker_task
                google.close()
            counts = await effect_counts(database)
            claim_wall, claim_cpu = await claim_cost(database, [k for k in handlers if k.startswith("sms.")])
            simulators.send("counts")
            seen = simulators.recv()
            print(
                "effects: "
                + ", ".join(f"{kind} {status}={n}" for (kind, status), n in sorted(counts.items()))
                + f"; handler retries={probe.retries} failures={probe.failures}"
            )
            print(f"simulators saw: {seen['events']} events, {seen['texts']} texts")
            print(
                f"one claim with nothing due, {sum(counts.values())} effect rows: "
                f"{claim_wall * 1e3:.2f} ms wall, {claim_cpu * 1e3:.2f} ms CPU (idle worker, same process)"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0, help="steady bookings per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="steady phase length (at most 120)")
    parser.add_argument("--burst", type=int, default=100, help="bookings within one second after the steady phase")
    parser.add_argument("--latency-ms", type=int, default=150, help="each simulator's answer time")
    parser.add_argument("--concurrency", type=int, default=32, help="worker concurrency per integration")
    parser.add_argument("--threads", type=int, default=32, help="Google Calendar client's request threads")
    parser.add_argument("--sms-mps", type=float, default=100.0, help="SMS sender limit, messages/s (0: none)")
    parser.add_argument("--sms-burst", type=int, default=10, help="SMS sender limit's burst")
    parser.add_argument("--seed", type=int, default=1, help="burst arrival instants")
    parser.add_argument("--database-url", help="ledger (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", help="Redis (default: the embedded redis-server)")
    args = parser.parse_args()
    args.seconds = min(args.seconds, 120.0)
    return args


if __name__ == "__main__":
    from voice_server.logging import configure_logging

    configure_logging("WARNING", "console")
    asyncio.run(main(parse_args()))
