"""An effect carries the trace context of the change that enqueued it: each attempt's span in the worker is
the child of the span that booked (a call's tool call), so a call's calendar write and texts show in the
call's trace. A change made outside a sampled span stores nothing, and its effects' spans start traces of
their own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

from booking.business import Business
from booking.ledger.database import Database
from booking.ledger.repository import Created, Ledger
from booking.outbox import Effect, EffectKind, Outbox
from booking.worker import Worker
from tests.conftest import FrozenClock
from tests.test_outbox import ALICE, T0, new
from tests.tracing_support import Finished, attributes, recording

# Due at once; the reminder is due three hours later and stays pending.
DUE_NOW = {f"effect {EffectKind.CALENDAR_CREATE}", f"effect {EffectKind.SMS_CONFIRMATION}"}


@pytest.fixture
def traced() -> Iterator[Finished]:
    with recording() as finished:
        yield finished


async def book(ledger: Ledger, start: timedelta = timedelta(0)) -> str:
    created = await ledger.create_bookings(ALICE, [new(T0 + start)])
    assert isinstance(created, Created)
    return created.bookings[0].id


async def run_due_effects(database: Database, redis_client: aioredis.Redis, clock: FrozenClock) -> None:
    async def succeed(effect: Effect) -> None:
        return None

    worker = Worker(database, redis_client, dict.fromkeys([kind.value for kind in EffectKind], succeed), clock=clock)
    assert await worker.run_until_idle() >= 2


def effect_spans(spans: list[ReadableSpan], booking_id: str) -> dict[str, ReadableSpan]:
    found = {s.name: s for s in spans if attributes(s).get("voicebook.booking_id") == booking_id}
    assert set(found) == DUE_NOW
    return found


def traceparent_of(span: trace.Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


async def test_an_effect_attempt_is_the_child_of_the_span_that_booked(
    database: Database,
    redis_client: aioredis.Redis,
    ledger: Ledger,
    business: Business,
    clock: FrozenClock,
    traced: Finished,
) -> None:
    await ledger.sync_catalog(business)
    with trace.get_tracer("test").start_as_current_span("tool") as tool:
        booking_id = await book(ledger)
    stored = await Outbox(database).for_booking(booking_id)
    assert [effect.kind for effect in stored] == ["calendar.create", "sms.confirmation", "sms.reminder"]
    assert {effect.traceparent for effect in stored} == {traceparent_of(tool)}

    await run_due_effects(database, redis_client, clock)

    tool_context = tool.get_span_context()
    for span in effect_spans(traced(), booking_id).values():
        assert span.context is not None and span.parent is not None, span.name
        assert span.context.trace_id == tool_context.trace_id, span.name
        assert span.parent.span_id == tool_context.span_id, span.name
        assert span.kind is trace.SpanKind.CONSUMER


async def test_bookings_committed_together_keep_their_own_traces(
    database: Database,
    redis_client: aioredis.Redis,
    ledger: Ledger,
    business: Business,
    clock: FrozenClock,
    traced: Finished,
) -> None:
    await ledger.sync_catalog(business)
    tracer = trace.get_tracer("test")

    async def book_in_span(name: str, start: timedelta) -> tuple[trace.Span, str]:
        with tracer.start_as_current_span(name) as span:
            return span, await book(ledger, start)

    batches = database.group_commit.batches
    (first, first_id), (second, second_id) = await asyncio.gather(
        book_in_span("tool one", timedelta(0)), book_in_span("tool two", timedelta(hours=1))
    )
    # One transaction for both (group commit), run on a lane that only one of the two callers started.
    assert database.group_commit.batches == batches + 1

    outbox = Outbox(database)
    assert {e.traceparent for e in await outbox.for_booking(first_id)} == {traceparent_of(first)}
    assert {e.traceparent for e in await outbox.for_booking(second_id)} == {traceparent_of(second)}
    await run_due_effects(database, redis_client, clock)
    spans = traced()
    for tool, booking_id in ((first, first_id), (second, second_id)):
        for span in effect_spans(spans, booking_id).values():
            assert span.parent is not None and span.parent.span_id == tool.get_span_context().span_id


UNSAMPLED = trace.NonRecordingSpan(
    trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
    )
)


@pytest.mark.parametrize("current", [None, UNSAMPLED], ids=["outside a span", "in an unsampled span"])
async def test_an_untraced_change_stores_no_context_and_its_effects_start_their_own_traces(
    database: Database,
    redis_client: aioredis.Redis,
    ledger: Ledger,
    business: Business,
    clock: FrozenClock,
    traced: Finished,
    current: trace.Span | None,
) -> None:
    await ledger.sync_catalog(business)
    if current is None:
        booking_id = await book(ledger)
    else:
        with trace.use_span(current):
            booking_id = await book(ledger)
    stored = await Outbox(database).for_booking(booking_id)
    assert len(stored) == 3 and {effect.traceparent for effect in stored} == {None}

    await run_due_effects(database, redis_client, clock)

    spans = effect_spans(traced(), booking_id)
    assert all(span.parent is None for span in spans.values())
    assert len({span.context.trace_id for span in spans.values() if span.context is not None}) == 2
