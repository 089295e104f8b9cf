"""Prometheus metrics through the real app: calls, turns, barge-ins, key presses, rejected frames and
webhooks over a real uvicorn with a websockets client playing Twilio; bookings through the HTTP API on a
real ledger and Redis; provider requests against the simulators; the event-loop lag monitor; and the
multi-process aggregation with two real processes.

The registry is process-global, so every assertion is on a delta (``sample`` before and after)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import requests
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import integrations.metrics
from booking.business import Business
from booking.errors import EffectFailed
from booking.metrics import sample
from integrations.google_calendar import GoogleCalendar
from integrations.metrics import classify_error, provider_request, provider_stream
from integrations.simulators.google_calendar import CalendarFaults, CalendarState, service_account_info
from integrations.simulators.loopback import loopback_socket
from integrations.simulators.twilio_messages import Fault, MessagesState, create_twilio_messages_simulator
from integrations.twilio_sms import TwilioSMS
from tests.conftest import FrozenClock, running_app, serving
from tests.test_google_calendar import make_booking
from tests.test_media_session import AUTH_TOKEN, GREETING_MARKS, Server, dial, hear_greeting
from tests.voice_fakes import SlowTools, scripted_ports
from voice_server import metrics as voice_metrics
from voice_server.api import metrics as metrics_api
from voice_server.app import create_app
from voice_server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ADMIN = {"Authorization": "Bearer test-admin-token-0123456789"}  # as in the app_settings fixture


@contextlib.asynccontextmanager
async def voice_server(app_settings: Settings, clock: FrozenClock, script: list[str]) -> AsyncIterator[Server]:
    """The real app on uvicorn, scripted speech and agent (tests/voice_fakes.py), everything else real."""
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    tools = SlowTools()
    settings = dataclasses.replace(app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN)
    app = create_app(settings, clock=clock, voice=scripted_ports(script, tools))
    async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
        yield Server(app, base, tools)


async def wait_until_filed(server: Server, active: float) -> None:
    """Until the calls have ended and been filed: the media endpoint counts a call ended once its session
    has finished ending, after it left ``sessions``."""
    for _ in range(500):
        if not server.app.state.components.sessions and sample("voicebook_calls_active") == active:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"calls still active: {sample('voicebook_calls_active')}, expected {active}")


# -- calls, turns, barge-ins -----------------------------------------------------------------------


async def test_a_call_is_counted_active_then_ended_and_its_turn_observed(
    app_settings: Settings, clock: FrozenClock
) -> None:
    before = {
        "total": sample("voicebook_calls_total"),
        "active": sample("voicebook_calls_active"),
        "stop": sample("voicebook_calls_ended_total", {"reason": "stop"}),
        "speech": sample("voicebook_turns_total", {"trigger": "speech"}),
        "v2v": sample("voicebook_turn_voice_to_voice_server_seconds_count"),
        "overhead": sample("voicebook_turn_server_overhead_seconds_count"),
        "accepted": sample("voicebook_webhook_requests_total", {"endpoint": "/twilio/media", "status": "101"}),
        "lag": sample("voicebook_event_loop_lag_seconds_count"),
    }
    async with voice_server(app_settings, clock, ["I would like a checkup"]) as server:
        async with dial(server) as caller:
            await hear_greeting(caller)
            assert sample("voicebook_calls_active") == before["active"] + 1
            assert sample("voicebook_calls_total") == before["total"] + 1
            await caller.say()
            await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 2)
            await caller.stop()
        await wait_until_filed(server, before["active"])
        assert sample("voicebook_calls_ended_total", {"reason": "stop"}) == before["stop"] + 1
        assert sample("voicebook_turns_total", {"trigger": "speech"}) == before["speech"] + 1
        assert sample("voicebook_turn_voice_to_voice_server_seconds_count") == before["v2v"] + 1
        assert sample("voicebook_turn_server_overhead_seconds_count") == before["overhead"] + 1
        assert sample("voicebook_turn_voice_to_voice_server_seconds_sum") > 0
        accepted = sample("voicebook_webhook_requests_total", {"endpoint": "/twilio/media", "status": "101"})
        assert accepted == before["accepted"] + 1
    # The app ran for longer than one 0.1 s tick of the lag monitor.
    assert sample("voicebook_event_loop_lag_seconds_count") > before["lag"]


async def test_barge_in_key_press_and_a_rejected_frame_are_counted(app_settings: Settings, clock: FrozenClock) -> None:
    barge_ins = sample("voicebook_barge_ins_total")
    digits = sample("voicebook_dtmf_digits_total")
    dtmf_turns = sample("voicebook_turns_total", {"trigger": "dtmf"})
    malformed = sample("voicebook_media_frames_rejected_total", {"reason": "malformed_json"})
    active = sample("voicebook_calls_active")
    async with voice_server(app_settings, clock, ["I would like a checkup", "tell me a story"]) as server:
        async with dial(server) as caller:
            await hear_greeting(caller)
            await caller.ws.send("{not json")
            await caller.say()  # "I would like a checkup"
            await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 2)
            await caller.say()  # "tell me a story": eight long sentences
            await caller.wait_for(lambda: len(caller.marks_echoed) >= GREETING_MARKS + 4)
            clears = caller.clears
            await caller.say(loud_ms=100, then_silence_ms=0)  # the caller talks over the story
            await caller.wait_for(lambda: caller.clears == clears + 1)
            await caller.dtmf("1")
            await caller.wait_for(lambda: sample("voicebook_turns_total", {"trigger": "dtmf"}) == dtmf_turns + 1)
            await caller.stop()
        await wait_until_filed(server, active)
    assert sample("voicebook_barge_ins_total") == barge_ins + 1
    assert sample("voicebook_dtmf_digits_total") == digits + 1
    assert sample("voicebook_media_frames_rejected_total", {"reason": "malformed_json"}) == malformed + 1


async def test_bad_twilio_signatures_are_counted_as_403(app_settings: Settings, clock: FrozenClock) -> None:
    voice = {"endpoint": "/twilio/voice", "status": "403"}
    media = {"endpoint": "/twilio/media", "status": "403"}
    voice_before, media_before = (
        sample("voicebook_webhook_requests_total", voice),
        sample("voicebook_webhook_requests_total", media),
    )
    async with voice_server(app_settings, clock, []) as server:
        async with httpx.AsyncClient() as http:
            refused = await http.post(
                f"{server.base}/twilio/voice", data={"CallSid": "CA" + "b" * 32}, headers={"X-Twilio-Signature": "x"}
            )
        assert refused.status_code == 403
        with pytest.raises(InvalidStatus):
            async with connect(server.media_url, additional_headers=server.signature(token="f" * 32)):
                pass
    assert sample("voicebook_webhook_requests_total", voice) == voice_before + 1
    assert sample("voicebook_webhook_requests_total", media) == media_before + 1


# -- bookings --------------------------------------------------------------------------------------


def booking_body(start: str) -> dict[str, object]:
    return {
        "service": "checkup",
        "resource": "dr-lee",
        "start": start,
        "customer": {"phone": "(212) 555-0142", "name": "Alice Rivera"},
    }


async def test_bookings_are_counted_by_operation_and_outcome(app_settings: Settings, clock: FrozenClock) -> None:
    pairs = [
        ("book", "done"),
        ("book", "unavailable"),
        ("book", "rejected"),
        ("cancel", "done"),
        ("reschedule", "done"),
    ]

    def counts() -> dict[tuple[str, str], float]:
        return {(op, out): sample("voicebook_bookings_total", {"operation": op, "outcome": out}) for op, out in pairs}

    stages = [(op, stage) for op in ("book", "reschedule") for stage in ("hold", "ledger", "index")]

    def stage_counts() -> dict[tuple[str, str], float]:
        return {
            (op, stage): sample("voicebook_booking_stage_seconds_count", {"operation": op, "stage": stage})
            for op, stage in stages
        }

    before = counts()
    stages_before = stage_counts()
    timed = sample("voicebook_booking_seconds_count", {"operation": "book"})
    async with running_app(app_settings, clock) as (_, client):
        made = await client.post("/api/bookings", json=booking_body("2026-12-01T10:00"), headers=ADMIN)
        assert made.status_code == 201, made.text
        taken = await client.post("/api/bookings", json=booking_body("2026-12-01T10:00"), headers=ADMIN)
        assert taken.status_code == 409
        unknown = await client.post(
            "/api/bookings", json={**booking_body("2026-12-01T11:00"), "service": "telepathy"}, headers=ADMIN
        )
        assert unknown.status_code in (400, 422)
        booking_id = made.json()["id"]
        moved = await client.patch(f"/api/bookings/{booking_id}", json={"start": "2026-12-01T14:00"}, headers=ADMIN)
        assert moved.status_code == 200, moved.text
        cancelled = await client.delete(f"/api/bookings/{booking_id}", headers=ADMIN)
        assert cancelled.status_code == 200, cancelled.text
    after = counts()
    assert {pair: after[pair] - before[pair] for pair in after} == {
        ("book", "done"): 1,
        ("book", "unavailable"): 1,
        ("book", "rejected"): 1,
        ("cancel", "done"): 1,
        ("reschedule", "done"): 1,
    }
    assert sample("voicebook_booking_seconds_count", {"operation": "book"}) == timed + 3
    stages_after = stage_counts()
    # The taken slot stops at its hold; the unknown service never reaches one.
    assert {pair: stages_after[pair] - stages_before[pair] for pair in stages} == {
        ("book", "hold"): 2,
        ("book", "ledger"): 1,
        ("book", "index"): 1,
        ("reschedule", "hold"): 1,
        ("reschedule", "ledger"): 1,
        ("reschedule", "index"): 1,
    }


# -- providers -------------------------------------------------------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The provider spans, recorded. The OpenTelemetry API takes one global provider per process (the
    tracing tests install theirs), so this swaps in a tracer of a local SDK provider for the test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(integrations.metrics, "_tracer", provider.get_tracer("voicebook.providers"))
    yield exporter
    provider.shutdown()


def attributes(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


async def test_twilio_refusals_are_counted_by_kind_and_traced(spans: InMemorySpanExporter) -> None:
    account, token = "AC" + "1" * 32, "2" * 32
    state = MessagesState(account, token)
    ok = {"provider": "twilio", "operation": "messages.create", "outcome": "ok"}
    failed = {**ok, "outcome": "error"}
    kinds = ("rate_limited", "unavailable")
    before = [sample("voicebook_provider_requests_total", labels) for labels in (ok, failed)]
    errors = {kind: sample("voicebook_provider_errors_total", {"provider": "twilio", "kind": kind}) for kind in kinds}
    async with serving(create_twilio_messages_simulator(state), lifespan="on") as url:
        sms = TwilioSMS(account, token, from_number="+12125550100", api_base_url=url)
        try:
            state.fail_next(Fault.RATE_LIMIT)
            with pytest.raises(EffectFailed):
                await sms.send("+12125550123", "Your check-up is confirmed.", idempotency_key="m-1")
            state.fail_next(Fault.SERVER_ERROR)
            with pytest.raises(EffectFailed):
                await sms.send("+12125550123", "Your check-up is confirmed.", idempotency_key="m-2")
            await sms.send("+12125550123", "Your check-up is confirmed.", idempotency_key="m-3")
        finally:
            sms.close()
    assert sample("voicebook_provider_requests_total", ok) == before[0] + 1
    assert sample("voicebook_provider_requests_total", failed) == before[1] + 2
    for kind in kinds:
        assert sample("voicebook_provider_errors_total", {"provider": "twilio", "kind": kind}) == errors[kind] + 1
    finished = spans.get_finished_spans()
    assert [span.name for span in finished] == ["twilio messages.create"] * 3
    assert [attributes(span)["voicebook.provider.outcome"] for span in finished] == ["error", "error", "ok"]
    assert [attributes(span).get("voicebook.provider.error_kind") for span in finished] == [
        "rate_limited",
        "unavailable",
        None,
    ]


async def test_calendar_faults_count_as_errors_and_a_delete_of_a_gone_event_as_ok(
    calendar_sim: tuple[CalendarState, str], private_key_pem: str, business: Business, spans: InMemorySpanExporter
) -> None:
    state, url = calendar_sim
    calendar = GoogleCalendar.from_service_account(
        service_account_info(url, private_key_pem), api_endpoint=f"{url}/calendar/v3/", timeout=5.0
    )
    labels = {"provider": "google_calendar", "operation": "insert"}
    before = {
        "ok": sample("voicebook_provider_requests_total", {**labels, "outcome": "ok"}),
        "error": sample("voicebook_provider_requests_total", {**labels, "outcome": "error"}),
        "rate_limited": sample(
            "voicebook_provider_errors_total", {"provider": "google_calendar", "kind": "rate_limited"}
        ),
        "unavailable": sample(
            "voicebook_provider_errors_total", {"provider": "google_calendar", "kind": "unavailable"}
        ),
        "deleted": sample(
            "voicebook_provider_requests_total", {"provider": "google_calendar", "operation": "delete", "outcome": "ok"}
        ),
        "timed": sample("voicebook_provider_request_seconds_count", labels),
    }
    booking = make_booking()
    try:
        state.faults = CalendarFaults(next=["403", "503"])  # Google's usage limit is a 403 with a reason
        for _ in range(2):
            with pytest.raises(EffectFailed):
                await calendar.create(booking, business)
        await calendar.create(booking, business)
        await calendar.delete(booking, business)
        await calendar.delete(booking, business)  # gone already: Google answers 410, the adapter's "done"
    finally:
        calendar.close()
    assert sample("voicebook_provider_requests_total", {**labels, "outcome": "ok"}) == before["ok"] + 1
    assert sample("voicebook_provider_requests_total", {**labels, "outcome": "error"}) == before["error"] + 2
    for kind in ("rate_limited", "unavailable"):
        assert (
            sample("voicebook_provider_errors_total", {"provider": "google_calendar", "kind": kind}) == before[kind] + 1
        )
    deleted = sample(
        "voicebook_provider_requests_total", {"provider": "google_calendar", "operation": "delete", "outcome": "ok"}
    )
    assert deleted == before["deleted"] + 2
    assert sample("voicebook_provider_request_seconds_count", labels) == before["timed"] + 3
    assert {span.name for span in spans.get_finished_spans()} == {"google_calendar insert", "google_calendar delete"}


async def test_a_stream_is_one_request_and_closing_it_early_is_not_an_error(spans: InMemorySpanExporter) -> None:
    labels = {"provider": "openai", "operation": "test-stream"}
    ok, failed = (sample("voicebook_provider_requests_total", {**labels, "outcome": o}) for o in ("ok", "error"))

    async def chunks() -> AsyncIterator[str]:
        for word in ("one", "two", "three"):
            yield word

    whole = [word async for word in provider_stream("openai", "test-stream", chunks())]
    assert whole == ["one", "two", "three"]
    async with contextlib.aclosing(provider_stream("openai", "test-stream", chunks())) as stream:
        async for _ in stream:
            break  # a barge-in: the reply is dropped after its first chunk
    assert sample("voicebook_provider_requests_total", {**labels, "outcome": "ok"}) == ok + 1  # not the closed one
    assert sample("voicebook_provider_requests_total", {**labels, "outcome": "error"}) == failed
    assert [attributes(span)["voicebook.provider.outcome"] for span in spans.get_finished_spans()] == [
        "ok",
        "cancelled",
    ]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (TimeoutError(), "timeout"),
        (httpx.ReadTimeout("slow"), "timeout"),
        (requests.ConnectTimeout(), "timeout"),
        (httpx.ConnectError("refused"), "connection"),
        (requests.ConnectionError(), "connection"),
        (ConnectionResetError(), "connection"),
        (EffectFailed("Twilio refused", permanent=True, code="rejected"), "rejected"),
        (EffectFailed("busy", permanent=False, code="receiver_busy"), "unavailable"),
        (EffectFailed("no key", permanent=True, code="unauthorized"), "auth"),
        (ValueError("a bug"), "other"),
    ],
)
def test_error_kinds(error: BaseException, kind: str) -> None:
    assert classify_error(error) == kind


@pytest.mark.parametrize(
    ("status", "kind"), [(429, "rate_limited"), (401, "auth"), (400, "rejected"), (502, "unavailable")]
)
def test_the_status_under_an_adapter_error_decides_its_kind(status: int, kind: str) -> None:
    response = httpx.Response(status, request=httpx.Request("POST", "https://provider.test/"))
    try:
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as raw:
            raise EffectFailed("refused", permanent=True) from raw
    except EffectFailed as error:
        assert classify_error(error) == kind


def test_a_request_in_a_thread_is_counted() -> None:
    labels = {"provider": "storage", "operation": "test-thread"}
    failed = sample("voicebook_provider_requests_total", {**labels, "outcome": "error"})
    connection = sample("voicebook_provider_errors_total", {"provider": "storage", "kind": "connection"})

    def work() -> None:
        with contextlib.suppress(OSError), provider_request("storage", "test-thread"):
            raise FileNotFoundError("gone")

    asyncio.run(asyncio.to_thread(work))
    assert sample("voicebook_provider_requests_total", {**labels, "outcome": "error"}) == failed + 1
    assert sample("voicebook_provider_errors_total", {"provider": "storage", "kind": "connection"}) == connection + 1


# -- the event loop --------------------------------------------------------------------------------


async def test_a_blocked_loop_shows_as_lag() -> None:
    def above_100ms() -> float:
        return sample("voicebook_event_loop_lag_seconds_count") - sample(
            "voicebook_event_loop_lag_seconds_bucket", {"le": "0.1"}
        )

    late_before = above_100ms()
    async with voice_metrics.watching_event_loop(interval=0.05):
        await asyncio.sleep(0.06)  # the monitor's first timer is set
        time.sleep(0.3)  # blocks the loop: that timer fires at least 0.25 s late  # noqa: ASYNC251
        await asyncio.sleep(0.01)
    assert above_100ms() >= late_before + 1


async def test_collector_pauses_are_timed_by_generation_while_the_loop_is_watched() -> None:
    def runs(generation: int) -> float:
        return sample("voicebook_gc_pause_seconds_count", {"generation": str(generation)})

    def seconds(generation: int) -> float:
        return sample("voicebook_gc_pause_seconds_sum", {"generation": str(generation)})

    before = {generation: (runs(generation), seconds(generation)) for generation in range(3)}
    async with voice_metrics.watching_event_loop(), voice_metrics.watching_event_loop():  # installed once
        assert gc.callbacks.count(voice_metrics.COLLECTOR_PAUSES) == 1
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        await asyncio.sleep(1.1)  # observed by the loop's next flush, while the block still runs
        assert runs(2) >= before[2][0] + 2
    assert runs(0) >= before[0][0] + 1 and seconds(0) > before[0][1]
    assert runs(2) >= before[2][0] + 2 and seconds(2) > before[2][1]
    assert voice_metrics.COLLECTOR_PAUSES not in gc.callbacks  # removed when the last block ended
    after = runs(2)
    gc.collect(2)
    assert runs(2) == after


def test_pauses_are_observed_on_flush_not_inside_the_collection() -> None:
    pauses = voice_metrics.CollectorPauses(clock=iter([1.0, 1.25]).__next__)
    before = sample("voicebook_gc_pause_seconds_count", {"generation": "1"})
    total = sample("voicebook_gc_pause_seconds_sum", {"generation": "1"})
    pauses("stop", {"generation": 1, "collected": 0, "uncollectable": 0})  # no start seen: ignored
    pauses("start", {"generation": 1})
    pauses("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    # Nothing touched prometheus_client (and its lock) from the hook: a collection may begin while it is held.
    assert sample("voicebook_gc_pause_seconds_count", {"generation": "1"}) == before
    pauses.flush()
    assert sample("voicebook_gc_pause_seconds_count", {"generation": "1"}) == before + 1
    assert sample("voicebook_gc_pause_seconds_sum", {"generation": "1"}) == pytest.approx(total + 0.25)
    pauses.flush()
    assert sample("voicebook_gc_pause_seconds_count", {"generation": "1"}) == before + 1


# -- several processes -----------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from voice_server import metrics
    for _ in range(int(sys.argv[1])):
        metrics.call_started()
    for _ in range(int(sys.argv[2])):
        metrics.call_ended("stop")
    if sys.argv[3] == "exit":
        metrics.mark_process_dead()
    """
)


def run_child(directory: Path, started: int, ended: int, how: str) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run(
        [sys.executable, "-c", CHILD, str(started), str(ended), how], cwd=REPO, env=env, check=True, timeout=60
    )


async def test_metrics_of_several_processes_are_aggregated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await asyncio.to_thread(run_child, tmp_path, 2, 0, "still-running")  # its live gauge stays in
    await asyncio.to_thread(run_child, tmp_path, 2, 1, "exit")  # exits the way `voicebook` does
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    app = Starlette(routes=metrics_api.routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metrics.test") as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in text_string_to_metric_families(response.text)
        for s in metric.samples
    }
    assert values[("voicebook_calls_total", ())] == 4  # counters are summed over every process
    assert values[("voicebook_calls_ended_total", (("reason", "stop"),))] == 1
    assert values[("voicebook_calls_active", ())] == 2  # livesum: only the process still running
