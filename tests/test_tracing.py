"""OpenTelemetry traces: a real call through the real app is one trace (webhook -> call -> turns -> tool),
with no span per audio frame; effect attempts are spans; spans reach an OTLP/HTTP receiver on loopback
as protobuf; log lines inside a span carry its ids.

The API allows one global tracer provider per process: ``tests.tracing_support`` installs one, made by
``configure_tracing`` with an in-memory exporter, once per test session (``traced``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from openai import AsyncOpenAI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from booking.business import Business
from booking.errors import EffectFailed
from booking.ledger.database import Database
from booking.ledger.repository import Created, Ledger
from booking.outbox import Effect, EffectKind
from booking.worker import Worker
from integrations.openai_agent import OpenAIAgent
from integrations.simulators.loopback import loopback_socket
from integrations.simulators.openai import OpenAISimConfig, PolicyReply, create_openai_simulator
from tests.conftest import FrozenClock, serving
from tests.test_outbox import ALICE, T0, new
from tests.tracing_support import (
    Finished,
    Received,
    attributes,
    otlp_receiver,
    parent_id,
    recording,
    span_id,
    trace_id,
    wait_for_spans,
)
from tests.twilio_caller import LOUD
from tests.voice_fakes import SlowTools, scripted_ports
from voice_server import tracing
from voice_server.app import create_app
from voice_server.ports import VoicePorts
from voice_server.settings import Settings, SettingsError
from voice_server.softphone import Softphone
from voice_server.tools import ALL_TOOL_SPECS

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def traced() -> Iterator[Finished]:
    """Tracing on for this test; yields a function returning the spans finished since it began."""
    with recording() as finished:
        yield finished


# -- a real call ----------------------------------------------------------------------------------------


CALL_SID = "CA" + "7" * 32


async def book_and_hang_up(
    settings: Settings, clock: FrozenClock, voice: VoicePorts, traced: Finished
) -> tuple[list[ReadableSpan], str]:
    """Serve the real app, ring it with the softphone: "please book it" (a reply, the booking tool, a
    reply), then "bye" (the agent hangs up). Returns the spans once the call's report was built, and
    the stream SID."""
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = dataclasses.replace(settings, public_url=base, twilio_auth_token=AUTH_TOKEN)
    app = create_app(settings, clock=clock, voice=voice)
    async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
        async with Softphone.dial(
            base, auth_token=AUTH_TOKEN, caller="+16465550199", called="+12125550100", call_sid=CALL_SID
        ) as phone:
            await phone.wait_for_reply()  # the greeting
            await phone.say(LOUD * 20)  # "please book it"
            await phone.wait_for_reply()  # the agent's words before its tool call
            # "bye" only once the tool has run: said earlier (a loop stalled on a loaded host) it barges
            # in on that reply before the agent's tool call is taken, and the call has no tool span.
            tools = voice.tools
            assert isinstance(tools, SlowTools)
            await asyncio.wait_for(tools.ran.wait(), 10)
            await phone.say(LOUD * 20)  # "bye"
            await asyncio.wait_for(phone.closed.wait(), 10)
        # The hang-up enqueues the call's report; the app's own worker builds it.
        spans = await wait_for_spans(
            traced, lambda spans: any(s.name == f"effect {EffectKind.REPORT_BUILD}" for s in spans)
        )
    return spans, phone.stream_sid


async def test_a_call_is_one_trace_of_webhook_call_turns_and_tool(
    app_settings: Settings, clock: FrozenClock, traced: Finished
) -> None:
    voice = scripted_ports(["please book it", "bye"], SlowTools(seconds=0.05))
    spans, stream_sid = await book_and_hang_up(app_settings, clock, voice, traced)
    frames_sent = voice.stt.opened[0].frames  # type: ignore[attr-defined]  # the scripted recogniser counts them
    call_sid = CALL_SID

    webhook = next(s for s in spans if s.name == "POST /twilio/voice")
    in_trace = [s for s in spans if trace_id(s) == trace_id(webhook)]
    assert Counter(s.name for s in in_trace) == {
        "POST /twilio/voice": 1,
        "call": 1,
        "turn": 2,
        "tool": 1,
        f"effect {EffectKind.REPORT_BUILD}": 1,  # enqueued at hang-up, built by the app's worker
    }
    assert frames_sent > 50, "the caller streamed audio all along"  # and none of it made a span
    by_name = {s.name: s for s in in_trace}
    call, tool = by_name["call"], by_name["tool"]
    turns = sorted((s for s in in_trace if s.name == "turn"), key=lambda s: attributes(s)["voicebook.turn.number"])

    assert webhook.parent is None and webhook.kind is trace.SpanKind.SERVER
    assert attributes(webhook)["http.response.status_code"] == 200
    assert attributes(webhook)["voicebook.call_sid"] == call_sid
    assert attributes(webhook)["voicebook.correlation_id"], "the id the request's log lines carry"
    assert parent_id(call) == span_id(webhook), "the TwiML's traceparent made the call the webhook's child"
    assert attributes(call)["voicebook.call_sid"] == call_sid
    assert attributes(call)["voicebook.stream_sid"] == stream_sid
    assert attributes(call)["voicebook.end_reason"] == "caller said goodbye"
    assert [parent_id(turn) for turn in turns] == [span_id(call), span_id(call)]
    first = attributes(turns[0])
    assert first["voicebook.turn.trigger"] == "speech" and first["voicebook.turn.answered"] is True
    assert first["voicebook.turn.voice_to_voice_server_seconds"] > 0
    assert first["voicebook.turn.tool_seconds"] > 0
    assert parent_id(tool) == span_id(turns[0])
    assert attributes(tool) == {
        "voicebook.tool.name": "book_appointment",
        "voicebook.tool.outcome": "ok",
        "voicebook.booking_id": "bk-test",
    }

    report = by_name[f"effect {EffectKind.REPORT_BUILD}"]
    assert report.kind is trace.SpanKind.CONSUMER
    # Enqueued as the agent hung up, in the second turn: the worker's attempt continues the call's trace.
    assert parent_id(report) == span_id(turns[1])
    assert attributes(report)["voicebook.call_sid"] == call_sid
    assert attributes(report)["voicebook.effect.attempt"] == 1
    assert attributes(report)["voicebook.effect.outcome"] == "done"


def booking_policy(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
    """The "model" of the simulator: checks availability when asked to book, hangs up on "bye"."""
    if messages[-1]["role"] == "tool":
        return PolicyReply("That is done. Anything else?")
    said = next(m["content"] for m in reversed(messages) if m["role"] == "user").lower()
    if "bye" in said:
        return PolicyReply("Goodbye!", [("end_call", {"reason": "caller said goodbye"})])
    return PolicyReply("Let me check.", [("check_availability", {"service": "checkup", "date": "2026-12-01"})])


async def test_provider_requests_are_children_of_the_turn_that_made_them(
    app_settings: Settings, clock: FrozenClock, traced: Finished
) -> None:
    config = OpenAISimConfig(api_key="sk-test-4f1c9e")
    async with serving(create_openai_simulator(config, booking_policy), lifespan="off") as url:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test-4f1c9e")
        agent = OpenAIAgent(client, model="gpt-4o-mini", tools=ALL_TOOL_SPECS, system_prompt="A test clinic.")
        voice = dataclasses.replace(scripted_ports(["please book it", "bye"], SlowTools(seconds=0.05)), agent=agent)
        try:
            spans, _ = await book_and_hang_up(app_settings, clock, voice, traced)
        finally:
            await client.close()
    webhook = next(s for s in spans if s.name == "POST /twilio/voice")
    in_trace = [s for s in spans if trace_id(s) == trace_id(webhook)]
    turns = {span_id(s): attributes(s)["voicebook.turn.number"] for s in in_trace if s.name == "turn"}
    chats = [s for s in in_trace if s.name == "openai chat"]
    # Turn 1: the reply with the tool call, then the reply to its result; turn 2: the goodbye.
    assert sorted(turns[parent_id(chat)] for chat in chats) == [1, 1, 2]  # type: ignore[index]
    assert all(chat.kind is trace.SpanKind.CLIENT for chat in chats)
    assert Counter(s.name for s in in_trace) == {
        "POST /twilio/voice": 1,
        "call": 1,
        "turn": 2,
        "tool": 1,
        "openai chat": 3,
        f"effect {EffectKind.REPORT_BUILD}": 1,
    }


async def test_an_effect_attempt_is_a_span_with_its_outcome(
    database: Database,
    redis_client: aioredis.Redis,
    ledger: Ledger,
    business: Business,
    clock: FrozenClock,
    traced: Finished,
) -> None:
    await ledger.sync_catalog(business)
    created = await ledger.create_bookings(ALICE, [new(T0)])  # a calendar event and a text are due at once
    assert isinstance(created, Created)
    booking_id = created.bookings[0].id

    async def handler(effect: Effect) -> None:
        if effect.kind == EffectKind.CALENDAR_CREATE:
            raise EffectFailed("calendar said 503", permanent=False)

    worker = Worker(database, redis_client, dict.fromkeys([k.value for k in EffectKind], handler), clock=clock)
    assert await worker.run_until_idle() >= 2

    spans = {s.name: s for s in traced() if attributes(s).get("voicebook.booking_id") == booking_id}
    failed, sent = spans["effect calendar.create"], spans["effect sms.confirmation"]
    assert attributes(failed)["voicebook.effect.outcome"] == "retry"
    assert attributes(failed)["voicebook.effect.integration"] == "calendar"
    assert attributes(failed)["voicebook.effect.attempt"] == 1
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]
    assert attributes(sent)["voicebook.effect.outcome"] == "done"
    assert sent.status.status_code is trace.StatusCode.UNSET


# -- the wire -----------------------------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, Received]]:
    async with otlp_receiver() as endpoint_and_requests:
        yield endpoint_and_requests


async def test_spans_reach_an_otlp_receiver_with_the_resource(receiver: tuple[str, Received]) -> None:
    endpoint, received = receiver
    settings = Settings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint.removesuffix("/v1/traces"),
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cret%2C1",
            "OTEL_SERVICE_NAME": "voicebook-test",
            "VOICEBOOK_ENV": "development",
        }
    )
    provider = tracing.configure_tracing(settings)
    assert provider is not None
    tracer = provider.get_tracer("test")  # this provider, not the process's
    with tracer.start_as_current_span("call", attributes={"voicebook.call_sid": "CA1"}):
        with tracer.start_as_current_span("turn"):
            pass
    # The exporter posts from its own thread to the receiver served on this loop: never block the loop.
    await asyncio.to_thread(provider.shutdown)  # shutdown flushes the batch

    assert len(received) == 1
    headers, request = received[0]
    assert headers["x-api-key"] == "s3cret,1"
    (resource_spans,) = request.resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource["service.name"] == "voicebook-test"
    assert resource["deployment.environment"] == "development"
    assert resource["service.version"]
    spans = [span for scope in resource_spans.scope_spans for span in scope.spans]
    by_name = {span.name: span for span in spans}
    assert set(by_name) == {"call", "turn"}
    assert by_name["turn"].parent_span_id == by_name["call"].span_id
    assert by_name["turn"].trace_id == by_name["call"].trace_id
    call_attributes = {kv.key: kv.value.string_value for kv in by_name["call"].attributes}
    assert call_attributes == {"voicebook.call_sid": "CA1"}


def test_without_an_endpoint_nothing_is_configured() -> None:
    assert tracing.configure_tracing(Settings()) is None
    with tracing.tracing_enabled(Settings()) as provider:
        assert provider is None


def test_a_second_provider_is_not_installed_over_the_first(traced: Finished) -> None:
    installed = trace.get_tracer_provider()
    with tracing.tracing_enabled(Settings(otel_traces_endpoint="http://127.0.0.1:9/v1/traces")) as provider:
        assert provider is None
        assert trace.get_tracer_provider() is installed


def test_a_new_trace_is_sampled_at_the_ratio_and_a_call_follows_its_webhook() -> None:
    never = tracing.configure_tracing(Settings(trace_sample_ratio=0.0), exporter=InMemorySpanExporter())
    assert never is not None
    tracer = never.get_tracer("test")
    with tracer.start_as_current_span("POST /twilio/voice") as webhook:
        assert not webhook.is_recording()
        parameters = tracing.stream_parameters()
    flags = int(parameters[tracing.TRACEPARENT].rsplit("-", 1)[1], 16)
    assert flags & 0x01 == 0, "the decision (not sampled) travels with the call"
    sampled_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracer.start_as_current_span("call", context=_extract(sampled_parent)) as call:
        assert call.is_recording(), "parent-based: a sampled webhook's call is traced whatever the ratio"
    never.shutdown()


def _extract(traceparent: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def test_outside_a_span_there_is_no_traceparent_to_carry() -> None:
    assert tracing.stream_parameters() == {}


# -- logs and correlation ---------------------------------------------------------------------------------


def test_a_log_line_inside_a_span_carries_its_ids_and_outside_none(traced: Finished) -> None:
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[tracing.add_trace_context, structlog.processors.JSONRenderer()]
    )
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("turn") as span:
        inside = json.loads(logger.info("inside"))
    outside = json.loads(logger.info("outside"))
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}" and inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in outside and "span_id" not in outside


def test_the_ids_bound_for_logs_become_span_attributes(traced: Finished) -> None:
    tracer = trace.get_tracer("test")
    with structlog.contextvars.bound_contextvars(correlation_id="req-42", call_sid="CA9"):
        with tracer.start_as_current_span("POST /twilio/voice") as span:
            tracing.annotate_from_log_context(span)
    assert isinstance(span, ReadableSpan)
    assert attributes(span) == {"voicebook.correlation_id": "req-42", "voicebook.call_sid": "CA9"}


# -- settings ---------------------------------------------------------------------------------------------


def test_otel_settings_are_read_from_the_standard_variables() -> None:
    base = Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert base.otel_traces_endpoint == "http://collector:4318/v1/traces"
    assert base.otel_service_name == "voicebook" and base.trace_sample_ratio == 1.0
    own = Settings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/otlp/v1/traces",
            "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc, x-team = voice",
            "VOICEBOOK_TRACE_SAMPLE_RATIO": "0.25",
        }
    )
    assert own.otel_traces_endpoint == "https://traces.example/otlp/v1/traces"
    assert own.otel_headers == (("authorization", "Bearer abc"), ("x-team", "voice"))
    assert own.trace_sample_ratio == 0.25
    assert "Bearer" not in repr(own)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "URL scheme must be one of http, https"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://collector:4317", "URL scheme must be one of http, https"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key", "entry 1 is not name=value"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "a=1,bad name=2", "entry 2 is not name=value"),
        ("VOICEBOOK_TRACE_SAMPLE_RATIO", "1.5", "1.5 is outside 0..1"),
        ("VOICEBOOK_TRACE_SAMPLE_RATIO", "half", "'half' is not a number"),
        ("VOICEBOOK_TRACE_SAMPLE_RATIO", "nan", "outside 0..1"),
    ],
)
def test_malformed_otel_settings_are_refused_by_name(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    assert f"{variable}: " in str(caught.value) and message in str(caught.value)


def test_otel_headers_are_not_echoed_when_malformed() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"OTEL_EXPORTER_OTLP_HEADERS": "Authorization Bearer-s3cret"})
    assert "s3cret" not in str(caught.value)
