"""``voicebook dlq`` (the dead letters, straight from the ledger) and ``voicebook worker`` (the outbox's
effect workers as a process of their own).

Exit codes: 0 done, 1 no such effect or it is not dead, 2 the configuration is unusable.

``voicebook worker`` needs a shared Redis (``REDIS_URL``): the server's embedded redis-server lives in
the server's process, so a separate worker could not hear its notifications. Run the server with
``VOICEBOOK_RUN_WORKERS=false`` alongside it, or both will run effects (safely, leases keep them apart,
but the server's concurrency then adds to the worker's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import TextIO

import redis.asyncio as aioredis
import structlog
from sqlalchemy.exc import SQLAlchemyError

from booking.business import load_business
from booking.errors import ConfigurationError
from booking.ledger.database import Database, LedgerConfigurationError, head_revision
from booking.outbox import Effect, Outbox, RedisNotifier
from booking.reconciler import Reconciler
from voice_server.api.effects import render_effect
from voice_server.effect_workers import effect_workers
from voice_server.google_setup import load_google_calendar
from voice_server.settings import Settings

log = structlog.get_logger("voicebook.worker_cli")

OK, NOT_FOUND, CONFIGURATION = 0, 1, 2


class Unusable(Exception):
    """The settings do not describe a usable ledger or Redis: exit 2 with this message."""


@contextlib.asynccontextmanager
async def open_ledger(settings: Settings) -> AsyncIterator[Database]:
    try:
        database = Database.connect(settings.effective_database_url)
    except LedgerConfigurationError as exc:
        raise Unusable(str(exc)) from None
    try:
        try:
            revision = await database.schema_revision()
        except (SQLAlchemyError, OSError) as exc:
            raise Unusable(f"cannot reach the ledger: {exc}") from None
        if revision != head_revision():
            raise Unusable("the ledger's schema is not current: run `voicebook migrate` first")
        yield database
    finally:
        await database.dispose()


@contextlib.asynccontextmanager
async def _shared_redis(settings: Settings) -> AsyncIterator[aioredis.Redis | None]:
    if settings.redis_url is None:
        yield None
        return
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def streams(out: TextIO | None, err: TextIO | None) -> tuple[TextIO, TextIO]:
    return out or sys.stdout, err or sys.stderr


def _age(effect: Effect) -> str:
    return effect.updated_at.isoformat(timespec="seconds").replace("+00:00", "Z")


def format_table(effects: list[Effect]) -> str:
    """The dead letters as a fixed-width table, one line each; the error is cut to its first line."""
    header = ("ID", "KIND", "FOR", "ATTEMPTS", "FAILED AT", "LAST ERROR")
    rows = [
        (
            str(e.id),
            e.kind,
            e.subject,
            f"{e.attempts}/{e.max_attempts}",
            _age(e),
            (e.last_error or "").splitlines()[0][:80] if e.last_error else "",
        )
        for e in effects
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines)


async def dlq_list(settings: Settings, *, limit: int = 50, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = streams(out, err)
    try:
        async with open_ledger(settings) as database:
            effects = await Outbox(database).dead_letters(limit=limit, newest_first=True)
    except Unusable as exc:
        print(f"voicebook dlq: {exc}", file=err)
        return CONFIGURATION
    if not effects:
        print("no dead letters", file=out)
        return OK
    print(format_table(effects), file=out)
    return OK


async def dlq_show(settings: Settings, effect_id: int, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = streams(out, err)
    try:
        async with open_ledger(settings) as database:
            effect = await Outbox(database).get(effect_id)
    except Unusable as exc:
        print(f"voicebook dlq: {exc}", file=err)
        return CONFIGURATION
    if effect is None:
        print(f"voicebook dlq: no effect {effect_id}", file=err)
        return NOT_FOUND
    print(json.dumps(render_effect(effect, payload=True), indent=2, ensure_ascii=False), file=out)
    return OK


async def _refused(outbox: Outbox, effect_id: int, err: TextIO) -> int:
    current = await outbox.get(effect_id)
    if current is None:
        print(f"voicebook dlq: no effect {effect_id}", file=err)
    else:
        print(f"voicebook dlq: effect {effect_id} is {current.status.value}, not dead", file=err)
    return NOT_FOUND


async def dlq_retry(settings: Settings, effect_id: int, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = streams(out, err)
    try:
        async with open_ledger(settings) as database, _shared_redis(settings) as redis:
            notify = RedisNotifier(redis, settings.effects_channel) if redis is not None else None
            outbox = Outbox(database, notify=notify)
            effect = await outbox.retry(effect_id)
            if effect is None:
                return await _refused(outbox, effect_id, err)
    except Unusable as exc:
        print(f"voicebook dlq: {exc}", file=err)
        return CONFIGURATION
    if redis is not None:
        print(f"effect {effect_id} ({effect.kind}) is pending again; workers notified", file=out)
    else:
        # The embedded redis-server belongs to the server process: nothing here can reach its workers.
        print(f"effect {effect_id} ({effect.kind}) is pending again; a worker picks it up on its next poll", file=out)
    return OK


async def dlq_discard(
    settings: Settings, effect_id: int, note: str, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = streams(out, err)
    if not note.strip():
        print("voicebook dlq: --note must say why the effect is discarded", file=err)
        return CONFIGURATION
    try:
        async with open_ledger(settings) as database:
            outbox = Outbox(database)
            effect = await outbox.discard(effect_id, note.strip())
            if effect is None:
                return await _refused(outbox, effect_id, err)
    except Unusable as exc:
        print(f"voicebook dlq: {exc}", file=err)
        return CONFIGURATION
    print(f"effect {effect_id} ({effect.kind}) discarded", file=out)
    return OK


async def run_worker(settings: Settings, *, concurrency: int, err: TextIO | None = None) -> int:
    """Run the effect workers until SIGINT or SIGTERM; effects in flight then get to finish."""
    err = err or sys.stderr
    if settings.redis_url is None:
        print(
            "voicebook worker: REDIS_URL is required: a separate worker cannot share the server's embedded "
            "redis (run the workers inside the server instead, VOICEBOOK_RUN_WORKERS=true)",
            file=err,
        )
        return CONFIGURATION
    if concurrency < 1:
        print("voicebook worker: --concurrency must be at least 1", file=err)
        return CONFIGURATION
    try:
        business = load_business(settings.business_file)
    except ConfigurationError as exc:
        print(f"voicebook worker: {exc.detail}", file=err)
        return CONFIGURATION
    try:
        async with (
            open_ledger(settings) as database,
            _shared_redis(settings) as redis,
            contextlib.AsyncExitStack() as stack,
        ):
            assert redis is not None
            google = await load_google_calendar(settings, database)
            if google is not None:
                stack.callback(google.close)  # after the workers, which use it
            workers = await stack.enter_async_context(
                effect_workers(settings, business, database, redis, google=google, concurrency=concurrency)
            )
            loop = asyncio.get_running_loop()
            signals = (signal.SIGINT, signal.SIGTERM)
            for signum in signals:
                loop.add_signal_handler(signum, workers.stop)
            try:
                worker = workers.worker
                log.info("worker_started", owner=worker.owner, concurrency=concurrency, kinds=worker.kinds)
                await workers.wait()
            finally:
                for signum in signals:
                    loop.remove_signal_handler(signum)
            log.info("worker_stopped", owner=workers.worker.owner)
    except Unusable as exc:
        print(f"voicebook worker: {exc}", file=err)
        return CONFIGURATION
    return OK


async def reconcile(settings: Settings, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """One reconciler pass; prints what it enqueued and what is stuck. Workers are woken when Redis is set."""
    out, err = streams(out, err)
    try:
        async with open_ledger(settings) as database, _shared_redis(settings) as redis:
            notify = RedisNotifier(redis, settings.effects_channel) if redis is not None else None
            report = await Reconciler(database, notify=notify).run_once()
    except Unusable as exc:
        print(f"voicebook reconcile: {exc}", file=err)
        return CONFIGURATION
    summary = {
        "checked": report.checked,
        "enqueued": dict(report.enqueued),
        "repaired_bookings": report.repaired_bookings,
        "stuck": dict(report.stuck),
    }
    print(json.dumps(summary, indent=2), file=out)
    return OK
