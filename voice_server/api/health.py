"""Liveness and readiness. ``/healthz`` says the process serves requests; ``/readyz`` says it can do its
job: Redis answers, the ledger answers and is migrated to the code's schema."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from booking.ledger.database import head_revision
from voice_server import __version__
from voice_server.api.responses import JSONResponse
from voice_server.components import Components

CHECK_TIMEOUT_SECONDS = 2.0


async def healthz(request: Request) -> Response:
    # The process that answered: with ``voicebook serve --processes N`` several share the port.
    return JSONResponse({"status": "ok", "version": __version__, "pid": os.getpid()})


async def _timed(name: str, check: Awaitable[dict[str, object]]) -> tuple[str, dict[str, object]]:
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(check, CHECK_TIMEOUT_SECONDS)
    except Exception as exc:  # a failing dependency is the answer, not an error of ours
        return name, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return name, {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2), **result}


async def _redis(components: Components) -> dict[str, object]:
    await components.redis.ping()
    return {}


async def _database(components: Components) -> dict[str, object]:
    revision = await components.database.schema_revision()
    expected = head_revision()
    if revision != expected:
        raise RuntimeError(f"schema at {revision}, code expects {expected}: run `voicebook migrate`")
    return {"dialect": components.database.dialect, "revision": revision}


async def readyz(request: Request) -> Response:
    components: Components = request.app.state.components
    checks = dict(await asyncio.gather(_timed("redis", _redis(components)), _timed("database", _database(components))))
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


routes = [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
