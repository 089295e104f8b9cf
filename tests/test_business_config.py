"""The business file: the example is valid, and every kind of mistake is named with its location."""

from __future__ import annotations

from typing import Any

import pytest

from booking.business import EXAMPLE_BUSINESS_FILE, load_business, parse_business
from booking.errors import ConfigurationError


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "business": {"name": "Salon", "timezone": "Europe/London"},
        "resources": [{"id": "sam", "name": "Sam", "hours": {"mon": ["09:00-17:00"], "sat": "10:00-24:00"}}],
        "services": [{"id": "cut", "name": "Cut", "duration_minutes": 45, "resources": ["sam"]}],
    }
    data.update(overrides)
    return data


def test_the_example_business_is_valid() -> None:
    business = load_business(EXAMPLE_BUSINESS_FILE)
    assert business.tz.key == "America/New_York"
    assert {r.id for r in business.resources} == {"dr-lee", "dr-patel", "nurse-kim"}
    assert business.resource("dr-lee") is not None and business.resource("dr-lee").calendar_id  # type: ignore[union-attr]
    assert business.service("checkup") is not None


def test_a_minimal_business_and_midnight_end() -> None:
    business = parse_business(minimal())
    assert str(business.resources[0].hours.sat[0]) == "10:00-24:00"
    assert business.booking.slot_step_minutes == 15
    assert business.crm.score_rules and business.crm.lifecycle_rules  # defaults without a [crm] section


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"business": {"name": "S", "timezone": "Europe/Atlantis"}}, "timezone: 'Europe/Atlantis' is not an IANA"),
        (
            {"services": [{"id": "cut", "name": "Cut", "duration_minutes": 45, "resources": ["kim"]}]},
            "services[0] (cut) names unknown resource(s): kim",
        ),
        (
            {"resources": [{"id": "sam", "name": "Sam", "hours": {"mon": ["09:00-12:00", "11:00-13:00"]}}]},
            "resources[0].hours.mon: spans 09:00-12:00 and 11:00-13:00 overlap",
        ),
        (
            {"resources": [{"id": "sam", "name": "Sam", "hours": {"mon": ["9am-5pm"]}}]},
            "resources[0].hours.mon: '9am-5pm' is not a span like '09:00-17:30'",
        ),
        ({"resources": [{"id": "sam", "name": "Sam", "hours": {}}]}, "has no opening hours on any day"),
        ({"resources": [{"id": "Sam Smith", "name": "Sam", "hours": {"mon": "09:00-10:00"}}]}, "resources[0].id"),
        (
            {"closures": [{"date": "2026-12-25", "start": "2026-12-25T10:00:00"}]},
            "give exactly one of: date; start_date and end_date; start and end",
        ),
        ({"closures": [{"date": "2026-12-25", "resources": ["kim"]}]}, "closures[0] names unknown resource(s): kim"),
        ({"booking": {"min_notice_minutes": 100000, "horizon_days": 1}}, "min_notice_minutes must be shorter"),
        ({"booking": {"slot_step": 15}}, "booking.slot_step: Extra inputs are not permitted"),
        (
            {"crm": {"score_rules": [{"when": "outcome:won", "points": 5}]}},
            "crm.score_rules[0].when: 'outcome:won': unknown outcome 'won'",
        ),
        ({"crm": {"score_rules": [{"when": "booked", "points": 5}]}}, "is not a condition like 'outcome:booked'"),
        ({"crm": {"lifecycle_rules": [{"stage": "booked"}]}}, "stage 'booked' needs 'when' or 'min_score'"),
        ({"crm": {"lifecycle_rules": [{"stage": "won", "min_score": 5}]}}, "crm.lifecycle_rules[0].stage"),
    ],
)
def test_mistakes_are_named_with_their_location(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_business(minimal(**change))
    assert message in caught.value.detail


def test_unreadable_and_invalid_toml(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="cannot read business configuration"):
        load_business(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[business\nname=")
    with pytest.raises(ConfigurationError, match="invalid TOML"):
        load_business(bad)
