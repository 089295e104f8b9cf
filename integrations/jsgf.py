"""JSGF grammars for pocketsphinx, built from what the dialog expects the caller to say next.

A general language model recognises 8 kHz telephone speech poorly; a grammar that allows only the
phrases the dialog can use next recognises it well. ``build_grammar`` turns an ``Expectation`` into
one grammar whose public rule takes an optional filler word, then one or more phrases of the expected
kinds in any order, so "tuesday at ten with doctor lee" parses as day, time and staff.

Everything here is pure text work. Words from ``choices`` (service and staff names, the caller's name)
are checked against the pronunciation dictionary: a grammar word the decoder cannot pronounce makes
the whole grammar fail to load, so unknown words are left out (``vocabulary`` lets the recogniser
count words it has taught the decoder as known).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping

import pocketsphinx  # type: ignore[import-untyped]  # no type information shipped

from voice_server.ports import Expectation

KINDS = ("intent", "service", "day", "time", "yes_no", "digits", "name")

# Kinds a choices key may name without being one of KINDS: staff and rooms ("with doctor lee").
_RESOURCE_KEYS = ("resource", "staff")

# Short words ("um", "uh", "a") match line noise and breath as well as speech, so each optional word
# here costs accuracy: only words a caller often opens with or joins phrases with are allowed.
_FILLER = ("hello", "hi", "well", "okay")
_CONNECTOR = ("and", "at", "on", "with", "for", "in", "around", "about")
_TRAILER = ("please", "thanks", "thank you")

_INTENT = {
    "book": (
        "[i'd like to | i would like to | i want to | i need to | can i | could i] "
        "(book | make | schedule) (an appointment | a visit | an appointment for)"
    ),
    "book_short": "(book | schedule) [it | that | a visit]",
    "reschedule": (
        "[i'd like to | i want to | i need to | can i | could i] (reschedule | move | change) "
        "[my appointment | it | my booking]"
    ),
    "cancel": "[i'd like to | i want to | i need to | can i | could i] cancel [my appointment | it | my booking]",
    "hours": (
        "what is available | what's available | what times are available | what do you have available"
        " | when are you open | what are your hours | are you open"
    ),
    "human": (
        "[can i | could i | i'd like to | i want to] (speak | talk) to (a person | a human | someone"
        " | the receptionist | a receptionist | a real person | an operator)"
        " | (a person | a human | receptionist | operator | representative)"
    ),
    "bye": "that's all | that is all | goodbye | bye | no thanks that's all | that's it",
}

_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
_UNITS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ORDINAL_UNITS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
_ORDINAL_TEENS = (
    "tenth",
    "eleventh",
    "twelfth",
    "thirteenth",
    "fourteenth",
    "fifteenth",
    "sixteenth",
    "seventeenth",
    "eighteenth",
    "nineteenth",
)

_DAY = (
    "[on | for | this | next | this coming] <weekday> [the <ordinal>]"
    " | today | tomorrow | the day after tomorrow | next week | this week"
    " | [on] the <ordinal> [of <month>]"
    " | [on] <month> [the] <ordinal>"
)
_TIME = (
    "<clock> [<ampm>] | noon | midday | half past <hour> [<ampm>] | quarter past <hour> [<ampm>]"
    " | quarter to <hour> [<ampm>] | <part_of_day> | first thing in the morning | any time | anytime"
    " | early | late | later | earlier"
)
_CLOCK = "<hour> [o'clock | <minutes>]"
_MINUTES = (
    "oh five | ten | fifteen | twenty | twenty five | thirty | thirty five | forty | forty five | fifty | fifty five"
)
_AMPM = "a.m. | p.m. | in the morning | in the afternoon | in the evening"
_PART_OF_DAY = "[in the | this] (morning | afternoon | evening)"

_YES_NO = (
    "yes | yeah | yep | yes please | correct | that's right | that's correct | sure | okay | sounds good"
    " | perfect | no | nope | not really | no thanks | no thank you | that's wrong | that's not right"
)
_DIGIT = "zero | oh | one | two | three | four | five | six | seven | eight | nine"
_NAME_LEAD = "my name is | it's | this is | i'm | the name is | name is | it is"

# A modest set of common first names, for when the dialog does not know whose name to expect.
COMMON_FIRST_NAMES = (
    "james mary john patricia robert jennifer michael linda william elizabeth david barbara richard susan joseph "
    "jessica thomas sarah charles karen christopher lisa daniel nancy matthew betty anthony margaret mark sandra "
    "donald ashley steven kimberly paul emily andrew donna joshua michelle kenneth carol kevin amanda brian melissa "
    "george deborah timothy stephanie ronald rebecca edward sharon jason laura jeffrey cynthia ryan kathleen jacob "
    "amy gary angela nicholas anna eric emma alice grace olivia sophia peter maria anne jack tom sam alex chris "
    "kate lucy ben adam"
).split()

# Services a business commonly books, for the broad grammar used before the dialog has said anything.
DEFAULT_SERVICES = (
    "appointment",
    "checkup",
    "check up",
    "consultation",
    "vaccination",
    "blood test",
    "cleaning",
    "haircut",
    "massage",
    "follow up",
    "physical",
    "exam",
)

_TITLES = {"dr": "doctor", "mr": "mister", "mrs": "missus", "ms": "miss"}
_WORD = re.compile(r"[a-z0-9']+(?:[.-][a-z0-9']+)*\.?")


def build_grammar(
    expectation: Expectation | None,
    vocabulary: Callable[[str], bool] | None = None,
) -> str:
    """A JSGF grammar for what ``expectation`` says may come next; ``None`` allows every kind.

    ``vocabulary`` says whether the decoder can pronounce a word; by default, whether pocketsphinx's
    packaged dictionary has it. Unknown kinds are ignored, and a kind whose choices are all
    unpronounceable falls back to its generic words; an expectation with no usable kind gets the broad
    grammar, since a grammar that matches nothing would turn every answer into silence.
    """
    known = vocabulary or in_default_dictionary
    kinds = [kind for kind in expectation.kinds if kind in KINDS] if expectation else list(KINDS)
    choices: Mapping[str, tuple[str, ...]] = expectation.choices if expectation else {}
    if not kinds:
        kinds = list(KINDS)

    rules: dict[str, str] = {}
    phrases: list[str] = []
    for kind in kinds:
        body = _kind_rule(kind, choices, known, rules)
        if body:
            rules[kind] = body
            phrases.append(f"<{kind}>")
    for key in _RESOURCE_KEYS:
        names = _resource_alternatives(choices.get(key, ()), known)
        if names:
            rules[key] = " | ".join(names)
            phrases.append(f"<{key}>")
    # One phrase per expected kind at most, so a single kind takes exactly one phrase. Several kinds
    # loop through one copy of <phrase>: JSGF inlines every rule reference into the FSG, and spelling
    # out "phrase [connector phrase [connector phrase]]" tripled the search (77 s instead of 0.4 s to
    # decode two seconds under the broad grammar).
    sequence = "<phrase>" if len(phrases) == 1 else "<phrase> ([<connector>] <phrase>)*"
    lines = [
        "#JSGF V1.0;",
        "grammar voicebook;",
        f"public <utterance> = [<filler>] {sequence} [<trailer>];",
        f"<filler> = {' | '.join(_FILLER)};",
        f"<trailer> = {' | '.join(_TRAILER)};",
        f"<connector> = {' | '.join(_CONNECTOR)};",
        f"<phrase> = {' | '.join(phrases)};",
    ]
    lines += [f"<{name}> = {body};" for name, body in rules.items()]
    return "\n".join(lines) + "\n"


def _kind_rule(
    kind: str, choices: Mapping[str, tuple[str, ...]], known: Callable[[str], bool], rules: dict[str, str]
) -> str:
    """The body of ``kind``'s rule (helper rules it refers to go into ``rules``); "" for no rule."""
    if kind == "intent":
        return " | ".join(f"({body})" for body in _INTENT.values())
    if kind == "service":
        given = _phrases(choices.get("service", ()), known)
        services = given or _phrases(DEFAULT_SERVICES, known)
        return "[a | an | the] (" + " | ".join(services) + ")"
    if kind == "day":
        rules["weekday"] = " | ".join(_WEEKDAYS)
        rules["month"] = " | ".join(_MONTHS)
        rules["ordinal"] = " | ".join(_ordinals())
        return _DAY
    if kind == "time":
        rules["clock"] = _CLOCK
        rules["hour"] = " | ".join((*_UNITS, *_TEENS[:3]))
        rules["minutes"] = _MINUTES
        rules["ampm"] = _AMPM
        rules["part_of_day"] = _PART_OF_DAY
        return _TIME
    if kind == "yes_no":
        return _YES_NO
    if kind == "digits":
        rules["digit"] = _DIGIT
        return "<digit>+"
    if kind == "name":
        names = _name_alternatives(choices.get("name", ()), known) or sorted(
            {name for name in COMMON_FIRST_NAMES if known(name)}
        )
        rules["person"] = " | ".join(names)
        return f"[{_NAME_LEAD}] <person>"
    return ""


def _ordinals() -> list[str]:
    ordinals = list(_ORDINAL_UNITS) + list(_ORDINAL_TEENS)
    ordinals += ["twentieth"] + [f"twenty {unit}" for unit in _ORDINAL_UNITS]
    ordinals += ["thirtieth", "thirty first"]
    return ordinals


def normalize_words(text: str) -> list[str]:
    """Lower-case words of ``text`` as a grammar spells them: digits spelled out, titles expanded,
    hyphens and punctuation dropped (``a.m.`` and ``p.m.`` keep their dots)."""
    words: list[str] = []
    for raw in _WORD.findall(text.lower()):
        token = raw.rstrip(".") if raw not in ("a.m.", "p.m.") else raw
        if token in ("am", "pm"):
            token = f"{token[0]}.m."
        if token in _TITLES:
            words.append(_TITLES[token])
        elif token.isdigit():
            words.extend(_number_words(int(token)))
        elif token in ("a.m.", "p.m.") or ("-" not in token and "." not in token):
            words.append(token)
        else:
            words.extend(part for part in re.split(r"[.-]", token) if part)
    return words


def _number_words(number: int) -> list[str]:
    """English words for 0..99, digit by digit beyond that (as a caller reads a long number)."""
    if number < 10:
        return ["zero", *_UNITS][number : number + 1]
    if number < 20:
        return [_TEENS[number - 10]]
    if number < 100:
        tens, unit = divmod(number, 10)
        return [_TENS[tens - 2], *([_UNITS[unit - 1]] if unit else [])]
    return [word for digit in str(number) for word in _number_words(int(digit))]


def _phrases(choices: Iterable[str], known: Callable[[str], bool]) -> list[str]:
    """Each choice as a grammar alternative, keeping its pronounceable words; duplicates dropped."""
    out: list[str] = []
    for choice in choices:
        words = [word for word in normalize_words(choice) if known(word)]
        phrase = " ".join(words)
        if phrase and phrase not in out:
            out.append(phrase)
    return out


def _name_alternatives(names: Iterable[str], known: Callable[[str], bool]) -> list[str]:
    """A full name may be said whole, by first name or by last name ("alice smith", "alice", "smith")."""
    variants: list[str] = []
    for name in names:
        words = [word for word in normalize_words(name) if word not in _TITLES.values()]
        variants += [" ".join(words), words[0] if words else "", words[-1] if words else ""]
    return _phrases(variants, known)


def _resource_alternatives(names: Iterable[str], known: Callable[[str], bool]) -> list[str]:
    """Staff as callers say them: "doctor lee", "doctor amelia lee", "amelia", "lee"."""
    variants: list[str] = []
    for name in names:
        words = normalize_words(name)
        title = [words[0]] if words and words[0] in ("doctor", "nurse", "mister", "missus", "miss") else []
        rest = words[len(title) :]
        if not rest:
            continue
        variants += [" ".join(words), " ".join(rest), rest[0], rest[-1]]
        if title:
            variants.append(f"{title[0]} {rest[-1]}")
    return _phrases(variants, known)


@functools.cache
def _default_dictionary() -> frozenset[str]:
    path = pocketsphinx.get_model_path("en-us/cmudict-en-us.dict")
    with open(path, encoding="utf-8") as lines:
        # Alternative pronunciations are listed as "word(2)"; the word itself is what matters here.
        return frozenset(line.split(" ", 1)[0] for line in lines if line and not line[0].isspace())


def in_default_dictionary(word: str) -> bool:
    """Whether pocketsphinx's packaged en-US dictionary can pronounce ``word``."""
    return word in _default_dictionary()
