"""Twilio's REST API on loopback, as much of it as voicebook uses: updating a live call with new TwiML
(transfer, hang-up). Strict where Twilio is: HTTP Basic auth with the account SID and auth token, the
account in the path must be the caller's, the call must exist, the TwiML must be a ``<Response>``.
Errors use Twilio's JSON error body ``{code, message, more_info, status}``."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from integrations.simulators.twilio_numbers import NumbersState

API = "/2010-04-01"


@dataclass
class SimulatedCall:
    sid: str
    from_number: str = "+16465550199"
    to_number: str = "+12125550100"
    status: str = "in-progress"
    twiml: list[str] = field(default_factory=list)


@dataclass
class TwilioState:
    account_sid: str
    auth_token: str
    calls: dict[str, SimulatedCall] = field(default_factory=dict)
    requests: int = 0

    def add_call(self, sid: str, **details: Any) -> SimulatedCall:
        call = SimulatedCall(sid, **details)
        self.calls[sid] = call
        return call


def _error(status: int, code: int, message: str) -> Response:
    return JSONResponse(
        {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status},
        status_code=status,
    )


def _authorised(request: Request, state: TwilioState) -> bool:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return user == state.account_sid and password == state.auth_token


def _call_resource(state: TwilioState, call: SimulatedCall) -> dict[str, Any]:
    now = format_datetime(datetime.now(UTC))
    return {
        "sid": call.sid,
        "account_sid": state.account_sid,
        "from": call.from_number,
        "to": call.to_number,
        "status": call.status,
        "direction": "inbound",
        "api_version": "2010-04-01",
        "date_created": now,
        "date_updated": now,
        "uri": f"{API}/Accounts/{state.account_sid}/Calls/{call.sid}.json",
    }


def create_twilio_simulator(state: TwilioState, numbers: NumbersState | None = None) -> Starlette:
    """The Calls API; with ``numbers``, the phone-number APIs too (:mod:`.twilio_numbers`), so one
    simulator serves everything twilio's client is pointed at."""

    async def update_call(request: Request) -> Response:
        state.requests += 1
        if not _authorised(request, state):
            return _error(401, 20003, "Authentication Error - invalid username")
        if request.path_params["account"] != state.account_sid:
            return _error(404, 20404, "The requested resource was not found")
        call = state.calls.get(request.path_params["call"])
        if call is None:
            return _error(404, 20404, f"The requested resource {request.url.path} was not found")
        form = await request.form()
        twiml, status = form.get("Twiml"), form.get("Status")
        if isinstance(twiml, str):
            try:
                root = ElementTree.fromstring(twiml)
            except ElementTree.ParseError:
                return _error(400, 12100, "Document parse failure")
            if root.tag != "Response":
                return _error(400, 12100, "Document parse failure: root element must be Response")
            call.twiml.append(twiml)
            if root.find("Hangup") is not None:
                call.status = "completed"
        elif status in ("completed", "canceled"):
            call.status = str(status)
        else:
            return _error(400, 21218, "Invalid call update: give Twiml, Url or Status")
        return JSONResponse(_call_resource(state, call))

    app = Starlette(
        routes=[
            Route(API + "/Accounts/{account}/Calls/{call}.json", update_call, methods=["POST"]),
        ]
    )
    if numbers is not None:
        from integrations.simulators.twilio_numbers import add_number_routes  # it builds on this module

        add_number_routes(app, numbers)
    return app
