"""What the offline dialog understands in a caller's words, phrasing by phrasing. Today is Monday
30 November 2026 (the last day of the month), so "the first" is tomorrow and "monday" is next week."""

from __future__ import annotations

from datetime import date, time

import pytest

from booking.business import EXAMPLE_BUSINESS_FILE, load_business
from voice_server.spoken import ClockSaid, resolve_clock, spoken_tokens
from voice_server.understanding import Heard, Understanding

TODAY = date(2026, 11, 30)
WORDS = Understanding(load_business(EXAMPLE_BUSINESS_FILE))


def hear(text: str, *, expecting_name: bool = False) -> Heard:
    return WORDS.hear(text, today=TODAY, expecting_name=expecting_name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ten thirty", ["10", "30"]),
        ("Two P.M.", ["2", "pm"]),
        ("two p m", ["2", "pm"]),
        ("10:30am", ["10:30", "am"]),
        ("nine o'clock", ["9", "oclock"]),
        ("december third", ["december", "3rd"]),
        ("I'd like a check-up", ["id", "like", "a", "check", "up"]),
        ("12/3, please!", ["12/3", "please"]),
    ],
)
def test_words_are_normalised_with_numbers_as_digits(text: str, expected: list[str]) -> None:
    assert spoken_tokens(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("today", date(2026, 11, 30)),
        ("tomorrow", date(2026, 12, 1)),
        ("the day after tomorrow", date(2026, 12, 2)),
        ("day after tomorrow please", date(2026, 12, 2)),
        # A weekday is the next one after today: said on a Monday, "monday" is next week's.
        ("monday", date(2026, 12, 7)),
        ("this monday", date(2026, 11, 30)),
        ("next monday", date(2026, 12, 7)),
        ("tuesday", date(2026, 12, 1)),
        ("on friday", date(2026, 12, 4)),
        ("next friday", date(2026, 12, 4)),
        ("friday next week", date(2026, 12, 11)),
        ("wed", date(2026, 12, 2)),
        ("december third", date(2026, 12, 3)),
        ("december 3", date(2026, 12, 3)),
        ("dec 3rd", date(2026, 12, 3)),
        ("the third of december", date(2026, 12, 3)),
        ("3rd of december", date(2026, 12, 3)),
        ("december the twenty first", date(2026, 12, 21)),
        ("december thirty first", date(2026, 12, 31)),
        ("12/3", date(2026, 12, 3)),
        ("12/03/2026", date(2026, 12, 3)),
        ("2026-12-03", date(2026, 12, 3)),
        # "the first" on the last day of a month is tomorrow; a day of the month still to come is this month's.
        ("the first", date(2026, 12, 1)),
        ("on the thirtieth", date(2026, 11, 30)),
        ("the twenty ninth", date(2026, 12, 29)),
        ("the thirty first", date(2026, 12, 31)),
        ("tuesday the first", date(2026, 12, 1)),
        # A month long past this year means next year's.
        ("january fifth", date(2027, 1, 5)),
        ("may i book for may third", date(2027, 5, 3)),
    ],
)
def test_days(text: str, expected: date) -> None:
    heard = hear(text)
    assert heard.day is not None and heard.day.problem is None
    assert heard.day.day == expected


@pytest.mark.parametrize(
    ("text", "problem", "said"),
    [
        ("february thirtieth", "impossible", "February 30"),
        ("april thirty first", "impossible", "April 31"),
        ("2/30", "impossible", "February 30"),
        ("the thirty second", "impossible", "the 32nd"),
        ("november second", "past", "November 2"),
        ("yesterday", "past", "yesterday"),
        ("11/2/2026", "past", "November 2"),
        ("2025-12-03", "past", "December 3"),
    ],
)
def test_days_that_cannot_be_booked_say_why(text: str, problem: str, said: str) -> None:
    heard = hear(text)
    assert heard.day is not None and heard.day.day is None
    assert (heard.day.problem, heard.day.said) == (problem, said)


CHECKUP_ANY_DAY = WORDS.opening("checkup", None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("at ten", time(10, 0)),
        ("ten thirty", time(10, 30)),
        ("10:30", time(10, 30)),
        ("10:30am", time(10, 30)),
        ("10:30 pm", time(22, 30)),
        ("two p m", time(14, 0)),
        ("2pm", time(14, 0)),
        ("two thirty", time(14, 30)),
        ("half past two", time(14, 30)),
        ("quarter past ten", time(10, 15)),
        ("a quarter to three", time(14, 45)),
        ("twenty past ten", time(10, 20)),
        ("noon", time(12, 0)),
        ("twelve noon", time(12, 0)),
        # Twelve thirty is after noon, never half past midnight.
        ("twelve thirty", time(12, 30)),
        ("at twelve", time(12, 0)),
        ("two in the afternoon", time(14, 0)),
        ("eight in the morning", time(8, 0)),
        ("nine o'clock", time(9, 0)),
        ("ten oh five", time(10, 5)),
        ("14:30", time(14, 30)),
        ("around four", time(16, 0)),
        # Six is open only in the evening (Thursdays to 7 PM); seven is open at neither, and reads as morning.
        ("at six", time(18, 0)),
        ("at seven", time(7, 0)),
        ("tomorrow afternoon at three", time(15, 0)),
        ("tomorrow morning at eleven", time(11, 0)),
    ],
)
def test_times_are_read_inside_opening_hours(text: str, expected: time) -> None:
    heard = hear(text)
    assert heard.clock is not None
    assert resolve_clock(heard.clock, CHECKUP_ANY_DAY) == expected


def test_a_bare_number_is_left_for_the_dialog_and_resolves_inside_hours() -> None:
    ten, two = hear("ten"), hear("two")
    assert (ten.clock, ten.number) == (None, 10)
    assert (two.clock, two.number) == (None, 2)
    assert resolve_clock(ClockSaid(10, 0), CHECKUP_ANY_DAY) == time(10, 0)
    assert resolve_clock(ClockSaid(2, 0), CHECKUP_ANY_DAY) == time(14, 0)
    # The hours of the day asked about decide: Dr. Patel works Saturday mornings only.
    saturday = date(2026, 12, 5)
    assert WORDS.resolve(ClockSaid(11, 0), "checkup", saturday) == time(11, 0)
    assert WORDS.resolve(ClockSaid(5, 0), "checkup", None) == time(17, 0)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("tomorrow morning", "morning"),
        ("in the afternoon", "afternoon"),
        ("first thing", "morning"),
        ("this evening", "evening"),
    ],
)
def test_parts_of_day(text: str, part: str) -> None:
    assert hear(text).part_of_day == part


def test_tonight_is_today_in_the_evening() -> None:
    heard = hear("tonight")
    assert heard.day is not None and heard.day.day == TODAY and heard.part_of_day == "evening"


@pytest.mark.parametrize(
    ("text", "service"),
    [
        ("a check up", "checkup"),
        ("checkup", "checkup"),
        ("Check-up", "checkup"),
        ("i want a general check up", "checkup"),
        ("an annual physical", "checkup"),
        ("blood test", "blood-test"),
        ("some blood work", "blood-test"),
        ("a vaccine", "vaccination"),
        ("i need a shot", "vaccination"),
        ("flu shot", "vaccination"),
        ("a jab", "vaccination"),
        ("new patient consultation", "consultation"),
        ("a consult", "consultation"),
        ("my first visit", "consultation"),
    ],
)
def test_services_by_name_alias_or_synonym(text: str, service: str) -> None:
    assert hear(text).service == service


@pytest.mark.parametrize(
    ("text", "resource"),
    [
        ("doctor lee", "dr-lee"),
        ("dr lee", "dr-lee"),
        ("Dr. Lee", "dr-lee"),
        ("with amelia lee", "dr-lee"),
        ("nurse kim", "nurse-kim"),
        ("doctor patel please", "dr-patel"),
        ("patel", "dr-patel"),
    ],
)
def test_staff(text: str, resource: str) -> None:
    assert hear(text).resource == resource


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("i'd like to book an appointment", "book"),
        ("can i make an appointment", "book"),
        ("i need to reschedule", "reschedule"),
        ("can i move my appointment", "reschedule"),
        ("i want to change my booking", "reschedule"),
        ("cancel my appointment", "cancel"),
        ("i can't make it on tuesday", "cancel"),
        ("when are you open", "availability"),
        ("what times do you have tomorrow", "availability"),
        ("do you have anything free on friday", "availability"),
        ("can i speak to a person", "person"),
        ("let me talk to a human", "person"),
        ("receptionist please", "person"),
        ("operator", "person"),
        ("goodbye", "goodbye"),
        ("that's all", "goodbye"),
        ("no thanks", "goodbye"),
        ("no thank you that's everything", "goodbye"),
        ("the weather is nice", None),
    ],
)
def test_intents(text: str, intent: str | None) -> None:
    assert hear(text).intent == intent


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("yes", True),
        ("yeah sure", True),
        ("yep", True),
        ("that's right", True),
        ("sounds good", True),
        ("okay", True),
        ("correct", True),
        ("please do", True),
        ("no", False),
        ("nope", False),
        ("no thanks", False),
        ("not really", False),
        ("that doesn't work", False),
        ("neither", False),
        ("no, tomorrow is fine", False),
        ("maybe", None),
        ("ten thirty", None),
    ],
)
def test_yes_and_no(text: str, answer: bool | None) -> None:
    assert hear(text).answer is answer


@pytest.mark.parametrize(
    ("text", "asked", "name"),
    [
        ("my name is alice smith", False, "Alice Smith"),
        ("this is bob", False, "Bob"),
        ("My name is April May", False, "April May"),  # months after "my name is" are names
        ("this is for a checkup", False, None),
        ("alice smith", False, None),  # a bare name only when the name was asked for
        ("alice smith", True, "Alice Smith"),
        ("it's alice", True, "Alice"),
        ("yes it's carol jones", True, "Carol Jones"),
        ("i'm dave", True, "Dave"),
        ("ann lee", True, "Ann Lee"),  # the caller, not Dr. Lee
        ("tomorrow", True, None),
        ("yes", True, None),
    ],
)
def test_names(text: str, asked: bool, name: str | None) -> None:
    heard = hear(text, expecting_name=asked)
    assert heard.name == name
    if name is not None:
        assert heard.resource is None


@pytest.mark.parametrize(
    ("text", "ordinal"),
    [
        ("the first one", 1),
        ("the second one", 2),
        ("number three", 3),
        ("option two", 2),
        ("the last one", -1),
    ],
)
def test_choices(text: str, ordinal: int) -> None:
    heard = hear(text)
    assert heard.ordinal == ordinal and heard.day is None


def test_the_second_alone_is_a_day_that_may_also_pick_an_offer() -> None:
    heard = hear("the second")
    assert heard.day is not None and heard.day.day == date(2026, 12, 2) and heard.day.bare_ordinal == 2


def test_everything_in_one_utterance() -> None:
    heard = hear("i'd like a checkup tomorrow at ten with doctor lee, my name is alice smith")
    assert heard.intent == "book"
    assert (heard.service, heard.resource, heard.name) == ("checkup", "dr-lee", "Alice Smith")
    assert heard.day is not None and heard.day.day == date(2026, 12, 1)
    assert heard.clock == ClockSaid(10, 0)
    assert WORDS.resolve(heard.clock, heard.service, heard.day.day) == time(10, 0)


def test_recogniser_choices_name_services_and_staff() -> None:
    services = WORDS.service_choices()
    assert services[:4] == ("general check up", "new patient consultation", "vaccination", "blood test")
    assert "flu shot" in services and "vaccine" in services
    assert WORDS.staff_choices() == ("doctor lee", "doctor patel", "nurse kim")
