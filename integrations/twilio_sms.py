"""Text messages through Twilio's Messages API (twilio's own client), with Twilio's answers translated
into :class:`~booking.errors.EffectFailed`, the only error the rest of voicebook sees from here.

Idempotency. Twilio's Messages API takes no idempotency key: a request that reached Twilio but whose
answer was lost (a timeout, a crash before the outbox recorded the SID) cannot be told apart from one
that never arrived, and resending may text the customer twice. This adapter stays free of storage and
does two things about it:

* the effect's ``idempotency_key`` rides in the status callback URL (``...?effect=<key>``), so every
  delivery receipt names the effect that caused it even when its SID was never recorded; the callback
  handler can mark the effect done from the receipt, and a retry can first check for one;
* a timeout after the request was sent is reported with code ``"outcome_unknown"`` (transient), distinct
  from a refused connection (``"unreachable"``, safe to retry at once). The outbox decides whether to
  wait for a receipt before resending.

The remaining window (the request landed, no receipt yet, the worker died) is narrowed, not closed, by
the outbox writing a "sending" mark for the key just before :meth:`TwilioSMS.send` and the SID right after.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import structlog
from requests.adapters import HTTPAdapter
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from booking.errors import EffectFailed
from booking.messages import MAX_BODY_CHARS, segments
from integrations.egress import Allowlist, guard_session
from integrations.http_headers import retry_after
from integrations.metrics import provider_request

log = structlog.get_logger("voicebook.twilio_sms")
T = TypeVar("T")

OPTED_OUT = 21610
INVALID_NUMBERS = frozenset({21211, 21614})
TOO_MANY_REQUESTS = 20429
EFFECT_PARAM = "effect"
"""Query parameter of the status callback URL that carries the effect's idempotency key."""
_FIND_PAGE = 20
"""Messages read back when looking for one a lost answer may have sent (newest first)."""
DEFAULT_THREADS = 32
"""Requests in flight at once: at least the effect worker's concurrency, so no send waits for a thread
where the worker cannot see it (measured in ``load_tests/bench_effects.py``). Threads start on demand."""


@dataclass(frozen=True, slots=True)
class SentMessage:
    sid: str
    status: str
    segments: int = 1


class SenderRateLimiter:
    """A token bucket per sending number: ``burst`` messages may go at once, then ``rate_per_second``.

    Carriers filter a long code that sends faster than about one message a second, and Twilio queues
    (then drops) what exceeds the account's rate, so the adapter smooths bursts here instead. A caller
    takes its token at once and sleeps off any debt, so concurrent callers are served in arrival order
    without a lock; a caller cancelled while waiting gives its token back.

    ``clock`` (seconds, monotonic) and ``sleep`` are injectable so tests run on virtual time.
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if rate_per_second <= 0 or burst < 1:
            raise ValueError(f"rate_per_second must be > 0 and burst >= 1, not {rate_per_second} and {burst}")
        self.rate = rate_per_second
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated = clock()

    async def acquire(self) -> float:
        """Wait for a token; returns the seconds waited (0.0 within the burst)."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        wait = -self._tokens / self.rate
        try:
            await self._sleep(wait)
        except asyncio.CancelledError:
            self._tokens += 1.0
            raise
        return wait


class _ResponseHeaders:
    """The headers of the last response seen by each worker thread. TwilioRestException drops them, yet
    a 429's Retry-After is what says when to try again. Thread-local because sends run concurrently in
    threads of the adapter's pool that share one client."""

    def __init__(self) -> None:
        self._local = threading.local()

    def hook(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        self._local.headers = dict(response.headers)
        return response

    def clear(self) -> None:
        self._local.headers = {}

    def last(self) -> Mapping[str, str]:
        headers: Mapping[str, str] = getattr(self._local, "headers", {})
        return headers


class TwilioSMS:
    """Send one text message. Exactly one of ``messaging_service_sid`` (Twilio picks the number) and
    ``from_number`` is required. ``status_callback_url`` receives signed delivery receipts. twilio's
    client blocks, so each request runs on one of ``threads`` threads of the adapter's own (not the
    event loop's default pool, which other blocking work shares); :meth:`close` them at shutdown."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        messaging_service_sid: str | None = None,
        from_number: str | None = None,
        status_callback_url: str | None = None,
        api_base_url: str | None = None,
        timeout: float = 15.0,
        rate_limiter: SenderRateLimiter | None = None,
        warn_above_segments: int = 3,
        threads: int = DEFAULT_THREADS,
        egress: Allowlist | None = None,
    ) -> None:
        if (messaging_service_sid is None) == (from_number is None):
            raise ValueError("give exactly one of messaging_service_sid and from_number")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="twilio-sms")
        self._headers = _ResponseHeaders()
        http_client = TwilioHttpClient(timeout=timeout, request_hooks={"response": [self._headers.hook]})
        if http_client.session is not None:
            # One kept-alive connection per thread: twilio's own pool keeps 6 (cpus + 4 here), and every
            # request beyond that would open, and then drop, a TLS connection of its own.
            for scheme in ("https://", "http://"):
                http_client.session.mount(scheme, HTTPAdapter(pool_maxsize=threads))
            if egress is not None:  # after mounting: the gate wraps the adapters in place
                guard_session(http_client.session, egress)
        self._client = Client(account_sid, auth_token, http_client=http_client)
        if api_base_url is not None:
            self._client.api.base_url = api_base_url.rstrip("/")
        self._messaging_service_sid = messaging_service_sid
        self._from_number = from_number
        self._status_callback_url = status_callback_url
        self._rate_limiter = rate_limiter
        self._warn_above_segments = warn_above_segments

    def close(self) -> None:
        """Let the requests in flight finish on their threads, which then exit; later sends fail
        (transient). Does not block the event loop."""
        self._executor.shutdown(wait=False)

    async def _in_thread(self, work: Callable[[], T]) -> T:
        # As asyncio.to_thread does, but on this adapter's threads: the request sees the caller's context.
        call = functools.partial(contextvars.copy_context().run, work)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    @property
    def rate_limiter(self) -> SenderRateLimiter | None:
        return self._rate_limiter

    def callback_url_for(self, idempotency_key: str) -> str | None:
        if self._status_callback_url is None:
            return None
        scheme, netloc, path, query, fragment = urlsplit(self._status_callback_url)
        pairs = [(name, value) for name, value in parse_qsl(query) if name != EFFECT_PARAM]
        pairs.append((EFFECT_PARAM, idempotency_key))
        return urlunsplit((scheme, netloc, path, urlencode(pairs), fragment))

    async def send(
        self,
        to: str,
        body: str,
        *,
        idempotency_key: str,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
    ) -> SentMessage:
        """Text ``body`` to ``to`` from the configured sender, or from ``from_number`` (a booking's line)
        when given. ``messaging_service_sid`` goes with ``from_number``: the Messaging Service whose
        sender pool holds that number (None: it is in none). Every send takes its token from the one
        rate limiter, whichever number it goes from: stricter than a bucket per number, never looser."""
        if messaging_service_sid is not None and from_number is None:
            raise ValueError("messaging_service_sid overrides the sender only together with from_number")
        count = segments(body)
        if not body.strip() or count.characters > MAX_BODY_CHARS:
            raise EffectFailed(
                f"an SMS body must have 1 to {MAX_BODY_CHARS} characters, not {count.characters}",
                permanent=True,
                code="invalid_body",
                idempotency_key=idempotency_key,
            )
        if count.segments > self._warn_above_segments:
            log.warning("sms.many_segments", segments=count.segments, encoding=count.encoding, key=idempotency_key)
        if self._rate_limiter is not None:
            await self._rate_limiter.acquire()
        arguments: dict[str, Any] = {"to": to, "body": body}
        if from_number is not None:
            arguments["from_"] = from_number
            if messaging_service_sid is not None:
                # Twilio's Messages API takes a MessagingServiceSid "instead of or in addition to a
                # specific 'From'" (https://www.twilio.com/docs/errors/21603); with both, "you can
                # provide a specific sender from your Sender Pool" (twilio's MessageList.create,
                # ``from_`` and ``messaging_service_sid``): this number sends, and the message belongs
                # to the service, so its features (Advanced Opt-Out, its A2P campaign) still apply.
                # Our StatusCallback below is used "instead of the Status Callback URL of the Messaging
                # Service" (``status_callback``), as for every send here. A From outside the pool draws
                # 21711 (https://www.twilio.com/docs/errors/21711), hence the number's own service.
                arguments["messaging_service_sid"] = messaging_service_sid
        elif self._messaging_service_sid is not None:
            arguments["messaging_service_sid"] = self._messaging_service_sid
        else:
            arguments["from_"] = self._from_number
        callback = self.callback_url_for(idempotency_key)
        if callback is not None:
            arguments["status_callback"] = callback

        def create() -> tuple[Any, Mapping[str, str]]:
            self._headers.clear()
            try:
                with provider_request("twilio", "messages.create"):
                    return self._client.messages.create(**arguments), {}
            except (TwilioRestException, TwilioServiceException) as error:
                return error, self._headers.last()

        try:
            result, headers = await self._in_thread(create)
        except requests.Timeout as error:
            if isinstance(error, requests.ConnectTimeout):  # never connected: nothing was sent
                raise EffectFailed(
                    f"Twilio could not be reached: {error}",
                    permanent=False,
                    code="unreachable",
                    idempotency_key=idempotency_key,
                ) from error
            raise EffectFailed(
                f"Twilio did not answer in time; the message may have been sent: {error}",
                permanent=False,
                code="outcome_unknown",
                idempotency_key=idempotency_key,
            ) from error
        except OSError as error:  # requests' ConnectionError and the rest of RequestException
            raise EffectFailed(
                f"Twilio could not be reached: {error}",
                permanent=False,
                code="unreachable",
                idempotency_key=idempotency_key,
            ) from error
        if isinstance(result, TwilioRestException | TwilioServiceException):
            raise _translate(result, headers, idempotency_key) from result
        return SentMessage(sid=str(result.sid), status=str(result.status), segments=count.segments)

    async def find_sent(self, to: str, body: str, *, since: datetime) -> SentMessage | None:
        """The message with exactly this body that Twilio created for ``to`` at or after ``since`` (a
        minute of clock skew allowed), or None. Read before resending after an attempt whose outcome was
        lost: Twilio's list shows queued messages too, newest first, so a short page is enough."""
        earliest = since - timedelta(minutes=1)

        def search() -> tuple[Any, Mapping[str, str]]:
            self._headers.clear()
            try:
                with provider_request("twilio", "messages.list"):
                    return self._client.messages.list(to=to, limit=_FIND_PAGE), {}
            except TwilioException as error:  # a list page's failure is the base class, not a RestException
                return error, self._headers.last()

        try:
            result, headers = await self._in_thread(search)
        except OSError as error:  # requests' timeouts and connection errors
            raise EffectFailed(
                f"Twilio's message list could not be read: {error}", permanent=False, code="unreachable"
            ) from error
        if isinstance(result, TwilioException):
            # Reading the list is only a precaution: a refusal here is retried, never a dead letter.
            raise EffectFailed(
                f"Twilio's message list could not be read: {result}",
                permanent=False,
                retry_after=retry_after(headers),
                code="list_failed",
            )
        for message in result:
            created = message.date_created
            if message.body == body and (created is None or created >= earliest):
                return SentMessage(sid=str(message.sid), status=str(message.status), segments=segments(body).segments)
        return None


def _translate(
    error: TwilioRestException | TwilioServiceException, headers: Mapping[str, str], idempotency_key: str
) -> EffectFailed:
    status = int(error.status)
    code = int(error.code) if error.code is not None else None
    message = error.msg if isinstance(error, TwilioRestException) else (error.detail or error.title)
    detail = f"Twilio refused the message (HTTP {status}, error {code}): {message}"
    context: dict[str, Any] = {"idempotency_key": idempotency_key, "twilio_code": code}
    if code == OPTED_OUT:
        return EffectFailed(detail, permanent=True, code="opted_out", **context)
    if code in INVALID_NUMBERS:
        return EffectFailed(detail, permanent=True, code="invalid_number", **context)
    if status == 429 or code == TOO_MANY_REQUESTS:
        return EffectFailed(detail, permanent=False, retry_after=retry_after(headers), code="rate_limited", **context)
    if status >= 500:
        return EffectFailed(detail, permanent=False, retry_after=retry_after(headers), code="provider_error", **context)
    if status in (401, 403):
        return EffectFailed(detail, permanent=True, code="unauthorized", **context)
    return EffectFailed(detail, permanent=True, code="rejected", **context)
