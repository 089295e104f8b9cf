"""The system prompt of a language-model agent: who it answers for, what the business offers, who is
calling, and how to behave on the phone.

Pure and deterministic: the same business, caller and moment give the same text, so it can be tested by
content and the provider can cache it. Times are written as people say them, in the business's zone; the
date of the next days is spelled out so the model resolves "tomorrow" or "next Tuesday" without doing
calendar arithmetic of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from booking.business import WEEKDAYS, Business, OpeningSpan
from booking.errors import InvalidRequest
from booking.phone import format_national, normalise_phone, region_of
from voice_server.tools import spoken_time

_DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
DAYS_SPELLED_OUT = 7
INTERRUPTION_NOTE = "[interrupted by the caller]"


@dataclass(frozen=True, slots=True)
class BookingView:
    """One of the caller's upcoming bookings, as much as the agent needs to talk about it."""

    booking_id: str
    service_name: str
    start: datetime  # aware
    resource_name: str | None = None


@dataclass(frozen=True, slots=True)
class CallerContext:
    """What we know about the caller before they say a word (looked up by their number)."""

    name: str | None = None
    upcoming: Sequence[BookingView] = ()
    timezone: str | None = None  # IANA zone, when known and possibly not the business's
    phone: str | None = None  # E.164, as the call reported it


def _clock(minutes: int) -> str:
    """Minutes after midnight as said aloud: ``8:30 AM``, ``noon``, ``5 PM``, ``midnight``."""
    hour, minute = divmod(minutes, 60)
    if minute == 0 and hour in (0, 24):
        return "midnight"
    if minute == 0 and hour == 12:
        return "noon"
    twelve = hour % 12 or 12
    text = f"{twelve}" if minute == 0 else f"{twelve}:{minute:02d}"
    return f"{text} {'AM' if hour < 12 else 'PM'}"


def _spans(spans: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{_clock(start)} to {_clock(end)}" for start, end in spans)


def _merged(spans: Sequence[OpeningSpan]) -> list[tuple[int, int]]:
    """The union of opening spans (the business is open when anyone is working)."""
    merged: list[tuple[int, int]] = []
    for span in sorted(spans, key=lambda s: s.start_minutes):
        if merged and span.start_minutes <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], span.end_minutes))
        else:
            merged.append((span.start_minutes, span.end_minutes))
    return merged


def _hours_lines(business: Business) -> list[str]:
    lines = []
    for day, name in enumerate(_DAY_NAMES):
        spans = _merged([span for resource in business.resources for span in resource.hours.for_weekday(day)])
        lines.append(f"- {name}: {_spans(spans) if spans else 'closed'}")
    return lines


def _staff_lines(business: Business) -> list[str]:
    lines = []
    for resource in business.resources:
        days = []
        for day, key in enumerate(WEEKDAYS):
            spans = resource.hours.for_weekday(day)
            if spans:
                days.append(f"{key.capitalize()} {_spans([(s.start_minutes, s.end_minutes) for s in spans])}")
        lines.append(f"- {resource.name} (id {resource.id}, {resource.kind}): {'; '.join(days)}")
    return lines


def _service_lines(business: Business) -> list[str]:
    lines = []
    for service in business.services:
        who = " or ".join(
            resource.name for rid in service.resources if (resource := business.resource(rid)) is not None
        )
        line = f"- {service.name} (id {service.id}): {service.duration_minutes} minutes, with {who}"
        if service.aliases:
            line += f"; callers may call it {', '.join(service.aliases)}"
        if service.description:
            line += f". {service.description}"
        lines.append(line)
    return lines


def _long_date(day: date) -> str:
    return f"{_DAY_NAMES[day.weekday()]}, {day:%B} {day.day}, {day.year}"


def _closure_lines(business: Business, today: date) -> list[str]:
    """Closures from today to the end of the booking horizon, so the model does not offer those days."""
    last = today + business.booking.horizon
    lines: list[tuple[date, str]] = []
    for closure in business.closures:
        if closure.date is not None:
            first_day = final_day = closure.date
            when = _long_date(closure.date)
        elif closure.start_date is not None and closure.end_date is not None:
            first_day, final_day = closure.start_date, closure.end_date
            when = f"{_long_date(first_day)} to {_long_date(final_day)}"
        elif closure.start is not None and closure.end is not None:
            first_day, final_day = closure.start.date(), closure.end.date()
            when = f"{_long_date(first_day)} from {_clock(closure.start.hour * 60 + closure.start.minute)}"
            when += f" to {_clock(closure.end.hour * 60 + closure.end.minute)}"
            if final_day != first_day:
                when += f" on {_long_date(final_day)}"
        else:
            continue
        if final_day < today or first_day > last:
            continue
        names = [r.name for rid in closure.resources if (r := business.resource(rid)) is not None]
        who = f"{', '.join(names)} away" if names else "the whole business closed"
        reason = f" ({closure.reason})" if closure.reason else ""
        lines.append((first_day, f"- {when}: {who}{reason}"))
    return [line for _, line in sorted(lines)]


def _hours_phrase(minutes: int) -> str:
    if minutes % 60 == 0:
        hours = minutes // 60
        return f"{hours} hour's" if hours == 1 else f"{hours} hours'"
    return f"{minutes} minutes'"


def _national(number: str | None, business: Business) -> str | None:
    """``number`` as a person in the business's country writes it; None when it is not a valid number."""
    if not number:
        return None
    home = region_of(business.phone)
    try:
        e164 = normalise_phone(number, default_region=home)
    except InvalidRequest:
        return None
    return format_national(e164, home_region=home)


def _caller_zone_line(business: Business, zone_name: str | None, now: datetime) -> str | None:
    if not zone_name:
        return None
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    if now.astimezone(zone).utcoffset() == now.astimezone(business.tz).utcoffset():
        return None  # same clock as the business: nothing to explain
    local = now.astimezone(zone)
    return (
        f"The caller is probably in the {zone_name} time zone, where it is now "
        f"{_clock(local.hour * 60 + local.minute)}. "
        f"Always give times in the business's time ({business.timezone}) and say so, adding the caller's own "
        "time when it helps."
    )


def _caller_lines(business: Business, context: CallerContext, now: datetime) -> list[str]:
    number = _national(context.phone, business)
    lines = [f"- Calling from {number}." if number else "- The caller's number is withheld or unknown."]
    if context.name:
        lines.append(
            f"- Our records name the holder of this number {context.name}. Greet them by name if it fits, but "
            "someone else may be using the phone: confirm the name before booking."
        )
    else:
        lines.append("- Not a known customer: ask for their name before booking.")
    if context.upcoming:
        lines.append("- Their upcoming appointments:")
        for booking in sorted(context.upcoming, key=lambda b: b.start):
            with_whom = f" with {booking.resource_name}" if booking.resource_name else ""
            lines.append(
                f"  - {booking.service_name} on {spoken_time(booking.start, business)}{with_whom} "
                f"(booking id {booking.booking_id})"
            )
    else:
        lines.append("- No upcoming appointments on record.")
    zone_line = _caller_zone_line(business, context.timezone, now)
    if zone_line is not None:
        lines.append(f"- {zone_line}")
    return lines


_RULES = (
    "You are on a phone call: your words are spoken aloud. Keep every reply to one or two short sentences, "
    "with no lists, markdown, symbols or emoji.",
    "Ask one question at a time.",
    "Before booking, know the service, the day and time, and the caller's name, and have the caller confirm them.",
    "Always check availability with check_availability before offering or booking a time. Never invent or "
    "guess free times: offer only times a tool returned, at most three at once.",
    "After booking, rescheduling or cancelling, read back what was done: service, day and time, and with whom.",
    "Say times in the business's time zone, as a person would (Tuesday, December 1 at 10 AM). Tools take the "
    "business's local time as YYYY-MM-DDTHH:MM and dates as YYYY-MM-DD.",
    "Only change or cancel the caller's own bookings; use find_my_appointments when you need their ids.",
    "If a tool returns an error, explain it simply and ask for what is missing, or fix the request yourself.",
    "If the caller asks for a person, or you cannot help, use transfer_to_human. If they describe a medical "
    "emergency, tell them to hang up and call the emergency number.",
    "When the caller has nothing more, say goodbye, then use end_call.",
    f"An earlier reply of yours that ends with {INTERRUPTION_NOTE} was cut short: the caller heard only the "
    "words shown. Never write that marker yourself.",
)


def build_system_prompt(business: Business, context: CallerContext, now: datetime) -> str:
    """The system prompt for one call to ``business`` from the caller described by ``context``, at ``now``
    (an aware instant)."""
    local = now.astimezone(business.tz)
    today = local.date()
    upcoming_days = [today + timedelta(days=offset) for offset in range(1, DAYS_SPELLED_OUT + 1)]
    rules = business.booking
    sections = [
        f"You are the phone receptionist of {business.name}. You book, move and cancel appointments for callers.",
        "",
        "## Now",
        f"Today is {_long_date(today)} ({today.isoformat()}); the time is {_clock(local.hour * 60 + local.minute)} "
        f"in the business's time zone, {business.timezone}.",
        "Coming days: "
        + "; ".join(
            f"{_DAY_NAMES[day.weekday()]} {day.isoformat()}" + (" (tomorrow)" if day == upcoming_days[0] else "")
            for day in upcoming_days
        )
        + ".",
        "",
        "## Opening hours",
        *_hours_lines(business),
        "",
        "## Services",
        *_service_lines(business),
        "",
        "## Staff and their hours",
        *_staff_lines(business),
        "",
        "## Booking policy",
        f"- Appointments need at least {_hours_phrase(rules.min_notice_minutes)} notice and can be booked up to "
        f"{rules.horizon_days} days ahead.",
    ]
    closures = _closure_lines(business, today)
    if closures:
        sections += ["- Closures coming up:", *(f"  {line}" for line in closures)]
    if business.phone:
        sections.append(f"- The business's own number is {_national(business.phone, business) or business.phone}.")
    sections += [
        "",
        "## The caller",
        *_caller_lines(business, context, now),
        "",
        "## How to behave",
        *(f"- {rule}" for rule in _RULES),
    ]
    return "\n".join(sections)


__all__ = ["INTERRUPTION_NOTE", "BookingView", "CallerContext", "build_system_prompt"]
