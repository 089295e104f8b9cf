"""The offline booking agent: a deterministic slot-filling dialog over the same booking tools the
language-model agent uses.

It keeps no memory between replies. Each ``respond`` folds the whole conversation into a
:class:`~voice_server.dialog_state.State` (what the caller wants, what was offered, what was asked)
and decides the next step from that, so the same conversation and clock always give the same reply:
a call can be replayed, and an OpenAI-protocol simulator that only sees the message history can run it.
The decision is re-made after every caller turn, key press and tool result, exactly where the session
asks for a reply. Tool call ids come from the position in the conversation (``call_12_book_appointment``)
so a replayed booking is the same booking.

Every question goes with an :class:`~voice_server.ports.Expect` naming what the caller may answer, so
a grammar-based recogniser listens for just that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from booking.business import Business
from voice_server.dialog_state import (
    Question,
    Slot,
    State,
    drop_article,
    on_caller,
    on_digit,
    on_tool,
    service_words,
    short_staff,
)
from voice_server.ports import (
    AgentEvent,
    CallInfo,
    EndCall,
    Expect,
    Expectation,
    TextDelta,
    ToolCall,
    TransferCall,
    Turn,
)
from voice_server.tools import spoken_time
from voice_server.understanding import Understanding

MAX_MISSES = 3
"""Failed attempts at one question before a person takes over (the DTMF menu comes at two)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One reply: words, and at most one of a tool call, a transfer or the end of the call."""

    text: str = ""
    expect: Expectation | None = None
    tool: str | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)
    transfer: str | None = None
    end: str | None = None


class DialogAgent:
    """``voice_server.ports.Agent`` without a language model."""

    def __init__(self, business: Business, *, clock: Callable[[], datetime]) -> None:
        self._business = business
        self._clock = clock
        self._words = Understanding(business)
        self._lines: dict[frozenset[str], Understanding] = {}

    def _understanding(self, serves: frozenset[str] | None) -> Understanding:
        """The vocabulary of the line called: a line that serves part of the business offers only its
        services and staff (``voice_server.lines``). Built once per line."""
        if not serves:
            return self._words
        words = self._lines.get(serves)
        if words is None:
            words = self._lines[serves] = Understanding(self._business.serving(serves))
        return words

    async def respond(self, conversation: Sequence[Turn], call: CallInfo) -> AsyncIterator[AgentEvent]:
        for event in self.reply(conversation, serves=call.serves):
            yield event

    def reply(self, conversation: Sequence[Turn], *, serves: frozenset[str] | None = None) -> list[AgentEvent]:
        """The next reply to ``conversation`` on the line serving ``serves`` (None: the whole business),
        as events (pure: no I/O, no state kept)."""
        _, step = self.replay(conversation, serves=serves)
        events: list[AgentEvent] = []
        if step.expect is not None:
            events.append(Expect(step.expect))
        if step.text:
            events.append(TextDelta(step.text))
        if step.tool is not None:
            events.append(ToolCall(f"call_{len(conversation)}_{step.tool}", step.tool, dict(step.arguments)))
        if step.transfer is not None:
            events.append(TransferCall(step.transfer))
        if step.end is not None:
            events.append(EndCall(step.end))
        return events

    def replay(self, conversation: Sequence[Turn], *, serves: frozenset[str] | None = None) -> tuple[State, Step]:
        """Fold the conversation into the dialog state, deciding again at every point where the session
        asked for a reply; returns the state and the last decision."""
        words = self._understanding(serves)
        today = self._clock().astimezone(self._business.tz).date()
        state = State()
        step: Step | None = None
        for turn in conversation:
            if turn.role == "caller":
                heard = words.hear(turn.text, today=today, expecting_name=state.asked == "name")
                state = on_caller(state, heard, words)
            elif turn.role == "dtmf":
                state = on_digit(state, turn.text.strip(), words)
            elif turn.role == "tool":
                record = _tool_record(turn)
                if record is None:  # the session's own note (a transfer that failed): carry on from here
                    state = replace(state, transfer=None)
                    continue
                arguments, result = record
                state = on_tool(state, turn.tool or "", arguments, result, words)
            else:
                continue  # the agent's own words (and the session's greeting) change nothing
            state, step = decide(state, words)
        if step is None:
            state, step = decide(state, words)
        return state, step


def _tool_record(turn: Turn) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    try:
        record = orjson.loads(turn.text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    arguments, result = record.get("arguments", {}), record.get("result", {})
    if not isinstance(arguments, dict) or not isinstance(result, dict):
        return None
    return arguments, result


# -- deciding --------------------------------------------------------------------------------------


def decide(state: State, words: Understanding) -> tuple[State, Step]:
    """The next step for ``state``: a question, a tool call, a transfer or goodbye."""
    if state.transfer is not None:
        text = _join(*state.news, "Let me put you through to someone who can help. One moment.")
        return replace(state, transfer=None, news=(), asked=None), Step(text=text, transfer=state.transfer)
    if state.end is not None:
        text = _join(*state.news, f"Thank you for calling {words.business.name}. Goodbye!")
        return replace(state, end=None, news=(), asked=None), Step(text=text, end=state.end)
    if state.misses >= MAX_MISSES:
        text = "I'm sorry, I'm having trouble understanding. Let me put you through to someone who can help."
        return replace(state, news=(), asked=None, misses=0), Step(text=text, transfer="the caller was not understood")
    if state.task is None:
        if state.wants_more:
            return _ask(replace(state, wants_more=False), "intent", "Sure, what can I help you with?", words)
        if state.misses >= 2:
            menu = "Please press 1 to book, 2 to change, or 3 to cancel an appointment, or 0 to speak to a person."
            return _ask(state, "intent", menu, words)
        if state.done:
            return _ask(state, "anything_else", "Is there anything else I can help with?", words)
        return _ask(state, "intent", "How can I help you today?", words)
    if state.task in ("book", "availability"):
        return _new_booking(state, words)
    return _existing_booking(state, words)


def _new_booking(state: State, words: Understanding) -> tuple[State, Step]:
    business = words.business
    if state.service is None:
        offered = [s for s in business.services if state.resource in s.resources]
        if len(offered) == 1:
            state = replace(state, service=offered[0].id)
        else:
            return _ask_service(state, words)
    service = business.service(state.service or "")
    if service is None:
        return _ask_service(replace(state, service=None), words)
    if state.resource is not None and state.resource not in service.resources:
        staff = [short_staff(r.name) or r.name for r in business.resources if r.id in service.resources]
        state = _say(replace(state, resource=None), f"For {service_words(service.name)}, you can see {_or(staff)}.")
    if state.proposal is not None:
        if state.confirmed and state.name:
            arguments = {"service": service.id, "start": state.proposal.start, "customer_name": state.name}
            if state.proposal.resource:
                arguments["resource"] = state.proposal.resource
            return _tool(state, "book_appointment", arguments)
        if state.name is None:
            return _ask(state, "name", "May I have your name for the booking?", words)
        if state.asked in ("confirm", "name"):
            who = short_staff(state.proposal.resource_name)
            question = (
                f"Shall I book {service_words(service.name)}{f' with {who}' if who else ''} on {state.proposal.spoken}?"
            )
        else:
            question = "Shall I book it?"
        return _ask_confirm(state, question, words)
    if state.offers:
        if state.task == "availability":
            return _ask_choice(state, "offer_book", "Would you like one of these?", words)
        return _ask_choice(state, "choice", "Which would you like?", words)
    state = _fall_back_to_next_free(state)
    check: dict[str, Any] = {"service": service.id}
    if state.resource is not None:
        check["resource"] = state.resource
    if state.day is not None:
        check["date"] = state.day.isoformat()
        if state.at is not None:
            check["time"] = state.at.strftime("%H:%M")
        elif state.part_of_day is not None:
            check["part_of_day"] = state.part_of_day
        return _tool(state, "check_availability", check)
    if state.earliest or state.task == "availability":
        return _tool(state, "check_availability", check)
    return _ask_when(state, words)


def _existing_booking(state: State, words: Understanding) -> tuple[State, Step]:
    appointments = state.appointments
    if appointments is None:
        return _tool(state, "find_my_appointments", {})
    if not appointments:
        state = _say(replace(state, task=None), "I can't find any upcoming appointments for this phone number.")
        return _ask(state, "book_instead", "Would you like to book one?", words)
    target = state.target
    if target is None and len(appointments) == 1:
        target = appointments[0]
        state = replace(state, target=target)
    if target is None:
        listed = appointments[:3]
        items = [f"{n}, {service_words(a.service_name)} on {a.spoken}" for n, a in enumerate(listed, start=1)]
        keys = _or([str(n) for n in range(1, len(listed) + 1)])
        question = f"You have {len(appointments)} appointments: {'; '.join(items)}. Which one? You can press {keys}."
        return _ask(state, "which", question, words)
    what = drop_article(service_words(target.service_name))
    who = short_staff(target.resource_name)
    if state.task == "cancel":
        if state.confirmed:
            return _tool(state, "cancel_appointment", {"booking_id": target.booking_id})
        question = f"Shall I cancel your {what}{f' with {who}' if who else ''} on {target.spoken}?"
        return _ask_confirm(state, question, words, other="2 to keep it")
    if state.proposal is not None:
        if state.confirmed:
            arguments = {"booking_id": target.booking_id, "new_start": state.proposal.start}
            if state.proposal.resource:
                arguments["resource"] = state.proposal.resource
            return _tool(state, "reschedule_appointment", arguments)
        question = f"Shall I move your {what} from {target.spoken} to {state.proposal.spoken}?"
        return _ask_confirm(state, question, words)
    if state.offers:
        return _ask_choice(state, "choice", "Which would you like?", words)
    state = _fall_back_to_next_free(state)
    if state.day is not None and state.at is not None:
        local = datetime.combine(state.day, state.at, tzinfo=words.business.tz)
        resource = words.business.resource(state.resource) if state.resource else None
        proposal = Slot(
            f"{state.day.isoformat()}T{state.at:%H:%M}",
            spoken_time(local, words.business),
            state.resource,
            resource.name if resource else None,
        )
        return _existing_booking(replace(state, proposal=proposal, confirmed=False), words)
    check: dict[str, Any] = {"service": target.service}
    if state.resource is not None:
        check["resource"] = state.resource
    if state.day is not None:
        check["date"] = state.day.isoformat()
        if state.part_of_day is not None:
            check["part_of_day"] = state.part_of_day
        return _tool(state, "check_availability", check)
    if state.earliest:
        return _tool(state, "check_availability", check)
    if state.asked not in ("when", "day"):
        state = _say(state, f"Your {what}{f' with {who}' if who else ''} is on {target.spoken}.")
    return _ask_when(state, words, "When would you like to move it to?")


def _fall_back_to_next_free(state: State) -> State:
    """Twice not understood when asked for a day: offer the next free times instead, to pick by key."""
    if state.misses >= 2 and state.asked in ("when", "day") and not state.earliest:
        return _say(replace(state, earliest=True, day=None, at=None), "Let me find the next free times.")
    return state


# -- asking ----------------------------------------------------------------------------------------


def _ask_service(state: State, words: Understanding) -> tuple[State, Step]:
    services = words.business.services
    if state.misses >= 2:
        keys = ", ".join(f"{n} for {s.name.lower()}" for n, s in enumerate(services, start=1))
        return _ask(state, "service", f"Please press {keys}, or 0 to speak to a person.", words)
    names = [service_words(s.name) for s in services]
    if state.task == "availability":
        return _ask(state, "service", f"Sure. Which service is it for: {_or(names)}?", words)
    return _ask(state, "service", f"Which service would you like: {_or(names)}?", words)


def _ask_when(
    state: State, words: Understanding, question: str = "What day and time would suit you?"
) -> tuple[State, Step]:
    if state.at is not None and state.day is None:
        return _ask(state, "day", "What day would you like?", words)
    return _ask(state, "when", question, words)


def _ask_choice(state: State, question: Question, text: str, words: Understanding) -> tuple[State, Step]:
    offers = state.offers
    keys = _or([str(n) for n in range(1, len(offers) + 1)])
    if state.misses >= 2:
        return _ask(state, question, f"{_offer_text(offers)} Please press {keys}, or 0 to speak to a person.", words)
    return _ask(state, question, f"{_offer_text(offers)} {text} You can also press {keys}.", words)


def _ask_confirm(
    state: State, question: str, words: Understanding, *, other: str = "2 to choose another time"
) -> tuple[State, Step]:
    if state.misses >= 1 and state.asked == "confirm":
        return _ask(state, "confirm", f"{question} Please say yes or no, or press 1 for yes, or {other}.", words)
    if not state.keys_told:
        state = replace(state, keys_told=True)
        return _ask(state, "confirm", f"{question} You can also press 1 for yes, or {other}.", words)
    return _ask(state, "confirm", question, words)


def _ask(state: State, question: Question, text: str, words: Understanding) -> tuple[State, Step]:
    step = Step(text=_join(*state.news, text), expect=_expectation(question, state, words))
    return replace(state, asked=question, news=()), step


def _tool(state: State, name: str, arguments: Mapping[str, Any]) -> tuple[State, Step]:
    # What the tool answers is said with the next question; nothing is said before it runs.
    return state, Step(tool=name, arguments=arguments)


def _say(state: State, sentence: str) -> State:
    return replace(state, news=(*state.news, sentence))


def _expectation(question: Question, state: State, words: Understanding) -> Expectation:
    services = {"service": words.service_choices()}
    staff = {"staff": words.staff_choices()}
    if question in ("intent", "anything_else"):
        return Expectation(("intent", "service", "day", "time", "yes_no", "digits"), {**services, **staff})
    if question == "service":
        return Expectation(("service", "digits"), services)
    if question == "when":
        return Expectation(("day", "time"), staff)
    if question == "day":
        return Expectation(("day",))
    if question in ("choice", "offer_book"):
        return Expectation(("time", "digits", "yes_no", "day"))
    if question == "name":
        return Expectation(("name",))
    if question == "which":
        return Expectation(("digits", "service", "day"), services)
    if question == "book_instead":
        return Expectation(("yes_no", "intent"))
    return Expectation(("yes_no", "digits", "day", "time"))


def _offer_text(offers: Sequence[Slot]) -> str:
    """The offers as one sentence: "On Tuesday, December 1, Dr. Lee has 8:30 AM, 9:30 AM or 1 PM."
    (each slot in full when they fall on different days)."""
    names = {slot.resource_name for slot in offers}
    who = short_staff(next(iter(names))) if len(names) == 1 else None
    has = f"{who} has" if who else "I have"
    if len({slot.start[:10] for slot in offers}) == 1 and all(" at " in slot.spoken for slot in offers):
        day = offers[0].spoken.split(" at ", 1)[0]
        return f"On {day}, {has} {_or([slot.spoken.split(' at ', 1)[1] for slot in offers])}."
    return f"{has[:1].upper()}{has[1:]} {_or([slot.spoken for slot in offers])}."


def _or(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} or {items[-1]}"


def _join(*sentences: str) -> str:
    return " ".join(sentence for sentence in sentences if sentence)
