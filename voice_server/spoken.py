"""Days and times as a caller says them on the phone or types them: "tomorrow at ten thirty",
"december third", "the first", "half past two", "10:30am", "12/3".

Spoken numbers become digits with ``text2num`` (a maintained Rust parser, microseconds per call); the
small grammar of days and clock times on top of it is ours, because the date libraries we measured
either ignore what a caller means on the phone ("the third", "the day after tomorrow", a bare "ten")
or cost 100 ms on first use. Everything here is pure: words in, values out.

Decisions a caller could read two ways, and what we chose:

- A weekday names the next such day *after* today: "monday" said on a Monday is next week's (a caller
  who means today says "today"); "this monday" said on a Monday is today. "next friday" is the same
  as "friday"; "friday next week" is the Friday of the next calendar week.
- "the third" (no month) is the next third of a month on or after today; a day the coming month does
  not have ("the thirty first" said in November) moves to the next month that has it.
- A month and day already past this year is rejected as past if it is within the last six months
  ("november second" said on November 30th), otherwise it means next year ("january fifth" said in
  December).
- A date that does not exist ("february thirtieth") is reported as impossible, never moved.
- A clock time without a.m./p.m. is read inside opening hours (see :func:`resolve_clock`).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, time, timedelta
from typing import Literal

from text_to_num import alpha2digit  # type: ignore[import-untyped]  # a compiled module without type hints

Meridiem = Literal["am", "pm"]
PartOfDay = Literal["morning", "afternoon", "evening"]

_MONTH_NAMES = (
    "january jan", "february feb", "march mar", "april apr", "may", "june jun", "july jul", "august aug",
    "september sep sept", "october oct", "november nov", "december dec",
)  # fmt: skip
_WEEKDAY_NAMES = (
    "monday mon mondays", "tuesday tue tues tuesdays", "wednesday wed wednesdays",
    "thursday thu thur thurs thursdays", "friday fri fridays", "saturday sat saturdays", "sunday sun sundays",
)  # fmt: skip
MONTHS: dict[str, int] = {name: n for n, names in enumerate(_MONTH_NAMES, start=1) for name in names.split()}
WEEKDAYS: dict[str, int] = {name: n for n, names in enumerate(_WEEKDAY_NAMES) for name in names.split()}
PARTS_OF_DAY: dict[str, PartOfDay] = {
    "morning": "morning",
    "afternoon": "afternoon",
    "evening": "evening",
    "tonight": "evening",
}
_ORDINAL = re.compile(r"^(\d{1,2})(?:st|nd|rd|th)$")
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})$")
_NUMERIC_DATE = re.compile(r"^(\d{1,2})/(\d{1,2})(?:/(\d{2}|\d{4}))?$")
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_AM_PM = re.compile(r"\b(\d{1,2}(?::\d{2})?)\s*([ap])\s*\.?\s*m\b\.?")
_PAST_WINDOW = timedelta(days=183)


def spoken_tokens(text: str) -> list[str]:
    """Lower-case words of ``text`` with numbers as digits ("ten thirty" -> ``10 30``, "third" ->
    ``3rd``), a.m./p.m. as ``am``/``pm``, o'clock as ``oclock``, and punctuation dropped except inside
    typed times and dates (``10:30``, ``12/3``, ``2026-12-03``)."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"\bo\s*'?\s*clock\b", " oclock ", text)
    text = re.sub(r"\b([ap])\.\s*m\.", r"\1m", text)
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # check-up -> check up
    text = re.sub(r"'", "", text)  # it's -> its, i'd -> id
    text = re.sub(r"[^a-z0-9:/\- ]+", " ", text)
    text = re.sub(r"(?<![0-9])[:/-]|[:/-](?![0-9])", " ", text)  # separators only inside numbers
    text = alpha2digit(text, "en", threshold=0)
    text = _AM_PM.sub(r"\1 \2m", text)
    return text.split()


@dataclass(frozen=True, slots=True)
class DaySaid:
    """A day the caller named. ``day`` is None when it cannot be booked: ``problem`` says why and
    ``said`` repeats it for the re-ask ("There's no February 30")."""

    day: date | None
    said: str
    problem: Literal["past", "impossible"] | None = None
    bare_ordinal: int | None = None
    """Set for "the third" without a month: the same words may pick the third of several offers."""


@dataclass(frozen=True, slots=True)
class ClockSaid:
    """A clock time as said: ``hour`` 0-23, ``meridiem`` when a.m./p.m. (or morning/afternoon) was said."""

    hour: int
    minute: int
    meridiem: Meridiem | None = None


class Tokens:
    """Words of one utterance, and which of them an entity already claimed."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self.used = [False] * len(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def free(self, index: int) -> bool:
        return 0 <= index < len(self.words) and not self.used[index]

    def word(self, index: int) -> str:
        return self.words[index] if 0 <= index < len(self.words) else ""

    def claim(self, start: int, end: int) -> None:
        for index in range(max(start, 0), min(end, len(self.words))):
            self.used[index] = True

    def find(self, phrase: Sequence[str], start: int = 0) -> int:
        """Index of the first unclaimed occurrence of ``phrase``, or -1."""
        size = len(phrase)
        for index in range(start, len(self.words) - size + 1):
            if self.words[index : index + size] == list(phrase) and not any(self.used[index : index + size]):
                return index
        return -1

    def take(self, phrase: str) -> bool:
        """Claim ``phrase`` if it occurs unclaimed."""
        words = phrase.split()
        index = self.find(words)
        if index < 0:
            return False
        self.claim(index, index + len(words))
        return True

    def rest(self) -> list[str]:
        return [word for word, used in zip(self.words, self.used, strict=True) if not used]


def ordinal_value(word: str) -> int | None:
    match = _ORDINAL.match(word)
    return int(match.group(1)) if match else None


def _number(word: str) -> int | None:
    return int(word) if word.isdigit() and len(word) <= 4 else None


# -- days ------------------------------------------------------------------------------------------


def find_day(tokens: Tokens, today: date) -> DaySaid | None:
    """The day the caller named, claiming its words."""
    for finder in (_relative_day, _numeric_date, _month_day, _weekday, _bare_ordinal):
        found = finder(tokens, today)
        if found is not None:
            return found
    return None


def _relative_day(tokens: Tokens, today: date) -> DaySaid | None:
    for phrase, offset in (
        ("the day after tomorrow", 2),
        ("day after tomorrow", 2),
        ("tomorrow", 1),
        ("tmrw", 1),
        ("today", 0),
        ("tonight", 0),
        ("yesterday", -1),
    ):
        words = phrase.split()
        index = tokens.find(words)
        if index < 0:
            continue
        # "tonight" names a day and a part of it: leave the word for the part of day as well.
        tokens.claim(index, index + len(words) - (phrase == "tonight"))
        if offset < 0:
            return DaySaid(None, phrase, "past")
        return DaySaid(today + timedelta(days=offset), phrase)
    return None


def _checked(year: int, month: int, day: int, said: str, today: date, *, year_given: bool) -> DaySaid:
    if not 1 <= month <= 12 or not 1 <= day <= calendar.monthrange(year if year_given else 2024, month)[1]:
        return DaySaid(None, said, "impossible")  # 2024 is a leap year: February 29th exists in some year
    if not year_given:
        candidate = _valid_date(year, month, day)
        if candidate is None or candidate < today:
            if candidate is not None and today - candidate <= _PAST_WINDOW:
                return DaySaid(None, said, "past")
            following = _valid_date(year + 1, month, day)
            while following is None:  # February 29th: the next leap year
                year += 1
                following = _valid_date(year + 1, month, day)
            return DaySaid(following, said)
        return DaySaid(candidate, said)
    given = date(year, month, day)
    return DaySaid(None, said, "past") if given < today else DaySaid(given, said)


def _valid_date(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _month_name(month: int) -> str:
    return calendar.month_name[month]


def _numeric_date(tokens: Tokens, today: date) -> DaySaid | None:
    for index, word in enumerate(tokens.words):
        if not tokens.free(index):
            continue
        iso = _ISO_DATE.match(word)
        numeric = _NUMERIC_DATE.match(word)
        if iso:
            year, month, day = (int(group) for group in iso.groups())
            year_given = True
        elif numeric:
            # US order, month first: "12/3" is December 3rd.
            month, day = int(numeric.group(1)), int(numeric.group(2))
            year_given = numeric.group(3) is not None
            year = int(numeric.group(3)) if numeric.group(3) else today.year
            year += 2000 if year < 100 else 0
        else:
            continue
        tokens.claim(index, index + 1)
        said = f"{_month_name(month)} {day}" if 1 <= month <= 12 else word
        return _checked(year, month, day, said, today, year_given=year_given)
    return None


def _day_number(word: str) -> int | None:
    value = ordinal_value(word)
    if value is None and word.isdigit() and len(word) <= 2:
        value = int(word)
    return value


def _month_day(tokens: Tokens, today: date) -> DaySaid | None:
    """Month and day: "december 3", "december the 3rd", "3rd of december", "the 3rd of december", "3 december",
    with an optional year after it."""
    for index, word in enumerate(tokens.words):
        month = MONTHS.get(word)
        if month is None or not tokens.free(index):
            continue
        if word == "may" and not _looks_like_date_after(tokens, index) and not _looks_like_date_before(tokens, index):
            continue  # "may i book": the verb, not the month
        start, end, day = index, index + 1, None
        after = index + 1 + (tokens.word(index + 1) == "the")
        if tokens.free(after) and (value := _day_number(tokens.word(after))) is not None:
            day, end = value, after + 1
        else:
            before = index - 1 - (tokens.word(index - 1) == "of")
            if tokens.free(before) and (value := _day_number(tokens.word(before))) is not None:
                day, start = value, before - (tokens.word(before - 1) == "the")
        if day is None:
            continue
        year, year_given = today.year, False
        if (number := _number(tokens.word(end))) is not None and number >= 2000 and tokens.free(end):
            year, year_given, end = number, True, end + 1
        tokens.claim(start, end)
        return _checked(year, month, day, f"{_month_name(month)} {day}", today, year_given=year_given)
    return None


def _looks_like_date_after(tokens: Tokens, index: int) -> bool:
    after = index + 1 + (tokens.word(index + 1) == "the")
    return _day_number(tokens.word(after)) is not None


def _looks_like_date_before(tokens: Tokens, index: int) -> bool:
    return tokens.word(index - 1) == "of" and _day_number(tokens.word(index - 2)) is not None


def _weekday(tokens: Tokens, today: date) -> DaySaid | None:
    for index, word in enumerate(tokens.words):
        weekday = WEEKDAYS.get(word)
        if weekday is None or not tokens.free(index):
            continue
        start, end = index, index + 1
        ahead = (weekday - today.weekday()) % 7
        prefix = tokens.word(index - 1)
        if prefix == "coming" and tokens.word(index - 2) == "this":
            start = index - 2
            ahead = ahead or 7
        elif prefix == "this":
            start = index - 1  # "this monday" on a Monday is today
        elif prefix in ("next", "coming"):
            start = index - 1
            ahead = ahead or 7
        else:
            ahead = ahead or 7
        for tail in (["of", "next", "week"], ["next", "week"]):
            if tokens.words[end : end + len(tail)] == tail:
                # The weekday of the next calendar week (Monday to Sunday).
                next_monday = today + timedelta(days=7 - today.weekday())
                tokens.claim(start, end + len(tail))
                return DaySaid(next_monday + timedelta(days=weekday), f"{calendar.day_name[weekday]} next week")
        # "tuesday the 1st": the date decides, the weekday was only said along with it.
        after = end + (tokens.word(end) == "the")
        if (value := ordinal_value(tokens.word(after))) is not None and tokens.free(after):
            tokens.claim(start, after + 1)
            found = _day_of_month(value, f"{calendar.day_name[weekday]} the {tokens.word(after)}", today)
            return replace(found, bare_ordinal=None)
        tokens.claim(start, end)
        return DaySaid(today + timedelta(days=ahead), calendar.day_name[weekday])
    return None


def _bare_ordinal(tokens: Tokens, today: date) -> DaySaid | None:
    """A day of the month alone ("the 3rd", "on the 3rd", or just "3rd"): the next such day."""
    for index, word in enumerate(tokens.words):
        value = ordinal_value(word)
        if value is None or not tokens.free(index):
            continue
        after = tokens.word(index + 1)
        if after in ("1", "one", "option", "choice", "slot", "time"):
            continue  # "the first one": a choice, not a day
        led = tokens.word(index - 1) in ("the", "on") or len(tokens) == 1
        if not led:
            continue
        start = index - (tokens.word(index - 1) == "the")
        start -= tokens.word(start - 1) == "on"
        tokens.claim(start, index + 1)
        return _day_of_month(value, f"the {word}", today)
    return None


def _day_of_month(value: int, said: str, today: date) -> DaySaid:
    """The next ``value``-th of a month on or after today, skipping months too short for it."""
    if not 1 <= value <= 31:
        return DaySaid(None, said, "impossible", bare_ordinal=value)
    year, month = today.year, today.month
    if value < today.day:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    while value > calendar.monthrange(year, month)[1]:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return DaySaid(date(year, month, value), said, bare_ordinal=value)


# -- clock times -----------------------------------------------------------------------------------

_HOUR_LEADS = ("at", "around", "about", "by", "after", "before", "for", "say", "maybe", "it", "how", "like")
_MINUTES_PAST = {"quarter": 15, "half": 30}


def find_part_of_day(tokens: Tokens) -> PartOfDay | None:
    for phrase, part in (("1st thing", "morning"), ("lunchtime", "afternoon")):
        if tokens.take(phrase):
            return part  # type: ignore[return-value]  # literal from the table above
    for index, word in enumerate(tokens.words):
        if word in PARTS_OF_DAY and tokens.free(index):
            start = index - (tokens.word(index - 1) in ("the", "this"))
            start -= tokens.word(start - 1) == "in"
            tokens.claim(start, index + 1)
            return PARTS_OF_DAY[word]
    return None


def find_clock(tokens: Tokens) -> ClockSaid | None:
    """A clock time with something that makes it one: "at 10", "10 30", "10:30", "10 am", "half past 2",
    "quarter to 3", "noon", "10 oclock". A lone number is left for the dialog to read in context."""
    for finder in (_named_time, _relative_minutes, _typed_clock, _hour_minute, _marked_hour):
        found = finder(tokens)
        if found is not None:
            return _with_meridiem(tokens, found)
    return None


def _with_meridiem(tokens: Tokens, clock: ClockSaid) -> ClockSaid:
    if clock.meridiem is not None or clock.hour > 12 or clock.hour == 0:
        return clock
    for word in ("am", "pm"):
        if tokens.take(word):
            return ClockSaid(clock.hour, clock.minute, "am" if word == "am" else "pm")
    return clock


def _named_time(tokens: Tokens) -> ClockSaid | None:
    for phrase, clock in (
        ("12 noon", ClockSaid(12, 0, "pm")),
        ("noon", ClockSaid(12, 0, "pm")),
        ("midday", ClockSaid(12, 0, "pm")),
        ("12 midnight", ClockSaid(0, 0, "am")),
        ("midnight", ClockSaid(0, 0, "am")),
    ):
        if tokens.take(phrase):
            return clock
    return None


def _relative_minutes(tokens: Tokens) -> ClockSaid | None:
    """Minutes from an hour: "half past 2", "quarter past 10", "20 past 10", "quarter to 3", "a quarter to 3"."""
    for index, word in enumerate(tokens.words):
        if word not in ("past", "after", "to", "til", "till") or not tokens.free(index):
            continue
        hour = _number(tokens.word(index + 1))
        if hour is None or not 1 <= hour <= 23 or not tokens.free(index + 1):
            continue
        before = tokens.word(index - 1)
        minutes = _MINUTES_PAST.get(before)
        if minutes is None and before.isdigit() and word in ("past", "after"):
            minutes = int(before) if int(before) in (5, 10, 20, 25) else None
        if minutes is None or (word in ("to", "til", "till") and before != "quarter"):
            continue
        start = index - 1 - (tokens.word(index - 2) == "a")
        tokens.claim(start, index + 2)
        if word in ("past", "after"):
            return ClockSaid(hour, minutes)
        return ClockSaid((hour - 1) % 24 or 12, 60 - minutes)
    return None


def _typed_clock(tokens: Tokens) -> ClockSaid | None:
    for index, word in enumerate(tokens.words):
        match = _CLOCK.match(word)
        if match and tokens.free(index):
            hour, minute = int(match.group(1)), int(match.group(2))
            if hour <= 23 and minute <= 59:
                tokens.claim(index, index + 1)
                return ClockSaid(hour, minute)
    return None


def _hour_minute(tokens: Tokens) -> ClockSaid | None:
    """Hour and minutes: "10 30" (ten thirty), "1 45", "10 oh 5", "10 oclock", "1030 am"."""
    for index, word in enumerate(tokens.words):
        hour = _number(word)
        if hour is None or not tokens.free(index):
            continue
        nxt = tokens.word(index + 1)
        if 100 <= hour <= 2359 and hour % 100 <= 59 and (nxt in ("am", "pm") or tokens.word(index - 1) == "at"):
            tokens.claim(index, index + 1)  # typed or "nine hundred": HMM
            return ClockSaid(hour // 100, hour % 100)
        if hour > 23:
            continue
        if nxt == "oclock":
            tokens.claim(index, index + 2)
            return ClockSaid(hour, 0)
        if nxt in ("oh", "0") and (minute := _number(tokens.word(index + 2))) is not None and minute <= 9:
            tokens.claim(index, index + 3)
            return ClockSaid(hour, minute)
        minute = _number(nxt)
        if minute is not None and len(nxt) == 2 and 10 <= minute <= 59 and tokens.free(index + 1):
            tokens.claim(index, index + 2)
            return ClockSaid(hour, minute)
    return None


def _marked_hour(tokens: Tokens) -> ClockSaid | None:
    """A single hour made a time by its neighbours: "at 10", "10 am", "2 in the afternoon"."""
    for index, word in enumerate(tokens.words):
        hour = _number(word)
        if hour is None or hour > 23 or not tokens.free(index):
            continue
        after = tokens.words[index + 1 : index + 4]
        if after[:1] and after[0] in ("am", "pm"):
            tokens.claim(index, index + 1)
            return ClockSaid(hour, 0)
        for phrase, meridiem in (
            (["in", "the", "morning"], "am"),
            (["in", "the", "afternoon"], "pm"),
            (["in", "the", "evening"], "pm"),
            (["this", "morning"], "am"),
            (["this", "afternoon"], "pm"),
            (["this", "evening"], "pm"),
            (["tonight"], "pm"),
        ):
            if after[: len(phrase)] == phrase:
                tokens.claim(index, index + 1)
                return ClockSaid(hour, 0, meridiem)  # type: ignore[arg-type]  # "am" or "pm"
        if tokens.word(index - 1) in _HOUR_LEADS and tokens.word(index + 1) not in ("days", "weeks", "people"):
            tokens.claim(index - 1, index + 1)
            return ClockSaid(hour, 0)
    return None


def resolve_clock(clock: ClockSaid, opening: Sequence[tuple[int, int]]) -> time | None:
    """The 24-hour time meant by ``clock``. Without a.m./p.m. a caller means a time the business is open:
    of ``h`` and ``h + 12`` we take the one inside ``opening`` (start, end minutes after midnight);
    when neither or both are, 7 to 11 are mornings and 12 to 6 afternoons. None if it is no time."""
    hour, minute = clock.hour, clock.minute
    if not 0 <= hour <= 23 or not 0 <= minute <= 59:
        return None
    if clock.meridiem == "am":
        return time(0 if hour == 12 else hour, minute) if hour <= 12 else None
    if clock.meridiem == "pm":
        return time(hour if hour >= 12 else hour + 12, minute)
    if hour == 0 or hour > 12:
        return time(hour, minute)
    morning = 0 if hour == 12 else hour
    afternoon = 12 if hour == 12 else hour + 12
    inside = [h for h in (morning, afternoon) if any(lo <= h * 60 + minute < hi for lo, hi in opening)]
    if len(inside) == 1:
        return time(inside[0], minute)
    return time(afternoon if hour <= 6 or hour == 12 else morning, minute)
