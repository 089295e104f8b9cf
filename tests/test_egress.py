"""Outbound HTTP only to configured hosts, redirects never followed: each client kind (httpx, httpx2 for
OpenAI, requests for twilio, pyairtable and the OTLP exporter, httplib2 for Google, botocore for S3, the
Deepgram SDK's REST and sockets, the Google connect flow's token exchange) against a real server on
loopback, with a listener counting connections to show that a refused request sent nothing, and the
allowlists the app builds from its settings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
from integrations.deepgram_stt import DeepgramSTT, SpeechProviderError, deepgram_client
from integrations.deepgram_tts import DeepgramTTS
from integrations.egress import Allowlist, EgressRefused, GuardedHttp, guard_session, httpx2_client, httpx_client
from integrations.simulators.deepgram import DeepgramSimConfig, create_deepgram_simulator
from integrations.storage import S3Storage, StorageError, aws_s3_hosts, build_storage
from integrations.twilio_rest import TwilioCallControl
from integrations.webhooks import WebhookSender
from tests.conftest import serving
from voice_server import egress_policy
from voice_server.effects import build_twilio_sms
from voice_server.ports import CallInfo
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


# -- clients gated by hooks: Deepgram's sockets and speech, S3, OTLP, Google's token exchange -------------


@dataclasses.dataclass
class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it is sent and answers each with ``answer``
    (nothing: the connection is closed)."""

    port: int
    answer: bytes
    connections: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def unlisted(self) -> str:
        return f"http://localhost:{self.port}"


@contextlib.asynccontextmanager
async def listening(answer: bytes = b"") -> AsyncIterator[Listener]:
    listener = Listener(0, answer)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.connections += 1
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(listener.answer)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


def redirect_to(url: str) -> bytes:
    return f"HTTP/1.1 302 Found\r\nLocation: {url}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


CALL = CallInfo(call_sid="CA" + "3" * 32, stream_sid="MZ" + "3" * 32, caller="+16465550199", called="+12125550100")


async def test_deepgram_sockets_and_speech_to_an_unlisted_host_are_refused_unsent() -> None:
    async with listening() as deepgram, httpx_client(loopback()) as http:
        client = deepgram_client("dg-key", base_url=deepgram.unlisted, http=http, egress=loopback())
        with pytest.raises(SpeechProviderError) as listen:
            await DeepgramSTT(client).open(CALL)
        with pytest.raises(SpeechProviderError) as speak:
            _ = [chunk async for chunk in DeepgramTTS(client).synthesize("your cleaning is booked")]
    for refused in (listen.value, speak.value):
        assert not refused.transient  # not worth a retry: the fallback takes over at once
        assert isinstance(refused.__cause__, EgressRefused) and refused.__cause__.host == "localhost"
    assert deepgram.connections == 0


async def test_a_deepgram_socket_never_follows_a_redirect() -> None:
    async with listening() as elsewhere, listening() as deepgram, httpx_client(loopback()) as http:
        deepgram.answer = redirect_to(f"ws://127.0.0.1:{elsewhere.port}/v1/listen")  # a listed host, even
        client = deepgram_client("dg-key", base_url=deepgram.base, http=http, egress=loopback())
        with pytest.raises(SpeechProviderError) as listen:
            await DeepgramSTT(client, reconnect_attempts=1).open(CALL)
    assert isinstance(listen.value.__cause__, EgressRefused) and listen.value.__cause__.redirect
    assert not listen.value.transient
    assert (deepgram.connections, elsewhere.connections) == (1, 0)


async def test_the_gated_deepgram_client_still_reaches_its_simulator() -> None:
    from tests.test_deepgram import tone_synthesize, tone_transcribe

    app = create_deepgram_simulator(DeepgramSimConfig(), transcribe=tone_transcribe, synthesize=tone_synthesize)
    async with serving(app, lifespan="off", ws="websockets-sansio") as url:
        client = deepgram_client(DeepgramSimConfig().api_key, base_url=url)  # its own gated HTTP client
        try:
            speech = b"".join([chunk async for chunk in DeepgramTTS(client).synthesize("book a cleaning")])
            stream = await DeepgramSTT(client).open(CALL)
            await stream.close()
        finally:
            await client._client_wrapper.httpx_client.httpx_client.aclose()
    assert speech and stream.metadata is not None
    assert app.state.deepgram.speak_requests == 1


def s3_storage(bucket: str, **options: Any) -> S3Storage:
    return S3Storage(bucket, access_key="testing", secret_key="testing", **options)


async def test_s3_requests_go_only_to_the_configured_endpoint() -> None:
    assert S3Storage(
        "calls", endpoint_url="http://127.0.0.7:9000", access_key="testing", secret_key="testing"
    ).egress.hosts == {"127.0.0.7"}
    aws = s3_storage("calls", region="eu-west-1")
    assert aws.egress.hosts == frozenset(aws_s3_hosts("calls", "eu-west-1"))
    assert "calls.s3.eu-west-1.amazonaws.com" in aws.egress.hosts
    async with listening() as s3:
        storage = S3Storage(
            "calls",
            endpoint_url=s3.unlisted,
            region="us-east-1",
            egress=loopback(),
            access_key="testing",
            secret_key="testing",
        )
        try:
            with pytest.raises(StorageError) as refused:
                await storage.put("recordings/CA1.jsonl", b"sealed", content_type="application/octet-stream")
        finally:
            await storage.close()
    assert refused.value.permanent and isinstance(refused.value.__cause__, EgressRefused)
    assert s3.connections == 0


def test_the_s3_archive_reaches_its_simulator_through_the_gate(tmp_path: Path) -> None:
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        url = f"s3://calls-egress?endpoint_url=http://{host}:{port}&region=us-east-1"
        storage = build_storage(url, tmp_path, access_key="testing", secret_key="testing")
        assert isinstance(storage, S3Storage) and storage.egress.hosts == {"127.0.0.1"}
        storage.client.create_bucket(Bucket="calls-egress")

        async def round_trip() -> bytes:
            await storage.put("a/b.bin", b"payload", content_type="application/octet-stream")
            return await storage.get("a/b.bin")

        assert asyncio.run(round_trip()) == b"payload"
        storage.client.close()
    finally:
        moto.stop()


def finished_spans() -> list[Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.get_tracer("test").start_span("call").end()
    return list(memory.get_finished_spans())


async def test_the_otlp_exporter_sends_only_to_its_collector_and_follows_no_redirect() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    from tests.tracing_support import otlp_receiver
    from voice_server.tracing import otlp_exporter

    spans = finished_spans()
    async with otlp_receiver() as (endpoint, received), listening() as elsewhere:
        settings = Settings(otel_traces_endpoint=endpoint)
        assert egress_policy.otlp(settings).hosts == {"127.0.0.1"} and egress_policy.otlp(Settings()).hosts == set()
        exporter = otlp_exporter(settings)
        assert await asyncio.to_thread(exporter.export, spans) is SpanExportResult.SUCCESS
        exporter.shutdown()  # type: ignore[no-untyped-call]  # untyped in the exporter
        assert len(received) == 1
        # the session the exporter is given is what it sends with: another host is refused unsent
        gate = requests.Session()
        unlisted = OTLPSpanExporter(
            endpoint=elsewhere.unlisted + "/v1/traces",
            session=egress.guard_session(gate, egress_policy.otlp(settings)),
            timeout=2,
        )
        assert await asyncio.to_thread(unlisted.export, spans) is SpanExportResult.FAILURE
        unlisted.shutdown()  # type: ignore[no-untyped-call]  # untyped in the exporter
    assert elsewhere.connections == 0 and len(received) == 1


async def test_the_google_token_exchange_goes_only_to_the_client_files_endpoint(tmp_path: Path) -> None:
    from integrations.google_consent import ConnectError, authorization_request, exchange_code
    from integrations.google_oauth import OAuthClient

    async with listening() as elsewhere, listening() as token:
        token.answer = redirect_to(f"{elsewhere.base}/token")
        section = {"client_id": "id", "client_secret": "secret", "auth_uri": "https://accounts.example/auth"}
        document = {"installed": {**section, "token_uri": f"{token.base}/token"}}
        client_file = tmp_path / "client.json"
        client_file.write_text(json.dumps(document), encoding="utf-8")
        allow = egress_policy.google_connect(Settings(), client_file)
        assert allow.hosts == frozenset({*egress.GOOGLE_HOSTS, "127.0.0.1"})
        client = OAuthClient.from_file(client_file)
        request = authorization_request(client, "http://127.0.0.1:1/")
        async with httpx_client(allow) as http:
            with pytest.raises(ConnectError) as redirected:
                await exchange_code(client, request, "code", http=http)
            moved = dataclasses.replace(client, token_uri=f"{token.unlisted}/token")
            with pytest.raises(ConnectError) as refused:
                await exchange_code(moved, request, "code", http=http)
    assert isinstance(redirected.value.__cause__, EgressRefused) and redirected.value.__cause__.redirect
    assert isinstance(refused.value.__cause__, EgressRefused) and not refused.value.__cause__.redirect
    assert (token.connections, elsewhere.connections) == (1, 0)
