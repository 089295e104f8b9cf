"""Provider errors counted by the right kind where the generic rules used to miss or misname them:
Google's usage-limit 403s (a rate limit, not an auth failure) through the real google-api-python-client
against the Calendar simulator, and a Deepgram stream that breaks after its handshake through the real
deepgram SDK against the Deepgram simulator.

The Prometheus registry is process-global, so every assertion is on a delta."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
from structlog.testing import capture_logs

from booking.business import Business
from booking.errors import EffectFailed
from booking.metrics import sample
from integrations.deepgram_stt import DeepgramSTT, StreamState, dropped_stream_kind, error_message_kind
from integrations.google_calendar import GoogleCalendar, classify
from integrations.metrics import ErrorKind, classify_error, google_error_reasons
from integrations.simulators.deepgram import DeepgramSimConfig
from integrations.simulators.deepgram_listen import ListenFaults
from integrations.simulators.google_calendar import CalendarFaults, CalendarState, FaultKind, service_account_info
from tests.test_deepgram import (
    CALL,
    DROP_AFTER_FIRST_RESULT,
    FAST_INTERIMS,
    collect,
    end_of_turn,
    eventually,
    feed,
    finals,
    simulator,
    speak_through_a_drop,
    utterance,
)
from tests.test_google_calendar import http_error, make_booking
from voice_server.ports import Transcript

KINDS: tuple[ErrorKind, ...] = get_args(ErrorKind)


def errors(provider: str) -> dict[str, float]:
    return {kind: sample("voicebook_provider_errors_total", {"provider": provider, "kind": kind}) for kind in KINDS}


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The kinds whose count changed, and by how much."""
    return {kind: after[kind] - before[kind] for kind in before if after[kind] != before[kind]}


# -- Google Calendar: usage limits answered with 403 ------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "kind", "permanent"),
    [
        ("403", "rate_limited", False),  # rateLimitExceeded: per minute, retried
        ("403user", "rate_limited", False),  # userRateLimitExceeded: per minute, retried
        ("403daily", "rate_limited", True),  # dailyLimitExceeded: outlasts the outbox's retries
        ("403quota", "rate_limited", True),  # quotaExceeded: Calendar's own usage limits
        ("403forbidden", "auth", True),  # forbidden: no access to the calendar
    ],
)
async def test_a_calendar_403_counts_by_its_reason(
    calendar_sim: tuple[CalendarState, str],
    private_key_pem: str,
    business: Business,
    fault: FaultKind,
    kind: str,
    permanent: bool,
) -> None:
    state, url = calendar_sim
    calendar = GoogleCalendar.from_service_account(
        service_account_info(url, private_key_pem), api_endpoint=f"{url}/calendar/v3/", timeout=5.0
    )
    before = errors("google_calendar")
    try:
        state.faults = CalendarFaults(next=[fault])
        with pytest.raises(EffectFailed) as failed:
            await calendar.create(make_booking(), business)
    finally:
        calendar.close()
    assert grown(before, errors("google_calendar")) == {kind: 1}
    assert failed.value.permanent is permanent  # the adapter's retry verdict is unchanged
    assert "403" in failed.value.detail


@pytest.mark.parametrize(
    ("status", "reason", "kind"),
    [
        (403, "rateLimitExceeded", "rate_limited"),
        (403, "userRateLimitExceeded", "rate_limited"),
        (403, "dailyLimitExceeded", "rate_limited"),
        (403, "quotaExceeded", "rate_limited"),
        (403, "forbidden", "auth"),
        (403, "forbiddenForServiceAccounts", "auth"),
        (403, None, "auth"),
        (429, "rateLimitExceeded", "rate_limited"),
        (401, "authError", "auth"),
    ],
)
def test_classify_error_reads_the_reason_of_a_google_403(status: int, reason: str | None, kind: str) -> None:
    raw = http_error(status, reason)
    assert classify_error(raw) == kind
    try:
        raise classify(raw, "insert", booking_id="b1") from raw
    except EffectFailed as wrapped:  # as it leaves the adapter: the raw answer under its verdict
        assert classify_error(wrapped) == kind


def test_google_error_reasons_are_read_from_the_body_only() -> None:
    assert google_error_reasons(http_error(403, "dailyLimitExceeded")) == ["dailyLimitExceeded"]
    assert google_error_reasons(http_error(403, None)) == []
    assert google_error_reasons(ValueError("dailyLimitExceeded")) == []  # no body, whatever the message says


# -- Deepgram: a stream that breaks after its handshake ---------------------------------------------

LISTEN_OK = {"provider": "deepgram", "operation": "listen", "outcome": "ok"}
LISTEN_FAILED = {**LISTEN_OK, "outcome": "error"}


async def test_a_stream_dropped_mid_call_counts_once_as_unavailable_and_the_call_carries_on() -> None:
    before = errors("deepgram")
    handshakes = sample("voicebook_provider_requests_total", LISTEN_OK)
    failed_requests = sample("voicebook_provider_requests_total", LISTEN_FAILED)
    async with simulator(DROP_AFTER_FIRST_RESULT) as (client, state):
        with capture_logs() as logs:
            events = await speak_through_a_drop(client)

    assert state.listen_closes == [(1011, "simulated drop"), (1000, "")]
    assert grown(before, errors("deepgram")) == {"unavailable": 1}
    # Both handshakes succeeded: the drop is an error of the stream, not a failed request.
    assert sample("voicebook_provider_requests_total", LISTEN_OK) == handshakes + 2
    assert sample("voicebook_provider_requests_total", LISTEN_FAILED) == failed_requests
    [dropped] = [entry for entry in logs if entry["event"] == "deepgram_stream_dropped"]
    assert dropped["log_level"] == "warning"
    assert (dropped["call_sid"], dropped["stream_sid"]) == (CALL.call_sid, CALL.stream_sid)
    assert (dropped["kind"], dropped["close_code"], dropped["close_reason"]) == ("unavailable", 1011, "simulated drop")
    # What the adapter already did on a drop: reconnect and replay, losing no words.
    assert finals(events) == [Transcript("book a cleaning tomorrow at nine", is_final=True, end_of_turn=True)]


async def test_a_clean_end_of_call_counts_no_error() -> None:
    before = errors("deepgram")
    handshakes = sample("voicebook_provider_requests_total", LISTEN_OK)
    async with simulator() as (client, state):
        with capture_logs() as logs:
            stream = await DeepgramSTT(client).open(CALL)
            await feed(stream, utterance("thanks", trail_ms=400))
            events = await collect(stream, end_of_turn)
            await stream.close()
    assert finals(events) == [Transcript("thanks", is_final=True, end_of_turn=True)]
    assert state.listen_closes == [(1000, "")]
    assert grown(before, errors("deepgram")) == {}
    assert sample("voicebook_provider_requests_total", LISTEN_OK) == handshakes + 1
    assert [entry for entry in logs if entry["event"] == "deepgram_stream_dropped"] == []


async def test_an_idle_close_mid_call_counts_as_unavailable() -> None:
    config = DeepgramSimConfig(idle_timeout_s=0.3)  # NET-0001: closed with 1011 for want of audio
    before = errors("deepgram")
    async with simulator(config) as (client, _):
        stream = await DeepgramSTT(client, keepalive_s=3600, reconnect_backoff_s=0.01).open(CALL)
        await eventually(lambda: stream.reconnects >= 1 and stream.state is StreamState.OPEN)
        await stream.close()
    assert grown(before, errors("deepgram")) == {"unavailable": stream.reconnects}


@pytest.mark.parametrize(("variant", "kind"), [("SchemaError", "rejected"), ("InternalError", "unavailable")])
async def test_an_error_message_counts_by_its_variant_and_the_stream_carries_on(variant: str, kind: str) -> None:
    faults = ListenFaults(error_after_results=1, error_variant=variant)
    config = dataclasses.replace(FAST_INTERIMS, listen=faults)
    before = errors("deepgram")
    async with simulator(config) as (client, state):
        with capture_logs() as logs:
            stream = await DeepgramSTT(client, endpointing_ms=200).open(CALL)
            await feed(stream, utterance("book a cleaning", trail_ms=400))
            events = await collect(stream, end_of_turn)
            await stream.close()
    assert state.listen_sent["Error"] == 1
    assert grown(before, errors("deepgram")) == {kind: 1}
    [error] = [entry for entry in logs if entry["event"] == "deepgram_error"]
    assert (error["call_sid"], error["kind"], error["variant"]) == (CALL.call_sid, kind, variant)
    assert stream.reconnects == 0
    assert finals(events) == [Transcript("book a cleaning", is_final=True, end_of_turn=True)]


def test_the_kind_of_a_dropped_stream_follows_its_close_code() -> None:
    assert dropped_stream_kind(1008) == "rejected"  # DATA-0000: Deepgram could not decode what we sent
    assert dropped_stream_kind(1011) == "unavailable"  # NET-0000, NET-0001
    assert dropped_stream_kind(None) == "unavailable"  # reset without a close frame, or closed unasked
    assert error_message_kind("SchemaError") == "rejected"
    assert error_message_kind("SomethingElse") == "unavailable"
