"""Calls are routed by the number they came to: a registered number that serves part of the business
(``voicebook numbers assign``) is offered, held and booked only with its resources, and its bookings keep
the number for their texts. Real booking service, Redis and ledger; the media stream test runs the real
server and a real websockets client playing Twilio."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

from booking.business import Business
from booking.errors import InvalidRequest
from booking.ledger.numbers_repository import NumberFacts, NumberRegistry, NumberType
from booking.ledger.repository import CustomerDetails
from booking.service import Booked, BookingService, BookRequest, Held, SlotUnavailable
from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock, serving
from tests.test_dialog import Call
from tests.twilio_caller import TwilioCaller
from tests.voice_fakes import SlowTools, scripted_ports
from voice_server.app import create_app
from voice_server.components import Components
from voice_server.dialog import DialogAgent
from voice_server.ports import CallInfo, ToolCall
from voice_server.settings import Settings
from voice_server.tools import BookingTools

NURSE_LINE = "+12125550111"
DOCTORS = frozenset({"dr-lee", "dr-patel"})
NURSES = frozenset({"nurse-kim"})
ON_NURSE_LINE = CallInfo("CA-line-1", "MZ-line-1", "+16465550199", NURSE_LINE, serves=NURSES)
ON_MAIN_LINE = CallInfo("CA-line-2", "MZ-line-2", "+16465550199", "+12125550100")


def at(business: Business, text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=business.tz)


async def run(tools: BookingTools, info: CallInfo, name: str, **arguments: Any) -> Any:
    return await tools.run(ToolCall(f"call_{name}", name, arguments), info)


# -- the business as one line presents it ------------------------------------------------------------


def test_a_line_presents_only_its_resources_services_and_closures(business: Business) -> None:
    line = business.serving({"dr-patel"})
    assert [r.id for r in line.resources] == ["dr-patel"]
    assert [s.id for s in line.services] == ["checkup", "consultation"]
    assert all(s.resources == ("dr-patel",) for s in line.services)
    # Closures of the whole business stay; ones only about other resources go.
    assert all(not c.resources or c.resources == ("dr-patel",) for c in line.closures)
    assert len(line.closures) == len([c for c in business.closures if not c.resources or "dr-patel" in c.resources])
    assert line.resource("dr-lee") is None and line.service("blood-test") is None  # lookups see the narrowed lists


def test_a_line_naming_nothing_the_business_has_serves_the_whole_business(business: Business) -> None:
    assert business.serving({"dr-gone"}) is business
    assert business.serving({r.id for r in business.resources}) is business


# -- the booking service -------------------------------------------------------------------------


async def test_slots_holds_and_bookings_stay_among_the_line_resources(
    service: BookingService, business: Business
) -> None:
    search = await service.find_slots("checkup", among={"dr-patel"}, limit=40)
    assert search.slots and {slot.resource_id for slot in search.slots} == {"dr-patel"}
    everyone = await service.find_slots("checkup", limit=40)
    assert {slot.resource_id for slot in everyone.slots} == {"dr-lee", "dr-patel"}  # the scope made the difference

    held = await service.hold("checkup", at(business, "2026-12-02T10:00"), among={"dr-patel"})
    assert isinstance(held, Held) and held.slot.resource_id == "dr-patel"
    with pytest.raises(InvalidRequest) as refused:
        await service.hold("checkup", at(business, "2026-12-02T11:00"), resource_id="dr-lee", among={"dr-patel"})
    assert refused.value.code == "resource_not_offered"
    with pytest.raises(InvalidRequest) as not_here:
        await service.find_slots("blood-test", among=DOCTORS)
    assert not_here.value.code == "service_not_offered"

    booked = await service.book(
        BookRequest(
            "checkup",
            at(business, "2026-12-02T11:00"),
            CustomerDetails(phone="+16465550199", name="Ann"),
            among=frozenset({"dr-patel"}),
            line_number=NURSE_LINE,
        )
    )
    assert isinstance(booked, Booked) and booked.booking.resource_id == "dr-patel"
    assert (await service.get_booking(booked.booking.id)).line_number == NURSE_LINE  # kept in the ledger


async def test_a_taken_time_on_a_line_offers_alternatives_from_that_line_only(
    service: BookingService, business: Business
) -> None:
    start = at(business, "2026-12-02T10:00")
    first = await service.book(
        BookRequest("checkup", start, CustomerDetails(phone="+16465550100", name="A"), resource_id="dr-patel")
    )
    assert isinstance(first, Booked)
    outcome = await service.book(
        BookRequest("checkup", start, CustomerDetails(phone="+16465550101", name="B"), among=frozenset({"dr-patel"}))
    )
    # Dr. Lee is free on Wednesday at 10, but is not booked on this line.
    assert isinstance(outcome, SlotUnavailable)
    assert outcome.alternatives and {slot.resource_id for slot in outcome.alternatives} == {"dr-patel"}


async def test_a_booking_moved_from_a_line_may_stay_with_its_own_resource(
    service: BookingService, business: Business
) -> None:
    made = await service.book(
        BookRequest(
            "checkup",
            at(business, "2026-12-01T10:00"),
            CustomerDetails(phone="+16465550199", name="Ann"),
            resource_id="dr-lee",
        )
    )
    assert isinstance(made, Booked)
    # Called on Dr. Patel's line: the move may keep Dr. Lee (the booking's own), or go to Dr. Patel.
    moved = await service.reschedule(made.booking.id, at(business, "2026-12-01T14:00"), among={"dr-patel"})
    assert isinstance(moved, Booked) and moved.booking.resource_id == "dr-lee"
    with pytest.raises(InvalidRequest) as refused:
        await service.reschedule(
            made.booking.id, at(business, "2026-12-01T15:00"), resource_id="nurse-kim", among={"dr-patel"}
        )
    assert refused.value.code in {"resource_not_offered", "resource_cannot_serve"}


# -- the agent's tools -------------------------------------------------------------------------------


async def test_the_tools_on_a_line_search_hold_and_book_only_its_resources(service: BookingService) -> None:
    tools = BookingTools(service)
    checked = await run(tools, ON_NURSE_LINE, "check_availability", service="vaccination", date="2026-12-01")
    assert checked["slots"] and {slot["resource"] for slot in checked["slots"]} == {"nurse-kim"}

    refused = await run(tools, ON_NURSE_LINE, "check_availability", service="checkup", date="2026-12-01")
    assert refused["error"]["code"] == "service_not_offered"
    elsewhere = await run(tools, ON_MAIN_LINE, "check_availability", service="checkup", date="2026-12-01")
    assert elsewhere["slots"]  # the same question on the main line is answered

    booked = await run(
        tools, ON_NURSE_LINE, "book_appointment", service="vaccination", start="2026-12-01T10:00", customer_name="Ann"
    )
    assert booked["status"] == "booked" and booked["resource"] == "nurse-kim"
    stored = await service.get_booking(booked["booking_id"])
    assert stored.line_number == NURSE_LINE  # its texts go from the line the caller dialled


# -- the offline dialog agent ------------------------------------------------------------------------


async def test_the_dialog_on_a_line_offers_only_its_services(
    business: Business, service: BookingService, clock: FrozenClock
) -> None:
    call = Call(DialogAgent(business, clock=clock), BookingTools(service, clock=clock), clock, ON_NURSE_LINE)
    reply = await call.say("hi i need to make an appointment")
    assert "Which service" in reply.text
    assert "vaccination" in reply.text.lower() and "blood test" in reply.text.lower()
    assert "checkup" not in reply.text.lower() and "consultation" not in reply.text.lower()
    main = Call(DialogAgent(business, clock=clock), BookingTools(service, clock=clock), clock, ON_MAIN_LINE)
    assert "consultation" in (await main.say("hi i need to make an appointment")).text.lower()


# -- the media stream ----------------------------------------------------------------------------------

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"


@contextlib.asynccontextmanager
async def line_server(app_settings: Settings, clock: FrozenClock) -> AsyncIterator[tuple[Components, str]]:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = dataclasses.replace(app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN)
    app = create_app(settings, clock=clock, voice=scripted_ports(["hello"], SlowTools(), None))
    async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
        yield app.state.components, base.replace("http://", "ws://") + "/twilio/media"


@pytest.mark.parametrize(
    ("serves", "expected"),
    [(["nurse-kim"], NURSES), ([], None), (["nurse-kim", "dr-gone"], NURSES), (["dr-gone"], None)],
    ids=["part", "everything", "a stale id dropped", "only stale ids"],
)
async def test_a_call_to_a_registered_line_carries_what_it_serves(
    app_settings: Settings, clock: FrozenClock, serves: list[str], expected: frozenset[str] | None
) -> None:
    async with line_server(app_settings, clock) as (components, media_url):
        registry = NumberRegistry(components.database)
        await registry.upsert(NumberFacts(NURSE_LINE, "PN" + "1" * 32, "US", NumberType.LOCAL, True, True, False))
        await registry.assign(NURSE_LINE, serves)
        signature = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(media_url, {})}
        async with (
            connect(media_url, additional_headers=signature) as ws,
            TwilioCaller(ws, call_sid="CA" + "5" * 32) as caller,
        ):
            await caller.connect(to=NURSE_LINE)
            for _ in range(200):
                if components.sessions:
                    break
                await asyncio.sleep(0.01)
            [session] = components.sessions
            assert session.info.called == NURSE_LINE
            assert session.info.serves == expected


def test_a_line_is_built_once(business: Business) -> None:
    """The language model's prompt asks for the line's business on every turn: it is built once."""
    assert business.serving({"dr-patel"}) is business.serving(["dr-patel"])
    assert business.serving({"dr-patel"}) is not business.serving({"dr-lee"})
