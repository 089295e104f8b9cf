"""Signed outbound webhooks: the signature format and its verifier (tampering, wrong or rotated secrets,
stale times, malformed headers), and the sender against a real receiver on loopback, with every kind of
answer translated into EffectFailed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from booking.errors import EffectFailed
from integrations.simulators.loopback import loopback_socket
from integrations.webhooks import (
    EVENT_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    WebhookSender,
    sign,
    verify,
)
from tests.conftest import serving

SECRET = b"whsec_test_0123456789abcdef"
OLD_SECRET = b"whsec_old_fedcba9876543210"
T = 1_764_511_200
BODY = b'{"event":"call.trigger_fired","call":{"call_sid":"CA1"}}'
PAYLOAD: dict[str, Any] = {
    "event": "call.trigger_fired",
    "summary": "A caller complained.",
    "lead_score": {"points": 0},
}
KEY = "CA" + "7" * 32 + ":trigger:needs-attention:v1:webhook"


# -- signing and verifying -------------------------------------------------------------------------


def test_the_signature_format() -> None:
    expected = hmac.new(SECRET, f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, T, BODY) == f"t={T},v1={expected}"
    assert verify(SECRET, sign(SECRET, T, BODY), BODY, now=T)


def test_a_changed_body_or_another_secret_is_refused() -> None:
    header = sign(SECRET, T, BODY)
    assert not verify(SECRET, header, BODY.replace(b"CA1", b"CA2"), now=T)
    assert not verify(SECRET, header, BODY + b" ", now=T)
    assert not verify(b"another-secret", header, BODY, now=T)
    assert not verify(SECRET, header.replace(f"t={T}", f"t={T + 1}"), BODY, now=T)  # the time is signed too


def test_stale_and_future_times_are_refused() -> None:
    header = sign(SECRET, T, BODY)
    assert verify(SECRET, header, BODY, now=T + 300)
    assert verify(SECRET, header, BODY, now=T - 300)
    assert not verify(SECRET, header, BODY, now=T + 301)
    assert not verify(SECRET, header, BODY, now=T - 301)
    assert verify(SECRET, header, BODY, now=T + 3000, tolerance=3600)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        f"v1={'0' * 64}",  # no time
        f"t={T}",  # no signature
        f"t={T},t={T},v1={'0' * 64}",
        f"t=soon,v1={'0' * 64}",
        f"t=-{T},v1={'0' * 64}",
        f"t={T},v1=abc",
        f"t={T},v1={'g' * 64}",
        f"t={T},v1",
        f"t={T}," + ",".join([f"v1={'0' * 64}"] * 40),  # longer than any header of ours
    ],
)
def test_malformed_headers_are_refused(header: str | None) -> None:
    assert not verify(SECRET, header, BODY, now=T)


def test_a_long_valid_looking_header_with_the_right_signature_is_still_refused() -> None:
    good = sign(SECRET, T, BODY)
    assert not verify(SECRET, good + "," + ",".join([f"v0={'0' * 64}"] * 40), BODY, now=T)
    assert verify(SECRET, good + f",v0={'0' * 64}", BODY, now=T)  # an unknown scheme is ignored


def test_rotating_secrets() -> None:
    both = sign([OLD_SECRET, SECRET], T, BODY)
    assert both.count("v1=") == 2
    assert verify(SECRET, both, BODY, now=T)  # a receiver already on the new secret
    assert verify(OLD_SECRET, both, BODY, now=T)  # a receiver still on the old one
    assert verify([OLD_SECRET, SECRET], sign(SECRET, T, BODY), BODY, now=T)  # a receiver accepting either
    assert not verify(b"neither", both, BODY, now=T)
    with pytest.raises(ValueError, match="non-empty"):
        sign(b"", T, BODY)
    with pytest.raises(ValueError, match="non-empty"):
        verify([], both, BODY, now=T)


# -- the sender against a real receiver ------------------------------------------------------------


@dataclass
class Receiver:
    """A business's webhook endpoint: it verifies every request with :func:`verify` and keeps it."""

    secrets: list[bytes] = field(default_factory=lambda: [SECRET])
    received: list[tuple[Request, bytes, bool]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            ok = verify(self.secrets, request.headers.get(SIGNATURE_HEADER), body, now=time.time())
            self.received.append((request, body, ok))
            return Response(status_code=204 if ok else 401, content=b"" if ok else b"bad signature")

        async def status(request: Request) -> Response:
            await request.body()
            headers = (
                {"Retry-After": request.query_params["retry_after"]} if "retry_after" in request.query_params else {}
            )
            return Response(b"no", status_code=int(request.path_params["code"]), headers=headers)

        async def moved(request: Request) -> Response:
            return RedirectResponse("/hook", status_code=307)

        async def slow(request: Request) -> Response:
            await self.release.wait()
            return Response(status_code=204)

        routes = [
            Route("/hook", hook, methods=["POST"]),
            Route("/status/{code:int}", status, methods=["POST"]),
            Route("/moved", moved, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
        ]
        return Starlette(routes=routes)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    state = Receiver()
    async with serving(state.app(), lifespan="off") as url:
        try:
            yield state, url
        finally:
            state.release.set()  # let a held request finish so the server can stop


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def failure(sender: WebhookSender, url: str) -> EffectFailed:
    with pytest.raises(EffectFailed) as caught:
        await sender.send(url, PAYLOAD, event="call.trigger_fired", idempotency_key=KEY)
    assert caught.value.context["idempotency_key"] == KEY
    return caught.value


async def test_a_signed_delivery(receiver: tuple[Receiver, str], http: httpx.AsyncClient) -> None:
    state, url = receiver
    delivery = await WebhookSender(http, secret=SECRET).send(
        f"{url}/hook", PAYLOAD, event="call.trigger_fired", idempotency_key=KEY
    )
    assert delivery.status == 204
    [(request, body, ok)] = state.received
    assert ok
    assert orjson.loads(body) == PAYLOAD
    assert request.headers["content-type"] == "application/json"
    assert request.headers[EVENT_HEADER] == "call.trigger_fired"
    assert request.headers[IDEMPOTENCY_HEADER] == KEY
    assert request.headers[SIGNATURE_HEADER].startswith(f"t={delivery.signed_at},v1=")


async def test_a_sender_rotating_its_secret_is_accepted_by_either_receiver(
    receiver: tuple[Receiver, str], http: httpx.AsyncClient
) -> None:
    state, url = receiver
    sender = WebhookSender(http, secret=[OLD_SECRET, SECRET])
    for secrets in ([SECRET], [OLD_SECRET]):
        state.secrets = secrets
        assert (await sender.send(f"{url}/hook", PAYLOAD, event="e", idempotency_key=KEY)).status == 204
    assert [ok for _, _, ok in state.received] == [True, True]


async def test_a_wrong_secret_is_refused_for_good(receiver: tuple[Receiver, str], http: httpx.AsyncClient) -> None:
    state, url = receiver
    error = await failure(WebhookSender(http, secret=b"not-the-shared-secret"), f"{url}/hook")
    assert (error.permanent, error.code) == (True, "unauthorized")
    assert "HTTP 401" in error.detail and "bad signature" in error.detail
    assert [ok for _, _, ok in state.received] == [False]


async def test_a_stale_signature_is_refused(receiver: tuple[Receiver, str], http: httpx.AsyncClient) -> None:
    state, url = receiver
    sender = WebhookSender(http, secret=SECRET, clock=lambda: time.time() - 3600)  # a clock an hour behind
    error = await failure(sender, f"{url}/hook")
    assert (error.permanent, error.code) == (True, "unauthorized")
    [(request, body, ok)] = state.received
    assert not ok
    assert verify(SECRET, request.headers[SIGNATURE_HEADER], body, now=time.time() - 3600)  # signed, only old


@pytest.mark.parametrize(
    ("path", "permanent", "retry_after", "code"),
    [
        ("/status/500", False, None, "receiver_busy"),
        ("/status/503?retry_after=30", False, 30.0, "receiver_busy"),
        ("/status/429?retry_after=7", False, 7.0, "receiver_busy"),
        ("/status/408", False, None, "receiver_busy"),
        ("/status/410", True, None, "rejected"),
        ("/status/400", True, None, "rejected"),
        ("/status/403", True, None, "unauthorized"),
        ("/moved", True, None, "redirected"),
    ],
)
async def test_answers_are_transient_or_permanent(
    receiver: tuple[Receiver, str],
    http: httpx.AsyncClient,
    path: str,
    permanent: bool,
    retry_after: float | None,
    code: str,
) -> None:
    state, url = receiver
    error = await failure(WebhookSender(http, secret=SECRET), url + path)
    assert (error.permanent, error.retry_after, error.code) == (permanent, retry_after, code)
    assert state.received == []  # a redirect is not followed


async def test_a_refused_connection_is_transient(http: httpx.AsyncClient) -> None:
    closed = loopback_socket()
    port = closed.getsockname()[1]
    closed.close()  # bound, never listening, now closed: connecting is refused
    error = await failure(WebhookSender(http, secret=SECRET), f"http://127.0.0.1:{port}/hook")
    assert (error.permanent, error.code) == (False, "unreachable")


async def test_no_answer_in_time_is_transient_and_may_have_arrived(
    receiver: tuple[Receiver, str], http: httpx.AsyncClient
) -> None:
    _, url = receiver
    # The receiver holds the request until the test ends, so the read timeout is the only way out.
    sender = WebhookSender(http, secret=SECRET, timeout=httpx.Timeout(5.0, read=0.2))
    error = await failure(sender, f"{url}/slow")
    assert (error.permanent, error.code) == (False, "outcome_unknown")


@pytest.mark.parametrize(
    "url", ["ftp://crm.example.com/in", "file:///etc/passwd", "http:///no-host", "crm.example.com/in", "http://h:0/"]
)
async def test_only_http_urls_are_posted_to(http: httpx.AsyncClient, url: str) -> None:
    error = await failure(WebhookSender(http, secret=SECRET), url)
    assert (error.permanent, error.code) == (True, "invalid_url")


async def test_the_secret_is_required(http: httpx.AsyncClient) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        WebhookSender(http, secret=b"")
