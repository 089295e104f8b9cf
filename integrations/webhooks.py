"""Outbound webhooks: JSON posted to a business's own URL, signed with a shared secret so the receiver
can tell it came from voicebook and was not changed or replayed. The receiver's answers are translated
into :class:`~booking.errors.EffectFailed`, the only error the rest of voicebook sees from here.

The signature, in ``X-Voicebook-Signature``::

    t=1764511200,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd

``t`` is the Unix time of signing and each ``v1`` the hex HMAC-SHA256, under one secret, of
``f"{t}.".encode() + body`` (the exact bytes posted). While a secret is being rotated the sender signs
with both and sends two ``v1`` values; a receiver accepts the request when any of them matches any of its
secrets. Signing the time stops an old request being replayed once it is older than the receiver's
tolerance; every attempt is signed afresh, so a retry is never stale. The ``Idempotency-Key`` is the same
on every attempt of one effect: a receiver that saw it already should answer 2xx and do nothing.

Answers: 2xx delivered; 408, 429 and 5xx transient (no sooner than ``Retry-After``); any other status
permanent, redirects included (they are not followed: the configured URL is the one that was approved).
A refused connection or a connect timeout is transient ``unreachable`` (nothing was sent); a timeout or
broken connection after the request went out is transient ``outcome_unknown`` (it may have arrived).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import httpx
import orjson

from booking.errors import EffectFailed
from integrations.egress import EgressRefused
from integrations.http_headers import retry_after
from integrations.metrics import provider_call

SIGNATURE_HEADER = "X-Voicebook-Signature"
EVENT_HEADER = "X-Voicebook-Event"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_SCHEME = "v1"
DEFAULT_TOLERANCE = 300
"""Seconds a signature stays acceptable either side of the receiver's clock."""
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
"""A receiver should answer at once and do its work later; ten seconds is generous."""
TRANSIENT_STATUSES = frozenset({408, 429})
_MAX_HEADER_CHARS = 2048  # a timestamp and a few signatures; anything longer is not ours
_DETAIL_BYTES = 200  # of the receiver's answer, quoted in a failure's detail
_HEX_DIGITS = frozenset("0123456789abcdef")

Secrets: TypeAlias = bytes | Sequence[bytes]
"""One secret, or several while rotating (sign with all, accept any)."""


def _secrets(secret: Secrets) -> tuple[bytes, ...]:
    keys = (secret,) if isinstance(secret, bytes) else tuple(secret)
    if not keys or not all(keys):
        raise ValueError("a webhook secret must be non-empty bytes")
    return keys


def _digest(key: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: Secrets, timestamp: int, body: bytes) -> str:
    """The ``X-Voicebook-Signature`` value for ``body`` signed at ``timestamp`` (Unix seconds): one
    ``v1`` per secret, in the order given."""
    signatures = ",".join(f"{SIGNATURE_SCHEME}={_digest(key, timestamp, body)}" for key in _secrets(secret))
    return f"t={timestamp},{signatures}"


def verify(
    secret: Secrets, header: str | None, body: bytes, *, now: float, tolerance: float = DEFAULT_TOLERANCE
) -> bool:
    """Whether ``header`` signs ``body`` under (any of) ``secret`` at a time within ``tolerance`` seconds
    of ``now``. A missing or malformed header is False, never an error; unknown schemes are ignored.
    The comparisons take the same time whether or not, and wherever, the signatures differ."""
    parsed = _parse(header)
    if parsed is None:
        return False
    timestamp, signatures = parsed
    if abs(now - timestamp) > tolerance:
        return False
    matched = False
    for key in _secrets(secret):
        expected = _digest(key, timestamp, body).encode()
        for candidate in signatures:
            matched |= hmac.compare_digest(expected, candidate)
    return matched


def _parse(header: str | None) -> tuple[int, list[bytes]] | None:
    """(timestamp, v1 signatures) from a header, or None if it is not one of ours."""
    if not header or len(header) > _MAX_HEADER_CHARS:
        return None
    timestamp: int | None = None
    signatures: list[bytes] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            return None
        if name == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                return None
            timestamp = int(value)
        elif name == SIGNATURE_SCHEME:
            if len(value) != 64 or not set(value) <= _HEX_DIGITS:
                return None
            signatures.append(value.encode())
    if timestamp is None or not signatures:
        return None
    return timestamp, signatures


@dataclass(frozen=True, slots=True)
class Delivery:
    """A webhook the receiver accepted."""

    status: int
    signed_at: int


class WebhookSender:
    """Posts signed JSON with a client the application owns (built and closed in its lifespan)::

        sender = WebhookSender(http, secret=settings.webhook_secret)
        await sender.send(url, payload, event="call.trigger_fired", idempotency_key=key)

    ``clock`` gives Unix seconds for the signature (tests move it); ``timeout`` bounds every attempt.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        secret: Secrets,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        user_agent: str = "voicebook-webhooks/1",
    ) -> None:
        self._http = http
        self._secrets = _secrets(secret)
        self._timeout = timeout
        self._clock = clock
        self._user_agent = user_agent

    @provider_call("webhook", "post")
    async def send(self, url: str, payload: Mapping[str, Any], *, event: str, idempotency_key: str) -> Delivery:
        """POST ``payload`` as JSON to ``url``; returns on a 2xx, raises EffectFailed otherwise."""
        context: dict[str, Any] = {"idempotency_key": idempotency_key, "event": event}
        if not _is_http_url(url):
            raise EffectFailed(
                f"a webhook URL must be http:// or https:// with a host, not {url!r}",
                permanent=True,
                code="invalid_url",
                **context,
            )
        body = orjson.dumps(payload)
        signed_at = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            SIGNATURE_HEADER: sign(self._secrets, signed_at, body),
            EVENT_HEADER: event,
            IDEMPOTENCY_HEADER: idempotency_key,
        }
        target = _redacted(url)
        try:
            request = self._http.build_request("POST", url, content=body, headers=headers, timeout=self._timeout)
            # Streamed so that only the start of a receiver's answer is ever read.
            response = await self._http.send(request, stream=True, follow_redirects=False)
            try:
                excerpt = await _excerpt(response)
            finally:
                await response.aclose()
        except EgressRefused as error:  # a host no trigger names, or a redirect: a person must look
            raise EffectFailed(
                f"webhook to {target} refused: {error}",
                permanent=True,
                code="redirected" if error.redirect else "host_not_allowed",
                **context,
            ) from error
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            raise EffectFailed(
                f"webhook receiver {target} could not be reached: {error!r}",
                permanent=False,
                code="unreachable",
                **context,
            ) from error
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as error:
            raise EffectFailed(
                f"webhook URL {target} is unusable: {error}", permanent=True, code="invalid_url", **context
            ) from error
        except httpx.TransportError as error:  # timeouts and broken connections after the request went out
            raise EffectFailed(
                f"webhook receiver {target} did not answer; it may have received the event: {error!r}",
                permanent=False,
                code="outcome_unknown",
                **context,
            ) from error
        status = response.status_code
        if response.is_success:
            return Delivery(status=status, signed_at=signed_at)
        detail = f"webhook receiver {target} answered HTTP {status}: {excerpt!r}"
        if status in TRANSIENT_STATUSES or status >= 500:
            raise EffectFailed(
                detail, permanent=False, retry_after=retry_after(response.headers), code="receiver_busy", **context
            )
        if response.is_redirect:
            raise EffectFailed(
                f"{detail}; redirects are not followed (to {response.headers.get('location')!r})",
                permanent=True,
                code="redirected",
                **context,
            )
        code = "unauthorized" if status in (401, 403) else "rejected"
        raise EffectFailed(detail, permanent=True, code=code, **context)


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        return False


def _redacted(url: str) -> str:
    """The URL for messages and logs: scheme, host and path, without credentials or query (which may
    carry a receiver's token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


async def _excerpt(response: httpx.Response) -> str:
    """The start of the receiver's answer; the status is what counts, so a body that fails to arrive is
    no failure of the delivery."""
    received = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            received += chunk
            if len(received) >= _DETAIL_BYTES:
                break
    except httpx.HTTPError:
        pass
    return bytes(received[:_DETAIL_BYTES]).decode("utf-8", errors="replace")
