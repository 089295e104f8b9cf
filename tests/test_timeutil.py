"""Wall-clock conversion across DST: gaps refused, repeats disambiguated."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from booking.errors import InvalidRequest
from booking.recurrence import expand
from booking.timeutil import (
    NonexistentLocalTime,
    is_ambiguous,
    is_nonexistent,
    local_day_bounds,
    local_to_utc,
    parse_instant,
    zone,
)

NEW_YORK = zone("America/New_York")


def test_a_time_in_the_spring_gap_is_refused_with_the_jump_named() -> None:
    with pytest.raises(NonexistentLocalTime) as caught:
        local_to_utc(datetime(2026, 3, 8, 2, 30), NEW_YORK)
    assert "2026-03-08T02:30 does not exist in America/New_York" in caught.value.detail
    assert "from 2026-03-08T01:59 straight to 2026-03-08T03:00" in caught.value.detail
    assert is_nonexistent(datetime(2026, 3, 8, 2, 0), NEW_YORK)
    assert not is_nonexistent(datetime(2026, 3, 8, 3, 0), NEW_YORK)


def test_a_repeated_time_takes_fold() -> None:
    local = datetime(2026, 11, 1, 1, 30)
    assert is_ambiguous(local, NEW_YORK)
    assert local_to_utc(local, NEW_YORK) == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # EDT, first
    assert local_to_utc(local, NEW_YORK, fold=1) == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)  # EST, second
    assert not is_ambiguous(datetime(2026, 11, 1, 3, 0), NEW_YORK)


def test_dst_days_have_23_and_25_hours() -> None:
    spring = local_day_bounds(date(2026, 3, 8), NEW_YORK)
    autumn = local_day_bounds(date(2026, 11, 1), NEW_YORK)
    assert (spring[1] - spring[0]).total_seconds() == 23 * 3600
    assert (autumn[1] - autumn[0]).total_seconds() == 25 * 3600


def test_parse_instant_respects_offsets_and_zones() -> None:
    assert parse_instant("2026-12-01T10:00:00-05:00", NEW_YORK) == datetime(2026, 12, 1, 15, tzinfo=UTC)
    assert parse_instant("2026-12-01T15:00:00Z", NEW_YORK) == datetime(2026, 12, 1, 15, tzinfo=UTC)
    assert parse_instant("2026-12-01T10:00", NEW_YORK) == datetime(2026, 12, 1, 15, tzinfo=UTC)
    assert parse_instant("2026-12-01T10:00", zone("Europe/London")) == datetime(2026, 12, 1, 10, tzinfo=UTC)
    with pytest.raises(InvalidRequest) as caught:
        parse_instant("tomorrow at ten", NEW_YORK)
    assert caught.value.code == "invalid_time"
    with pytest.raises(InvalidRequest) as unknown:
        zone("Atlantis/Capital")
    assert unknown.value.code == "unknown_time_zone"


def test_recurrence_reports_an_occurrence_that_does_not_exist() -> None:
    occurrences = expand("FREQ=DAILY;COUNT=3", datetime(2026, 3, 7, 7, 30, tzinfo=UTC), NEW_YORK, max_occurrences=10)
    assert [o.problem for o in occurrences] == [None, "nonexistent_local_time", None]
    assert occurrences[2].start == datetime(2026, 3, 9, 6, 30, tzinfo=UTC)  # 02:30 EDT


def test_recurrence_bounds() -> None:
    start = datetime(2026, 12, 1, 15, tzinfo=UTC)
    assert len(expand("RRULE:FREQ=WEEKLY;UNTIL=20261222T235959", start, NEW_YORK, max_occurrences=10)) == 4
    with pytest.raises(InvalidRequest, match="more than the 3 occurrences"):
        expand("FREQ=DAILY;COUNT=4", start, NEW_YORK, max_occurrences=3)
    with pytest.raises(InvalidRequest, match="COUNT or UNTIL"):
        expand("FREQ=DAILY", start, NEW_YORK, max_occurrences=3)
    with pytest.raises(InvalidRequest, match="single RRULE"):
        expand("DTSTART:20261201T100000\nRRULE:FREQ=DAILY;COUNT=2", start, NEW_YORK, max_occurrences=3)
