"""Twilio's Messages API on loopback: sending a text, the signed status callbacks that follow it, and
inbound texts injected as Twilio's webhook. Strict where Twilio is (Basic auth, the account in the path,
To/From/Body rules, 1600 characters, opted-out recipients) and configurable where tests need it:
delivery outcomes, callback delays, latency, and faults for the next N requests or a seeded fraction.

Mount it alone (:func:`create_twilio_messages_simulator`) or on the Calls simulator
(``add_message_routes(create_twilio_simulator(calls_state), messages_state)``). Callback deliveries run
as tasks owned by the state: ``await state.settle()`` waits for them, ``await state.aclose()`` cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from booking.messages import MAX_BODY_CHARS, segments
from integrations.simulators.twilio import API, TwilioState, _authorised, _error

MESSAGES_PATH = API + "/Accounts/{account}/Messages.json"
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class Fault(enum.StrEnum):
    RATE_LIMIT = "rate_limit"  # HTTP 429, code 20429, Retry-After
    SERVER_ERROR = "server_error"  # HTTP 500, code 20500
    TIMEOUT = "timeout"  # the message is accepted; the answer waits for release_hung() or hang_seconds


@dataclass(frozen=True)
class Outcome:
    """The statuses reported by callback after the initial one, e.g. ``("sent", "delivered")`` or
    ``("sent", "undelivered")`` with ``error_code=30003``; the error code goes with the last status."""

    statuses: tuple[str, ...] = ("sent", "delivered")
    error_code: int | None = None
    delay: float = 0.0
    """Seconds before each callback."""


@dataclass
class SimulatedMessage:
    sid: str
    to: str
    from_number: str | None
    messaging_service_sid: str | None
    body: str
    status: str
    num_segments: int
    status_callback: str | None
    error_code: int | None = None
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class CallbackDelivery:
    url: str
    params: dict[str, str]
    status_code: int | None
    error: str | None = None


@dataclass
class MessagesState:
    account_sid: str
    auth_token: str
    messages: dict[str, SimulatedMessage] = field(default_factory=dict)
    opted_out: set[str] = field(default_factory=set)
    landlines: set[str] = field(default_factory=set)
    """Numbers that cannot receive texts (error 21614)."""
    outcome: Outcome = field(default_factory=Outcome)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    """Per recipient, overriding ``outcome``."""
    latency: float = 0.0
    retry_after: int = 1
    hang_seconds: float = 30.0
    callback_client: httpx.AsyncClient | None = None
    """Client for callbacks and injected webhooks (e.g. on an ``httpx.ASGITransport``); a fresh one per
    delivery when None."""
    requests: int = 0
    callbacks: list[CallbackDelivery] = field(default_factory=list)
    _pending_faults: list[Fault] = field(default_factory=list)
    _fault_fraction: tuple[Fault, float, random.Random] | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def fail_next(self, fault: Fault, count: int = 1) -> None:
        self._pending_faults.extend([fault] * count)

    def fail_fraction(self, fault: Fault, fraction: float, *, seed: int) -> None:
        """Fail about ``fraction`` of requests from now on, reproducibly for a given ``seed``."""
        self._fault_fraction = (fault, fraction, random.Random(seed)) if fraction > 0 else None

    def release_hung(self) -> None:
        """Answer the requests held by a TIMEOUT fault now (their clients have given up by then)."""
        self._release.set()
        self._release = asyncio.Event()  # later TIMEOUT faults hang again

    def sent_to(self, number: str) -> list[SimulatedMessage]:
        return [message for message in self.messages.values() if message.to == number]

    def next_fault(self) -> Fault | None:
        if self._pending_faults:
            return self._pending_faults.pop(0)
        if self._fault_fraction is not None:
            fault, fraction, rng = self._fault_fraction
            if rng.random() < fraction:
                return fault
        return None

    def sign(self, url: str, params: dict[str, str]) -> str:
        return str(RequestValidator(self.auth_token).compute_signature(url, params))

    async def post_signed(self, url: str, params: dict[str, str]) -> httpx.Response:
        headers = {"X-Twilio-Signature": self.sign(url, params)}
        async with self._client() as client:
            return await client.post(url, data=params, headers=headers)

    async def inject_inbound(
        self, from_number: str, to_number: str, body: str, url: str, *, messaging_service_sid: str | None = None
    ) -> httpx.Response:
        """POST a signed inbound-SMS webhook to ``url`` as Twilio does when someone texts ``to_number``."""
        sid = "SM" + secrets.token_hex(16)
        params = {
            "MessageSid": sid,
            "SmsMessageSid": sid,
            "SmsSid": sid,
            "AccountSid": self.account_sid,
            "From": from_number,
            "To": to_number,
            "Body": body,
            "NumMedia": "0",
            "NumSegments": str(max(1, segments(body).segments)),
            "SmsStatus": "received",
            "ApiVersion": "2010-04-01",
        }
        if messaging_service_sid is not None:
            params["MessagingServiceSid"] = messaging_service_sid
        return await self.post_signed(url, params)

    async def settle(self) -> None:
        """Wait until every scheduled callback has been delivered (or has failed)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _client(self) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        if self.callback_client is not None:
            return contextlib.nullcontext(self.callback_client)
        return httpx.AsyncClient(timeout=10.0)

    def _schedule(self, message: SimulatedMessage) -> None:
        if message.status_callback is None:
            return
        task = asyncio.create_task(self._report(message, message.status_callback))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, message: SimulatedMessage, url: str) -> None:
        outcome = self.outcomes.get(message.to, self.outcome)
        for position, status in enumerate(outcome.statuses):
            await asyncio.sleep(outcome.delay)
            last = position == len(outcome.statuses) - 1
            message.status = status
            if last and outcome.error_code is not None:
                message.error_code = outcome.error_code
            params = {
                "MessageSid": message.sid,
                "SmsSid": message.sid,
                "MessageStatus": status,
                "SmsStatus": status,
                "AccountSid": self.account_sid,
                "To": message.to,
                "ApiVersion": "2010-04-01",
            }
            if message.from_number is not None:
                params["From"] = message.from_number
            if message.messaging_service_sid is not None:
                params["MessagingServiceSid"] = message.messaging_service_sid
            if last and outcome.error_code is not None:
                params["ErrorCode"] = str(outcome.error_code)
            try:
                response = await self.post_signed(url, params)
            except httpx.HTTPError as error:
                # Twilio does not retry a status callback that fails; neither do we.
                self.callbacks.append(CallbackDelivery(url, params, None, repr(error)))
            else:
                self.callbacks.append(CallbackDelivery(url, params, response.status_code))


def _resource(state: MessagesState, message: SimulatedMessage) -> dict[str, Any]:
    created = format_datetime(message.date_created)
    return {
        "sid": message.sid,
        "account_sid": state.account_sid,
        "messaging_service_sid": message.messaging_service_sid,
        "from": message.from_number,
        "to": message.to,
        "body": message.body,
        "status": message.status,
        "num_segments": str(message.num_segments),
        "num_media": "0",
        "direction": "outbound-api",
        "api_version": "2010-04-01",
        "price": None,
        "price_unit": "USD",
        "error_code": None,
        "error_message": None,
        "date_created": created,
        "date_updated": created,
        "date_sent": None,
        "uri": f"{API}/Accounts/{state.account_sid}/Messages/{message.sid}.json",
        "subresource_uris": {"media": f"{API}/Accounts/{state.account_sid}/Messages/{message.sid}/Media.json"},
    }


def _fault_response(state: MessagesState, fault: Fault) -> Response:
    if fault is Fault.RATE_LIMIT:
        response = _error(429, 20429, "Too Many Requests")
        response.headers["Retry-After"] = str(state.retry_after)
        return response
    return _error(500, 20500, "Internal Server Error")


def _form_value(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def message_routes(state: MessagesState) -> list[Route]:
    credentials = TwilioState(state.account_sid, state.auth_token)  # the Calls simulator's auth check

    async def create_message(request: Request) -> Response:
        state.requests += 1
        if state.latency:
            await asyncio.sleep(state.latency)
        if not _authorised(request, credentials):
            return _error(401, 20003, "Authentication Error - invalid username")
        if request.path_params["account"] != state.account_sid:
            return _error(404, 20404, "The requested resource was not found")
        fault = state.next_fault()
        if fault is not None and fault is not Fault.TIMEOUT:
            return _fault_response(state, fault)
        form = await request.form()
        to, body = _form_value(form, "To"), _form_value(form, "Body")
        from_number, service = _form_value(form, "From"), _form_value(form, "MessagingServiceSid")
        if not to:
            return _error(400, 21604, "A 'To' phone number is required.")
        if not _E164.match(to):
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not from_number and not service:
            return _error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required to send a message.")
        if not body:
            return _error(400, 21602, "Message body is required.")
        if len(body) > MAX_BODY_CHARS:
            return _error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
        if to in state.opted_out:
            return _error(400, 21610, "Attempt to send to unsubscribed recipient")
        if to in state.landlines:
            return _error(400, 21614, f"'To' number {to} is not a valid mobile number")
        message = SimulatedMessage(
            sid="SM" + secrets.token_hex(16),
            to=to,
            from_number=from_number,
            messaging_service_sid=service,
            body=body,
            # A messaging service first accepts the message, then picks a sender and queues it.
            status="accepted" if service else "queued",
            num_segments=max(1, segments(body).segments),
            status_callback=_form_value(form, "StatusCallback"),
        )
        state.messages[message.sid] = message
        state._schedule(message)
        if fault is Fault.TIMEOUT:
            # The message is already on its way; only the answer is late. This is the case that can
            # double a text if the sender retries blindly.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state._release.wait(), state.hang_seconds)
        return JSONResponse(_resource(state, message), status_code=201)

    async def list_messages(request: Request) -> Response:
        """Newest first, filtered by ``To`` and ``From`` like Twilio's list; one page of ``PageSize``."""
        state.requests += 1
        if state.latency:
            await asyncio.sleep(state.latency)
        if not _authorised(request, credentials):
            return _error(401, 20003, "Authentication Error - invalid username")
        fault = state.next_fault()
        if fault is not None and fault is not Fault.TIMEOUT:
            return _fault_response(state, fault)
        to, sender = request.query_params.get("To"), request.query_params.get("From")
        try:
            page_size = min(max(int(request.query_params.get("PageSize", "50")), 1), 1000)
        except ValueError:
            return _error(400, 20001, "PageSize must be a number")
        found = [
            message
            for message in sorted(state.messages.values(), key=lambda m: m.date_created, reverse=True)
            if (to is None or message.to == to) and (sender is None or message.from_number == sender)
        ][:page_size]
        uri = str(request.url.path)
        return JSONResponse(
            {
                "messages": [_resource(state, message) for message in found],
                "page": 0,
                "page_size": page_size,
                "start": 0,
                "end": max(len(found) - 1, 0),
                "uri": uri,
                "first_page_uri": uri,
                "next_page_uri": None,
                "previous_page_uri": None,
            }
        )

    async def messages(request: Request) -> Response:
        return await (list_messages(request) if request.method == "GET" else create_message(request))

    return [Route(MESSAGES_PATH, messages, methods=["GET", "POST"])]


def add_message_routes(app: Starlette, state: MessagesState) -> None:
    """Add the Messages API to an existing simulator app (such as the Calls simulator)."""
    app.router.routes.extend(message_routes(state))


def create_twilio_messages_simulator(state: MessagesState) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await state.aclose()

    return Starlette(routes=message_routes(state), lifespan=lifespan)
