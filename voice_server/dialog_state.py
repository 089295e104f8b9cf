"""The offline dialog's state, and how each turn of a call changes it.

The state is never kept between replies: :class:`~voice_server.dialog.DialogAgent` folds the whole
conversation through :func:`on_caller`, :func:`on_digit` and :func:`on_tool` every time it answers, so
a reply depends on nothing but the conversation, the call and the clock. These functions are pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, time
from typing import Any, Literal

from voice_server.spoken import ClockSaid, PartOfDay
from voice_server.understanding import Heard, Understanding

Task = Literal["book", "availability", "reschedule", "cancel"]
Question = Literal[
    "intent",
    "anything_else",
    "service",
    "when",
    "day",
    "choice",
    "name",
    "confirm",
    "which",
    "offer_book",
    "book_instead",
]
MENU_TASKS: tuple[Task, ...] = ("book", "reschedule", "cancel")  # DTMF 1, 2, 3 when asked what the caller wants


@dataclass(frozen=True, slots=True)
class Slot:
    """A time as the tools speak of it: local ``start`` (YYYY-MM-DDTHH:MM), said as ``spoken``."""

    start: str
    spoken: str
    resource: str | None = None
    resource_name: str | None = None

    @property
    def local(self) -> datetime:
        return datetime.fromisoformat(self.start)


@dataclass(frozen=True, slots=True)
class Appointment:
    booking_id: str
    service: str
    service_name: str
    start: str
    spoken: str
    resource: str
    resource_name: str


@dataclass(frozen=True, slots=True)
class State:
    task: Task | None = None
    service: str | None = None
    resource: str | None = None
    day: date | None = None
    at: time | None = None
    part_of_day: PartOfDay | None = None
    earliest: bool = False
    name: str | None = None
    offers: tuple[Slot, ...] = ()
    proposal: Slot | None = None
    confirmed: bool = False
    appointments: tuple[Appointment, ...] | None = None
    target: Appointment | None = None
    asked: Question | None = None
    misses: int = 0
    keys_told: bool = False
    news: tuple[str, ...] = ()
    """Sentences to say before the next question: a tool's answer, or why the last words did not fit."""
    done: int = 0
    """Requests concluded, so the next open question is "anything else?"."""
    wants_more: bool = False
    transfer: str | None = None
    end: str | None = None


_WHEN_FIELDS = ("day", "at", "part_of_day", "earliest", "offers", "proposal", "confirmed")


def _fresh_task(state: State, task: Task | None) -> State:
    """A new request: forget the last one's details, keep who the caller is and what was looked up."""
    return State(
        task=task,
        name=state.name,
        appointments=state.appointments,
        asked=state.asked,
        keys_told=state.keys_told,
        done=state.done,
        news=state.news,
    )


def _dropped(state: State, sentence: str) -> State:
    """The request ends without a change (the caller said no, or it cannot be done): say so, and ask
    what else next."""
    return replace(_say(_fresh_task(state, None), sentence), done=state.done + 1)


def _progress_key(state: State) -> State:
    return replace(state, news=(), misses=0, asked=None)


def on_caller(state: State, heard: Heard, words: Understanding) -> State:
    """Fold one caller utterance into the state."""
    before = state
    state = replace(state, news=())
    if heard.greeting and state.task is None and state.asked in (None, "intent"):
        return _say(state, "Hello!")
    if heard.intent == "person":
        return replace(state, transfer="the caller asked for a person")
    if "goodbye" in heard.intents and heard.answer is not True:
        return replace(state, end="the caller said goodbye")
    if state.asked in ("anything_else", "intent") and heard.answer is False and not _has_request(heard):
        return replace(state, end="the caller has nothing else")
    if state.asked in ("anything_else", "book_instead") and heard.answer is not None and heard.intent is None:
        if not _has_request(heard) and state.asked == "anything_else":
            return replace(state, wants_more=True, misses=0)
        if state.asked == "book_instead" and heard.answer is False:
            return replace(_say(state, "Okay."), done=state.done + 1, misses=0)
        if state.asked == "book_instead":
            state = _fresh_task(state, "book")
    state = _switch_task(state, heard)
    answered = _answer(state, heard, words)
    # An offer picked by its time or as "the second" has used the day and time words already.
    picked = bool(state.offers) and not answered.offers and answered.at is not None
    state = _merge(answered, heard, words, with_when=not picked)
    if state.task is None and _has_request(heard):
        state = _merge(_fresh_task(state, "book"), heard, words)
    if heard.day is not None and heard.day.problem is not None:
        said = heard.day.said
        if heard.day.problem == "impossible":
            state = _say(state, f"There's no {said}." if said[:1].isupper() else "I don't know that date.")
        else:
            state = _say(state, "That date has already passed.")
    return _count_miss(before, state)


def _has_request(heard: Heard) -> bool:
    return heard.service is not None or heard.has_when or heard.resource is not None


def _count_miss(before: State, after: State) -> State:
    if after.transfer or after.end or _progress_key(after) != _progress_key(before):
        return replace(after, misses=0)
    if not after.news:
        after = _say(after, "Sorry, I didn't catch that.")
    return replace(after, misses=before.misses + 1)


def _say(state: State, sentence: str) -> State:
    return replace(state, news=(*state.news, sentence))


def _switch_task(state: State, heard: Heard) -> State:
    intent = heard.intent
    if intent not in ("book", "availability", "reschedule", "cancel"):
        return state
    if state.task in ("book", "availability") and (state.proposal or state.offers):
        if intent == "cancel":  # "cancel that": drop the booking being made
            return _dropped(state, "Okay, I won't book it.")
        return state  # "a different time" while choosing: read as an answer, below
    if state.task is None or (intent in ("reschedule", "cancel") and intent != state.task):
        return _fresh_task(state, intent)  # type: ignore[arg-type]  # narrowed by the test above
    if state.task == "availability" and intent == "book":
        return replace(state, task="book")
    return state


def _answer(state: State, heard: Heard, words: Understanding) -> State:
    """The caller's answer to what was asked (yes, no, a pick); other entities are merged after."""
    asked = state.asked
    if asked == "confirm":
        changes_time = heard.day is not None or heard.clock is not None
        if heard.answer is True and not changes_time:
            return replace(state, confirmed=True)
        if heard.answer is False or (heard.intent == "reschedule" and state.task != "cancel"):
            if state.task == "cancel":
                return _dropped(state, "Okay, I'll leave it as it is.")
            return _say(replace(state, at=None, offers=(), proposal=None, confirmed=False), "No problem.")
        return state
    if asked in ("choice", "offer_book") and state.offers:
        picked = _pick_offer(state, heard, words)
        if picked is not None:
            return _choose(state, picked)
        if heard.answer is False or heard.intent == "reschedule":
            if state.task == "availability":
                return _dropped(state, "Okay.")
            return _say(replace(state, day=None, at=None, offers=(), part_of_day=None, earliest=False), "Okay.")
        if heard.answer is True and len(state.offers) == 1:
            return _choose(state, state.offers[0])
        if heard.answer is True and asked == "offer_book":
            return replace(state, task="book", asked="choice")
        if heard.answer is True:
            return _say(state, "Sure.")  # which one is asked again
        return state
    if asked == "which" and state.appointments:
        found = _pick_appointment(state.appointments, heard)
        return replace(state, target=found) if found is not None else state
    if asked == "service" and heard.service is None and heard.number is not None:
        return _service_by_key(state, heard.number, words)
    if asked == "name" and heard.name is not None:
        first = heard.name.split()[0]
        return _say(replace(state, name=heard.name), f"Thank you, {first}.")
    if asked in ("when", "day") and heard.clock is None and heard.number is not None and heard.day is None:
        clock = ClockSaid(heard.number, 0)
        resolved = words.resolve(clock, _service_of(state), state.day)
        return replace(state, at=resolved, proposal=None, confirmed=False, offers=())
    return state


def _service_of(state: State) -> str | None:
    return state.target.service if state.target is not None else state.service


def _service_by_key(state: State, key: int, words: Understanding) -> State:
    services = words.business.services
    return replace(state, service=services[key - 1].id) if 1 <= key <= len(services) else state


def _choose(state: State, slot: Slot) -> State:
    """The caller picked an offered time: it becomes the requested day and time (the booking path
    checks, and so holds, it before reading it back)."""
    local = slot.local
    task: Task | None = "book" if state.task == "availability" else state.task
    return replace(
        state, task=task, day=local.date(), at=local.time(), resource=slot.resource, offers=(), proposal=None
    )


def _pick_offer(state: State, heard: Heard, words: Understanding) -> Slot | None:
    offers = state.offers
    service = _service_of(state)
    if heard.clock is not None or (heard.number is not None and heard.ordinal is None):
        clock = heard.clock or ClockSaid(heard.number or 0, 0)
        for slot in offers:
            local = slot.local
            if heard.day is not None and heard.day.day != local.date():
                continue
            if words.resolve(clock, service, local.date()) == local.time():
                return slot
    index = heard.ordinal
    if index is None and heard.day is not None and heard.day.bare_ordinal is not None and heard.clock is None:
        index = heard.day.bare_ordinal  # "the second": the offer, not the 2nd of the month
    if index is None and heard.clock is None:
        index = heard.number
    if index is not None and (1 <= index <= len(offers) or index == -1):
        return offers[index - 1] if index > 0 else offers[-1]
    if heard.day is not None and heard.clock is None:
        same_day = [slot for slot in offers if slot.local.date() == heard.day.day]
        if len(same_day) == 1:
            return same_day[0]
    return None


def _pick_appointment(appointments: tuple[Appointment, ...], heard: Heard) -> Appointment | None:
    index = heard.ordinal or heard.number
    if index is None and heard.day is not None and heard.day.bare_ordinal is not None:
        index = heard.day.bare_ordinal
    if index is not None and 1 <= index <= len(appointments):
        return appointments[index - 1]
    if index == -1:
        return appointments[-1]
    return _describe(appointments, heard.service, heard.day.day if heard.day else None)


def _describe(appointments: tuple[Appointment, ...], service: str | None, day: date | None) -> Appointment | None:
    """The one appointment the caller described by its service and/or day."""
    if service is None and day is None:
        return None
    matching = [
        a
        for a in appointments
        if (service is None or a.service == service) and (day is None or datetime.fromisoformat(a.start).date() == day)
    ]
    return matching[0] if len(matching) == 1 else None


def _merge(state: State, heard: Heard, words: Understanding, *, with_when: bool = True) -> State:
    """Entities the caller volunteered. A new day or time replaces what was offered or proposed."""
    if heard.name is not None and state.name is None:
        state = replace(state, name=heard.name)
    if heard.resource is not None and heard.resource != state.resource:
        state = replace(state, resource=heard.resource, offers=(), proposal=None, confirmed=False)
    if heard.service is not None and state.task in ("book", "availability", None) and heard.service != state.service:
        state = replace(state, service=heard.service, offers=(), proposal=None, confirmed=False)
    elif heard.service is not None and state.task in ("reschedule", "cancel"):
        state = replace(state, service=heard.service)  # describes which booking
    when: dict[str, Any] = {}
    if not with_when:
        return state
    if heard.day is not None and heard.day.day is not None and heard.day.day != state.day:
        when["day"] = heard.day.day
    if heard.clock is not None:
        resolved = words.resolve(heard.clock, _service_of(state), when.get("day", state.day))
        if resolved is not None and resolved != state.at:
            when["at"] = resolved
    if heard.part_of_day is not None and heard.part_of_day != state.part_of_day:
        when["part_of_day"] = heard.part_of_day
    if heard.earliest and not state.earliest:
        when["earliest"] = True
    if when:
        # A new day alone keeps the time asked for ("actually wednesday" -> Wednesday at that time).
        state = replace(state, offers=(), proposal=None, confirmed=False, **when)
    return state


# -- tool results -----------------------------------------------------------------------------------


def _slot(data: Mapping[str, Any]) -> Slot:
    return Slot(str(data["start"]), str(data["spoken"]), data.get("resource"), data.get("resource_name"))


def _sorted_slots(items: Any) -> tuple[Slot, ...]:
    """Offers in time order, so "the first one" and key 1 mean the earliest of them."""
    return tuple(sorted((_slot(item) for item in items), key=lambda slot: slot.start))


def _appointment(data: Mapping[str, Any]) -> Appointment:
    return Appointment(
        str(data["booking_id"]),
        str(data["service"]),
        str(data["service_name"]),
        str(data["start"]),
        str(data["spoken"]),
        str(data["resource"]),
        str(data["resource_name"]),
    )


def _finished(state: State, sentence: str) -> State:
    """A task is done: say so, and drop what was looked up (it changed)."""
    fresh = _fresh_task(replace(state, appointments=None), None)
    return replace(_say(fresh, sentence), done=state.done + 1)


def on_tool(
    state: State, name: str, arguments: Mapping[str, Any], result: Mapping[str, Any], words: Understanding
) -> State:
    """Fold a tool's result into the state, with what to tell the caller about it (after anything
    still to be said: a tool call is made without words). What it answers is a new question, so the
    count of answers not understood starts again."""
    state = replace(state, misses=0)
    error = result.get("error")
    if error is not None:
        return _tool_error(state, name, error if isinstance(error, Mapping) else {"message": str(error)})
    if name == "check_availability":
        return _checked(state, arguments, result, words)
    if name in ("book_appointment", "reschedule_appointment"):
        status = result.get("status")
        if status in ("booked", "rescheduled"):
            what = service_words(str(result.get("service_name", "appointment")))
            who = short_staff(result.get("resource_name"))
            with_whom = f" with {who}" if who else ""
            if status == "booked":
                return _finished(state, f"You're booked for {what}{with_whom} on {result['spoken']}.")
            return _finished(state, f"Done. Your {drop_article(what)} is now on {result['spoken']}{with_whom}.")
        offers = _sorted_slots(result.get("alternatives", ()))
        state = replace(state, proposal=None, confirmed=False, at=None, offers=offers)
        return _say(state, "Sorry, that time was just taken.")
    if name == "cancel_appointment":
        target = state.target
        what = drop_article(service_words(target.service_name)) if target else "appointment"
        return _finished(state, f"Your {what} on {result.get('spoken', '')} is cancelled.")
    if name == "find_my_appointments":
        found = tuple(_appointment(item) for item in result.get("appointments", ()))
        state = replace(state, appointments=found)
        if len(found) == 1:
            return replace(state, target=found[0])
        if state.task == "cancel":
            return replace(state, target=_describe(found, state.service, state.day))
        return replace(state, target=_describe(found, state.service, None))
    return state


def _checked(state: State, arguments: Mapping[str, Any], result: Mapping[str, Any], words: Understanding) -> State:
    slots = _sorted_slots(result.get("slots", ()))
    if result.get("requested") is not None:
        if result.get("requested_available") and result.get("slots"):
            slot = _slot(result["slots"][0])  # the requested time, held for this caller
            what = service_words(str(result.get("service_name", "")))
            who = short_staff(slot.resource_name) or "We"
            state = replace(state, proposal=slot, offers=(), confirmed=False, resource=slot.resource)
            return _say(state, f"{who} {'has' if who != 'We' else 'have'} {slot.spoken} for {what}.")
        state = replace(state, at=None, proposal=None, offers=slots)
        taken = "That time isn't available." if result.get("reason") else "That time is taken."
        if not slots:
            return _say(replace(state, day=None), f"{taken} I have nothing close to it.")
        return _say(state, taken)
    if not slots:
        if arguments.get("date"):
            return _say(
                replace(state, day=None, at=None, part_of_day=None, earliest=False),
                "Sorry, I have nothing free that day.",
            )
        return _dropped(state, "Sorry, I have no free times in the coming weeks.")
    return replace(state, offers=slots, at=None, earliest=False)


def _tool_error(state: State, name: str, error: Mapping[str, Any]) -> State:
    code = str(error.get("code", ""))
    if code == "unknown_service":
        return _say(replace(state, service=None), "Sorry, we don't offer that.")
    if code == "unknown_resource":
        return _say(replace(state, resource=None), "Sorry, I don't know that name here.")
    if name == "check_availability" and error.get("field") == "date":
        return _say(replace(state, day=None, at=None, offers=()), "That day isn't possible.")
    if name in ("check_availability", "book_appointment", "reschedule_appointment"):
        cleared = replace(state, at=None, offers=(), proposal=None, confirmed=False)
        return _say(cleared, "Sorry, I can't book that time.")
    return _dropped(state, "Sorry, something went wrong with that.")


# -- words for the caller -------------------------------------------------------------------------


def service_words(service_name: str) -> str:
    """The service as said in a sentence: "General check-up" -> "a general check-up"."""
    name = service_name[:1].lower() + service_name[1:] if service_name else "appointment"
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def drop_article(words: str) -> str:
    return words.split(" ", 1)[1] if words.startswith(("a ", "an ")) else words


def short_staff(name: object) -> str | None:
    """A staff member as a receptionist says them: "Dr. Amelia Lee" -> "Dr. Lee"."""
    if not isinstance(name, str) or not name:
        return None
    parts = name.split()
    if len(parts) >= 3 and parts[0].rstrip(".").lower() in ("dr", "doctor", "nurse", "mr", "mrs", "ms"):
        return f"{parts[0]} {parts[-1]}"
    return name


def on_digit(state: State, digit: str, words: Understanding) -> State:
    """A key pressed on the phone: the menu choice for what was asked."""
    before = state
    state = replace(state, news=())
    if digit == "0":
        return replace(state, transfer="the caller pressed 0 for a person")
    key = int(digit) if digit.isdigit() else -99
    asked = state.asked
    if asked == "confirm":
        if key == 1:
            state = replace(state, confirmed=True)
        elif key == 2 and state.task == "cancel":
            state = _dropped(state, "Okay, I'll leave it as it is.")
        elif key == 2:
            state = _say(replace(state, at=None, offers=(), proposal=None), "No problem.")
    elif asked in ("choice", "offer_book") and 1 <= key <= len(state.offers):
        state = _choose(state, state.offers[key - 1])
    elif asked == "which" and state.appointments and 1 <= key <= len(state.appointments):
        state = replace(state, target=state.appointments[key - 1])
    elif asked == "service":
        state = _service_by_key(state, key, words)
    elif asked in ("intent", "anything_else", None) and state.task is None and 1 <= key <= len(MENU_TASKS):
        state = _fresh_task(state, MENU_TASKS[key - 1])
    return _count_miss(before, state)
