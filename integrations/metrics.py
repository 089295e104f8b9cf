"""Every request an adapter makes to a provider, counted, timed and traced in one place.

:func:`provider_request` wraps one request: it times it into ``voicebook_provider_request_seconds``,
counts it by outcome (``ok`` or ``error``) and, on an error, counts the error by kind; and it opens an
OpenTelemetry span ``"{provider} {operation}"`` with the provider, the operation and the outcome. The
span is a child of whatever is current when the request starts (a call's turn, an effect attempt) but is
never made current itself: a provider request has no children, and a span that is not current can be
started in one coroutine step and ended in another, in a thread, or across an async generator's yields
without disturbing anyone's context. Without an OpenTelemetry SDK the spans are no-ops.

:func:`provider_call` (a whole coroutine function is one request), :func:`provider_stream` (a streamed
answer is one request, never one per chunk) and :func:`provider_connect` (opening a stream is the
request, never the frames that follow) are the same helper shaped for the adapters that need them.
:func:`provider_stream_failed` counts what breaks after such a handshake (a socket dropped mid-call): an
error of the provider, though not of a request.

Errors are sorted into a few kinds (:data:`ErrorKind`) from what the adapters already know: the raw
error (a timeout, a refused connection, the HTTP status a provider answered) is looked for first along
the exception's causes, then the adapter's own verdict (an ``EffectFailed`` code, ``permanent`` or
``transient``). A cancelled request (a barge-in, a call that ended) is neither ok nor an error: it is
not counted, and its span says ``cancelled``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Final, Literal, ParamSpec, TypeVar

from opentelemetry import trace
from prometheus_client import Counter, Histogram

Provider = Literal["twilio", "google_calendar", "airtable", "deepgram", "openai", "webhook", "storage"]
ErrorKind = Literal["timeout", "rate_limited", "unavailable", "auth", "rejected", "connection", "other"]

PROVIDER_REQUESTS = Counter(
    "voicebook_provider_requests_total",
    "Requests to providers by provider, operation and outcome (ok, error).",
    ["provider", "operation", "outcome"],
)
PROVIDER_ERRORS = Counter(
    "voicebook_provider_errors_total",
    "Failed provider requests, and streams that failed once open, by provider and kind (timeout, "
    "rate_limited, unavailable, auth, rejected, connection, other).",
    ["provider", "kind"],
)
PROVIDER_REQUEST_SECONDS = Histogram(
    "voicebook_provider_request_seconds",
    "Time one provider request took, answer or error, by provider and operation.",
    ["provider", "operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
)

_tracer = trace.get_tracer("voicebook.providers")

# Adapters' own codes for an error they raise without a readable cause (EffectFailed.code).
_KIND_OF_CODE: dict[str, ErrorKind] = {
    "rate_limited": "rate_limited",
    "unauthorized": "auth",
    "calendar_auth_failed": "auth",
    "unreachable": "connection",
    "calendar_unreachable": "connection",
    "outcome_unknown": "timeout",  # the request went out and no answer came
}
# Errors of SDKs this module does not import, known by a class name in their hierarchy.
_CONNECTION_CLASSES = frozenset(
    {"APIConnectionError", "TransportError", "WebSocketException", "HttpLib2Error", "EndpointConnectionError"}
)
_AUTH_CLASSES = frozenset({"RefreshError", "NoCredentialsError", "CredentialRetrievalError"})

# Google APIs answer a usage limit with 403 (not only with 429) and one of these reasons in the body:
# a rate limit, not an authorisation failure. The per-minute limits pass within a minute, so a request
# refused by one is worth retrying; the daily quota and Calendar's own usage limits (``quotaExceeded``:
# too many events or invitations) do not pass that soon. google_calendar.py retries on the first set.
GOOGLE_RATE_LIMIT_REASONS: Final = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
GOOGLE_USAGE_LIMIT_REASONS: Final = GOOGLE_RATE_LIMIT_REASONS | {"dailyLimitExceeded", "quotaExceeded"}


def google_error_reasons(error: BaseException) -> list[str]:
    """The ``reason`` of each item of a Google API error body (``{"error": {"errors": [{"reason": ...}]}}``),
    read from the error's ``content`` (googleapiclient's ``HttpError`` keeps the body there); empty when
    the error has no such body."""
    try:
        payload = json.loads(getattr(error, "content", b""))
        return [str(item.get("reason")) for item in payload["error"]["errors"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def _status_of(error: BaseException) -> int | None:
    """The HTTP status a provider answered, wherever the SDK keeps it: ``status_code`` (openai, deepgram,
    googleapiclient), ``status`` (twilio), ``response.status_code`` (requests, httpx), or botocore's
    ``response["ResponseMetadata"]["HTTPStatusCode"]``."""
    for candidate in (getattr(error, "status_code", None), getattr(error, "status", None)):
        if isinstance(candidate, int) and not isinstance(candidate, bool) and candidate >= 100:
            return candidate
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and status >= 100:
        return status
    if isinstance(response, dict):
        metadata = response.get("ResponseMetadata")
        status = metadata.get("HTTPStatusCode") if isinstance(metadata, dict) else None
        if isinstance(status, int) and status >= 100:
            return status
    return None


def _kind_of_status(status: int, error: BaseException) -> ErrorKind:
    if status == 408:
        return "timeout"
    if status == 429:
        return "rate_limited"
    if status == 403 and GOOGLE_USAGE_LIMIT_REASONS.intersection(google_error_reasons(error)):
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status >= 500:
        return "unavailable"
    return "rejected"


def _raw_kind(error: BaseException) -> ErrorKind | None:
    """The kind when ``error`` itself says it (a timeout, a status, a connection), else None."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if isinstance(error, TimeoutError) or any("Timeout" in name for name in names):
        return "timeout"  # before connections: SDKs' timeouts are often their connection errors' subclasses
    status = _status_of(error)
    if status is not None:
        return _kind_of_status(status, error)
    if names & _AUTH_CLASSES:
        return "auth"
    if isinstance(error, OSError) or names & _CONNECTION_CLASSES:
        return "connection"  # ConnectionError, requests' ConnectionError, refused or reset sockets
    return None


def classify_error(error: BaseException) -> ErrorKind:
    """The kind of a failed request: what the raw error (``error`` or one of its causes) says first,
    then the adapter's own verdict on it."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        # ``raise ... from None`` cuts the chain: what was being handled then is not this error's cause.
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    for link in reversed(chain):  # the innermost cause is the provider's own answer
        kind = _raw_kind(link)
        if kind is not None:
            return kind
    for link in chain:
        code = getattr(link, "code", None)
        if isinstance(code, str) and code in _KIND_OF_CODE:
            return _KIND_OF_CODE[code]
        permanent = getattr(link, "permanent", None)
        transient = getattr(link, "transient", None)
        if isinstance(permanent, bool):
            return "rejected" if permanent else "unavailable"
        if isinstance(transient, bool):
            return "unavailable" if transient else "rejected"
    return "other"


@contextlib.contextmanager
def provider_request(
    provider: Provider, operation: str, *, ok_if: Callable[[BaseException], bool] | None = None
) -> Iterator[trace.Span]:
    """One request to ``provider``: timed, counted, classified on error, and traced. A plain context
    manager, so it serves coroutines (``with`` around an ``await``) and worker threads alike. ``ok_if``
    names errors that are an answer the adapter expects (a 404 on deleting what is already gone): those
    count as ``ok``. ``operation`` must come from a small fixed set: it is a label.

    >>> with provider_request("twilio", "calls.update"):
    ...     await asyncio.to_thread(update)  # doctest: +SKIP
    """
    span = _tracer.start_span(
        f"{provider} {operation}",
        attributes={"voicebook.provider": provider, "voicebook.provider.operation": operation},
        kind=trace.SpanKind.CLIENT,
    )
    started = time.perf_counter()
    outcome = "ok"
    try:
        yield span
    except BaseException as error:
        if not isinstance(error, Exception):  # CancelledError, GeneratorExit: the caller gave up, not the provider
            outcome = "cancelled"
        elif ok_if is None or not ok_if(error):
            outcome = "error"
            kind = classify_error(error)
            PROVIDER_ERRORS.labels(provider, kind).inc()
            span.set_attribute("voicebook.provider.error_kind", kind)
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR, f"{kind}: {type(error).__name__}")
        raise
    finally:
        span.set_attribute("voicebook.provider.outcome", outcome)
        if outcome != "cancelled":
            PROVIDER_REQUESTS.labels(provider, operation, outcome).inc()
            PROVIDER_REQUEST_SECONDS.labels(provider, operation).observe(time.perf_counter() - started)
        span.end()


P = ParamSpec("P")
T = TypeVar("T")


def provider_call(
    provider: Provider, operation: str
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """A decorator: every call of the decorated coroutine function is one :func:`provider_request`."""

    def decorate(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(function)
        async def measured(*args: P.args, **kwargs: P.kwargs) -> T:
            with provider_request(provider, operation):
                return await function(*args, **kwargs)

        return measured

    return decorate


async def provider_stream(provider: Provider, operation: str, stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """``stream`` unchanged, the whole of it one :func:`provider_request` (a streamed chat completion is
    one request, whatever its number of chunks). Closing this closes ``stream``."""
    with provider_request(provider, operation):
        try:
            async for item in stream:
                yield item
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()


def provider_stream_failed(provider: Provider, kind: ErrorKind) -> None:
    """Count a stream that failed after its handshake (a dropped socket, an error message in it) as an
    error of ``provider``. Only ``voicebook_provider_errors_total`` moves: the request, the handshake
    that :func:`provider_connect` counted, succeeded, and stays counted as ``ok``."""
    PROVIDER_ERRORS.labels(provider, kind).inc()


@contextlib.asynccontextmanager
async def provider_connect(
    provider: Provider, operation: str, connection: contextlib.AbstractAsyncContextManager[T]
) -> AsyncIterator[T]:
    """``async with connection``, opening it as one :func:`provider_request`: the request is the
    handshake (a live-transcription socket, a synthesis response's headers), not what flows after."""
    async with contextlib.AsyncExitStack() as stack:
        with provider_request(provider, operation):
            opened = await stack.enter_async_context(connection)
        yield opened


__all__ = [
    "GOOGLE_RATE_LIMIT_REASONS",
    "GOOGLE_USAGE_LIMIT_REASONS",
    "PROVIDER_ERRORS",
    "PROVIDER_REQUESTS",
    "PROVIDER_REQUEST_SECONDS",
    "ErrorKind",
    "Provider",
    "classify_error",
    "google_error_reasons",
    "provider_call",
    "provider_connect",
    "provider_request",
    "provider_stream",
    "provider_stream_failed",
]
