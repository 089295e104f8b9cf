"""Outbound HTTP only to configured hosts, redirects never followed: each client kind (httpx, httpx2 for
OpenAI, requests for twilio and pyairtable, httplib2 for Google) against a real server on loopback, and
the allowlists the app builds from its settings."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from booking.business import load_business
from booking.errors import EffectFailed
from integrations import egress
from integrations.egress import Allowlist, EgressRefused, GuardedHttp, guard_session, httpx2_client, httpx_client
from integrations.twilio_rest import TwilioCallControl
from integrations.webhooks import WebhookSender
from tests.conftest import serving
from voice_server import egress_policy
from voice_server.effects import build_twilio_sms
from voice_server.settings import Settings

ACCOUNT_SID = "AC" + "1" * 32


@dataclasses.dataclass
class Server:
    base: str
    hits: list[str]

    @property
    def unlisted(self) -> str:
        """The same server under a name that is not on the allowlist."""
        return self.base.replace("127.0.0.1", "localhost")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    hits: list[str] = []

    async def ok(request: Request) -> Response:
        hits.append(request.url.path)
        return PlainTextResponse("ok")

    async def moved(request: Request) -> Response:
        hits.append(request.url.path)
        return RedirectResponse(f"{request.base_url}ok", status_code=302)

    async def elsewhere(request: Request) -> Response:  # an API call answered with a redirect
        hits.append(request.url.path)
        return RedirectResponse("https://evil.example/steal", status_code=307)

    app = Starlette(
        routes=[
            Route("/ok", ok, methods=["GET", "POST"]),
            Route("/moved", moved, methods=["GET", "POST"]),
            Route("/2010-04-01/Accounts/{account}/Calls/{call}.json", elsewhere, methods=["POST"]),
            Route("/v0/{rest:path}", elsewhere, methods=["GET", "POST", "PATCH"]),  # Airtable's API
        ]
    )
    async with serving(app, lifespan="off") as base:
        yield Server(base, hits)


def loopback() -> Allowlist:
    return Allowlist.of(["http://127.0.0.1:1"])


def test_the_allowlist_takes_hosts_and_urls_by_host_name_only() -> None:
    allow = Allowlist.of(["https://API.example.com:8443/v1"], ["plain.example"])
    assert allow.hosts == frozenset({"api.example.com", "plain.example"})
    allow.check("https://api.example.com/other/path")
    allow.check("http://plain.example:9999/")
    with pytest.raises(EgressRefused) as refused:
        allow.check("https://api.example.com.evil.example/")
    assert refused.value.host == "api.example.com.evil.example" and not refused.value.redirect
    with pytest.raises(EgressRefused):
        allow.check("not a url")


async def test_httpx_sends_to_listed_hosts_and_refuses_the_rest_and_every_redirect(server: Server) -> None:
    async with httpx_client(loopback()) as http:
        assert (await http.get(server.base + "/ok")).text == "ok"
        with pytest.raises(EgressRefused) as refused:
            await http.get(server.unlisted + "/ok")
        assert refused.value.host == "localhost" and not refused.value.redirect
        with pytest.raises(EgressRefused) as redirected:
            await http.get(server.base + "/moved", follow_redirects=True)  # even when asked to follow
        assert redirected.value.redirect
    assert server.hits == ["/ok", "/moved"]  # the unlisted host was never contacted


async def test_httpx2_for_openai_does_the_same(server: Server) -> None:
    async with httpx2_client(loopback()) as http:
        assert (await http.get(server.base + "/ok")).text == "ok"
        with pytest.raises(EgressRefused):
            await http.get(server.unlisted + "/ok")
        with pytest.raises(EgressRefused) as redirected:
            await http.get(server.base + "/moved", follow_redirects=True)
        assert redirected.value.redirect
    assert server.hits == ["/ok", "/moved"]


async def test_the_openai_sdk_sends_through_the_gate(server: Server) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        api_key="sk-test", base_url=server.unlisted + "/v1", max_retries=0, http_client=httpx2_client(loopback())
    )
    try:
        with pytest.raises(EgressRefused):  # the SDK passes it on as it is: not a connection error to retry
            await client.models.list()
    finally:
        await client.close()
    assert server.hits == []


async def test_requests_sessions_refuse_unlisted_hosts_and_redirects(server: Server) -> None:
    session = guard_session(requests.Session(), loopback())
    with session:
        assert (await asyncio.to_thread(session.get, server.base + "/ok")).text == "ok"
        with pytest.raises(EgressRefused):
            await asyncio.to_thread(session.get, server.unlisted + "/ok")
        with pytest.raises(EgressRefused) as redirected:
            await asyncio.to_thread(session.get, server.base + "/moved")  # requests follows by default
        assert redirected.value.redirect
    assert session.max_redirects == 0
    assert server.hits == ["/ok", "/moved"]


async def test_twilio_rest_calls_go_only_to_the_configured_api_and_never_follow_a_redirect(server: Server) -> None:
    unlisted = TwilioCallControl(ACCOUNT_SID, "0" * 32, api_base_url=server.unlisted, egress=loopback())
    with pytest.raises(EgressRefused):
        await unlisted.hangup("CA" + "2" * 32)
    assert server.hits == []
    listed = TwilioCallControl(ACCOUNT_SID, "0" * 32, api_base_url=server.base, egress=loopback())
    try:
        with pytest.raises(EgressRefused) as redirected:
            await listed.hangup("CA" + "2" * 32)
        assert redirected.value.redirect and len(server.hits) == 1
    finally:
        listed._client.http_client.session.close()  # TwilioHttpClient's own


async def test_the_airtable_client_is_gated(server: Server, redis_client: object) -> None:
    import redis.asyncio as aioredis

    from integrations.airtable import AirtableCRM, airtable_rate_limiter

    assert isinstance(redis_client, aioredis.Redis)
    crm = AirtableCRM(
        "patTest.0123456789",
        "app" + "A" * 14,
        airtable_rate_limiter(redis_client),
        endpoint_url=server.unlisted,
        egress=loopback(),
    )
    rows = [{"Phone": "+12125550100"}]
    try:
        with pytest.raises(EgressRefused):
            await crm.upsert("Contacts", "Phone", rows)
        assert server.hits == []
    finally:
        crm.close()
    moved = AirtableCRM(
        "patTest.0123456789",
        "app" + "A" * 14,
        airtable_rate_limiter(redis_client),
        endpoint_url=server.base,
        egress=loopback(),
    )
    try:
        with pytest.raises(EgressRefused) as redirected:
            await moved.upsert("Contacts", "Phone", rows)
        assert redirected.value.redirect
    finally:
        moved.close()
    assert len(server.hits) == 1 and server.hits[0].startswith("/v0/")


async def test_httplib2_for_google_refuses_unlisted_hosts_and_redirects(server: Server) -> None:
    http = GuardedHttp(loopback(), timeout=5)
    try:
        response, content = await asyncio.to_thread(http.request, server.base + "/ok")
        assert response.status == 200 and content == b"ok"
        with pytest.raises(EgressRefused):
            await asyncio.to_thread(http.request, server.unlisted + "/ok")
        with pytest.raises(EgressRefused) as redirected:
            await asyncio.to_thread(http.request, server.base + "/moved")
        assert redirected.value.redirect
    finally:
        http.close()
    assert server.hits == ["/ok", "/moved"]


async def test_webhooks_to_an_unlisted_host_or_a_redirect_fail_permanently(server: Server) -> None:
    async with httpx_client(loopback()) as http:
        sender = WebhookSender(http, secret=b"whsec_test_0123456789abcdef")
        assert (await sender.send(server.base + "/ok", {"a": 1}, event="e", idempotency_key="k")).status == 200
        with pytest.raises(EffectFailed) as refused:
            await sender.send(server.unlisted + "/ok", {"a": 1}, event="e", idempotency_key="k")
        assert refused.value.permanent and refused.value.code == "host_not_allowed"
        with pytest.raises(EffectFailed) as redirected:
            await sender.send(server.base + "/moved", {"a": 1}, event="e", idempotency_key="k")
        assert redirected.value.permanent and redirected.value.code == "redirected"


# -- the allowlists the app builds ---------------------------------------------------------------------


def test_each_provider_is_allowed_its_own_hosts_only() -> None:
    defaults = Settings()
    assert egress_policy.twilio(defaults).hosts == frozenset(egress.TWILIO_HOSTS)
    assert egress_policy.deepgram(defaults).hosts == frozenset(egress.DEEPGRAM_HOSTS)
    assert egress_policy.openai(defaults).hosts == frozenset(egress.OPENAI_HOSTS)
    assert egress_policy.airtable(defaults).hosts == frozenset(egress.AIRTABLE_HOSTS)
    assert egress_policy.google(defaults).hosts == frozenset(egress.GOOGLE_HOSTS)
    configured = Settings(
        twilio_api_base_url="http://127.0.0.1:8705",
        deepgram_base_url="http://127.0.0.2:8701",
        openai_base_url="http://127.0.0.3:8702/v1",
        airtable_api_url="http://127.0.0.4:8704",
        google_calendar_api_url="http://127.0.0.5:8703",
    )
    assert egress_policy.twilio(configured).hosts == frozenset({"127.0.0.1"})
    assert egress_policy.deepgram(configured).hosts == frozenset({"127.0.0.2"})
    assert egress_policy.openai(configured).hosts == frozenset({"127.0.0.3"})
    assert egress_policy.airtable(configured).hosts == frozenset({"127.0.0.4"})
    assert egress_policy.google(configured).hosts == frozenset({"127.0.0.5"})


def test_google_token_endpoints_come_from_the_credential_file(tmp_path: Path) -> None:
    key = tmp_path / "sa.json"
    key.write_text(
        '{"type": "service_account", "private_key": "x", "client_email": "a@b.c", '
        '"token_uri": "http://127.0.0.9:9/token"}',
        encoding="utf-8",
    )
    settings = Settings(google_service_account_file=key, google_calendar_api_url="http://127.0.0.5:1")
    assert egress_policy.google(settings).hosts == frozenset({"127.0.0.5", "127.0.0.9"})


def test_webhook_receivers_are_the_hosts_the_triggers_name(tmp_path: Path) -> None:
    from booking.business import EXAMPLE_BUSINESS_FILE

    business = load_business(EXAMPLE_BUSINESS_FILE)
    assert egress_policy.webhooks(business).hosts == frozenset(
        egress.host_of(rule.webhook_url) for rule in business.crm.triggers if rule.webhook_url
    )


def test_the_sms_sender_the_app_builds_is_gated() -> None:
    settings = Settings(
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token="0" * 32,
        twilio_sms_from="+12125550100",
        twilio_api_base_url="http://127.0.0.1:1",
    )
    sms = build_twilio_sms(settings, threads=1)
    assert sms is not None
    try:
        session = sms._client.http_client.session
        with pytest.raises(EgressRefused):
            session.get("https://api.twilio.com.evil.example/")
    finally:
        sms.close()


async def test_a_request_refused_before_sending_never_reaches_the_transport() -> None:
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    transport = egress.httpx_transport(loopback(), httpx.MockTransport(record))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(EgressRefused):
            await http.get("http://169.254.169.254/latest/meta-data/")
        assert (await http.get("http://127.0.0.1:1/")).status_code == 200
    assert [str(request.url) for request in sent] == ["http://127.0.0.1:1/"]
