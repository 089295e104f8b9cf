"""What a caller's words mean for booking: intents, service, staff, day, time, yes or no, a name, a
choice. Pure and fast (no I/O, no models): it runs on every caller turn of the offline dialog.

Input is speech recognition output (lower case, no punctuation, numbers as words) or typed text.
:class:`Understanding` is built once per business from its services and staff, so "flu shot" and
"doctor lee" resolve to the business's own ids; :meth:`Understanding.hear` turns one utterance into a
:class:`Heard`. Entities claim their words in a fixed order (the caller's name, staff, service, day,
time), so "my name is april lee" is a name rather than a month and a doctor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date, time

from booking.business import Business
from voice_server.spoken import (
    MONTHS,
    PARTS_OF_DAY,
    WEEKDAYS,
    ClockSaid,
    DaySaid,
    PartOfDay,
    Tokens,
    find_clock,
    find_day,
    find_part_of_day,
    ordinal_value,
    resolve_clock,
    spoken_tokens,
)

INTENTS = ("person", "goodbye", "cancel", "reschedule", "book", "availability")
"""In order of precedence: "cancel my appointment" names an appointment but means cancel."""

_INTENT_WORDS: dict[str, tuple[str, ...]] = {
    "person": (
        "person", "human", "receptionist", "operator", "someone", "somebody", "representative", "front desk",
        "real person", "speak to a", "talk to a", "speak with a", "talk with a", "speak to someone",
    ),
    "goodbye": (
        "goodbye", "bye", "thats all", "that is all", "thats it", "that is it", "nothing else", "no thanks",
        "no thank you", "im done", "all set", "im good", "hang up", "have a good day", "have a nice day",
        "thats everything",
    ),
    "cancel": (
        "cancel", "cancellation", "call off", "cant make it", "cannot make it", "wont make it",
        "wont be able to make", "not going to make it",
    ),
    "reschedule": (
        "reschedule", "move my", "move it", "move the", "move that", "change my", "change the", "change it",
        "push back", "push it", "postpone", "bring forward", "rebook", "different day", "different time",
        "another day",
    ),
    "book": (
        "book", "make an appointment", "schedule", "appointment", "reserve", "set up", "come in", "see the doctor",
        "see a doctor", "need a", "like a", "want a", "get a", "new one",
    ),
    "availability": (
        "available", "availability", "when are you open", "are you open", "opening hours", "your hours",
        "what times", "what time", "any openings", "openings", "free slots", "anything free",
        "do you have anything", "what do you have", "when can", "earliest", "next available", "first available",
        "soonest", "free times",
    ),
}  # fmt: skip
_EARLIEST_WORDS = (
    "first available", "next available", "earliest", "soonest", "as soon as possible", "asap", "any time",
    "anytime", "whenever", "next free", "first free",
)  # fmt: skip
_YES_WORDS = (
    "yes", "yeah", "yea", "yep", "yup", "ya", "sure", "correct", "thats right", "that is right", "right",
    "ok", "okay", "alright", "all right", "please do", "go ahead", "sounds good", "perfect", "absolutely",
    "definitely", "confirm", "book it", "that works", "works for me", "uh huh", "mhm", "great", "fine",
    "of course", "do it", "affirmative", "yes please",
)  # fmt: skip
_NO_WORDS = (
    "no", "nope", "nah", "not really", "dont", "do not", "negative", "wrong", "not that", "neither",
    "never mind", "nevermind", "doesnt work", "does not work", "not right", "incorrect", "another time",
    "other time", "different time", "not good",
)  # fmt: skip

# Other ways of naming a service: a group joins a service when one of its phrases is already one of
# the service's own names, so a business that calls it "Flu clinic" with the alias "flu shot" also
# hears "vaccine" and "jab".
_SYNONYMS: tuple[frozenset[str], ...] = (
    frozenset({"check up", "checkup", "physical", "annual exam", "exam", "examination", "annual physical"}),
    frozenset({"consultation", "consult", "new patient", "new patient consultation"}),
    frozenset({"vaccination", "vaccine", "vaccines", "shot", "flu shot", "flu jab", "jab", "immunization",
               "immunisation", "injection", "booster", "covid shot"}),
    frozenset({"blood test", "blood tests", "blood work", "bloodwork", "blood draw", "lab work", "labs"}),
)  # fmt: skip


def _as_heard(phrases: Iterable[str]) -> tuple[str, ...]:
    """Phrases as :func:`spoken_tokens` leaves an utterance ("first available" -> "1st available")."""
    return tuple(" ".join(spoken_tokens(phrase)) for phrase in phrases)


_INTENT_PHRASES = {intent: _as_heard(phrases) for intent, phrases in _INTENT_WORDS.items()}
_EARLIEST = _as_heard(_EARLIEST_WORDS)
_YES = _as_heard(_YES_WORDS)
_NO = _as_heard(_NO_WORDS)
_TITLES = {"dr": ("dr", "doctor"), "doctor": ("dr", "doctor"), "nurse": ("nurse",), "mr": ("mr",), "ms": ("ms",)}

_NAME_MARKERS_STRONG = (
    "my name is", "my names", "the name is", "name is", "call me", "under the name", "this is",
)  # fmt: skip
_NAME_MARKERS_WHEN_ASKED = ("its", "it is", "im", "i am", "under", "names", "for", "name")
_FILLER = frozenset(
    "um uh er erm hmm oh well so hi hello hey yes yeah yep sure ok okay thanks thank you please its it is "
    "the name my".split()
)
_NOT_A_NAME = frozenset(
    """a an the and or but to of for with at on in by from as is are was be been am im i id ill ive me my we
    you your it its this that these those he she they them there here what when where which who why how
    not no yes yeah yep nope sure okay ok please thanks thank hi hello hey um uh er well so just actually
    like want need would could can cant will wont do dont did have has had get got make book booking
    appointment appointments cancel reschedule change move time times day days today tomorrow tonight
    morning afternoon evening noon calling call looking trying speaking again back good fine great
    person human someone somebody operator receptionist doctor dr nurse one first second third last next
    bye goodbye all set done nothing else available availability open free any anything maybe perhaps
    sorry excuse pardon what huh repeat""".split()
)
_GREETING = frozenset("hi hello hey hiya there good morning afternoon evening um uh oh".split())
_ORDINAL_WORDS = {"last": -1, "latter": -1, "former": 1, "earlier": 1, "later": -1}


@dataclass(frozen=True, slots=True)
class Heard:
    """What one utterance said. ``number`` is a lone number nothing else claimed ("ten", "2"): the
    dialog reads it as a time, a choice or a menu key depending on what it asked."""

    words: tuple[str, ...]
    intents: frozenset[str] = frozenset()
    answer: bool | None = None
    service: str | None = None
    resource: str | None = None
    day: DaySaid | None = None
    clock: ClockSaid | None = None
    part_of_day: PartOfDay | None = None
    earliest: bool = False
    ordinal: int | None = None
    number: int | None = None
    name: str | None = None
    greeting: bool = False
    """Only a greeting ("hi there", "good morning"): nothing to understand, nothing misunderstood."""

    @property
    def intent(self) -> str | None:
        """The intent that wins when several were heard."""
        return next((intent for intent in INTENTS if intent in self.intents), None)

    @property
    def has_when(self) -> bool:
        return self.day is not None or self.clock is not None or self.part_of_day is not None or self.earliest


def _norm(phrase: str) -> tuple[str, ...]:
    return tuple(spoken_tokens(phrase))


def _compact(words: Iterable[str]) -> str:
    return "".join(words)


class Understanding:
    """The business's vocabulary and hours, and :meth:`hear` to read one utterance with them."""

    def __init__(self, business: Business) -> None:
        self.business = business
        self._services: dict[str, str] = {}  # compact phrase -> service id
        self._service_phrases: dict[str, list[str]] = {}
        for service in business.services:
            own = {" ".join(_norm(text)) for text in (service.id.replace("-", " "), service.name, *service.aliases)}
            for group in _SYNONYMS:
                if own & group:
                    own |= group
            self._service_phrases[service.id] = sorted(own)
            for phrase in own:
                self._services.setdefault(_compact(phrase.split()), service.id)
        self._staff: dict[str, str] = {}  # compact phrase -> resource id
        self._staff_spoken: dict[str, str] = {}
        for resource in business.resources:
            for staff_phrase in _staff_phrases(_norm(resource.name)):
                self._staff.setdefault(_compact(staff_phrase), resource.id)
            self._staff_spoken[resource.id] = " ".join(_spoken_staff(_norm(resource.name)))
        self._heard = functools.lru_cache(maxsize=4096)(self._hear)
        self._longest = max(len(key.split()) for key in (*self._service_phrases_flat(), "a b c d"))

    def _service_phrases_flat(self) -> list[str]:
        return [phrase for phrases in self._service_phrases.values() for phrase in phrases]

    # -- what the recogniser may be told -------------------------------------------------------------
    def service_choices(self) -> tuple[str, ...]:
        """Words a caller may use for each service, names first (for a recogniser's grammar)."""
        names = [" ".join(_norm(service.name)) for service in self.business.services]
        return tuple(dict.fromkeys([*names, *self._service_phrases_flat()]))

    def staff_choices(self) -> tuple[str, ...]:
        return tuple(self._staff_spoken.values())

    # -- hours -----------------------------------------------------------------------------------------
    def opening(self, service_id: str | None, day: date | None) -> list[tuple[int, int]]:
        """Opening spans (minutes after midnight) of the staff who give ``service_id`` on ``day``'s
        weekday; all staff and all weekdays where either is unknown."""
        service = self.business.service(service_id) if service_id else None
        staff = [r for r in self.business.resources if service is None or r.id in service.resources]
        weekdays = [day.weekday()] if day is not None else list(range(7))
        return [
            (span.start_minutes, span.end_minutes)
            for resource in staff
            for weekday in weekdays
            for span in resource.hours.for_weekday(weekday)
        ]

    def resolve(self, clock: ClockSaid, service_id: str | None, day: date | None) -> time | None:
        return resolve_clock(clock, self.opening(service_id, day))

    # -- one utterance -----------------------------------------------------------------------------
    def hear(self, text: str, *, today: date, expecting_name: bool = False) -> Heard:
        """What ``text`` says, with days counted from ``today``. Memoised: the dialog reads every earlier
        utterance of the call again on each reply, and the answer depends only on the arguments."""
        return self._heard(text, today, expecting_name)

    def _hear(self, text: str, today: date, expecting_name: bool) -> Heard:
        tokens = Tokens(spoken_tokens(text))
        words = tuple(tokens.words)
        name = _marked_name(tokens, _NAME_MARKERS_STRONG, strong=True)
        if name is None and expecting_name:
            name = _marked_name(tokens, _NAME_MARKERS_WHEN_ASKED, strong=False)
        if name is None and expecting_name:
            # Before staff and services claim words: "ann lee" is the caller, not Dr. Lee.
            name = _bare_name(words)
            if name is not None:
                tokens.claim(0, len(tokens))
        resource = self._match(tokens, self._staff)
        service = self._match(tokens, self._services)
        earliest = any(tokens.take(phrase) for phrase in _EARLIEST)
        day = find_day(tokens, today)
        clock = find_clock(tokens)
        part = find_part_of_day(tokens)
        if clock is not None and clock.meridiem is None and part is not None and clock.hour <= 12:
            clock = replace(clock, meridiem="am" if part == "morning" else "pm")
        ordinal = _ordinal(tokens)
        rest = tokens.rest()
        joined = f" {' '.join(words)} "
        intents = frozenset(
            intent for intent, phrases in _INTENT_PHRASES.items() if any(f" {p} " in joined for p in phrases)
        )
        if "goodbye" in intents and "no" in words and "person" in intents:
            intents -= {"person"}  # "no thanks, that's all" mentions nobody to talk to
        numbers = [int(word) for word in rest if word.isdigit() and len(word) <= 2]
        number = numbers[0] if len(numbers) == 1 else None
        return Heard(
            words=words,
            intents=intents,
            answer=_yes_no(words),
            service=service,
            resource=resource,
            day=day,
            clock=clock,
            part_of_day=part,
            earliest=earliest,
            ordinal=ordinal,
            number=number,
            name=name,
            greeting=bool(words) and all(word in _GREETING for word in words),
        )

    def _match(self, tokens: Tokens, table: dict[str, str]) -> str | None:
        """The longest unclaimed run of words that names an entry of ``table``, compared without spaces
        so "checkup", "check up" and "check-up" are one phrase."""
        for size in range(min(self._longest, len(tokens)), 0, -1):
            for start in range(len(tokens) - size + 1):
                if not all(tokens.free(i) for i in range(start, start + size)):
                    continue
                found = table.get(_compact(tokens.words[start : start + size]))
                if found is not None:
                    lead = start - (tokens.word(start - 1) in ("a", "an", "the", "with", "see"))
                    tokens.claim(lead, start + size)
                    return found
        return None


def _staff_phrases(name: Sequence[str]) -> list[tuple[str, ...]]:
    """Phrases for "Dr. Amelia Lee": dr amelia lee, doctor lee, amelia lee, lee, ... (a given name alone is too
    likely to be the caller's own)."""
    titles: tuple[str, ...] = ()
    words = list(name)
    if words and words[0] in _TITLES:
        titles = _TITLES[words.pop(0)]
    if not words:
        return [tuple(name)]
    surname = words[-1]
    phrases: list[tuple[str, ...]] = [tuple(words), (surname,)]
    for title in titles:
        phrases += [(title, *words), (title, surname)]
        if len(words) > 1:
            phrases.append((title, words[0]))
    return phrases


def _spoken_staff(name: Sequence[str]) -> tuple[str, ...]:
    """How a caller says a staff member: "doctor lee", "nurse kim"."""
    words = list(name)
    if words and words[0] in _TITLES and len(words) > 1:
        return (_TITLES[words[0]][-1], words[-1])
    return tuple(words)


def _marked_name(tokens: Tokens, markers: Sequence[str], *, strong: bool) -> str | None:
    for marker in markers:
        lead = marker.split()
        index = tokens.find(lead)
        while index >= 0:
            start = index + len(lead)
            taken: list[str] = []
            for position in range(start, min(start + 3, len(tokens))):
                word = tokens.word(position)
                if not _name_word(word, strong=strong):
                    break
                taken.append(word)
            if taken:
                tokens.claim(index, start + len(taken))
                return _title(taken)
            index = tokens.find(lead, index + 1)
    return None


def _name_word(word: str, *, strong: bool) -> bool:
    if not word.isalpha() or len(word) < 2 or word in _NOT_A_NAME:
        return False
    # After "my name is" a month or weekday is a name (April, May, June); after "this is" it is not.
    return strong or (word not in MONTHS and word not in WEEKDAYS and word not in PARTS_OF_DAY)


def _bare_name(rest: Sequence[str]) -> str | None:
    """The caller answered "what is your name?" with just a name ("alice smith", "yes alice")."""
    words = [word for word in rest if word not in _FILLER]
    if not 1 <= len(words) <= 3 or not all(_name_word(word, strong=True) for word in words):
        return None
    return _title(words)


def _title(words: Sequence[str]) -> str:
    return " ".join(word[:1].upper() + word[1:] for word in words)


def _ordinal(tokens: Tokens) -> int | None:
    """A choice among offers: "the second one", "number 2", "option 3", "the last one"."""
    for lead in ("number", "option", "choice"):
        index = tokens.find([lead])
        if index >= 0 and tokens.word(index + 1).isdigit() and tokens.free(index + 1):
            tokens.claim(index, index + 2)
            return int(tokens.word(index + 1))
    for index, word in enumerate(tokens.words):
        if not tokens.free(index):
            continue
        value = ordinal_value(word) if word not in _ORDINAL_WORDS else _ORDINAL_WORDS[word]
        if value is None or not 1 <= abs(value) <= 9:
            continue
        end = index + 1 + (tokens.word(index + 1) in ("1", "one", "option", "time", "slot"))
        tokens.claim(index - (tokens.word(index - 1) == "the"), end)
        return value
    return None


def _yes_no(words: Sequence[str]) -> bool | None:
    """Yes or no, whichever the caller said first ("no, tomorrow is fine" is a no to what was asked)."""
    joined = f" {' '.join(words)} "
    first_yes = min((joined.find(f" {p} ") for p in _YES if f" {p} " in joined), default=-1)
    first_no = min((joined.find(f" {p} ") for p in _NO if f" {p} " in joined), default=-1)
    if first_yes < 0 and first_no < 0:
        return None
    if first_no < 0:
        return True
    if first_yes < 0:
        return False
    return first_yes < first_no
