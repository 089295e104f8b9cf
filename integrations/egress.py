"""Outbound HTTP only to the providers we were configured with, and never where a redirect points.

A stolen API key is worth less if the process holding it cannot be talked into sending it somewhere
else: a crafted ``Location`` header, a webhook URL edited to an internal address, an SDK default that
follows redirects across hosts. So every outbound HTTP client voicebook builds goes through one gate:

- the request's host must be on the :class:`Allowlist`, built at start-up from configuration (the
  providers' default hosts, or the hosts of their configured base URLs, and the business's webhook
  targets); anything else raises :class:`EgressRefused` before a byte is sent;
- a redirect answer (3xx with a ``Location``) is never followed: it raises :class:`EgressRefused` too,
  whatever the client or SDK was told about redirects. None of our providers redirects an API call, and a
  webhook receiver that moved must be reconfigured by a person.

One gate per client kind, each applied where the client is built:

- httpx (Deepgram's REST, outbound webhooks): :func:`httpx_transport` wraps the transport; the OpenAI SDK
  sends with ``httpx2`` (a fork with the same API), whose client :func:`httpx2_client` builds the same way;
- requests (twilio's ``TwilioHttpClient``, pyairtable's ``Api``): :func:`guard_session` wraps every
  adapter mounted on the session (so call it after mounting your own) and sets ``max_redirects = 0``;
- httplib2 (the Google API client): :class:`GuardedHttp`, an ``httplib2.Http`` that checks each request
  and has ``follow_redirects`` off;
- botocore (the S3 archive): :func:`guard_botocore` registers a ``before-send`` hook that checks every
  request botocore is about to send, its own re-sends included (S3's region redirects are re-sends to
  another host, so they meet the same check);
- websockets (the Deepgram SDK's live sockets): the SDK dials with websockets' legacy client, which
  follows up to ten redirects to any host; :class:`RedirectRefusingConnect` is that client refusing the
  first. The host is checked by the SDK's adapter before it dials (``integrations.deepgram_stt``).

Hosts are compared by name only (lower-cased, no port): the simulators all listen on 127.0.0.1 on ports
picked at run time, and a port does not make a host more or less trusted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httplib2  # type: ignore[import-untyped]  # ships no type information
import httpx
import httpx2
import requests
import structlog
from requests.adapters import BaseAdapter

from integrations.http_pool import unbound_on_close

with warnings.catch_warnings():
    # Deprecated since websockets 14, and still what the deepgram SDK dials with (see deepgram_stt).
    warnings.simplefilter("ignore", DeprecationWarning)
    from websockets.legacy.client import Connect as LegacyConnect

log = structlog.get_logger("voicebook.egress")

TWILIO_HOSTS = ("api.twilio.com",)
DEEPGRAM_HOSTS = ("api.deepgram.com",)
OPENAI_HOSTS = ("api.openai.com",)
AIRTABLE_HOSTS = ("api.airtable.com",)
GOOGLE_HOSTS = ("www.googleapis.com", "oauth2.googleapis.com", "accounts.google.com")
"""The Calendar API, and the token endpoints of service accounts and OAuth grants."""


class EgressRefused(Exception):
    """An outbound request was not sent (``redirect`` False: its host is not allowed) or a redirect was not
    followed (``redirect`` True). Never a transient failure: retrying cannot change the answer."""

    def __init__(self, message: str, *, host: str, redirect: bool) -> None:
        super().__init__(message)
        self.host = host
        self.redirect = redirect


def host_of(url: str) -> str:
    """The lower-cased host name of ``url`` (no port, no brackets); empty when it has none."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


@dataclass(frozen=True)
class Allowlist:
    """The hosts outbound requests may go to."""

    hosts: frozenset[str]

    @classmethod
    def of(cls, *groups: Iterable[str]) -> Allowlist:
        """Hosts, or URLs whose hosts are meant (``https://api.example.com/v1`` -> ``api.example.com``)."""
        hosts: set[str] = set()
        for group in groups:
            for entry in group:
                host = host_of(entry) if "://" in entry else entry.strip().lower()
                if host:
                    hosts.add(host)
        return cls(frozenset(hosts))

    def __or__(self, other: Allowlist) -> Allowlist:
        return Allowlist(self.hosts | other.hosts)

    def check(self, url: str) -> None:
        """Raise :class:`EgressRefused` unless ``url``'s host is allowed."""
        host = host_of(url)
        if host not in self.hosts:
            log.error("egress_refused", host=host, reason="host not allowed")
            raise EgressRefused(
                f"outbound request to {host or url[:40]!r} refused: the host is not a configured provider "
                "(see docs/operations.md, Webhook hardening and secrets)",
                host=host,
                redirect=False,
            )

    def refuse_redirect(self, url: str, status: int | None, location: str | None) -> None:
        """Raise :class:`EgressRefused` for a redirect answer from ``url`` to ``location`` (``status`` None:
        the client did not say which)."""
        target = host_of(location or "") or "the same host"
        host = host_of(url)
        log.error("egress_redirect_refused", host=host, status=status, to_host=target)
        answer = f"HTTP {status} redirect" if status is not None else "Redirect"
        raise EgressRefused(
            f"{answer} from {host!r} to {target!r} not followed: outbound requests never follow redirects",
            host=host,
            redirect=True,
        )


def _is_redirect(status: int, location: str | None) -> bool:
    return 300 <= status < 400 and bool(location)


# -- httpx -------------------------------------------------------------------------------------------


async def _send_guarded(inner: Any, allow: Allowlist, request: Any) -> Any:
    """One request through ``inner`` (an httpx or httpx2 transport: the fork keeps httpx's API): the host
    checked before sending, a redirect answer refused after."""
    allow.check(str(request.url))
    response = await inner.handle_async_request(request)
    location = response.headers.get("location")
    if _is_redirect(response.status_code, location):
        await response.aclose()
        allow.refuse_redirect(str(request.url), response.status_code, location)
    return response


class _GuardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, allow: Allowlist) -> None:
        self._inner = inner
        self._allow = allow

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response: httpx.Response = await _send_guarded(self._inner, self._allow, request)
        return unbound_on_close(response)  # freed once closed, not by the cycle collector (http_pool)

    async def aclose(self) -> None:
        await self._inner.aclose()


def httpx_transport(
    allow: Allowlist, inner: httpx.AsyncBaseTransport | None = None, **options: Any
) -> httpx.AsyncBaseTransport:
    """A transport for ``httpx.AsyncClient(transport=...)`` that sends only to ``allow`` and refuses every
    redirect. ``inner`` is the transport that does the sending (default: ``httpx.AsyncHTTPTransport(**options)``,
    where the client's ``limits`` belong, since a client given a transport ignores its own)."""
    return _GuardedTransport(inner if inner is not None else httpx.AsyncHTTPTransport(**options), allow)


def httpx_client(allow: Allowlist, **options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` behind the gate; ``limits`` go to its transport, the rest to the client."""
    transport_options = {key: options.pop(key) for key in ("limits",) if key in options}
    return httpx.AsyncClient(transport=httpx_transport(allow, **transport_options), follow_redirects=False, **options)


class _GuardedTransport2(httpx2.AsyncBaseTransport):
    """:class:`_GuardedTransport` for ``httpx2``, the httpx fork the OpenAI SDK sends with."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, allow: Allowlist) -> None:
        self._inner = inner
        self._allow = allow

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response: httpx2.Response = await _send_guarded(self._inner, self._allow, request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def httpx2_client(allow: Allowlist, **options: Any) -> httpx2.AsyncClient:
    """:func:`httpx_client` for the OpenAI SDK (``AsyncOpenAI(http_client=...)``)."""
    transport_options = {key: options.pop(key) for key in ("limits",) if key in options}
    transport = _GuardedTransport2(httpx2.AsyncHTTPTransport(**transport_options), allow)
    return httpx2.AsyncClient(transport=transport, follow_redirects=False, **options)


# -- requests ----------------------------------------------------------------------------------------


class _GuardedAdapter(BaseAdapter):
    def __init__(self, inner: BaseAdapter, allow: Allowlist) -> None:
        super().__init__()
        self.inner = inner
        self._allow = allow

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self._allow.check(request.url or "")
        response: requests.Response = self.inner.send(request, *args, **kwargs)
        location = response.headers.get("location")
        if _is_redirect(response.status_code, location):
            response.close()
            self._allow.refuse_redirect(request.url or "", response.status_code, location)
        return response

    def close(self) -> None:
        self.inner.close()


def guard_session(session: requests.Session, allow: Allowlist) -> requests.Session:
    """Put every adapter mounted on ``session`` behind the gate (call it after mounting your own) and turn
    redirects off. Returns the session."""
    for prefix, adapter in list(session.adapters.items()):
        if not isinstance(adapter, _GuardedAdapter):
            session.mount(prefix, _GuardedAdapter(adapter, allow))
    session.max_redirects = 0
    return session


# -- httplib2 ----------------------------------------------------------------------------------------


class GuardedHttp(httplib2.Http):  # type: ignore[misc]  # httplib2 ships no type information
    """``httplib2.Http`` that sends only to ``allow`` and never follows a redirect (google-auth refreshes
    its token through the same object, so the token endpoint is checked too)."""

    def __init__(self, allow: Allowlist, **options: Any) -> None:
        super().__init__(**options)
        self.follow_redirects = False
        self._allow = allow

    def request(self, uri: str, *args: Any, **kwargs: Any) -> tuple[Any, bytes]:
        self._allow.check(uri)
        response, content = super().request(uri, *args, **kwargs)
        location = response.get("location")
        if _is_redirect(int(response.status), location):
            self._allow.refuse_redirect(uri, int(response.status), location)
        return response, content


# -- botocore ----------------------------------------------------------------------------------------


def guard_botocore(client: Any, allow: Allowlist) -> None:
    """Check every request ``client`` (a boto3/botocore client) sends against ``allow``: a refused one
    raises :class:`EgressRefused` from the client's call, before a connection is made, and is not retried
    (botocore retries only its own errors)."""

    def check(request: Any, **_: Any) -> None:
        allow.check(str(request.url))

    client.meta.events.register("before-send", check)


# -- websockets (legacy client) ------------------------------------------------------------------------


class RedirectRefusingConnect(LegacyConnect):
    """websockets' legacy ``connect`` that raises :class:`EgressRefused` at a redirect answer to the
    handshake instead of dialling where it points (the stock one follows up to ten, to any host)."""

    def handle_redirect(self, uri: str) -> None:
        Allowlist(frozenset()).refuse_redirect(self._uri, None, uri)
