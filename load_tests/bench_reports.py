"""After hang-up: from the end of the call to its report stored in the ledger and to its CRM sync.

    python load_tests/bench_reports.py [--calls 50] [--concurrency 32] [--airtable-rate 5]
        [--airtable-penalty 30] [--seed 1] [--database-url URL] [--redis-url URL]

What runs is the product's own path, in this process: ``effect_workers`` (the server's worker set, with
``build_reporting``'s handlers) on a real ledger and Redis. ``--calls`` calls are rung
(``CallLedger.record_call``), each from its own number, and each books one visit "in the call"
(``BookingService.book`` with ``actor="call:<sid>"``); once the bookings' own effects have run, every
call hangs up at the same instant: ``CallLedger.finish_call`` for all of them at once (``asyncio.gather``)
with a 10 to 16 turn transcript. The worker then runs ``report.build`` (the offline analysers, the
transcript archived to a local folder, the report stored as version 1 with its ``crm.call`` in the same
transaction) and ``crm.call`` (``CrmCallSync``: contact, appointment and call upserted into Airtable
through pyairtable, paced by the shared Redis limiter of 5 requests per 1.2 s per base).

Airtable is the simulator (``integrations/simulators/airtable.py``), in a child process so that it takes
no CPU from the event loop being measured; it enforces Airtable's 5 requests a second per base and its
30-second penalty after a 429 unless ``--airtable-rate`` / ``--airtable-penalty`` say otherwise (the
product's limiter stays at 5 per 1.2 s whatever the simulator allows). The base's tables are created
first with ``AirtableCRM.ensure_schema(create=True)``, as ``voicebook crm create`` does.

Instrumentation patches and wraps nothing: the product stamps both instants with the real UTC clock
(``utc_now``), and the bench reads them back from the ledger. The report time is the hang-up version's
``call_reports.created_at`` (taken inside the transaction that stores it); the CRM time is the
``crm.call`` effect's ``done_at`` (taken when its handler has returned: Airtable answered all upserts and
the export was audited; the commit of ``done`` itself is not included). Both count from t0, the instant
just before the ``finish_call``s start. While waiting, the bench polls two counts every
``POLL_SECONDS``; that and the event-loop lag sampler are the only work it adds to the process. Before
the calls book, and again before they hang up, the workers are let go quiet: the ``crm.push`` they
schedule at start-up has run, and so have the bookings' calendar and text effects (no Google or Twilio
is configured: the ledger is the calendar and texts are logged), so the window holds only the calls'
own effects (a later ``crm.push``, every ``crm_push_seconds``, would show under "other effects").

Printed: those latencies (p50/p95/p99/max), the time ``finish_call`` itself took, the event loop's lag,
this process's CPU per call (all threads: the worker, the ledger's threads, pyairtable's requests),
effect counts and retries, the requests the simulator received after t0 (by table, and any 429s) and
what the base holds at the end. Defaults: the embedded redis-server and a temporary SQLite ledger; with
``--database-url postgresql://`` a scratch database is created next to the one named and dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from common import free_slots, redis_and_ledger, rooms_business, summary  # load_tests/common.py
from sqlalchemy import func, select

from booking.business import Business
from booking.calls import CallStatus, CallTurn
from booking.domain import Booking
from booking.freebusy import FreeBusyIndex
from booking.ledger import schema as t
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from booking.ledger.repository import CustomerDetails, Ledger
from booking.outbox import EffectKind, EffectStatus, RedisNotifier
from booking.reports.pipeline import HANG_UP
from booking.service import Booked, BookingService, BookRequest
from integrations.airtable import RATE_LIMIT, RATE_WINDOW
from integrations.simulators.loopback import loopback_socket
from voice_server.effect_workers import CRM_CONCURRENCY, effect_workers
from voice_server.reporting import build_crm
from voice_server.settings import Settings

ROOMS = 20
TOKEN = "patBenchmarkToken.0123456789abcdef"
BUSINESS_PHONE = "+12125550100"
CALL_SECONDS = 150
"""How long each call lasted: it rang this long before the hang-up, and its turns spread over it."""
POLL_SECONDS = 0.1
SETTLE_TIMEOUT = 150.0


# -- the Airtable simulator, in its own process --------------------------------------------------------


def _simulator_main(connection: Connection, base_id: str) -> None:
    asyncio.run(_simulator(connection, base_id))


async def _simulator(connection: Connection, base_id: str) -> None:
    import uvicorn

    from integrations.simulators.airtable import AirtableState, create_airtable_simulator

    state = AirtableState(token=TOKEN)  # Airtable's own limits until told otherwise
    state.add_base(base_id)
    # loopback_socket sets the protocol, so answers are not held for the client's delayed ACK.
    sock = loopback_socket()
    server = uvicorn.Server(
        uvicorn.Config(create_airtable_simulator(state), log_config=None, lifespan="off", backlog=1024)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    connection.send(f"http://127.0.0.1:{sock.getsockname()[1]}")
    loop = asyncio.get_running_loop()
    while (command := await loop.run_in_executor(None, connection.recv)) != "stop":
        if command == "mark":
            connection.send(len(state.log))
        elif command[0] == "limit":  # ("limit", rate, penalty)
            state.rate, state.penalty = int(command[1]), float(command[2])
            connection.send(None)
        else:  # ("since", mark): what was asked after the mark, and what the base holds now
            connection.send(_tally(state, base_id, int(command[1])))
    server.should_exit = True
    await task


def _tally(state: Any, base_id: str, mark: int) -> dict[str, Any]:
    requests = Counter(f"{r.method} {r.path.rsplit('/', 1)[-1]} {r.status}" for r in state.log[mark:])
    calls = state.records(base_id, "Calls")
    return {
        "requests": dict(requests),
        "total": len(state.log) - mark,
        "refused": sum(1 for r in state.log[mark:] if r.status == 429),
        "contacts": len(state.records(base_id, "Contacts")),
        "appointments": len(state.records(base_id, "Appointments")),
        "calls": len(calls),
        "linked": sum(1 for r in calls if r.fields.get("Appointments") and r.fields.get("Contact")),
    }


@contextlib.contextmanager
def airtable_process(base_id: str) -> Iterator[tuple[str, Connection]]:
    """Yields the simulator's URL and a pipe: send "mark" for the log's length, ("since", mark) for a tally,
    ("limit", rate, penalty) to change its rate limit; each is answered."""
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_simulator_main, args=(theirs, base_id), daemon=True)
    process.start()
    try:
        yield ours.recv(), ours
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


# -- the calls -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    sid: str
    phone: str
    name: str
    booking: Booking


FIRST_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kemi", "Liam")
LAST_NAMES = ("Ortiz", "Nakamura", "Walsh", "Okafor", "Schmidt", "Patel", "Rossi", "Kowalski", "Dubois", "Lee")
ASIDES = (
    ("Is there parking near you?", "Yes, there's a public garage right next door, and street parking after six."),
    ("Could you text me the details?", "Of course, you'll get a text confirmation with the address in a moment."),
    ("Do I need to bring anything?", "Just a photo ID, and please arrive about five minutes early."),
    ("What if I need to cancel?", "No problem, just call us or reply to the text at least a day before."),
    (
        "Is the room accessible? My mother uses a wheelchair.",
        "Yes, every room is step-free and the lift is by the door.",
    ),
)


def transcript(call: Call, business: Business, ended: datetime, rng: random.Random) -> list[CallTurn]:
    """10 to 16 turns of a booking call, with the real booking in its tool results, ending at ``ended``."""
    local = call.booking.start.astimezone(ZoneInfo(business.timezone))
    day, hour = f"{local:%Y-%m-%d}", f"{local:%H:%M}"
    spoken = f"{local:%A, %B} {local.day} at {local:%I:%M %p}".replace(" 0", " ")
    room = call.booking.resource_id
    check = {"service": "visit", "date": day, "time": hour, "resource": room}
    booked = {
        "booking_id": call.booking.id,
        "service": "visit",
        "service_name": "Visit",
        "start": f"{day}T{hour}",
        "spoken": spoken,
        "resource": room,
        "status": "booked",
    }
    lines: list[tuple[str, str, str | None]] = [
        ("agent", f"Thank you for calling {business.name}. How can I help you today?", None),
        ("caller", f"Hi, um, I'd like to book a visit on {local:%A} around {local:%I %p}, if you have anything.", None),
        _tool("check_availability", check, {"requested_available": True, "held": True, "slots": []}),
        ("agent", f"{room.replace('-', ' ').title()} is free on {spoken}. Shall I book it for you?", None),
        ("caller", f"Yes please, that's perfect. My name is {call.name}.", None),
        _tool("book_appointment", {"service": "visit", "start": f"{day}T{hour}"}, booked),
        ("agent", f"You're booked for a visit on {spoken}, {call.name.split()[0]}. Anything else?", None),
    ]
    for question, answer in rng.sample(ASIDES, rng.randint(0, 3)):
        lines += [("caller", question, None), ("agent", answer, None)]
    lines += [
        ("caller", "No, that's everything. Thanks so much, that was really easy!", None),
        ("agent", "You're welcome. See you soon, goodbye!", None),
        ("caller", "Bye!", None),
    ]
    gap = CALL_SECONDS / (len(lines) + 1)
    started = ended - timedelta(seconds=CALL_SECONDS)
    return [
        CallTurn(role, text, started + timedelta(seconds=gap * (i + 1)), tool=tool)
        for i, (role, text, tool) in enumerate(lines)
    ]


def _tool(name: str, arguments: dict[str, Any], result: dict[str, Any]) -> tuple[str, str, str]:
    """A tool turn as the session stores it: the call's arguments and what the tool returned."""
    return "tool", orjson.dumps({"id": f"call_{name}", "arguments": arguments, "result": result}).decode(), name


async def ring_and_book(
    calls: CallLedger, service: BookingService, slots: Iterator[tuple[str, datetime]], count: int
) -> list[Call]:
    """``count`` calls in progress, each from its own number, each with one booking it made."""

    async def one(n: int) -> Call:
        sid = f"CA{uuid.uuid4().hex}"
        phone = f"+16467{n:06d}"  # a valid, distinct New York number per caller
        name = f"{FIRST_NAMES[n % len(FIRST_NAMES)]} {LAST_NAMES[n // len(FIRST_NAMES) % len(LAST_NAMES)]}"
        await calls.record_call(
            call_sid=sid,
            account_sid="AC" + "0" * 32,
            from_number=phone,
            to_number=BUSINESS_PHONE,
            direction="inbound",
            status=CallStatus.IN_PROGRESS,
        )
        resource, start = next(slots)
        outcome = await service.book(
            BookRequest(
                "visit", start, CustomerDetails(phone, name), resource_id=resource, source="phone", actor=f"call:{sid}"
            )
        )
        if not isinstance(outcome, Booked):
            raise RuntimeError(f"call {sid} could not book {resource} at {start:%Y-%m-%d %H:%M}: {outcome}")
        return Call(sid, phone, name, outcome.booking)

    return list(await asyncio.gather(*(one(n) for n in range(count))))


# -- measuring -------------------------------------------------------------------------------------------


@dataclass
class Run:
    t0: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = 0.0  # perf_counter() at t0
    finished: list[float] = field(default_factory=list)  # finish_call's own time, seconds
    lags: list[float] = field(default_factory=list)  # event loop lag samples
    cpu_reports: float = 0.0  # this process's CPU seconds from t0 until every report was stored
    wall_reports: float = 0.0
    cpu: float = 0.0  # ... until every CRM sync was done
    wall: float = 0.0
    settled: bool = False


async def settle(database: Database, sids: list[str], run: Run, cpu0: float) -> None:
    """Poll until every call's CRM sync is done (or its report or sync is dead), or ``SETTLE_TIMEOUT``."""
    r, e = t.call_reports.c, t.effects.c
    reports = select(func.count()).where(r.call_sid.in_(sids), r.reason == HANG_UP)
    over = (EffectStatus.DONE.value, EffectStatus.DEAD.value)
    synced = select(func.count()).where(
        e.call_sid.in_(sids),
        ((e.kind == EffectKind.CRM_CALL.value) & e.status.in_(over))
        | ((e.kind == EffectKind.REPORT_BUILD.value) & (e.status == EffectStatus.DEAD.value)),
    )
    deadline = time.perf_counter() + SETTLE_TIMEOUT
    while time.perf_counter() < deadline:
        async with database.reader.connect() as conn:
            if not run.wall_reports and (await conn.execute(reports)).scalar_one() == len(sids):
                run.cpu_reports, run.wall_reports = time.process_time() - cpu0, time.perf_counter() - run.started
            if (await conn.execute(synced)).scalar_one() >= len(sids):
                run.settled = True
                break
        await asyncio.sleep(POLL_SECONDS)
    run.cpu, run.wall = time.process_time() - cpu0, time.perf_counter() - run.started


async def quiet(database: Database, kinds: list[str]) -> None:
    """Until no due effect of ``kinds`` (what the worker runs) is pending or running, and the workers'
    start-up ``crm.push`` has run: before the calls book, and again before they hang up (the bookings'
    calendar and text effects done, as they would be in calls that lasted minutes)."""
    e = t.effects.c
    open_ = (EffectStatus.PENDING.value, EffectStatus.RUNNING.value)
    busy = select(func.count()).where(e.kind.in_(kinds), e.status.in_(open_), e.due_at <= datetime.now(UTC))
    pushed = select(func.count()).where(e.kind == EffectKind.CRM_PUSH.value, e.status == EffectStatus.DONE.value)
    pushes = 1 if EffectKind.CRM_PUSH.value in kinds else 0
    for _ in range(600):
        async with database.reader.connect() as conn:
            if (await conn.execute(busy)).scalar_one() == 0 and (await conn.execute(pushed)).scalar_one() >= pushes:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError("the workers did not go quiet within 30 s")


@contextlib.asynccontextmanager
async def lag_sampled(run: Run) -> AsyncIterator[None]:
    """How late a 10 ms sleep wakes, while the block runs."""
    loop = asyncio.get_running_loop()

    async def sample() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            run.lags.append(loop.time() - before - 0.01)

    sampler = loop.create_task(sample())
    try:
        yield
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)


async def call_effects(database: Database, sids: list[str]) -> list[Any]:
    e = t.effects.c
    query = select(e.call_sid, e.kind, e.status, e.attempts, e.created_at, e.done_at, e.last_error)
    async with database.reader.connect() as conn:
        return list(await conn.execute(query.where(e.call_sid.in_(sids))))


async def others_since(database: Database, t0: datetime) -> Counter[tuple[str, str]]:
    """Effects enqueued after t0 that belong to no call (a scheduled ``crm.push`` shares the rate limit)."""
    e = t.effects.c
    query = select(e.kind, e.status).where(e.call_sid.is_(None), e.booking_id.is_(None), e.created_at >= t0)
    async with database.reader.connect() as conn:
        return Counter((kind, status) for kind, status in await conn.execute(query))


async def stored_reports(database: Database, sids: list[str]) -> dict[str, datetime]:
    r = t.call_reports.c
    query = select(r.call_sid, r.created_at).where(r.call_sid.in_(sids), r.reason == HANG_UP)
    async with database.reader.connect() as conn:
        return {sid: at for sid, at in await conn.execute(query)}


def report(
    run: Run,
    calls: list[Call],
    reports: dict[str, datetime],
    effects: list[Any],
    others: Counter[tuple[str, str]],
    seen: dict[str, Any],
) -> None:
    def since_t0(at: datetime) -> float:
        return (at - run.t0).total_seconds()

    crm = {row.call_sid: row for row in effects if row.kind == EffectKind.CRM_CALL.value}
    synced = {sid: row.done_at for sid, row in crm.items() if row.status == EffectStatus.DONE.value}
    print(f"  hang-up -> transcript committed {summary(run.finished, decimals=1)}")
    print(f"  hang-up -> report stored        {summary([since_t0(at) for at in reports.values()], decimals=1)}")
    print(f"  hang-up -> CRM synced           {summary([since_t0(at) for at in synced.values()], decimals=1)}")
    between = [(synced[sid] - reports[sid]).total_seconds() for sid in synced if sid in reports]
    print(f"  report stored -> CRM synced     {summary(between, decimals=1)}")
    print(f"  event loop lag                  {summary(run.lags, decimals=1)}")
    n = max(len(calls), 1)
    print(
        f"  CPU of this process             {run.cpu / n * 1e3:.1f} ms per call until synced "
        f"({run.cpu / max(run.wall, 1e-9):.0%} of one core over {run.wall:.1f} s); "
        f"{run.cpu_reports / n * 1e3:.1f} ms per call until every report was stored "
        f"({run.cpu_reports / max(run.wall_reports, 1e-9):.0%} of one core over {run.wall_reports:.1f} s)"
    )
    counts = Counter((row.kind, row.status) for row in effects)
    retries = Counter(row.kind for row in effects for _ in range(max(row.attempts - 1, 0)))
    print(
        "  effects: "
        + ", ".join(f"{kind} {status}={count}" for (kind, status), count in sorted(counts.items()))
        + "; attempts after the first: "
        + (", ".join(f"{kind}={count}" for kind, count in sorted(retries.items())) or "none")
    )
    print(
        "  other effects enqueued after t0: "
        + (", ".join(f"{kind} {status}={count}" for (kind, status), count in sorted(others.items())) or "none")
    )
    for error in sorted({row.last_error for row in effects if row.last_error})[:3]:
        print(f"    last error: {error[:200]}")
    total = seen["total"]
    if synced:
        first = min(row.created_at for row in crm.values())
        span = (max(synced.values()) - first).total_seconds()
        pace = f"{total / span:.2f} requests/s from the first crm.call enqueued to the last done" if span > 0 else ""
    else:
        pace = ""
    print(
        f"  Airtable requests: {total} ({total / n:.1f} per call), 429s: {seen['refused']}; {pace} "
        f"(our limiter: {RATE_LIMIT} per {RATE_WINDOW:g} s = {RATE_LIMIT / RATE_WINDOW:.2f}/s)"
    )
    print("    " + ", ".join(f"{what}={count}" for what, count in sorted(seen["requests"].items())))
    print(
        f"  Airtable holds: {seen['contacts']} contacts, {seen['appointments']} appointments, "
        f"{seen['calls']} calls ({seen['linked']} linked to their contact and appointment)"
    )
    if not run.settled:
        print(f"  NOT SETTLED within {SETTLE_TIMEOUT:.0f} s")


# -- the stack -------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    business = rooms_business(ROOMS)
    rng = random.Random(args.seed)
    base_id = f"app{uuid.uuid4().hex[:14]}"  # a base of this run's own: the limiter's key is the base id
    with (
        tempfile.TemporaryDirectory(prefix="voicebook-bench-") as scratch,
        airtable_process(base_id) as (airtable_url, simulator),
    ):
        folder = Path(scratch)
        async with redis_and_ledger(args.database_url, args.redis_url, folder) as (redis, database, prefix):
            settings = Settings(
                data_dir=folder / "data",
                redis_prefix=prefix,
                retention_days=0,
                worker_concurrency=args.concurrency,
                airtable_api_key=TOKEN,
                airtable_base_id=base_id,
                airtable_api_url=airtable_url,
            )
            crm = build_crm(settings, redis)
            assert crm is not None
            try:
                schema = await crm.ensure_schema(create=True)  # as `voicebook crm create` does
            finally:
                crm.close()
            if not schema.ok:
                raise RuntimeError(f"the Airtable base was not set up: {schema}")
            # The set-up ran under Airtable's own limit; the run's limit starts once its requests have aged out.
            await asyncio.sleep(RATE_WINDOW)
            simulator.send(("limit", args.airtable_rate, args.airtable_penalty))
            simulator.recv()
            notify = RedisNotifier(redis, settings.effects_channel)
            service = BookingService(
                business, Ledger(database, notify_effects=notify), FreeBusyIndex(redis, prefix=prefix)
            )
            await service.start()
            calls = CallLedger(database, notify_effects=notify)
            # The calls rang CALL_SECONDS before they hang up (their turns spread over that time).
            ringing = CallLedger(database, clock=lambda: datetime.now(UTC) - timedelta(seconds=CALL_SECONDS))
            print(
                f"ledger: {database.dialect}; redis: {'embedded' if args.redis_url is None else args.redis_url}; "
                f"Airtable simulator: {args.airtable_rate} requests/s per base, {args.airtable_penalty:g} s penalty, "
                f"own process; worker concurrency per integration: {args.concurrency} "
                f"(crm: {min(args.concurrency, CRM_CONCURRENCY)})"
            )
            async with effect_workers(settings, business, database, redis) as workers:
                await asyncio.wait_for(workers.worker.listening.wait(), 10)
                await quiet(database, workers.worker.kinds)
                first_day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
                made = await ring_and_book(ringing, service, free_slots(first_day, ROOMS), args.calls)
                await quiet(database, workers.worker.kinds)
                run = Run()
                transcripts = {c.sid: transcript(c, business, datetime.now(UTC), rng) for c in made}
                sizes = [len(turns) for turns in transcripts.values()]
                print(
                    f"{len(made)} calls hung up at once, {min(sizes)} to {max(sizes)} turns "
                    f"(mean {sum(sizes) / len(sizes):.1f}), one booking each"
                )
                simulator.send("mark")
                mark = simulator.recv()

                async def hang_up(call: Call) -> None:
                    await calls.finish_call(
                        call.sid,
                        stream_sid=f"MZ{uuid.uuid4().hex}",
                        end_reason="caller_hung_up",
                        turns=transcripts[call.sid],
                        latencies=[{"trigger": "speech", "parts": {"voice_to_voice_server": 0.6, "tool": 0.05}}],
                    )
                    run.finished.append(time.perf_counter() - run.started)

                async with lag_sampled(run):
                    cpu0, run.started = time.process_time(), time.perf_counter()
                    run.t0 = datetime.now(UTC)
                    await asyncio.gather(*(hang_up(call) for call in made))
                    await settle(database, [c.sid for c in made], run, cpu0)
            sids = [c.sid for c in made]
            simulator.send(("since", mark))
            seen = simulator.recv()
            reports, effects = await stored_reports(database, sids), await call_effects(database, sids)
            report(run, made, reports, effects, await others_since(database, run.t0), seen)
            await service.drain()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50, help="calls that hang up at the same instant")
    parser.add_argument("--concurrency", type=int, default=32, help="worker concurrency per integration")
    parser.add_argument("--airtable-rate", type=int, default=5, help="requests/s per base the simulator allows")
    parser.add_argument("--airtable-penalty", type=float, default=30.0, help="seconds of 429s after exceeding it")
    parser.add_argument("--seed", type=int, default=1, help="which asides each transcript gets")
    parser.add_argument("--database-url", help="ledger (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", help="Redis (default: the embedded redis-server)")
    return parser.parse_args()


if __name__ == "__main__":
    from voice_server.logging import configure_logging

    configure_logging("WARNING", "console")
    asyncio.run(main(parse_args()))
