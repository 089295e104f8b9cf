"""The words a report is made of: outcomes, intents, tags, sentiment labels and lifecycle stages, and the
``kind:value`` conditions that lead-scoring and lifecycle rules are written in.

Kept free of other imports so the business configuration can validate its rules against it.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """What the call came to, for the business."""

    BOOKED = "booked"
    RESCHEDULED = "rescheduled"
    CANCELLED = "cancelled"
    ENQUIRY_ONLY = "enquiry_only"
    TRANSFERRED = "transferred"
    ABANDONED = "abandoned"
    VOICEMAIL = "voicemail"


class BookingAction(enum.StrEnum):
    """What a call did to a booking."""

    BOOKED = "booked"
    RESCHEDULED = "rescheduled"
    CANCELLED = "cancelled"


class Intent(enum.StrEnum):
    """What the caller wanted."""

    BOOK = "book"
    RESCHEDULE = "reschedule"
    CANCEL = "cancel"
    CHECK_AVAILABILITY = "check_availability"
    FIND_APPOINTMENTS = "find_appointments"
    ASK_PRICE = "ask_price"
    ASK_HOURS = "ask_hours"
    ASK_LOCATION = "ask_location"
    SPEAK_TO_PERSON = "speak_to_person"
    COMPLAIN = "complain"
    REQUEST_CALLBACK = "request_callback"


class Tag(enum.StrEnum):
    """Labels for the people who act on reports (and for triggers)."""

    FOLLOW_UP_REQUIRED = "follow_up_required"
    COMPLAINT = "complaint"
    NEW_CUSTOMER = "new_customer"
    RETURNING_CUSTOMER = "returning_customer"
    ASKED_FOR_PERSON = "asked_for_person"
    URGENT = "urgent"
    NO_AVAILABILITY = "no_availability"


class SentimentLabel(enum.StrEnum):
    POSITIVE = "positive"
    NEUTRAL = "neutral"
    NEGATIVE = "negative"


class LifecycleStage(enum.StrEnum):
    """Where the caller stands as a lead."""

    NEW = "new"
    CONTACTED = "contacted"
    QUALIFIED = "qualified"
    BOOKED = "booked"
    NURTURE = "nurture"
    LOST = "lost"


CONDITION_KINDS: dict[str, type[enum.StrEnum]] = {
    "outcome": Outcome,
    "intent": Intent,
    "tag": Tag,
    "sentiment": SentimentLabel,
}


def condition(kind: str, value: str) -> str:
    return f"{kind}:{value}"


def check_condition(text: str) -> str:
    """Return ``text`` (``kind:value``, e.g. ``outcome:booked``) if it names a known condition, else raise
    ValueError listing what is allowed."""
    kind, sep, value = text.partition(":")
    vocabulary = CONDITION_KINDS.get(kind)
    if not sep or vocabulary is None:
        kinds = ", ".join(CONDITION_KINDS)
        raise ValueError(f"{text!r} is not a condition like 'outcome:booked' (kinds: {kinds})")
    allowed = [member.value for member in vocabulary]
    if value not in allowed:
        raise ValueError(f"{text!r}: unknown {kind} {value!r} (one of: {', '.join(allowed)})")
    return text
