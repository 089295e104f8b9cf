"""What the call came to, by rules over the ledger's facts and the transcript.

In order: a call that never connected is abandoned; a call that changed a booking is booked,
rescheduled or cancelled (booking wins over the others when a call did several: it is what the business
gained); then a completed transfer; a voicemail greeting heard from the other end; a caller who never
said anything (abandoned); anything else is an enquiry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from booking.calls import CallRecord, CallStatus
from booking.reports.facts import CallFacts
from booking.reports.provenance import rules
from booking.reports.schema import Automated, BookingTouched
from booking.reports.vocabulary import BookingAction, Outcome

_NOT_CONNECTED = frozenset({CallStatus.BUSY, CallStatus.FAILED, CallStatus.NO_ANSWER, CallStatus.CANCELED})
_BY_PRIORITY: tuple[tuple[BookingAction, Outcome], ...] = (
    (BookingAction.BOOKED, Outcome.BOOKED),
    (BookingAction.RESCHEDULED, Outcome.RESCHEDULED),
    (BookingAction.CANCELLED, Outcome.CANCELLED),
)
VOICEMAIL_CUES = re.compile(
    # A greeting's words, not a caller's: "can I leave a message for Dr Lee?" is an enquiry.
    r"(?i)\b(?:after the (?:tone|beep)|voice ?mail|mailbox"
    r"|not available to take your call|can't come to the phone|cannot come to the phone|record your message)\b"
)
_VOICEMAIL_END_REASONS = frozenset({"voicemail", "machine", "answering_machine"})


def classify_outcome(call: CallRecord, facts: CallFacts, touched: Sequence[BookingTouched]) -> Automated[Outcome]:
    def decided(outcome: Outcome, confidence: float) -> Automated[Outcome]:
        return Automated[Outcome](value=outcome, confidence=confidence, provenance=rules("outcome"))

    if call.status in _NOT_CONNECTED:
        return decided(Outcome.ABANDONED, 1.0)
    ledger_actions = {booking.action for booking in touched}
    tool_actions = {change.action for change in facts.changes}
    for action, outcome in _BY_PRIORITY:
        if action in ledger_actions:
            return decided(outcome, 1.0)  # the ledger's own record of what the call did
    for action, outcome in _BY_PRIORITY:
        if action in tool_actions:
            return decided(outcome, 0.9)  # the tool said so; the ledger was not consulted
    if facts.transfer == "done" or call.end_reason == "transferred":
        return decided(Outcome.TRANSFERRED, 1.0)
    if call.end_reason in _VOICEMAIL_END_REASONS:
        return decided(Outcome.VOICEMAIL, 1.0)
    if VOICEMAIL_CUES.search(facts.caller_text):
        return decided(Outcome.VOICEMAIL, 0.7)
    if not facts.caller_spoke:
        return decided(Outcome.ABANDONED, 0.95)
    return decided(Outcome.ENQUIRY_ONLY, 0.8)
