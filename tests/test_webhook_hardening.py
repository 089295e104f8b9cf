"""Twilio webhooks beyond the signature: either auth token accepted during a rotation (and which one
said), replayed deliveries not applied twice (by idempotency token or by SID and event, failing open
when Redis is away), and request bodies over the limit refused with 413. All through the real app."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from structlog.testing import capture_logs
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from booking.ledger.sms_repository import SmsLedger
from tests.conftest import FrozenClock, running_app, serving
from voice_server import twiml
from voice_server.components import Components
from voice_server.request_limits import MEDIA_WS_MAX_BYTES, RequestSizeLimit
from voice_server.settings import Settings
from voice_server.twilio_signature import SIGNATURE_MATCHED
from voice_server.webhook_dedupe import REPLAYS, delivery_key

PRIMARY = "0123456789abcdef0123456789abcdef"
SECONDARY = "fedcba9876543210fedcba9876543210"
PUBLIC = "https://voice.example.test"
CALL_SID = "CA" + "4" * 32
CALL = {
    "CallSid": CALL_SID,
    "AccountSid": "AC" + "1" * 32,
    "From": "+16465550199",
    "To": "+12125550100",
    "CallStatus": "ringing",
    "Direction": "inbound",
}
App = tuple[Starlette, httpx.AsyncClient]


@pytest.fixture
async def app(app_settings: Settings, clock: FrozenClock) -> AsyncIterator[App]:
    settings = dataclasses.replace(
        app_settings, public_url=PUBLIC, twilio_auth_token=PRIMARY, twilio_auth_token_secondary=SECONDARY
    )
    async with running_app(settings, clock) as running:
        yield running


def headers(
    path: str, params: dict[str, str], *, token: str = PRIMARY, idempotency: str | None = None
) -> dict[str, str]:
    out = {"X-Twilio-Signature": RequestValidator(token).compute_signature(PUBLIC + path, params)}
    if idempotency is not None:
        out["I-Twilio-Idempotency-Token"] = idempotency
    return out


async def post(client: httpx.AsyncClient, path: str, params: dict[str, str], **kwargs: Any) -> httpx.Response:
    return await client.post(path, data=params, headers=headers(path, params, **kwargs))


class Spy:
    """Counts the calls of chosen methods of the object it wraps and passes them on (optionally failing
    the first ``fail`` of them)."""

    def __init__(self, inner: Any, *names: str, fail: int = 0) -> None:
        self._inner, self._names, self._fail = inner, names, fail
        self.calls: dict[str, int] = dict.fromkeys(names, 0)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in self._names:
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if self._fail > 0:
                self._fail -= 1
                raise RuntimeError("the ledger failed")
            return await attribute(*args, **kwargs)

        return counted


def spy_calls(application: Starlette, *names: str, fail: int = 0) -> Spy:
    components: Components = application.state.components
    spy = Spy(components.calls, *names, fail=fail)
    application.state.components = dataclasses.replace(components, calls=spy)  # type: ignore[arg-type]  # a spy
    return spy


def matched(which: str) -> float:
    value: float = SIGNATURE_MATCHED.labels(which)._value.get()
    return value


# -- auth token rotation ---------------------------------------------------------------------------


async def test_either_token_is_accepted_during_a_rotation_and_the_match_is_told(app: App) -> None:
    application, client = app
    primary_before, secondary_before = matched("primary"), matched("secondary")
    with capture_logs() as logs:
        by_primary = await post(client, "/twilio/voice", CALL)
        by_secondary = await post(client, "/twilio/voice", {**CALL, "CallSid": "CA" + "5" * 32}, token=SECONDARY)
        by_neither = await post(client, "/twilio/voice", {**CALL, "CallSid": "CA" + "6" * 32}, token="9" * 32)
    assert [r.status_code for r in (by_primary, by_secondary, by_neither)] == [200, 200, 403]
    assert (matched("primary") - primary_before, matched("secondary") - secondary_before) == (1, 1)
    told = [line for line in logs if line.get("twilio_signature_matched")]
    assert [line["twilio_signature_matched"] for line in told] == ["secondary"]
    assert await application.state.components.calls.get_call("CA" + "6" * 32) is None


async def test_sms_webhooks_accept_the_secondary_token_too(app: App) -> None:
    _, client = app
    text = {"MessageSid": "SM" + "1" * 32, "From": "+12125550142", "To": "+12125550100", "Body": "HELP"}
    assert (await post(client, "/twilio/sms", text, token=SECONDARY)).status_code == 200
    assert (await post(client, "/twilio/sms", text, token="9" * 32)).status_code == 403


async def test_the_media_stream_upgrade_accepts_either_token(app: App) -> None:
    application, _ = app
    async with serving(application, lifespan="off") as base:
        local = "ws" + base.removeprefix("http") + "/twilio/media"
        signed_url = twiml.media_stream_url(PUBLIC)

        def upgrade(token: str) -> dict[str, str]:
            return {"X-Twilio-Signature": RequestValidator(token).compute_signature(signed_url, {})}

        for token in (PRIMARY, SECONDARY):
            async with connect(local, additional_headers=upgrade(token), max_size=MEDIA_WS_MAX_BYTES) as ws:
                await ws.close()
        with pytest.raises(InvalidStatus) as refused:
            async with connect(local, additional_headers=upgrade("9" * 32)):
                pass
        assert refused.value.response.status_code == 403


# -- replays ---------------------------------------------------------------------------------------


async def test_a_replayed_incoming_call_gets_the_same_twiml_and_is_recorded_once(app: App) -> None:
    application, client = app
    spy = spy_calls(application, "record_call")
    first = await post(client, "/twilio/voice", CALL, idempotency="idem-call-1")
    again = await post(client, "/twilio/voice", CALL, idempotency="idem-call-1")
    # Without a token the CallSid names the event: a third delivery of the same call is a replay too.
    untokened = await post(client, "/twilio/voice", CALL)
    assert [r.status_code for r in (first, again, untokened)] == [200, 200, 200]
    assert again.text == first.text and "<Stream" in again.text
    assert spy.calls["record_call"] == 2  # the token and the SID+event are two keys; never three


async def test_status_callbacks_are_applied_once_per_event(app: App) -> None:
    application, client = app
    assert (await post(client, "/twilio/voice", CALL)).status_code == 200
    spy = spy_calls(application, "apply_status")
    replays_before = REPLAYS.labels("call-status")._value.get()
    answered = {**CALL, "CallStatus": "in-progress", "SequenceNumber": "0"}
    completed = {**CALL, "CallStatus": "completed", "SequenceNumber": "1", "CallDuration": "42"}
    statuses = [
        (await post(client, "/twilio/call-status", answered)).status_code,
        (await post(client, "/twilio/call-status", answered)).status_code,  # replayed: same SID, status, seq
        (await post(client, "/twilio/call-status", completed, idempotency="idem-status-9")).status_code,
        (await post(client, "/twilio/call-status", completed, idempotency="idem-status-9")).status_code,
    ]
    assert statuses == [204, 204, 204, 204]
    assert spy.calls["apply_status"] == 2
    assert REPLAYS.labels("call-status")._value.get() - replays_before == 2
    call = await application.state.components.calls.require_call(CALL_SID)
    assert call.status.value == "completed"


async def test_a_failed_first_delivery_gives_its_claim_back_so_the_retry_is_applied(app: App) -> None:
    application, client = app
    spy = spy_calls(application, "record_call", fail=1)
    with pytest.raises(RuntimeError, match="the ledger failed"):
        await post(client, "/twilio/voice", CALL, idempotency="idem-retry")
    retried = await post(client, "/twilio/voice", CALL, idempotency="idem-retry")
    assert retried.status_code == 200 and spy.calls["record_call"] == 2
    assert await application.state.components.calls.get_call(CALL_SID) is not None


async def test_a_late_replay_of_stop_does_not_undo_a_later_start(app: App) -> None:
    application, client = app
    customer = "+12125550142"
    stop = {"MessageSid": "SM" + "2" * 32, "From": customer, "To": "+12125550100", "Body": "STOP"}
    start = {"MessageSid": "SM" + "3" * 32, "From": customer, "To": "+12125550100", "Body": "START"}
    ledger = SmsLedger(application.state.components.database)
    assert (await post(client, "/twilio/sms", stop)).status_code == 200
    assert await ledger.is_suppressed(customer)
    assert (await post(client, "/twilio/sms", start)).status_code == 200
    replayed = await post(client, "/twilio/sms", stop)
    assert replayed.status_code == 200 and replayed.text == (await post(client, "/twilio/sms", start)).text
    assert not await ledger.is_suppressed(customer)


async def test_delivery_receipts_are_applied_once(app: App) -> None:
    _, client = app
    receipt = {"MessageSid": "SM" + "7" * 32, "MessageStatus": "delivered", "To": "+12125550142"}
    before = REPLAYS.labels("message-status")._value.get()
    codes = [(await post(client, "/twilio/message-status", receipt)).status_code for _ in range(3)]
    assert codes == [204, 204, 204]
    assert REPLAYS.labels("message-status")._value.get() - before == 2
    failed = {**receipt, "MessageStatus": "failed"}  # another event of the same message is not a replay
    assert (await post(client, "/twilio/message-status", failed)).status_code == 204
    assert REPLAYS.labels("message-status")._value.get() - before == 2


async def test_replays_are_remembered_for_the_configured_time(app: App) -> None:
    application, client = app
    components: Components = application.state.components
    assert (await post(client, "/twilio/voice", CALL, idempotency="idem-ttl")).status_code == 200
    key = delivery_key(components.settings.redis_prefix, "voice", "idem-ttl", _form(CALL))
    assert key is not None
    ttl = await components.redis.ttl(key)
    assert 0 < ttl <= components.settings.webhook_dedupe_seconds == 86_400


async def test_without_redis_the_front_door_fails_open_to_the_ledger(app: App) -> None:
    application, client = app
    components: Components = application.state.components
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    application.state.components = dataclasses.replace(components, redis=unreachable)
    spy = spy_calls(application, "apply_status")
    answered = {**CALL, "CallStatus": "in-progress", "SequenceNumber": "0"}
    try:
        with capture_logs() as logs:
            codes = [(await post(client, "/twilio/call-status", answered)).status_code for _ in range(2)]
    finally:
        await unreachable.aclose()
    assert codes == [204, 204] and spy.calls["apply_status"] == 2  # both reached the ledger...
    events = await components.calls.status_events(CALL_SID)
    assert len(events) == 1  # ...which applied the event once
    assert [line["event"] for line in logs].count("webhook_dedupe_unavailable") == 2


def _form(params: dict[str, str]) -> Any:
    from starlette.datastructures import FormData

    return FormData(list(params.items()))


# -- request size ----------------------------------------------------------------------------------


async def echo(request: Request) -> Response:
    return PlainTextResponse(str(len(await request.body())))


def limited(max_bytes: int) -> httpx.AsyncClient:
    app = RequestSizeLimit(Starlette(routes=[Route("/echo", echo, methods=["POST"])]), max_bytes=max_bytes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://limits.test")


def chunks(total: int, size: int = 1000) -> Callable[[], AsyncIterator[bytes]]:
    async def generate() -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            piece = min(size, total - sent)
            sent += piece
            yield b"x" * piece

    return generate


async def test_bodies_over_the_limit_are_refused_by_length_and_by_counting_chunks() -> None:
    async with limited(4096) as client:
        assert (await client.post("/echo", content=b"x" * 4096)).text == "4096"
        declared = await client.post("/echo", content=b"x" * 4097)
        assert declared.status_code == 413
        assert declared.headers["content-type"] == "application/problem+json"
        assert declared.json()["code"] == "request_too_large"
        streamed = await client.post("/echo", content=chunks(10_000)())  # no Content-Length: chunked
        assert streamed.status_code == 413
        small_streamed = await client.post("/echo", content=chunks(3000)())
        assert small_streamed.status_code == 200 and small_streamed.text == "3000"


async def test_the_app_refuses_a_large_webhook_before_reading_it(app: App) -> None:
    application, client = app
    limit = application.state.components.settings.max_request_bytes
    assert limit == 64 * 1024
    big = {**CALL, "Padding": "x" * (limit + 1)}
    response = await post(client, "/twilio/voice", big)
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"
    assert await application.state.components.calls.get_call(CALL_SID) is None


def test_the_limits_are_configurable() -> None:
    settings = Settings.from_env({"VOICEBOOK_MAX_REQUEST_BYTES": "8192", "VOICEBOOK_WEBHOOK_DEDUPE_SECONDS": "600"})
    assert (settings.max_request_bytes, settings.webhook_dedupe_seconds) == (8192, 600)
    defaults = Settings.from_env({})
    assert (defaults.max_request_bytes, defaults.webhook_dedupe_seconds) == (64 * 1024, 86_400)
    assert MEDIA_WS_MAX_BYTES < 16 * 1024 * 1024  # below uvicorn's default, far above a media message
