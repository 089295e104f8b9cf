"""Wall-clock time in a business's IANA zone, with the two DST traps handled explicitly.

* A local time inside a spring-forward gap does not exist (02:30 on 2026-03-08 in New York): it is
  refused with :class:`NonexistentLocalTime`, never silently shifted.
* A local time inside a fall-back overlap happens twice (01:30 on 2026-11-01 in New York): ``fold``
  picks the occurrence (0 = the first, daylight time; 1 = the second, standard time), as in PEP 495.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from booking.errors import InvalidRequest


class NonexistentLocalTime(InvalidRequest):
    code = "nonexistent_local_time"


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The ``ZoneInfo`` for an IANA name, with a clear error for a name that is not one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidRequest(f"unknown IANA time zone {name!r}", code="unknown_time_zone") from exc


def is_nonexistent(local: datetime, tz: ZoneInfo) -> bool:
    """True when the naive wall-clock ``local`` falls in a gap of ``tz`` (it never shows on a clock)."""
    aware = local.replace(tzinfo=tz)
    round_trip = aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
    return round_trip != local.replace(tzinfo=None)


def is_ambiguous(local: datetime, tz: ZoneInfo) -> bool:
    """True when the naive wall-clock ``local`` happens twice in ``tz``."""
    naive = local.replace(tzinfo=None)
    first = naive.replace(tzinfo=tz, fold=0).utcoffset()
    second = naive.replace(tzinfo=tz, fold=1).utcoffset()
    return first != second and not is_nonexistent(naive, tz)


def local_to_utc(local: datetime, tz: ZoneInfo, *, fold: int = 0) -> datetime:
    """Convert a naive wall-clock time in ``tz`` to an aware UTC instant.

    Raises :class:`NonexistentLocalTime` for a time in a spring-forward gap, naming the zone and the
    nearest valid times. ``fold`` chooses between the two occurrences of a repeated time.
    """
    if fold not in (0, 1):
        raise InvalidRequest(f"fold must be 0 or 1, not {fold}", code="invalid_fold")
    naive = local.replace(tzinfo=None, fold=0)
    if is_nonexistent(naive, tz):
        before = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
        gap_start = (before - timedelta(hours=3)).astimezone(tz)
        # The clock jumps at the instant where the offset changes; report the wall times on each side.
        jump = _transition_between(gap_start.astimezone(UTC), before + timedelta(hours=3), tz)
        detail = f"{naive.isoformat(timespec='minutes')} does not exist in {tz.key}: clocks spring forward"
        if jump is not None:
            last = (jump - timedelta(minutes=1)).astimezone(tz).replace(tzinfo=None)
            first = jump.astimezone(tz).replace(tzinfo=None)
            detail += f" from {last.isoformat(timespec='minutes')} straight to {first.isoformat(timespec='minutes')}"
        raise NonexistentLocalTime(detail, time_zone=tz.key)
    return naive.replace(tzinfo=tz, fold=fold).astimezone(UTC)


def local_boundary_to_utc(day: date, clock: time, tz: ZoneInfo) -> datetime:
    """A business-hours boundary (``09:00`` on ``day``) as a UTC instant.

    Boundaries are lenient where requests are strict: a repeated time uses its first occurrence, and a
    time inside a gap is read with the offset from before the jump (PEP 495 ``fold=0``), so an opening
    at 02:30 on a spring-forward night opens at 03:30 daylight time, the same elapsed time after
    midnight.
    """
    return datetime.combine(day, clock).replace(tzinfo=tz, fold=0).astimezone(UTC)


def local_day_bounds(day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants at which local ``day`` starts and the next local day starts (23 or 25 hours
    apart on DST days)."""
    return (
        local_boundary_to_utc(day, time(0), tz),
        local_boundary_to_utc(day + timedelta(days=1), time(0), tz),
    )


def _transition_between(start: datetime, end: datetime, tz: ZoneInfo) -> datetime | None:
    """The first UTC minute in ``[start, end)`` where the zone's offset differs from the one before."""
    offset = start.astimezone(tz).utcoffset()
    low, high = start, end
    if end.astimezone(tz).utcoffset() == offset:
        return None
    while high - low > timedelta(minutes=1):
        middle = low + (high - low) / 2
        middle = middle.replace(second=0, microsecond=0)
        if middle <= low:
            break
        if middle.astimezone(tz).utcoffset() == offset:
            low = middle
        else:
            high = middle
    return high


def parse_instant(text: str, tz: ZoneInfo, *, fold: int = 0) -> datetime:
    """Parse an ISO 8601 time from a request into UTC.

    With an offset (``2026-03-09T10:00:00-04:00`` or ``...Z``) the instant is exact. Without one it is a
    wall-clock time in ``tz`` (the business's or the caller's zone) and goes through
    :func:`local_to_utc`, so gaps are refused and ``fold`` disambiguates repeats.
    """
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InvalidRequest(
            f"{text!r} is not an ISO 8601 date-time such as 2026-03-09T10:30 or 2026-03-09T10:30:00-04:00",
            code="invalid_time",
        ) from exc
    if parsed.tzinfo is not None:
        return parsed.astimezone(UTC)
    return local_to_utc(parsed, tz, fold=fold)


def format_local(instant: datetime, tz: ZoneInfo) -> str:
    """ISO 8601 with the local offset, e.g. ``2026-11-01T01:30:00-05:00`` (the offset disambiguates)."""
    return instant.astimezone(tz).isoformat(timespec="seconds")
