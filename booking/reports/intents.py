"""What the caller wanted, by rules: the tools the agent ran (certain: the caller asked for what they
did) and cue phrases in what the caller said (likely)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from booking.reports.facts import CallFacts
from booking.reports.provenance import rules
from booking.reports.schema import Automated
from booking.reports.vocabulary import Intent

TOOL_CONFIDENCE = 0.95  # the agent may run a tool the caller did not quite ask for
CUE_CONFIDENCE = 0.75

_FROM_TOOLS: Mapping[str, Intent] = {
    "book_appointment": Intent.BOOK,
    "check_availability": Intent.CHECK_AVAILABILITY,
    "reschedule_appointment": Intent.RESCHEDULE,
    "cancel_appointment": Intent.CANCEL,
    "find_my_appointments": Intent.FIND_APPOINTMENTS,
}


def _cue(*patterns: str) -> re.Pattern[str]:
    return re.compile(r"(?i)\b(?:" + "|".join(patterns) + r")\b")


CUES: Mapping[Intent, re.Pattern[str]] = {
    Intent.BOOK: _cue(
        r"book", r"make an? appointment", r"schedule an?", r"get an? appointment", r"come in", r"see (?:the|a|dr)"
    ),
    Intent.RESCHEDULE: _cue(r"reschedule", r"move my", r"change my (?:appointment|booking|time)", r"another time"),
    Intent.CANCEL: _cue(r"cancel", r"can't make it", r"cannot make it", r"won't be able to (?:come|make)"),
    Intent.CHECK_AVAILABILITY: _cue(r"availab\w*", r"free slot", r"any (?:openings|times|slots)", r"earliest"),
    Intent.FIND_APPOINTMENTS: _cue(r"when is my", r"do i have an appointment", r"my next appointment"),
    Intent.ASK_PRICE: _cue(r"how much", r"price\w*", r"cost\w*", r"fees?", r"charge", r"insurance", r"co-?pay"),
    Intent.ASK_HOURS: _cue(r"opening hours", r"what time do you (?:open|close)", r"are you open", r"hours"),
    Intent.ASK_LOCATION: _cue(r"where are you", r"address", r"directions", r"parking", r"located"),
    Intent.SPEAK_TO_PERSON: _cue(
        r"(?:speak|talk) (?:to|with) (?:a |an |the |someone|somebody|a real|a human|reception|the doctor|dr)\w*",
        r"real person",
        r"human",
        r"receptionist",
        r"operator",
        r"put me through",
    ),
    Intent.COMPLAIN: _cue(
        r"complain\w*",
        r"unacceptable",
        r"disappointed",
        r"rude",
        r"terrible",
        r"awful",
        r"worst",
        r"not happy",
        r"unhappy",
        r"refund",
        r"kept waiting",
        r"waited (?:for )?(?:an hour|ages|hours)",
    ),
    Intent.REQUEST_CALLBACK: _cue(r"call me back", r"ring me back", r"get back to me", r"call back", r"callback"),
}


def detect_intents(facts: CallFacts) -> tuple[Automated[Intent], ...]:
    """Intents in the order of the vocabulary, each once, with the surer of its sources."""
    found: dict[Intent, float] = {}
    for use in facts.tool_uses:
        intent = _FROM_TOOLS.get(use.name)
        if intent is not None:
            found[intent] = TOOL_CONFIDENCE
    if facts.transfer is not None:
        found[Intent.SPEAK_TO_PERSON] = TOOL_CONFIDENCE
    text = facts.caller_text
    for intent, pattern in CUES.items():
        if intent not in found and pattern.search(text):
            found[intent] = CUE_CONFIDENCE
    provenance = rules("intents")
    return tuple(
        Automated[Intent](value=intent, confidence=found[intent], provenance=provenance)
        for intent in Intent
        if intent in found
    )
