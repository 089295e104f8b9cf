"""What the load test's callers say, per scenario, and the folder of their utterances.

Pure (no locust, no I/O but the utterance folder): ``locustfile.py`` runs these conversations, the
runner (``run_load.py``) writes the utterances before the simulators start, and the Deepgram simulator
(``load_sims.py``) recognises each utterance by its exact audio, so every line any caller may say is in
:func:`all_lines` and is sent exactly as written to the folder (trimmed to its voice).

Scenarios:

- ``steady``: each call books a checkup at a day and time of its own (intent, when, name, yes, bye);
- ``burst``: every call wants tomorrow at nine a m; when the agent offers other times instead, the
  caller picks one and says its name in the same breath ("the second one my name is ..."), which also
  answers "may I have your name?" when nine o'clock was still free, then "the first one" in case the
  pick was taken meanwhile, then "yes";
- ``mixed``: 70 % bookings as in ``steady``, 15 % cancellations and 15 % reschedules of a booking the
  caller's number made earlier in the run (:class:`CallerPool` hands those out).

Before each line the caller pauses, as a person does before answering: a time drawn evenly from
``THINK_MS`` (300 to 1,200 ms by default; :func:`think_seconds` reads the runner's ``--think-ms``). Without
the pause every call of a run took the same time, so callers who began within the spawn's few seconds
stayed in step for the whole run: all of them asked for a booking within the same few seconds, and hung up
and dialled again together, every half minute. That is the ``burst`` scenario's job, not ``steady``'s.

Days and times are spoken relative to today ("tomorrow", "friday next week"), and the load business is
open 07:00-19:00 every day (``load_stack.business_toml``), so every line means a bookable time whenever
the run happens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from integrations.simulators.scripted_speech import trim_to_voice

Scenario = Literal["steady", "burst", "mixed"]
Task = Literal["book", "cancel", "reschedule"]
SCENARIOS: tuple[Scenario, ...] = ("steady", "burst", "mixed")

_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAYS: tuple[str, ...] = (
    "tomorrow",
    "the day after tomorrow",
    *_WEEKDAYS,
    *(f"{day} next week" for day in _WEEKDAYS),
)
"""About two weeks of days; a weekday may fall on the same date as "tomorrow" (three doctors take it)."""
HOURS: tuple[str, ...] = (
    "seven a m", "eight a m", "nine a m", "ten a m", "eleven a m", "twelve p m", "four p m", "five p m", "six p m",
)  # fmt: skip
"""Inside the load business's hours (07:00-19:00) with room for the 40 minutes of a check-up. Its staff must
not be named by numbers: the agent hears "Doctor 5" in "at five p m" (tests/test_load_script.py checks)."""
NAMES: tuple[str, ...] = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "henry")

INTENT = "I would like to book a checkup"
BURST_WHEN = "tomorrow at nine a m"
YES = "yes"
BYE = "no thank you goodbye"
CANCEL = "I need to cancel my appointment"
RESCHEDULE = "I need to reschedule my appointment"
ORDINALS = ("first", "second", "third")
REPICK = "the first one"
_MIX: tuple[Task, ...] = ("book",) * 14 + ("cancel",) * 3 + ("reschedule",) * 3
"""One round of 20 calls of ``mixed``: 70 % book, 15 % cancel, 15 % reschedule, interleaved by position."""
MIX: tuple[Task, ...] = tuple(_MIX[(n * 7) % 20] for n in range(20))  # 7 is prime to 20: a permutation


@dataclass(frozen=True, slots=True)
class Line:
    """One utterance and its kind, the name of its latency sample: intent, when, name, pick, confirm,
    bye, cancel, reschedule. ``books`` marks the "yes" that makes the agent run a booking tool."""

    text: str
    kind: str
    books: bool = False


@dataclass(frozen=True, slots=True)
class Conversation:
    scenario: Scenario
    task: Task
    lines: tuple[Line, ...]


def when_for(number: int) -> str:
    """A day and time of call ``number``'s own: no two of the first ``len(DAYS) * len(HOURS)`` calls ask
    for the same words."""
    slot = number % (len(DAYS) * len(HOURS))
    return f"{DAYS[slot // len(HOURS)]} at {HOURS[slot % len(HOURS)]}"


def name_for(number: int) -> str:
    return f"my name is {NAMES[number % len(NAMES)]}"


def booking(number: int, scenario: Scenario = "steady") -> Conversation:
    """Intent, a time (the availability tool), a name, yes (the booking tool), goodbye."""
    return Conversation(
        scenario,
        "book",
        (
            Line(INTENT, "intent"),
            Line(when_for(number), "when"),
            Line(name_for(number), "name"),
            Line(YES, "confirm", books=True),
            Line(BYE, "bye"),
        ),
    )


def burst(number: int) -> Conversation:
    """Everybody wants the same morning. A caller who is offered other times instead takes one of the first
    three (by its number, so not all want the same one) and says its name in the same breath; if that was
    taken meanwhile, the first of the fresh offers. Where nine o'clock was still free the picks are heard as
    the name and as nothing (the agent asks again), so in every case the "yes" is what books."""
    return Conversation(
        "burst",
        "book",
        (
            Line(INTENT, "intent"),
            Line(BURST_WHEN, "when"),
            Line(f"the {ORDINALS[number % len(ORDINALS)]} one {name_for(number)}", "pick"),
            Line(REPICK, "repick"),
            Line(YES, "confirm", books=True),
            Line(BYE, "bye"),
        ),
    )


def cancellation() -> Conversation:
    """The caller's number has one booking: the agent finds it and asks to confirm the cancellation."""
    return Conversation("mixed", "cancel", (Line(CANCEL, "cancel"), Line(YES, "confirm", books=True), Line(BYE, "bye")))


def reschedule(number: int) -> Conversation:
    """The caller's number has one booking: the agent asks when to, reads the move back, and moves it."""
    return Conversation(
        "mixed",
        "reschedule",
        (
            Line(RESCHEDULE, "reschedule"),
            Line(when_for(number), "when"),
            Line(YES, "confirm", books=True),
            Line(BYE, "bye"),
        ),
    )


def mixed_task(number: int) -> Task:
    return MIX[number % len(MIX)]


def conversation(scenario: Scenario, number: int, task: Task | None = None) -> Conversation:
    """Call ``number`` of ``scenario``; ``task`` overrides what ``mixed`` would do (a cancellation with no
    booking to cancel becomes a booking)."""
    if scenario == "steady":
        return booking(number)
    if scenario == "burst":
        return burst(number)
    if scenario != "mixed":
        raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")
    chosen = task or mixed_task(number)
    if chosen == "cancel":
        return cancellation()
    if chosen == "reschedule":
        return reschedule(number)
    return booking(number, "mixed")


THINK_MS: tuple[int, int] = (300, 1200)


def think_seconds(raw: str) -> tuple[float, float]:
    """``"LOW,HIGH"`` milliseconds (``""``: :data:`THINK_MS`) as seconds; ``"0,0"`` for no pause."""
    if not raw.strip():
        low, high = THINK_MS
    else:
        parts = raw.split(",")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"think time {raw!r}: LOW,HIGH in whole milliseconds, e.g. 300,1200")
        low, high = (int(part) for part in parts)
        if low > high or high > 10_000:
            raise ValueError(f"think time {raw!r}: LOW must not exceed HIGH, and HIGH at most 10000 ms")
    return low / 1000, high / 1000


def all_lines() -> list[str]:
    """Every line any scenario may say, sorted, each once."""
    lines = {INTENT, BURST_WHEN, REPICK, YES, BYE, CANCEL, RESCHEDULE}
    lines.update(when_for(n) for n in range(len(DAYS) * len(HOURS)))
    lines.update(name_for(n) for n in range(len(NAMES)))
    lines.update(f"the {o} one {name_for(n)}" for o in ORDINALS for n in range(len(NAMES)))
    return sorted(lines)


# -- caller numbers ---------------------------------------------------------------------------------


def caller_number(index: int) -> str:
    return f"+1646555{index:04d}"


@dataclass
class CallerPool:
    """The caller numbers of one locust process and how many bookings each made, so a cancellation or a
    reschedule calls from a number with exactly one booking (the agent then finds it without asking which),
    and a new booking prefers a number with none. Not thread-safe: greenlets of one process take turns."""

    size: int
    offset: int = 0
    """The first number's index: locust worker processes take pools of their own."""
    bookings: dict[str, int] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)
    _next: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.size or self.offset < 0 or self.offset + self.size > 10_000:
            raise ValueError(f"caller pool of {self.size} from {self.offset}: numbers 0 to 9999 only")

    def take(self, task: Task) -> tuple[str, Task]:
        """A number for ``task``, and the task to do with it: a cancellation or a reschedule with no number
        that has one booking is a booking instead. The number is busy until :meth:`release`."""
        if task != "book":
            ready = sorted(n for n, count in self.bookings.items() if count == 1 and n not in self.busy)
            if ready:
                number = ready[self._next % len(ready)]
                self._next += 1
                self.busy.add(number)
                return number, task
        numbers = [caller_number(self.offset + i) for i in range(self.size)]
        idle = [n for n in numbers if n not in self.busy]
        fresh = [n for n in idle if not self.bookings.get(n)]
        choices = fresh or idle or numbers
        number = choices[self._next % len(choices)]
        self._next += 1
        self.busy.add(number)
        return number, "book"

    def release(self, number: str, task: Task, *, done: bool, found: int | None = None) -> None:
        """The call of ``number`` ended; ``done``: the agent answered the confirming "yes". ``found``: the
        number's upcoming bookings as the server counts them (a "yes" may not have booked: the time was
        taken meanwhile), which then replaces the guess."""
        self.busy.discard(number)
        if found is not None:
            self.bookings[number] = found
            return
        if not done:
            return
        if task == "book":
            self.bookings[number] = self.bookings.get(number, 0) + 1
        elif task == "cancel":
            self.bookings[number] = max(0, self.bookings.get(number, 0) - 1)


# -- the utterance folder -----------------------------------------------------------------------------

INDEX = "index.json"


def utterance_file(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16] + ".ulaw"


def write_utterances(
    folder: Path, synthesize: Callable[[str], bytes], lines: Sequence[str] | None = None
) -> dict[str, str]:
    """Synthesize every line (``all_lines()`` unless given; ``synthesize(text) -> mu-law 8 kHz``), trimmed
    to its voice, into ``<folder>/<sha1(text)[:16]>.ulaw``, and ``<folder>/index.json`` ``{text: file}``.
    Returns the index."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    for text in lines if lines is not None else all_lines():
        name = utterance_file(text)
        (folder / name).write_bytes(trim_to_voice(synthesize(text)))
        index[text] = name
    # Written last and whole: a folder with an index holds every utterance it names.
    partial = folder / (INDEX + ".tmp")
    partial.write_text(json.dumps(index, indent=1, sort_keys=True))
    partial.replace(folder / INDEX)
    return index


def read_utterances(folder: Path) -> dict[str, bytes]:
    """``{text: mu-law}`` of a folder :func:`write_utterances` wrote."""
    index = json.loads((folder / INDEX).read_text())
    if not isinstance(index, dict):
        raise ValueError(f"{folder / INDEX} is not a {{text: file}} object")
    return {str(text): (folder / str(name)).read_bytes() for text, name in index.items()}
