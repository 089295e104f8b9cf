"""Text messages through twilio's own REST client against the Messages simulator on loopback: sends,
refusals translated into EffectFailed, signed status callbacks and inbound texts, and the rate limiter."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from booking.errors import EffectFailed
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from integrations.simulators.twilio_messages import (
    Fault,
    MessagesState,
    Outcome,
    add_message_routes,
    create_twilio_messages_simulator,
)
from integrations.twilio_sms import SenderRateLimiter, TwilioSMS
from tests.conftest import serving

ACCOUNT = "AC" + "1" * 32
TOKEN = "2" * 32
FROM = "+12125550100"
TO = "+12125550123"


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[MessagesState, str]]:
    state = MessagesState(ACCOUNT, TOKEN)
    async with serving(create_twilio_messages_simulator(state), lifespan="on") as url:
        yield state, url


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[list[tuple[dict[str, str], bool]], str]]:
    """A small webhook app that checks each request's signature as voicebook's handler would."""
    received: list[tuple[dict[str, str], bool]] = []
    validator = RequestValidator(TOKEN)

    async def webhook(request: Request) -> Response:
        params = {name: str(value) for name, value in (await request.form()).items()}
        valid = validator.validate(str(request.url), params, request.headers.get("X-Twilio-Signature", ""))
        received.append((params, bool(valid)))
        return Response(status_code=204 if valid else 403)

    app = Starlette(routes=[Route("/sms/{kind}", webhook, methods=["POST"])])
    async with serving(app, lifespan="off") as url:
        yield received, url


async def test_send_creates_exactly_one_message(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    sms = TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url)
    sent = await sms.send(TO, "Hi Ana, your check-up is confirmed. Ref A1B2C3.", idempotency_key="effect-1")
    [message] = state.messages.values()
    assert (sent.sid, sent.status, sent.segments) == (message.sid, "queued", 1)
    assert (message.to, message.from_number, message.body) == (
        TO,
        FROM,
        "Hi Ana, your check-up is confirmed. Ref A1B2C3.",
    )


async def test_messaging_service_is_accepted_first(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    service = "MG" + "4" * 32
    sent = await TwilioSMS(ACCOUNT, TOKEN, messaging_service_sid=service, api_base_url=url).send(
        TO, "hello", idempotency_key="k"
    )
    assert sent.status == "accepted" and state.messages[sent.sid].messaging_service_sid == service


async def test_opted_out_recipient_is_a_permanent_failure(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    state.opted_out.add(TO)
    with pytest.raises(EffectFailed) as failure:
        await TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url).send(TO, "hello", idempotency_key="k")
    assert failure.value.permanent and failure.value.code == "opted_out" and not state.messages


@pytest.mark.parametrize("number", ["2125550123", "+12125550999"])
async def test_invalid_or_landline_number_is_permanent(simulator: tuple[MessagesState, str], number: str) -> None:
    state, url = simulator
    state.landlines.add("+12125550999")
    with pytest.raises(EffectFailed) as failure:
        await TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url).send(number, "hi", idempotency_key="k")
    assert failure.value.permanent and failure.value.code == "invalid_number"


async def test_rate_limit_is_transient_with_retry_after(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    state.retry_after = 7
    state.fail_next(Fault.RATE_LIMIT)
    sms = TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url)
    with pytest.raises(EffectFailed) as failure:
        await sms.send(TO, "hello", idempotency_key="k")
    assert not failure.value.permanent and failure.value.retry_after == 7.0 and failure.value.code == "rate_limited"
    assert not state.messages
    await sms.send(TO, "hello", idempotency_key="k")  # the fault was for one request only
    assert len(state.messages) == 1


async def test_server_errors_and_outages_are_transient_bad_credentials_permanent(
    simulator: tuple[MessagesState, str],
) -> None:
    state, url = simulator
    state.fail_next(Fault.SERVER_ERROR)
    with pytest.raises(EffectFailed) as server_error:
        await TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url).send(TO, "hi", idempotency_key="k")
    assert not server_error.value.permanent and server_error.value.code == "provider_error"
    with pytest.raises(EffectFailed) as bad_token:
        await TwilioSMS(ACCOUNT, "f" * 32, from_number=FROM, api_base_url=url).send(TO, "hi", idempotency_key="k")
    assert bad_token.value.permanent and bad_token.value.code == "unauthorized"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(EffectFailed) as unreachable:
        await TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=f"http://127.0.0.1:{port}").send(
            TO, "hi", idempotency_key="k"
        )
    assert not unreachable.value.permanent and unreachable.value.code == "unreachable"
    assert not state.messages


async def test_a_late_answer_is_an_unknown_outcome_and_the_message_exists(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    state.fail_next(Fault.TIMEOUT)
    with pytest.raises(EffectFailed) as failure:
        await TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url, timeout=0.3).send(
            TO, "hi", idempotency_key="k"
        )
    state.release_hung()
    assert not failure.value.permanent and failure.value.code == "outcome_unknown"
    assert len(state.messages) == 1  # why a blind retry would double the text


async def test_bodies_out_of_bounds_are_refused_before_sending(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    sms = TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url)
    for body in ("  ", "a" * 1601):
        with pytest.raises(EffectFailed) as failure:
            await sms.send(TO, body, idempotency_key="k")
        assert failure.value.permanent and failure.value.code == "invalid_body"
    assert state.requests == 0


async def test_fault_fraction_is_reproducible_for_a_seed(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    sms = TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url)

    async def pattern() -> list[bool]:
        state.fail_fraction(Fault.SERVER_ERROR, 0.5, seed=11)
        outcomes = []
        for _ in range(8):
            try:
                await sms.send(TO, "hi", idempotency_key="k")
                outcomes.append(True)
            except EffectFailed:
                outcomes.append(False)
        return outcomes

    first, second = await pattern(), await pattern()
    assert first == second and True in first and False in first


async def test_status_callbacks_arrive_signed_and_name_the_effect(
    simulator: tuple[MessagesState, str], receiver: tuple[list[tuple[dict[str, str], bool]], str]
) -> None:
    state, url = simulator
    received, receiver_url = receiver
    state.outcomes["+12125550124"] = Outcome(("sent", "undelivered"), error_code=30003)
    sms = TwilioSMS(
        ACCOUNT, TOKEN, from_number=FROM, api_base_url=url, status_callback_url=f"{receiver_url}/sms/status"
    )
    delivered = await sms.send(TO, "hi", idempotency_key="effect-7")
    undelivered = await sms.send("+12125550124", "hi", idempotency_key="effect-8")
    await state.settle()
    assert all(valid for _, valid in received) and len(received) == 4
    by_sid = {sid: [p for p, _ in received if p["MessageSid"] == sid] for sid in (delivered.sid, undelivered.sid)}
    assert [p["MessageStatus"] for p in by_sid[delivered.sid]] == ["sent", "delivered"]
    assert [(p["MessageStatus"], p.get("ErrorCode")) for p in by_sid[undelivered.sid]] == [
        ("sent", None),
        ("undelivered", "30003"),
    ]
    callback = state.messages[delivered.sid].status_callback
    assert callback is not None and parse_qs(urlsplit(callback).query) == {"effect": ["effect-7"]}
    assert state.messages[undelivered.sid].status == "undelivered"


async def test_a_forged_callback_fails_validation(receiver: tuple[list[tuple[dict[str, str], bool]], str]) -> None:
    received, receiver_url = receiver
    impostor = MessagesState(ACCOUNT, "9" * 32)
    response = await impostor.inject_inbound(TO, FROM, "STOP", f"{receiver_url}/sms/inbound")
    assert response.status_code == 403 and received[0][1] is False


async def test_inbound_text_is_posted_signed(receiver: tuple[list[tuple[dict[str, str], bool]], str]) -> None:
    received, receiver_url = receiver
    response = await MessagesState(ACCOUNT, TOKEN).inject_inbound(TO, FROM, " stop ", f"{receiver_url}/sms/inbound")
    assert response.status_code == 204
    [(params, valid)] = received
    assert valid and params["Body"] == " stop " and params["From"] == TO and params["To"] == FROM
    assert params["AccountSid"] == ACCOUNT and params["MessageSid"].startswith("SM")


async def test_messages_mount_beside_the_calls_simulator() -> None:
    calls = TwilioState(ACCOUNT, TOKEN)
    messages = MessagesState(ACCOUNT, TOKEN)
    app = create_twilio_simulator(calls)
    add_message_routes(app, messages)
    async with serving(app, lifespan="off") as url:
        await TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url).send(TO, "hi", idempotency_key="k")
    assert len(messages.sent_to(TO)) == 1


# -- the rate limiter, on virtual time ------------------------------------------------------------


class VirtualTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_rate_limiter_lets_a_burst_through_then_spaces_sends() -> None:
    time = VirtualTime()
    limiter = SenderRateLimiter(2.0, burst=3, clock=time.clock, sleep=time.sleep)
    starts = []
    for _ in range(7):
        await limiter.acquire()
        starts.append(time.now)
    assert starts == [0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    time.now += 10.0  # idle: the bucket refills to the burst, no more
    waits = [await limiter.acquire() for _ in range(4)]
    assert waits == [0.0, 0.0, 0.0, 0.5]


async def test_rate_limiter_queues_concurrent_senders_and_refunds_a_cancelled_one() -> None:
    time = VirtualTime()
    gate = asyncio.Event()

    async def blocked_sleep(seconds: float) -> None:
        time.sleeps.append(seconds)
        await gate.wait()

    limiter = SenderRateLimiter(4.0, burst=1, clock=time.clock, sleep=blocked_sleep)
    tasks = [asyncio.create_task(limiter.acquire()) for _ in range(4)]
    await asyncio.sleep(0)
    assert time.sleeps == [0.25, 0.5, 0.75]  # each later caller waits one interval more
    tasks[3].cancel()
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:3] == [0.0, 0.25, 0.5] and isinstance(results[3], asyncio.CancelledError)
    gate.clear()
    next_caller = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert time.sleeps[-1] == 0.75  # the cancelled caller's slot was given back
    gate.set()
    await next_caller


async def test_adapter_waits_for_the_limiter(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    time = VirtualTime()
    limiter = SenderRateLimiter(1.0, burst=1, clock=time.clock, sleep=time.sleep)
    sms = TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url, rate_limiter=limiter)
    for index in range(3):
        await sms.send(TO, f"message {index}", idempotency_key=f"k{index}")
    assert time.sleeps == [1.0, 1.0] and len(state.messages) == 3


async def test_find_sent_sees_a_message_whose_answer_was_lost(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    since = datetime.now(UTC)
    sms = TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url, timeout=0.3)
    body = "Hi Ana, your check-up is confirmed. Ref A1B2C3."
    assert await sms.find_sent(TO, body, since=since) is None
    await sms.send(TO, "another text", idempotency_key="other")
    state.fail_next(Fault.TIMEOUT)
    with pytest.raises(EffectFailed):
        await sms.send(TO, body, idempotency_key="k")
    state.release_hung()
    found = await sms.find_sent(TO, body, since=since)
    [message] = [m for m in state.messages.values() if m.body == body]
    assert found is not None and found.sid == message.sid
    assert await sms.find_sent("+12125550199", body, since=since) is None  # another recipient
    assert await sms.find_sent(TO, body, since=since + timedelta(minutes=5)) is None  # created before the effect


async def test_find_sent_failures_are_transient(simulator: tuple[MessagesState, str]) -> None:
    state, url = simulator
    state.fail_next(Fault.SERVER_ERROR)
    with pytest.raises(EffectFailed) as failure:
        await TwilioSMS(ACCOUNT, TOKEN, from_number=FROM, api_base_url=url).find_sent(TO, "x", since=datetime.now(UTC))
    assert not failure.value.permanent and failure.value.code == "list_failed"
