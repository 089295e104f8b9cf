"""The offline dialog agent driven turn by turn like the call session drives it, with its tool calls
run by the real booking tools against a real booking service (real Redis, real ledger). Assertions
look at the ledger first and at the words second."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import orjson
import pytest

from booking.business import Business
from booking.domain import Booking, BookingStatus
from booking.ledger.repository import CustomerDetails
from booking.service import Booked, BookingService, BookRequest
from tests.conftest import FrozenClock
from voice_server.dialog import DialogAgent
from voice_server.ports import (
    AgentEvent,
    CallInfo,
    EndCall,
    Expect,
    TextDelta,
    ToolCall,
    TransferCall,
    Turn,
)
from voice_server.tools import BookingTools

ALICE = CallInfo("CA-dialog-alice", "MZ-dialog-alice", "+12125550142", "+12125550100")
ROUNDS = 5  # the session's MAX_TOOL_ROUNDS


@dataclass
class Reply:
    events: list[AgentEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def tools(self) -> list[str]:
        return [e.name for e in self.events if isinstance(e, ToolCall)]

    @property
    def kinds(self) -> tuple[str, ...]:
        expects = [e.expectation for e in self.events if isinstance(e, Expect)]
        return expects[-1].kinds if expects else ()

    @property
    def transfer(self) -> bool:
        return any(isinstance(e, TransferCall) for e in self.events)

    @property
    def end(self) -> bool:
        return any(isinstance(e, EndCall) for e in self.events)


class Call:
    """One caller on the line: what the session does between the caller and the agent, in order (the
    agent's words filed as heard, each tool call run and filed as one tool turn, the agent asked again)."""

    def __init__(self, agent: DialogAgent, tools: BookingTools, clock: FrozenClock, info: CallInfo = ALICE) -> None:
        self.agent, self.tools, self.clock, self.info = agent, tools, clock, info
        self.turns: list[Turn] = [Turn("agent", "Thank you for calling Riverside Family Clinic.", clock())]

    async def say(self, text: str) -> Reply:
        self.turns.append(Turn("caller", text, self.clock()))
        return await self._reply()

    async def press(self, digit: str) -> Reply:
        self.turns.append(Turn("dtmf", digit, self.clock()))
        return await self._reply()

    async def _reply(self) -> Reply:
        reply = Reply()
        for _ in range(ROUNDS):
            events = [event async for event in self.agent.respond(list(self.turns), self.info)]
            reply.events += events
            text = " ".join(e.text for e in events if isinstance(e, TextDelta))
            if text:
                self.turns.append(Turn("agent", text, self.clock()))
            calls = [e for e in events if isinstance(e, ToolCall)]
            if not calls:
                return reply
            for call in calls:
                result = dict(await self.tools.run(call, self.info))
                record = {"id": call.id, "arguments": dict(call.arguments), "result": result}
                self.turns.append(Turn("tool", orjson.dumps(record).decode(), self.clock(), tool=call.name))
        raise AssertionError(f"no answer after {ROUNDS} tool rounds: {reply.events}")


@pytest.fixture
def agent(business: Business, clock: FrozenClock) -> DialogAgent:
    return DialogAgent(business, clock=clock)


@pytest.fixture
def tools(service: BookingService, clock: FrozenClock) -> BookingTools:
    return BookingTools(service, clock=clock)


@pytest.fixture
def call(agent: DialogAgent, tools: BookingTools, clock: FrozenClock) -> Call:
    return Call(agent, tools, clock)


def local(booking: Booking, business: Business) -> str:
    return booking.start.astimezone(business.tz).strftime("%Y-%m-%dT%H:%M")


async def bookings(service: BookingService, info: CallInfo = ALICE) -> list[Booking]:
    return await service.find_bookings(info.caller)


async def book_directly(
    service: BookingService, business: Business, when: str, *, phone: str, resource: str
) -> Booking:
    """A booking made by someone else (another caller, the front desk) before this call."""
    start = datetime.fromisoformat(when).replace(tzinfo=business.tz)
    outcome = await service.book(
        BookRequest("checkup", start, CustomerDetails(phone=phone, name="Someone Else"), resource_id=resource)
    )
    assert isinstance(outcome, Booked)
    return outcome.booking


# -- booking --------------------------------------------------------------------------------------


async def test_book_in_one_utterance(call: Call, service: BookingService, business: Business) -> None:
    reply = await call.say("i'd like a checkup tomorrow at ten with doctor lee, my name is alice smith")
    assert reply.tools == ["check_availability"]
    assert "Dr. Lee has Tuesday, December 1 at 10 AM" in reply.text
    assert reply.text.rstrip().endswith("or 2 to choose another time.")  # the keys, said once
    assert reply.kinds[0] == "yes_no"
    assert await bookings(service) == []  # nothing is booked before the caller says yes

    reply = await call.say("yes please")
    assert reply.tools == ["book_appointment"]
    assert "You're booked" in reply.text and "anything else" in reply.text
    [booking] = await bookings(service)
    assert local(booking, business) == "2026-12-01T10:00"
    assert (booking.service_id, booking.resource_id) == ("checkup", "dr-lee")
    assert booking.customer.name == "Alice Smith" and booking.status is BookingStatus.CONFIRMED

    reply = await call.say("no that's all thanks")
    assert reply.end and "Goodbye" in reply.text


async def test_book_step_by_step(call: Call, service: BookingService, business: Business) -> None:
    reply = await call.say("hi i need to make an appointment")
    assert "Which service" in reply.text and reply.kinds[0] == "service"
    reply = await call.say("a blood test")
    assert "What day and time" in reply.text and reply.kinds == ("day", "time")
    reply = await call.say("thursday")
    # A day without a time: the first free times that day, to pick from.
    assert reply.tools == ["check_availability"]
    assert "On Thursday, December 3, Nurse Kim has" in reply.text
    reply = await call.say("two p m")
    assert "Nurse Kim has Thursday, December 3 at 2 PM for a blood test" in reply.text
    assert reply.kinds == ("name",)
    reply = await call.say("bob jones")
    assert "Thank you, Bob" in reply.text and "Shall I book a blood test" in reply.text
    reply = await call.press("1")
    assert reply.tools == ["book_appointment"]
    [booking] = await bookings(service)
    assert local(booking, business) == "2026-12-03T14:00"
    assert booking.service_id == "blood-test" and booking.customer.name == "Bob Jones"


async def test_taken_slot_offers_alternatives_picked_by_words(
    call: Call, service: BookingService, business: Business
) -> None:
    await book_directly(service, business, "2026-12-01T10:00", phone="+16465550199", resource="dr-lee")
    reply = await call.say("can i book a check up with dr lee tomorrow at ten")
    assert "That time is taken" in reply.text
    assert "Which would you like?" in reply.text and "press 1, 2 or 3" in reply.text
    reply = await call.say("the second one")
    assert reply.tools == ["check_availability"]
    reply = await call.say("my name is alice")
    reply = await call.say("yes")
    assert reply.tools == ["book_appointment"]
    [booking] = await bookings(service)
    assert booking.resource_id == "dr-lee" and local(booking, business) != "2026-12-01T10:00"
    assert booking.customer.name == "Alice"


async def test_taken_slot_alternative_picked_by_key_or_by_time(
    agent: DialogAgent, tools: BookingTools, clock: FrozenClock, service: BookingService, business: Business
) -> None:
    await book_directly(service, business, "2026-12-01T10:00", phone="+16465550199", resource="dr-lee")
    first = Call(agent, tools, clock)
    await first.say("checkup with doctor lee tomorrow at 10, this is alice smith")
    offered = _offers(first)
    assert len(offered) >= 2
    await first.press("2")
    await first.press("1")
    [booking] = await bookings(service)
    assert local(booking, business) == offered[1]

    bob = CallInfo("CA-dialog-bob", "MZ-dialog-bob", "+16465550123", "+12125550100")
    second = Call(agent, tools, clock, bob)
    reply = await second.say("checkup with doctor lee tomorrow at 10, this is bob")
    assert "That time is taken" in reply.text
    wanted = _offers(second)[-1]
    reply = await second.say(said_as_speech(datetime.fromisoformat(wanted)))  # "ten forty five"
    assert reply.tools == ["check_availability"]
    await second.say("yes")
    [booking] = await bookings(service, bob)
    assert local(booking, business) == wanted


_UNITS = "one two three four five six seven eight nine ten eleven twelve".split()
_TENS = {15: "fifteen", 30: "thirty", 45: "forty five"}


def said_as_speech(moment: datetime) -> str:
    """A clock time as speech recognition writes it: "ten forty five", "two"."""
    hour = _UNITS[(moment.hour - 1) % 12]
    return hour if moment.minute == 0 else f"{hour} {_TENS[moment.minute]}"


def _offers(call: Call) -> list[str]:
    for turn in reversed(call.turns):
        if turn.role == "tool" and turn.tool == "check_availability":
            # Offers are read out (and numbered for the keypad) in time order.
            return sorted(slot["start"] for slot in orjson.loads(turn.text)["result"]["slots"])
    return []


async def test_saying_no_to_the_readback_books_nothing_and_offers_other_times(
    call: Call, service: BookingService
) -> None:
    await call.say("vaccination tomorrow at nine, my name is carol")
    reply = await call.say("no")
    assert "No problem" in reply.text and "Which would you like?" in reply.text
    assert await bookings(service) == []


# -- existing bookings ------------------------------------------------------------------------------


async def test_reschedule_the_only_booking(call: Call, service: BookingService, business: Business) -> None:
    await call.say("checkup tomorrow at ten, my name is alice smith")
    await call.say("yes")
    [before] = await bookings(service)
    reply = await call.say("actually i need to move my appointment")
    assert reply.tools == ["find_my_appointments"]
    assert "Your general check-up with Dr. Lee is on Tuesday, December 1 at 10 AM" in reply.text
    reply = await call.say("wednesday at eleven")
    assert (
        "move your general check-up from Tuesday, December 1 at 10 AM to Wednesday, December 2 at 11 AM?" in reply.text
    )
    reply = await call.say("yes")
    assert reply.tools == ["reschedule_appointment"]
    [after] = await bookings(service)
    assert after.id == before.id and local(after, business) == "2026-12-02T11:00"


async def test_reschedule_to_a_taken_time_offers_alternatives(
    call: Call, service: BookingService, business: Business
) -> None:
    mine = await book_directly(service, business, "2026-12-01T09:00", phone=ALICE.caller, resource="dr-lee")
    await book_directly(service, business, "2026-12-03T10:00", phone="+16465550199", resource="dr-lee")
    await book_directly(service, business, "2026-12-03T10:00", phone="+16465550198", resource="dr-patel")
    reply = await call.say("i'd like to reschedule to thursday at ten")
    assert "move your general check-up from Tuesday, December 1 at 9 AM to Thursday, December 3 at 10 AM?" in reply.text
    reply = await call.say("yes")
    assert reply.tools == ["reschedule_appointment"] and "just taken" in reply.text
    offered = sorted(s["start"] for s in orjson.loads(call.turns[-2].text)["result"]["alternatives"])
    await call.press("1")
    reply = await call.say("yes")
    [after] = await bookings(service)
    assert after.id == mine.id and local(after, business) == offered[0]


async def test_cancel_one_of_several_bookings_by_key(call: Call, service: BookingService, business: Business) -> None:
    await book_directly(service, business, "2026-12-01T09:00", phone=ALICE.caller, resource="dr-lee")
    keep = await book_directly(service, business, "2026-12-02T10:00", phone=ALICE.caller, resource="dr-patel")
    reply = await call.say("i want to cancel my appointment")
    assert "You have 2 appointments" in reply.text and reply.kinds[0] == "digits"
    reply = await call.press("1")
    assert "Shall I cancel your general check-up with Dr. Lee on Tuesday, December 1 at 9 AM?" in reply.text
    reply = await call.say("yes")
    assert reply.tools == ["cancel_appointment"] and "is cancelled" in reply.text
    assert [b.id for b in await bookings(service)] == [keep.id]


async def test_cancel_with_no_bookings_offers_to_book(call: Call, service: BookingService) -> None:
    reply = await call.say("cancel my appointment please")
    assert "can't find any upcoming appointments" in reply.text and "book one" in reply.text
    reply = await call.say("yes")
    assert "Which service" in reply.text


# -- questions, people, goodbyes ----------------------------------------------------------------------


async def test_availability_question_then_booking(call: Call, service: BookingService, business: Business) -> None:
    reply = await call.say("what times do you have for a vaccination on friday morning")
    assert reply.tools == ["check_availability"]
    assert "On Friday, December 4, Nurse Kim has" in reply.text and "Would you like one of these?" in reply.text
    first = _offers(call)[0]
    reply = await call.say("yes the first one")
    assert reply.kinds == ("name",)
    await call.say("dave")
    await call.say("yes")
    [booking] = await bookings(service)
    assert local(booking, business) == first and first.startswith("2026-12-04T0")


async def test_asking_for_a_person_transfers(call: Call) -> None:
    reply = await call.say("can i speak to a real person please")
    assert reply.transfer and not reply.end


async def test_goodbye_ends_the_call(call: Call, service: BookingService) -> None:
    reply = await call.say("actually never mind goodbye")
    assert reply.end and "Goodbye" in reply.text
    assert await bookings(service) == []


async def test_two_misunderstandings_offer_keys_then_a_person(call: Call) -> None:
    reply = await call.say("i want to book something")
    assert "Which service" in reply.text
    reply = await call.say("purple elephants")
    assert "didn't catch" in reply.text and "press" not in reply.text.lower()
    reply = await call.say("banana")
    assert "Please press 1 for general check-up" in reply.text and "0 to speak to a person" in reply.text
    reply = await call.press("3")
    assert "What day and time" in reply.text  # 3 = vaccination
    reply = await call.say("blue")
    reply = await call.say("green")
    assert reply.tools == ["check_availability"] and "Let me find the next free times" in reply.text
    reply = await call.say("red")
    assert "didn't catch" in reply.text and not reply.transfer
    reply = await call.say("yellow")
    assert "Please press 1, 2 or 3, or 0 to speak to a person." in reply.text
    reply = await call.say("orange")
    assert reply.transfer and "trouble understanding" in reply.text


async def test_impossible_and_past_dates_are_re_asked(call: Call) -> None:
    await call.say("book a checkup")
    reply = await call.say("february thirtieth")
    assert "There's no February 30" in reply.text and not reply.tools
    reply = await call.say("november second")
    # Twice no usable day: the next free times instead, to pick by key.
    assert "That date has already passed. Let me find the next free times." in reply.text
    assert reply.tools == ["check_availability"] and "press 1, 2 or 3" in reply.text


# -- determinism --------------------------------------------------------------------------------------


async def test_the_same_conversation_gives_the_same_events(call: Call, agent: DialogAgent, clock: FrozenClock) -> None:
    await call.say("checkup with doctor lee tomorrow at ten, my name is alice")
    conversation = list(call.turns)
    again = DialogAgent(agent._business, clock=clock)  # a fresh agent: nothing carried over
    first = [e async for e in agent.respond(conversation, ALICE)]
    second = [e async for e in again.respond(conversation, ALICE)]
    assert first == second and first
    # Replaying the whole call from its start makes the same tool call with the same id.
    await call.say("yes")
    booked = next(t for t in call.turns if t.tool == "book_appointment")
    position = call.turns.index(booked)
    replayed = agent.reply(call.turns[:position])
    call_id = orjson.loads(booked.text)["id"]
    assert next(e for e in replayed if isinstance(e, ToolCall)).id == call_id == f"call_{position}_book_appointment"


async def test_tomorrow_follows_the_clock(call: Call, clock: FrozenClock) -> None:
    clock.advance(timedelta(days=2))
    reply = await call.say("a checkup tomorrow at ten for alice")
    assert "Thursday, December 3 at 10 AM" in reply.text


async def test_saying_no_to_a_cancellation_keeps_the_booking(
    call: Call, service: BookingService, business: Business
) -> None:
    mine = await book_directly(service, business, "2026-12-01T09:00", phone=ALICE.caller, resource="dr-lee")
    reply = await call.say("i won't be able to make it on tuesday")
    assert "Shall I cancel your general check-up" in reply.text
    reply = await call.press("2")
    assert "leave it as it is" in reply.text and "anything else" in reply.text
    assert [b.id for b in await bookings(service)] == [mine.id]


async def test_key_zero_asks_for_a_person_and_a_failed_transfer_carries_on(call: Call, clock: FrozenClock) -> None:
    await call.say("a blood test please")
    reply = await call.press("0")
    assert reply.transfer
    # The session could not transfer: it says so itself and files a note; the caller carries on.
    call.turns.append(Turn("tool", "transfer failed: no call control", clock(), tool="transfer"))
    reply = await call.say("okay then friday at nine")
    assert reply.tools == ["check_availability"] and "Friday, December 4 at 9 AM for a blood test" in reply.text


async def test_every_question_tells_the_recogniser_what_may_come(call: Call) -> None:
    reply = await call.say("hello")
    assert "Hello! How can I help you today?" in reply.text
    expect = next(e.expectation for e in reply.events if isinstance(e, Expect))
    assert "intent" in expect.kinds and "general check up" in expect.choices["service"]
    assert "doctor lee" in expect.choices["staff"]
    reply = await call.say("book an appointment")
    expect = next(e.expectation for e in reply.events if isinstance(e, Expect))
    assert expect.kinds == ("service", "digits") and "blood test" in expect.choices["service"]
    # The Expect comes before the words, so the grammar is loaded when the caller answers.
    assert isinstance(reply.events[0], Expect) and isinstance(reply.events[1], TextDelta)


async def test_the_second_picks_an_offer_rather_than_a_day(
    call: Call, service: BookingService, business: Business
) -> None:
    reply = await call.say("i'd like a vaccination on thursday, this is erin")
    assert "On Thursday, December 3, Nurse Kim has" in reply.text
    second = _offers(call)[1]
    reply = await call.say("the second")
    assert "Shall I book it?" in reply.text
    await call.say("yes")
    [booking] = await bookings(service)
    assert local(booking, business) == second
