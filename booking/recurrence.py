"""Recurring bookings: RFC 5545 RRULEs expanded in the business's wall-clock time.

A weekly 09:00 appointment stays at 09:00 local across a DST change (its UTC instant moves), as people
expect. The rule must be bounded (COUNT or UNTIL) and stay within the configured maximum, so one request
can never ask for an unbounded number of bookings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from dateutil.rrule import rrule, rrulestr

from booking.errors import InvalidRequest
from booking.timeutil import NonexistentLocalTime, local_to_utc


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One occurrence: its wall-clock time and, unless that time does not exist, its UTC instant."""

    local: datetime
    start: datetime | None
    problem: str | None = None


def expand(rule: str, first_start: datetime, tz: ZoneInfo, *, max_occurrences: int) -> list[Occurrence]:
    """Occurrences of ``rule`` starting at ``first_start`` (aware), in wall-clock time of ``tz``.

    ``rule`` is an RRULE value such as ``FREQ=WEEKLY;COUNT=6`` (a leading ``RRULE:`` is accepted; no
    DTSTART: the first start comes from the booking). The first occurrence is ``first_start`` itself.
    """
    text = rule.strip()
    if text.upper().startswith("RRULE:"):
        text = text[len("RRULE:") :]
    if not text or "DTSTART" in text.upper() or "\n" in text:
        raise InvalidRequest(
            "recurrence must be a single RRULE value such as FREQ=WEEKLY;COUNT=6", code="invalid_rrule"
        )
    if "COUNT=" not in text.upper() and "UNTIL=" not in text.upper():
        raise InvalidRequest("recurrence needs COUNT or UNTIL so it ends", code="invalid_rrule")
    local_first = first_start.astimezone(tz).replace(tzinfo=None)
    try:
        parsed = rrulestr(text, dtstart=local_first)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"invalid RRULE {rule!r}: {exc}", code="invalid_rrule") from None
    if not isinstance(parsed, rrule):
        raise InvalidRequest(f"invalid RRULE {rule!r}", code="invalid_rrule")
    occurrences: list[Occurrence] = []
    for index, local in enumerate(parsed):
        if index >= max_occurrences:
            raise InvalidRequest(
                f"recurrence yields more than the {max_occurrences} occurrences allowed", code="too_many_occurrences"
            )
        if local.tzinfo is not None:
            # An UNTIL with Z makes dateutil compare in UTC but occurrences stay naive; guard anyway.
            local = local.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
        try:
            occurrences.append(Occurrence(local, local_to_utc(local, tz, fold=first_start.astimezone(tz).fold)))
        except NonexistentLocalTime:
            occurrences.append(Occurrence(local, None, NonexistentLocalTime.code))
    if not occurrences:
        raise InvalidRequest(f"recurrence {rule!r} yields no occurrence", code="invalid_rrule")
    return occurrences
