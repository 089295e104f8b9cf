"""What the tracing tests share: the process's one tracer provider, switched on per test; helpers to read
finished spans; and an OTLP/HTTP traces receiver on loopback.

The OpenTelemetry API allows one global tracer provider per process, so it is installed once, by the
first test module that asks (:func:`recording`), and every tracing test module shares it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import serving
from voice_server import tracing
from voice_server.settings import Settings

Finished = Callable[[], list[ReadableSpan]]
Received = list[tuple[dict[str, str], ExportTraceServiceRequest]]


class Switched(trace.TracerProvider):
    """The process's tracer provider in a test session: ``configure_tracing``'s SDK provider while a
    tracing test runs (:func:`recording`), the API's no-op otherwise, so that tests elsewhere still see a
    process without tracing (no traceparent in their TwiML, no trace ids in their logs)."""

    def __init__(self, sdk: TracerProvider, exporter: InMemorySpanExporter) -> None:
        self.sdk = sdk
        self.exporter = exporter
        self.on = False

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchedTracer(self, self.sdk.get_tracer(*args, **kwargs))


class _SwitchedTracer(trace.Tracer):
    def __init__(self, switch: Switched, real: trace.Tracer) -> None:
        self._switch = switch
        self._real = real

    def _now(self) -> trace.Tracer:
        return self._real if self._switch.on else trace.NoOpTracer()

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._now().start_span(*args, **kwargs)

    @contextlib.contextmanager
    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:  # type: ignore[override]
        with self._now().start_as_current_span(*args, **kwargs) as span:
            yield span


@functools.cache
def _installed() -> Switched:
    # Never shut down: its export thread is a daemon and its exporter keeps spans in memory.
    exporter = InMemorySpanExporter()
    provider = tracing.configure_tracing(Settings(), exporter=exporter)
    assert provider is not None
    switched = Switched(provider, exporter)
    trace.set_tracer_provider(switched)
    if trace.get_tracer_provider() is not switched:
        pytest.fail("another test module installed a tracer provider: one per process")
    return switched


@contextlib.contextmanager
def recording() -> Iterator[Finished]:
    """Tracing on inside the block; yields a function returning the spans finished since it began."""
    switched = _installed()
    switched.exporter.clear()

    def finished() -> list[ReadableSpan]:
        switched.sdk.force_flush()
        return list(switched.exporter.get_finished_spans())

    switched.on = True
    try:
        yield finished
    finally:
        switched.on = False


async def wait_for_spans(
    traced: Finished, done: Callable[[list[ReadableSpan]], bool], within: float = 10.0
) -> list[ReadableSpan]:
    async with asyncio.timeout(within):
        # Polled: spans reach the exporter from the batch processor's thread, which sets nothing we could await.
        while not done(spans := traced()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return spans


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[str, Received]]:
    """An OTLP/HTTP traces endpoint on loopback decoding what it is sent; yields its URL (``.../v1/traces``)
    and the requests (headers, decoded body) as they arrive."""
    received: Received = []

    async def export(request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        received.append((dict(request.headers), message))
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    receiver = Starlette(routes=[Route("/v1/traces", export, methods=["POST"])])
    async with serving(receiver, lifespan="off") as url:
        yield f"{url}/v1/traces", received
