"""``GET /metrics``: the Prometheus text exposition.

One process: its default registry. With ``PROMETHEUS_MULTIPROC_DIR`` set, every process of the host that
shares the directory (the server's workers, ``voicebook worker``) writes its values there, and this
endpoint reads them all into a fresh registry per scrape: counters and histograms summed, gauges as each
declares (``livesum``, ``livemax``). Values of processes that have exited stay in the sums, as a counter
must; their live gauges are dropped when they exit (``voice_server.metrics.mark_process_dead``). The
multi-process collector cannot sum ``process_*`` figures (CPU, memory, file descriptors): those of the
process that answers the scrape are added as they are.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from voice_server.metrics import multiprocess_dir


def scrape_registry() -> CollectorRegistry:
    """What a scrape reads: the default registry, or with ``PROMETHEUS_MULTIPROC_DIR`` a fresh one that
    collects every process's files (plus this process's own ``process_*`` figures)."""
    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]  # untyped upstream
    ProcessCollector(registry=registry)
    return registry


def exposition() -> bytes:
    """The metrics text of this process, or of every process sharing ``PROMETHEUS_MULTIPROC_DIR``."""
    return generate_latest(scrape_registry())


async def metrics(request: Request) -> Response:
    # Reading every process's files is file I/O: off the event loop, which carries the calls' audio.
    body = await run_in_threadpool(exposition) if multiprocess_dir() is not None else exposition()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics, methods=["GET"])]
