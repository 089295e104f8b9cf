"""Tags for the people who act on a report, by rules over the facts, the outcome, the intents and the
caller's sentiment."""

from __future__ import annotations

import re
from collections.abc import Sequence

from booking.reports.facts import CallFacts
from booking.reports.provenance import rules
from booking.reports.schema import Automated, SentimentScore
from booking.reports.vocabulary import Intent, Outcome, SentimentLabel, Tag

URGENT_CUES = re.compile(
    r"(?i)\b(?:urgent\w*|emergenc\w*|as soon as possible|asap|right away|straight away|in (?:a lot of )?pain)\b"
)


def derive_tags(
    facts: CallFacts,
    *,
    outcome: Outcome,
    intents: Sequence[Automated[Intent]],
    sentiment: Automated[SentimentScore],
    known_customer: bool,
) -> tuple[Automated[Tag], ...]:
    """Each tag once, in the vocabulary's order, with the confidence of its best-supported reason."""
    found: dict[Tag, float] = {}

    def tag(name: Tag, confidence: float) -> None:
        found[name] = max(found.get(name, 0.0), confidence)

    wanted = {item.value: item.confidence for item in intents}
    negative = sentiment.value.label is SentimentLabel.NEGATIVE
    if facts.caller_spoke:
        # Whether the number is on the books is the ledger's fact, not a guess.
        tag(Tag.RETURNING_CUSTOMER if known_customer else Tag.NEW_CUSTOMER, 1.0)
    if Intent.COMPLAIN in wanted:
        # A complaint cue in a negative call is surer than one in a cheerful call ("no complaints!").
        tag(Tag.COMPLAINT, min(1.0, wanted[Intent.COMPLAIN] + 0.15) if negative else wanted[Intent.COMPLAIN] - 0.25)
    if Intent.SPEAK_TO_PERSON in wanted:
        tag(Tag.ASKED_FOR_PERSON, wanted[Intent.SPEAK_TO_PERSON])
    if URGENT_CUES.search(facts.caller_text):
        tag(Tag.URGENT, 0.7)
    if facts.unavailable_answers and outcome is not Outcome.BOOKED and outcome is not Outcome.RESCHEDULED:
        tag(Tag.NO_AVAILABILITY, 0.9)
    follow_up = _follow_up_confidence(facts, outcome, wanted, negative)
    if follow_up:
        tag(Tag.FOLLOW_UP_REQUIRED, follow_up)
    provenance = rules("tags")
    return tuple(
        Automated[Tag](value=name, confidence=round(found[name], 3), provenance=provenance)
        for name in Tag
        if name in found
    )


def _follow_up_confidence(facts: CallFacts, outcome: Outcome, wanted: dict[Intent, float], negative: bool) -> float:
    """Someone at the business should call back: the caller asked to be called back, a transfer they
    wanted failed, they complained, they left a voicemail, or they wanted a time that was not free."""
    reasons = [0.0]
    if Intent.REQUEST_CALLBACK in wanted:
        reasons.append(wanted[Intent.REQUEST_CALLBACK])
    if facts.transfer == "failed":
        reasons.append(0.9)
    if Intent.COMPLAIN in wanted and negative:
        reasons.append(0.8)
    if outcome is Outcome.VOICEMAIL and facts.caller_spoke:
        reasons.append(0.6)
    if facts.unavailable_answers and outcome is Outcome.ENQUIRY_ONLY:
        reasons.append(0.6)
    return max(reasons)
