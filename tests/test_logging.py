"""Logs as they are written: the real ``configure_logging`` output, parsed line by line.

Secrets and personal data never reach a line (ours, a library's, a traceback); requests and calls carry
correlation ids; bookings and effects are named. Requests go through the real app factory, calls through
a real uvicorn, the real Media Streams endpoint and the real booking tools, against the real ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import re
import secrets
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import structlog
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from booking.business import Business
from booking.domain import Interval, new_id
from booking.ledger.database import Database
from booking.ledger.repository import Created, CustomerDetails, Ledger, NewBooking
from booking.outbox import Effect, EffectKind
from booking.service import BookingService
from booking.worker import Worker
from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock, running_app, serving
from tests.twilio_caller import TwilioCaller
from tests.voice_fakes import ScriptedSTT, ScriptedTTS
from voice_server.app import create_app
from voice_server.effects import masked_phone
from voice_server.logging import REDACTED, configure_logging, register_settings_secrets
from voice_server.ports import AgentEvent, CallInfo, TextDelta, ToolCall, Turn, VoicePorts
from voice_server.settings import Settings
from voice_server.tools import BookingTools

HEX32 = re.compile(r"[0-9a-f]{32}")
MARKER = re.compile(r"\[(\d+) chars #[0-9a-f]{8}\]")
TOKEN = "test-admin-token-0123456789"  # as in the app_settings fixture
AUTH = {"Authorization": f"Bearer {TOKEN}"}
log = structlog.get_logger("voicebook.test")


@dataclasses.dataclass
class Captured:
    stream: io.StringIO

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]


@pytest.fixture
def captured() -> Iterator[Captured]:
    """``configure_logging`` as the server runs it (JSON), its handler writing into a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level, saved_config = root.handlers[:], root.level, structlog.get_config()
    quiet = {name: logging.getLogger(name).level for name in ("uvicorn.access", "twilio.http_client")}
    configure_logging("INFO", "json")
    # Not cached, so loggers used here stay usable by tests that swap structlog's configuration.
    structlog.configure(cache_logger_on_first_use=False)
    stream = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        yield Captured(stream)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_config)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


# -- secrets ------------------------------------------------------------------------------------


def secret_settings() -> tuple[Settings, list[str]]:
    """Settings with every secret field (``repr=False``) set to a fresh random value, and those values.
    A secret setting of a new shape fails here, so it cannot be added without being covered."""
    values: dict[str, Any] = {}
    found: list[str] = []
    for spec in dataclasses.fields(Settings):
        if spec.repr:
            continue
        first, second = secrets.token_urlsafe(24), secrets.token_hex(20)
        if spec.type in ("str | None", "str"):
            values[spec.name] = first
            found.append(first)
        elif spec.type == "tuple[str, ...]":
            values[spec.name] = (first, second)
            found += [first, second]
        elif spec.type == "tuple[tuple[str, str], ...]":
            values[spec.name] = (("authorization", first), ("x-api-key", second))
            found += [first, second]
        else:
            raise AssertionError(f"{spec.name}: a secret setting of a type this test does not know: {spec.type}")
    return Settings(**values), found


def _fail_with(value: str) -> None:
    try:
        raise KeyError(value)
    except KeyError as cause:
        raise RuntimeError(f"the provider refused credentials {value}") from cause


def test_no_configured_secret_reaches_any_line(captured: Captured) -> None:
    settings, values = secret_settings()
    storage = {"AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30), "AWS_SESSION_TOKEN": secrets.token_urlsafe(40)}
    values += storage.values()
    assert len(values) >= 10  # admin, Twilio, Deepgram, OpenAI, Airtable, Fernet, webhook, OTLP, S3
    register_settings_secrets(settings, storage)
    library = logging.getLogger("some.library")
    for value in values:
        log.info(f"connecting with {value} now", detail=f"GET https://api.example/v1?x={value}&y=1", plain=value)
        log.warning("nested", payload={"outer": [{"inner": f"Bearer-less {value}"}, (value,)]})
        try:
            _fail_with(value)
        except RuntimeError:
            log.exception("provider_failed")
            library.exception("library failed with %s", value)
        library.error("encoded %s", urllib.parse.quote(value, safe=""))
    text = captured.text
    for value in values:
        assert value not in text
        assert urllib.parse.quote(value, safe="") not in text
    lines = captured.lines()
    assert len(lines) == 5 * len(values)  # every line was written, only its secrets are gone
    assert sum(line["event"] == f"connecting with {REDACTED} now" for line in lines) == len(values)
    failures = [line for line in lines if line["event"] == "provider_failed"]
    assert all("RuntimeError: the provider refused credentials [redacted]" in f["exception"] for f in failures)
    assert all("KeyError" in f["exception"] and "Traceback" in f["exception"] for f in failures)


def test_keys_that_name_secrets_are_redacted_at_any_depth(captured: Captured) -> None:
    log.info(
        "headers_seen",
        api_key="k-plain",
        password="pw-plain",
        headers={"Authorization": "Basic dXNlcjpwYXNz", "X-Twilio-Signature": "sig-plain", "Cookie": "sid=1"},
        oauth={"refresh_token": "rt-plain", "client_secret": "cs-plain", "private_key": "pk-plain"},
        credentials=["c-plain"],
        prompt_tokens=12,
        twilio_idempotency_token="idem-kept",
        url="redis://:hunter2-plain@redis:6379/0",
    )
    (line,) = captured.events("headers_seen")
    assert "plain" not in captured.text
    assert line["api_key"] == line["password"] == REDACTED and line["credentials"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "X-Twilio-Signature": REDACTED, "Cookie": REDACTED}
    assert set(line["oauth"].values()) == {REDACTED}
    assert line["prompt_tokens"] == 12 and line["twilio_idempotency_token"] == "idem-kept"
    assert line["url"] == "redis://:[redacted]@redis:6379/0"


class _Unprintable:
    """A key whose text cannot be had (``repr`` works: pytest's own capture handler needs it)."""

    def __str__(self) -> str:
        raise ValueError("+14155550153")


def test_a_line_that_cannot_be_redacted_is_replaced_not_printed_raw(captured: Captured) -> None:
    loop: dict[str, object] = {"phone": "+14155550154"}
    loop["again"] = loop
    log.info("circular", payload=loop)
    log.info("unprintable +14155550155", thing={_Unprintable(): 1})
    circular, dropped = captured.lines()
    assert circular["payload"]["phone"] == "+*********54"
    assert dropped == {
        "event": "log_line_dropped",
        "redaction_error": "ValueError",
        "level": "info",
        "logger": "voicebook.test",
        "timestamp": dropped["timestamp"],
    }
    assert "41555501" not in captured.text


# -- personal data ------------------------------------------------------------------------------

PHONES = {
    "+14155550142": "+*********42",
    "(415) 555-0143": "(***) ***-**43",
    "415-555-0144": "***-***-**44",
    "415.555.0145": "***.***.**45",
    "+44 20 7946 0958": "+** ** **** **58",
    "07700 900123": "***** ****23",
    "4155550146": "********46",
}


def test_phone_numbers_emails_and_what_callers_said_are_masked(captured: Captured) -> None:
    call_sid, booking_id = "CA" + uuid.uuid4().hex, new_id()
    log.info(
        f"call {call_sid} from +16465550199 booked {booking_id}",
        call_sid=call_sid,
        booking_id=booking_id,
        effect_id=1234567890,
        at="2026-11-30T12:00:00.123456+00:00",
        local="2026-11-30 07:00:00",
        waited_ms=1500,
        duration="PT15M",
        numbers=list(PHONES),
        message="call me back on 415 555 0147 or write to jane.doe+clinic@example.com",
        transcript="I'd like a checkup, my name is Jane Doe",
        caller_name="Jane Doe",
        customer={"name": "Jane Doe", "phone": "+14155550148", "email": "jane@example.org"},
        notes=["allergic to penicillin"],
        to=masked_phone("+14155550149"),  # keeps four digits: the log keeps two
    )
    (line,) = [entry for entry in captured.lines() if entry.get("call_sid") == call_sid]
    text = captured.text
    for raw in [*PHONES, "6465550199", "555 0147", "4155550148", "jane", "Jane", "penicillin", "checkup", "0149"]:
        assert raw not in text
    assert line["event"] == f"call {call_sid} from +*********99 booked {booking_id}"
    assert line["numbers"] == list(PHONES.values())
    assert line["message"] == "call me back on *** *** **47 or write to [email]"
    assert line["to"] == "+*********49"
    assert line["customer"]["phone"] == "+*********48" and line["customer"]["email"] == "[email]"
    said = MARKER.fullmatch(line["transcript"])
    assert said is not None and int(said.group(1)) == len("I'd like a checkup, my name is Jane Doe")
    assert line["caller_name"] == line["customer"]["name"] != line["transcript"]  # equal texts, equal markers
    assert MARKER.fullmatch(line["notes"][0])
    assert (line["booking_id"], line["effect_id"], line["waited_ms"]) == (booking_id, 1234567890, 1500)
    assert (line["at"], line["local"], line["duration"]) == (
        "2026-11-30T12:00:00.123456+00:00",
        "2026-11-30 07:00:00",
        "PT15M",
    )


def test_library_loggers_are_redacted_too(captured: Captured) -> None:
    register_settings_secrets(dataclasses.replace(Settings(), twilio_auth_token="tw-" + "9f" * 16))
    twilio = logging.getLogger("twilio.http_client")
    twilio.warning("POST /Messages.json To=%s Body=%s", "+14155550150", "Your visit is at 10:00")
    twilio.info("below the level configured for it: %s", "+14155550151")
    try:
        raise ConnectionError("auth tw-" + "9f" * 16 + " rejected for %2B14155550152")
    except ConnectionError:
        twilio.exception("request failed")
    lines = captured.lines()
    assert [line["event"] for line in lines] == [
        "POST /Messages.json To=+*********50 Body=Your visit is at 10:00",
        "request failed",
    ]
    assert lines[0]["logger"] == "twilio.http_client" and lines[0]["level"] == "warning"
    assert "ConnectionError: auth [redacted] rejected for %2B*********52" in lines[1]["exception"]
    assert "9f9f9f" not in captured.text and "4155550151" not in captured.text


# -- correlation ids: requests ------------------------------------------------------------------


def booking_body(start: str) -> dict[str, object]:
    return {
        "service": "checkup",
        "resource": "dr-lee",
        "start": start,
        "customer": {"phone": "(212) 555-0142", "name": "Alice Rivera", "email": "alice@example.com"},
        "notes": "first visit",
    }


async def test_each_request_has_a_correlation_id_in_its_lines_and_response(
    captured: Captured, app_settings: Settings, clock: FrozenClock
) -> None:
    async with running_app(app_settings, clock) as (_, client):
        created = await client.post(
            "/api/bookings",
            json=booking_body("2026-12-01T10:00"),
            headers={**AUTH, "I-Twilio-Idempotency-Token": "idem-7f3a"},
        )
        honoured = await client.post(
            "/api/bookings", json=booking_body("2026-12-01T11:00"), headers={**AUTH, "X-Request-Id": "req-42.a:b"}
        )
        too_long = await client.post(
            "/api/bookings", json=booking_body("2026-12-01T13:00"), headers={**AUTH, "X-Request-Id": "a" * 129}
        )
        bad_chars = await client.post(
            "/api/bookings", json=booking_body("2026-12-01T14:00"), headers={**AUTH, "X-Request-Id": "x;drop table"}
        )
    assert structlog.contextvars.get_contextvars() == {}  # nothing a request bound is left in this task
    responses = [created, honoured, too_long, bad_chars]
    assert [response.status_code for response in responses] == [201] * 4
    ids = [response.headers["x-request-id"] for response in responses]
    assert ids[1] == "req-42.a:b"
    assert all(HEX32.fullmatch(ids[n]) for n in (0, 2, 3)) and len(set(ids)) == 4
    made = captured.events("api_booking_created")
    assert [line["correlation_id"] for line in made] == ids
    assert [line["booking_id"] for line in made] == [response.json()["id"] for response in responses]
    assert all(line["method"] == "POST" and line["path"] == "/api/bookings" for line in made)
    assert made[0]["twilio_idempotency_token"] == "idem-7f3a" and "twilio_idempotency_token" not in made[1]
    assert TOKEN not in captured.text and "alice@example.com" not in captured.text


# -- correlation ids: calls ---------------------------------------------------------------------

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
CALLS = {"CA" + "1" * 32: "2026-12-01T10:00", "CA" + "2" * 32: "2026-12-01T11:00"}


class BookingAgent:
    """Books the call's slot with the real booking tools when the caller says "book"."""

    async def respond(self, conversation: Sequence[Turn], call: CallInfo) -> AsyncIterator[AgentEvent]:
        last = conversation[-1]
        if last.role == "tool":
            yield TextDelta("You are booked.")
            return
        yield TextDelta("One moment.")
        arguments = {"service": "checkup", "start": CALLS[call.call_sid], "customer_name": "Jane Caller"}
        yield ToolCall("call-1", "book_appointment", arguments)


async def place_call(media_url: str, signature: str, call_sid: str) -> str:
    """One whole call; returns the X-Request-Id the WebSocket upgrade was answered with."""
    async with connect(media_url, additional_headers={"X-Twilio-Signature": signature}) as ws:
        async with TwilioCaller(ws, call_sid=call_sid, stream_sid="MZ" + call_sid[2:]) as caller:
            await caller.connect()
            await caller.wait_for(lambda: len(caller.marks_echoed) >= 2)  # the greeting's two sentences
            await caller.say()
            await caller.wait_for(lambda: len(caller.marks_echoed) >= 4, within=10)  # "One moment." "You are booked."
            await caller.stop()
        assert ws.response is not None
        return str(ws.response.headers["x-request-id"])


async def _until(predicate: Any) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not logged within 10 s")


async def test_a_call_has_one_correlation_id_and_its_booking_is_named(
    captured: Captured, app_settings: Settings, clock: FrozenClock, service: BookingService
) -> None:
    from twilio.request_validator import RequestValidator

    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ports = VoicePorts(
        stt=ScriptedSTT(["I would like to book a checkup"]),
        agent=BookingAgent(),
        tts=ScriptedTTS(),
        tools=BookingTools(service, clock=clock),
    )
    settings = dataclasses.replace(app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN)
    media_url = base.replace("http://", "ws://") + "/twilio/media"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(media_url, {})
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(serving(create_app(settings, clock=clock, voice=ports), sock, lifespan="on"))
        upgrade_ids = await asyncio.gather(*(place_call(media_url, signature, sid) for sid in CALLS))
        await _until(lambda: len(captured.events("media_stream_ended")) == len(CALLS))
    bookings = await service.find_bookings("+16465550199", upcoming_only=False)
    assert sorted(b.start.date() for b in bookings) == [date(2026, 12, 1)] * 2
    booked_ids = {b.id for b in bookings}

    call_ids: dict[str, str] = {}
    for call_sid in CALLS:
        stream_sid = "MZ" + call_sid[2:]
        mine = [line for line in captured.lines() if line.get("stream_sid") == stream_sid]
        events = {line["event"] for line in mine}
        assert {"media_stream_started", "tool_booked", "media_stream_ended"} <= events
        assert all(line["call_sid"] == call_sid for line in mine)
        (correlation_id,) = {line["correlation_id"] for line in mine}  # one id for the whole call
        assert HEX32.fullmatch(correlation_id)
        call_ids[call_sid] = correlation_id
        (booked,) = [line for line in mine if line["event"] == "tool_booked"]
        assert booked["booking_id"] in booked_ids
        (started,) = [line for line in mine if line["event"] == "media_stream_started"]
        assert started["upgrade_correlation_id"] in upgrade_ids  # the upgrade's own lines can be joined
    assert len(set(call_ids.values())) == len(CALLS)
    assert not set(call_ids.values()) & set(upgrade_ids)
    assert "6465550199" not in captured.text and AUTH_TOKEN not in captured.text


async def test_effect_attempts_are_named_in_every_line(
    captured: Captured, ledger: Ledger, business: Business, database: Database, redis_client: Redis, clock: FrozenClock
) -> None:
    await ledger.sync_catalog(business)
    start = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
    end = start + timedelta(minutes=30)
    created = await ledger.create_bookings(
        CustomerDetails(phone="+12125550142", name="Alice"),
        [NewBooking("dr-lee", "checkup", start, end, Interval(start, end + timedelta(minutes=10)))],
    )
    assert isinstance(created, Created)
    booking_id = created.bookings[0].id

    async def handler(effect: Effect) -> None:
        log.info("handler_ran")  # names nothing itself

    worker = Worker(database, redis_client, dict.fromkeys([kind.value for kind in EffectKind], handler), clock=clock)
    ran = await worker.run_until_idle()
    lines = captured.events("handler_ran")
    assert ran >= 2 and len(lines) == ran  # the calendar event and the confirmation text are due now
    effects = {effect.id: effect for effect in await worker.outbox.for_booking(booking_id)}
    for line in lines:
        effect = effects[line["effect_id"]]
        assert (line["kind"], line["booking_id"]) == (effect.kind, booking_id)
    assert {line["kind"] for line in lines} >= {"calendar.create", "sms.confirmation"}
    assert structlog.contextvars.get_contextvars() == {}
