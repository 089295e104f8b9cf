"""Value objects and lifecycles of the booking domain. Pure: no I/O, no configuration reads.

All instants are timezone-aware and in UTC. Local wall-clock times exist only at the edges (parsing a
request, rendering a slot for a caller) and in the business configuration.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from booking.errors import InvalidTransition


def ensure_utc(value: datetime) -> datetime:
    """Return ``value`` in UTC; naive datetimes are refused because they hide a time zone bug."""
    if value.tzinfo is UTC:
        return value  # the common case, kept cheap: slots and intervals are built by the thousand
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} where an aware instant was expected")
    return value.astimezone(UTC)


@dataclass(frozen=True, slots=True, order=True)
class Interval:
    """A half-open span of time ``[start, end)`` in UTC."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", ensure_utc(self.start))
        object.__setattr__(self, "end", ensure_utc(self.end))
        if self.end <= self.start:
            raise ValueError(f"interval ends ({self.end.isoformat()}) before it starts ({self.start.isoformat()})")

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    def overlaps(self, other: Interval) -> bool:
        return self.start < other.end and other.start < self.end

    def contains(self, other: Interval) -> bool:
        return self.start <= other.start and other.end <= self.end

    def widen(self, before: timedelta, after: timedelta) -> Interval:
        return Interval(self.start - before, self.end + after)


@dataclass(frozen=True, slots=True)
class Slot:
    """A bookable appointment: the service time ``[start, end)`` plus the ``block`` it occupies on the
    resource, which adds the service's buffers before and after."""

    resource_id: str
    service_id: str
    start: datetime
    end: datetime
    block: Interval

    @property
    def interval(self) -> Interval:
        return Interval(self.start, self.end)


class BookingStatus(enum.StrEnum):
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    NO_SHOW = "no_show"

    @property
    def is_active(self) -> bool:
        """Active bookings occupy their resource; the ledger refuses two that overlap."""
        return self is BookingStatus.CONFIRMED

    def check_transition(self, target: BookingStatus, *, booking_id: str) -> None:
        if target not in _LEGAL_TRANSITIONS[self]:
            raise InvalidTransition(
                f"a {self.value} booking cannot become {target.value}",
                booking_id=booking_id,
            )


_LEGAL_TRANSITIONS: dict[BookingStatus, frozenset[BookingStatus]] = {
    BookingStatus.CONFIRMED: frozenset({BookingStatus.CANCELLED, BookingStatus.COMPLETED, BookingStatus.NO_SHOW}),
    BookingStatus.CANCELLED: frozenset(),
    BookingStatus.COMPLETED: frozenset(),
    BookingStatus.NO_SHOW: frozenset(),
}

ACTIVE_STATUSES: tuple[str, ...] = tuple(status.value for status in BookingStatus if status.is_active)


@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    phone: str
    name: str | None = None
    email: str | None = None
    time_zone: str | None = None


class SmsConsent(enum.StrEnum):
    """What the customer said about texts when they booked, recorded with the booking."""

    GIVEN = "given"  # asked and said yes (or ticked the box)
    IMPLIED = "implied"  # gave the number for this booking (a call, a form): confirmations and reminders only
    DECLINED = "declined"  # said no: the booking gets no texts

    @property
    def allows_texts(self) -> bool:
        return self is not SmsConsent.DECLINED

    @classmethod
    def from_answer(cls, answer: bool | None) -> SmsConsent:
        """Yes, no, or not asked (the number was given for the booking: implied)."""
        if answer is None:
            return cls.IMPLIED
        return cls.GIVEN if answer else cls.DECLINED


@dataclass(frozen=True, slots=True)
class Booking:
    id: str
    resource_id: str
    service_id: str
    customer: Customer
    start: datetime
    end: datetime
    block: Interval
    status: BookingStatus
    version: int
    created_at: datetime
    updated_at: datetime
    series_id: str | None = None
    source: str = "api"
    notes: str | None = None
    sms_consent: SmsConsent = SmsConsent.IMPLIED
    line_number: str | None = None
    """The business's number the customer reached it on (a call's ``To``), E.164; texts about the booking
    go from it. None: made another way (the API, a booking page), texted from the configured sender."""

    @property
    def interval(self) -> Interval:
        return Interval(self.start, self.end)


@dataclass(frozen=True, slots=True)
class BookingEvent:
    """One line of a booking's history: every status change and every move of its time."""

    booking_id: str
    at: datetime
    kind: str
    from_status: BookingStatus | None
    to_status: BookingStatus
    actor: str
    details: dict[str, Any] = field(default_factory=dict)


def new_id() -> str:
    """A 32-character lowercase hex id whose first 12 characters are the millisecond time, so ids sort
    by creation and index well. Hex digits are valid base32hex, so a Google Calendar event id can be
    derived from a booking id directly."""
    millis = int(datetime.now(UTC).timestamp() * 1000)
    return f"{millis:012x}{secrets.token_hex(10)}"
