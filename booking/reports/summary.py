"""An extractive summary without a language model: who called, what they wanted, what happened, and
the next step, each sentence built from facts or lifted from what the caller said."""

from __future__ import annotations

from collections.abc import Sequence

from booking.business import Business
from booking.reports.facts import BookingChange, CallFacts
from booking.reports.intents import CUES
from booking.reports.provenance import rules
from booking.reports.schema import Automated, BookingTouched, TranscriptTurn
from booking.reports.vocabulary import BookingAction, Intent, Outcome

MAX_QUOTE_CHARS = 160

_WANTED: dict[Intent, str] = {
    Intent.BOOK: "to book an appointment",
    Intent.RESCHEDULE: "to move an appointment",
    Intent.CANCEL: "to cancel an appointment",
    Intent.CHECK_AVAILABILITY: "to know when there was a free time",
    Intent.FIND_APPOINTMENTS: "to check their appointments",
    Intent.ASK_PRICE: "to know about prices",
    Intent.ASK_HOURS: "to know the opening hours",
    Intent.ASK_LOCATION: "to know where the business is",
    Intent.SPEAK_TO_PERSON: "to speak to a person",
    Intent.COMPLAIN: "to make a complaint",
    Intent.REQUEST_CALLBACK: "a call back",
}
_DONE: dict[BookingAction, str] = {
    BookingAction.BOOKED: "Booked",
    BookingAction.RESCHEDULED: "Moved",
    BookingAction.CANCELLED: "Cancelled",
}


def summarise(
    *,
    turns: Sequence[TranscriptTurn],
    facts: CallFacts,
    outcome: Outcome,
    intents: Sequence[Intent],
    touched: Sequence[BookingTouched],
    known_customer: bool,
    business: Business,
) -> Automated[str]:
    """``turns`` is the cleaned transcript, so a quoted request carries no personal data."""
    sentences = [_who(facts, known_customer), _wanted(turns, intents), _happened(facts, outcome, touched, business)]
    sentences.append(f"Next step: {_next_step(facts, outcome, intents)}.")
    text = " ".join(sentence for sentence in sentences if sentence)
    # Facts make the what-happened sentence certain; the quoted request is a guess at the main point.
    confidence = 0.9 if facts.changes or touched or not facts.caller_spoke else 0.7
    return Automated[str](value=text, confidence=confidence, provenance=rules("summary"))


def _who(facts: CallFacts, known_customer: bool) -> str:
    who = "A returning customer" if known_customer else "A new caller"
    if facts.customer_name:
        who += f", {facts.customer_name},"
    return f"{who} called."


def _wanted(turns: Sequence[TranscriptTurn], intents: Sequence[Intent]) -> str:
    quote = _request_line(turns, intents)
    named = [_WANTED[intent] for intent in intents if intent is not Intent.FIND_APPOINTMENTS][:2]
    if named:
        wanted = f"They wanted {' and '.join(named)}"
        return f"{wanted}: {_quoted(quote)}" if quote else f"{wanted}."
    return f"They said: {_quoted(quote)}" if quote else ""


def _quoted(text: str) -> str:
    return f'"{text}"' if text.endswith((".", "?", "!", "…")) else f'"{text}."'


def _request_line(turns: Sequence[TranscriptTurn], intents: Sequence[Intent]) -> str | None:
    """The first caller turn that states an intent, else their first turn of several words."""
    caller = [turn.text for turn in turns if turn.role == "caller" and turn.text.strip()]
    stating = [text for text in caller if any(CUES[intent].search(text) for intent in intents)]
    candidates = stating or [text for text in caller if len(text.split()) >= 4] or caller
    if not candidates:
        return None
    quote = candidates[0].strip()
    if len(quote) > MAX_QUOTE_CHARS:
        quote = quote[: MAX_QUOTE_CHARS - 1].rsplit(" ", 1)[0] + "…"
    return quote


def _happened(facts: CallFacts, outcome: Outcome, touched: Sequence[BookingTouched], business: Business) -> str:
    if outcome in (Outcome.BOOKED, Outcome.RESCHEDULED, Outcome.CANCELLED):
        described = [_describe_change(change) for change in facts.changes]
        if not described:
            described = [_describe_touched(booking, business) for booking in touched]
        return " ".join(described)
    if outcome is Outcome.TRANSFERRED:
        reason = f" ({facts.transfer_reason})" if facts.transfer_reason else ""
        return f"The call was transferred to a person{reason}."
    if outcome is Outcome.VOICEMAIL:
        return "The call reached a voicemail greeting."
    if outcome is Outcome.ABANDONED:
        return "The caller hung up before saying anything." if not facts.caller_spoke else "The call did not connect."
    if facts.unavailable_answers:
        return "No booking was made: the time they wanted was not free."
    return "No booking was made."


def _describe_change(change: BookingChange) -> str:
    what = change.service_name or "an appointment"
    who = f" with {change.resource_name}" if change.resource_name else ""
    when = (
        f" {'to' if change.action is BookingAction.RESCHEDULED else 'for'} {change.spoken_time}"
        if (change.spoken_time)
        else ""
    )
    ref = f" (booking {change.booking_id})" if change.booking_id else ""
    return f"{_DONE[change.action]} {what}{who}{when}{ref}."


def _describe_touched(booking: BookingTouched, business: Business) -> str:
    service = business.service(booking.service_id)
    resource = business.resource(booking.resource_id)
    local = booking.start.astimezone(business.tz)
    what = service.name if service is not None else booking.service_id
    who = resource.name if resource is not None else booking.resource_id
    when = f"{local:%A, %B} {local.day} at {local:%H:%M}"
    return f"{_DONE[booking.action]} {what} with {who} for {when} (booking {booking.booking_id})."


def _next_step(facts: CallFacts, outcome: Outcome, intents: Sequence[Intent]) -> str:
    if Intent.COMPLAIN in intents:
        return "review the complaint and call the caller back"
    if Intent.REQUEST_CALLBACK in intents or facts.transfer == "failed":
        return "call the caller back"
    if outcome is Outcome.BOOKED or outcome is Outcome.RESCHEDULED:
        return "none, the appointment is confirmed"
    if outcome is Outcome.CANCELLED:
        return "offer the caller a new appointment"
    if outcome is Outcome.VOICEMAIL:
        return "return the call"
    if outcome is Outcome.TRANSFERRED:
        return "the person who took the call follows up"
    if outcome is Outcome.ABANDONED:
        return "none, nothing was asked"
    if facts.unavailable_answers:
        return "offer other times"
    return "none"
