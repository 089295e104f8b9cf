"""The W3C trace context an effect carries from the change that enqueued it to the worker that runs it,
so a call's calendar write and texts show in the call's trace.

Only the OpenTelemetry API: in a process without a tracer provider every span is the invalid one, and
nothing is stored.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"

# Only W3C trace context, whatever OTEL_PROPAGATORS says: the value goes into a ledger column, not headers.
_propagator = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The current span's ``traceparent`` (``00-<trace id>-<span id>-<flags>``) when it is sampled; None outside
    a span, or inside one that is not sampled (an effect would join a trace that nobody records)."""
    if not trace.get_current_span().get_span_context().trace_flags.sampled:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def parent_context(traceparent: str | None) -> Context | None:
    """The context in which to start a span as the child of ``traceparent``; None (the current context)
    without one. A malformed value gives an empty context: the span starts a trace of its own."""
    if traceparent is None:
        return None
    return _propagator.extract({TRACEPARENT: traceparent})
