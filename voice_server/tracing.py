"""OpenTelemetry traces: one trace per call, exported over OTLP/HTTP when an endpoint is configured.

A call's trace starts at Twilio's voice webhook (``POST /twilio/voice``). Twilio carries no headers from
that request to the Media Streams upgrade, so the webhook's ``traceparent`` travels in the TwiML as a
``<Stream><Parameter>`` and comes back in the stream's ``start`` message: the ``call`` span is the
webhook span's child, and the call's turns, tool calls and provider requests are children of ``call``.
Effects run later in a worker: an effect keeps the ``traceparent`` of the span that enqueued it (the
tool call that booked, the turn that hung up), and each attempt's span is that span's child.
Nothing is traced per audio frame.

Without an endpoint nothing is installed and the OpenTelemetry API stays the no-op one: spans cost
nothing, and logs carry no trace ids (``call_sid`` and ``correlation_id`` still tie them together).
An SDK provider that records and drops every span was the alternative; it would buy trace ids in logs
that no tracing backend can resolve, at the price of a span object per turn for nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import requests
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.requests import Request
from starlette.responses import Response

from integrations.egress import guard_session
from voice_server import __version__, egress_policy
from voice_server.settings import Settings
from voice_server.turn_timing import TurnTiming

log = structlog.get_logger("voicebook.tracing")

TRACEPARENT = "traceparent"
"""The ``<Stream>`` parameter carrying the webhook span's W3C trace context to the media stream."""
CORRELATION_ID = "voicebook.correlation_id"
CALL_SID = "voicebook.call_sid"
STREAM_SID = "voicebook.stream_sid"

# Only W3C trace context, whatever OTEL_PROPAGATORS says: the TwiML parameter is ours, not a header set.
_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("voicebook.calls")


def configure_tracing(settings: Settings, *, exporter: SpanExporter | None = None) -> TracerProvider | None:
    """A tracer provider exporting in batches to the configured OTLP/HTTP endpoint (or to ``exporter``,
    which tests pass), sampling new traces at ``trace_sample_ratio`` and following a parent's decision.
    None when there is nowhere to export. The provider is not installed: see :func:`install_tracing`."""
    if exporter is None:
        if settings.otel_traces_endpoint is None:
            return None
        exporter = otlp_exporter(settings)
    resource = Resource.create(
        {
            "service.name": settings.otel_service_name,
            "service.version": __version__,
            # Both spellings: semantic conventions renamed it, and backends read one or the other.
            "deployment.environment": settings.environment,
            "deployment.environment.name": settings.environment,
        }
    )
    # Shut down by the lifespan that made it (flushing what is queued), not at interpreter exit.
    provider = TracerProvider(
        sampler=ParentBasedTraceIdRatio(settings.trace_sample_ratio), resource=resource, shutdown_on_exit=False
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def otlp_exporter(settings: Settings) -> OTLPSpanExporter:
    """The OTLP/HTTP exporter to the configured endpoint, sending only to that endpoint's host and never
    following a redirect (:mod:`integrations.egress`): spans carry call sids and timings, and the
    exporter sends its headers (often an API key) with each batch. A refused export fails like an
    unreachable collector: the batch is dropped and logged."""
    endpoint = settings.otel_traces_endpoint
    if endpoint is None:
        raise ValueError("OTEL_EXPORTER_OTLP_ENDPOINT is not set: there is no collector to export to")
    session = guard_session(requests.Session(), egress_policy.otlp(settings))
    return OTLPSpanExporter(endpoint=endpoint, headers=dict(settings.otel_headers), session=session)


def install_tracing(provider: TracerProvider) -> bool:
    """Make ``provider`` the process's tracer provider (every ``trace.get_tracer`` delegates to it). The
    OpenTelemetry API allows this once per process: False, and a warning, when one is installed already."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # the API's "none set yet"
        log.warning("tracing_already_installed", hint="one tracer provider per process; keeping the first")
        return False
    trace.set_tracer_provider(provider)
    return True


@contextlib.contextmanager
def tracing_enabled(settings: Settings) -> Iterator[TracerProvider | None]:
    """For a process's lifetime (the server's lifespan, ``voicebook worker``): install the configured
    provider, and on the way out flush what is queued and stop its export thread."""
    provider = configure_tracing(settings)
    if provider is None:
        yield None
        return
    if not install_tracing(provider):
        provider.shutdown()
        yield None
        return
    log.info("tracing_enabled", endpoint=settings.otel_traces_endpoint, sample_ratio=settings.trace_sample_ratio)
    try:
        yield provider
    finally:
        provider.shutdown()  # blocks for one last export at most (the exporter's timeout)


def add_trace_context(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the current span's ``trace_id`` and ``span_id`` (hex, as tracing backends show
    them) on every log event written inside a span; nothing outside one."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", trace.format_trace_id(span_context.trace_id))
        event_dict.setdefault("span_id", trace.format_span_id(span_context.span_id))
    return event_dict


def annotate_from_log_context(span: trace.Span) -> None:
    """Copy the identifiers bound for logging (``correlation_id``, ``call_sid``, ``stream_sid``) onto
    ``span``, so a span and the log lines of its request or call can be found from each other."""
    if not span.is_recording():
        return
    bound = structlog.contextvars.get_contextvars()
    for key, attribute in (("correlation_id", CORRELATION_ID), ("call_sid", CALL_SID), ("stream_sid", STREAM_SID)):
        value = bound.get(key)
        if value is not None:
            span.set_attribute(attribute, str(value))


def record_turn(span: trace.Span, timing: TurnTiming) -> None:
    """What set a turn off, whether it was answered, and its latency parts (seconds, under the names of
    their histograms) on the turn's span."""
    span.set_attribute("voicebook.turn.trigger", timing.trigger)
    span.set_attribute("voicebook.turn.answered", timing.answered)
    for part, seconds in timing.parts():
        span.set_attribute(f"voicebook.turn.{part}_seconds", seconds)


def record_tool_result(span: trace.Span, result: Mapping[str, Any]) -> None:
    """A tool call's outcome on its span: ``error`` when it failed or refused, else the status it reports
    (``booked``, ``unavailable``) or ``ok``; and the booking it made or touched."""
    status = result.get("status")
    outcome = "error" if "error" in result else status if isinstance(status, str) else "ok"
    span.set_attribute("voicebook.tool.outcome", outcome)
    booking_id = result.get("booking_id")
    if isinstance(booking_id, str):
        span.set_attribute("voicebook.booking_id", booking_id)


def stream_parameters() -> dict[str, str]:
    """The current span's ``traceparent`` for the TwiML ``<Stream>`` parameters; empty when not traced."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return {TRACEPARENT: carrier[TRACEPARENT]} if TRACEPARENT in carrier else {}


Endpoint = Callable[[Request], Awaitable[Response]]


def traced_webhook(name: str) -> Callable[[Endpoint], Endpoint]:
    """Wrap a webhook endpoint in a server span named ``name``, continuing a ``traceparent`` header when a
    proxy in front of us sends one (Twilio does not)."""

    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def traced(request: Request) -> Response:
            parent = _propagator.extract(request.headers)
            attributes: dict[str, AttributeValue] = {
                "http.request.method": request.method,
                "http.route": request.url.path,
            }
            with _tracer.start_as_current_span(
                name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
            ) as span:
                annotate_from_log_context(span)
                response = await endpoint(request)
                span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 500:
                    span.set_status(trace.StatusCode.ERROR)
                annotate_from_log_context(span)  # the endpoint binds the call SID as it learns it
                return response

        return traced

    return decorate


@dataclass(slots=True)
class CallSpan:
    """The ``call`` span of one media stream, current in the stream's context (the tasks the session
    starts inherit it) until :meth:`finish`."""

    span: trace.Span
    _token: contextvars.Token[otel_context.Context]

    def finish(self, *, end_reason: str) -> None:
        """End the span with why the call ended; call from the context that started it."""
        self.span.set_attribute("voicebook.end_reason", end_reason)
        annotate_from_log_context(self.span)
        self.span.end()
        otel_context.detach(self._token)


def start_call(parameters: Mapping[str, str], *, call_sid: str, stream_sid: str) -> CallSpan:
    """Start the ``call`` span as the child of the webhook span whose ``traceparent`` the stream's
    parameters carry (a new trace when they carry none), and make it current."""
    parent = _propagator.extract({TRACEPARENT: parameters[TRACEPARENT]}) if TRACEPARENT in parameters else None
    span = _tracer.start_span(
        "call",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={CALL_SID: call_sid, STREAM_SID: stream_sid},
    )
    annotate_from_log_context(span)
    token = otel_context.attach(trace.set_span_in_context(span))
    return CallSpan(span, token)


__all__ = [
    "TRACEPARENT",
    "CallSpan",
    "add_trace_context",
    "annotate_from_log_context",
    "configure_tracing",
    "install_tracing",
    "record_tool_result",
    "record_turn",
    "start_call",
    "stream_parameters",
    "traced_webhook",
    "tracing_enabled",
]
