"""Build a call's report from what the ledger holds about it. Pure apart from the analyser it is given:
the same call, turns and analyser give the same report."""

from __future__ import annotations

from collections.abc import Sequence

from booking.business import Business
from booking.calls import CallRecord, CallTurn
from booking.phone import region_of
from booking.reports.analysis import OfflineAnalyser
from booking.reports.cleaning import clean_text
from booking.reports.facts import read_facts
from booking.reports.outcome import classify_outcome
from booking.reports.ports import Analyser, AnalysisInput
from booking.reports.provenance import library, rules
from booking.reports.schema import (
    Automated,
    BookingTouched,
    CallReport,
    Participant,
    ParticipantRole,
    TranscriptTurn,
    TurnLatency,
)
from booking.reports.scoring import assign_lifecycle, gather_evidence, score_lead
from booking.reports.tags import derive_tags
from booking.reports.vocabulary import Outcome

_SPOKEN_ROLES = ("caller", "agent")
_CLEANING_CONFIDENCE = 0.9  # masking finds written numbers and addresses; spelled-out ones can slip through


async def build_report(
    call: CallRecord,
    turns: Sequence[CallTurn],
    *,
    business: Business,
    bookings_touched: Sequence[BookingTouched],
    known_customer: bool,
    latencies: Sequence[TurnLatency] | None = None,
    analyser: Analyser | None = None,
) -> CallReport:
    """The report of ``call``. ``known_customer`` says whether the caller's number was on the books
    before the call; ``bookings_touched`` is what the ledger records the call doing to bookings;
    ``analyser`` defaults to the offline one."""
    facts = read_facts(turns)
    raw = tuple(
        TranscriptTurn(index=index, role=t.role, text=t.text, at=t.at, truncated=t.truncated, tool=t.tool)
        for index, t in enumerate(turns)
    )
    names = [facts.customer_name] if facts.customer_name else []
    cleaned = _clean(raw, region_of(call.to_number if _inbound(call) else call.from_number), names)
    outcome = classify_outcome(call, facts, bookings_touched)
    analysis = await (analyser or OfflineAnalyser()).analyse(
        AnalysisInput(
            turns=cleaned.value,
            facts=facts,
            outcome=outcome.value,
            bookings_touched=bookings_touched,
            known_customer=known_customer,
            business=business,
        )
    )
    tags = derive_tags(
        facts,
        outcome=outcome.value,
        intents=analysis.intents,
        sentiment=analysis.sentiment,
        known_customer=known_customer,
    )
    evidence = gather_evidence(outcome=outcome, intents=analysis.intents, tags=tags, sentiment=analysis.sentiment)
    score = score_lead(evidence, business.crm, outcome_confidence=outcome.confidence)
    caller_number, business_number = (
        (call.from_number, call.to_number) if _inbound(call) else (call.to_number, call.from_number)
    )
    return CallReport(
        builder=rules("report-builder"),
        call_sid=call.call_sid,
        stream_sid=call.stream_sid,
        direction=call.direction,
        caller_number=caller_number,
        business_number=business_number,
        participants=_participants(caller_number, business_number, facts.customer_name, business, outcome.value),
        started_at=call.created_at,
        ended_at=call.ended_at,
        duration_seconds=_duration(call),
        end_reason=call.end_reason,
        outcome=outcome,
        bookings_touched=tuple(bookings_touched),
        transcript=raw,
        cleaned_transcript=cleaned,
        summary=analysis.summary,
        sentiment=analysis.sentiment,
        turn_sentiments=analysis.turn_sentiments,
        key_phrases=analysis.key_phrases,
        intents=analysis.intents,
        tags=tags,
        lead_score=score,
        lifecycle=assign_lifecycle(evidence, score, business.crm),
        turn_latencies=tuple(latencies) if latencies is not None else None,
    )


def _inbound(call: CallRecord) -> bool:
    return not call.direction.startswith("outbound")


def _clean(raw: Sequence[TranscriptTurn], region: str, names: Sequence[str]) -> Automated[tuple[TranscriptTurn, ...]]:
    """The spoken conversation, readable and safe to share: tool and key-press turns are left out (key
    presses are often digits of an account or card), fillers removed, personal data masked."""
    cleaned = []
    for turn in raw:
        if turn.role not in _SPOKEN_ROLES:
            continue
        text = clean_text(turn.text, region, names)
        if text:
            cleaned.append(turn.model_copy(update={"text": text}))
    return Automated[tuple[TranscriptTurn, ...]](
        value=tuple(cleaned), confidence=_CLEANING_CONFIDENCE, provenance=library("phonenumbers")
    )


def _participants(
    caller_number: str, business_number: str, caller_name: str | None, business: Business, outcome: Outcome
) -> tuple[Participant, ...]:
    people = [
        Participant(role=ParticipantRole.CALLER, number=caller_number, name=caller_name),
        Participant(role=ParticipantRole.AGENT, number=business_number, name=business.name),
    ]
    if outcome is Outcome.TRANSFERRED:
        people.append(Participant(role=ParticipantRole.STAFF))  # who picked up is not in the ledger
    return tuple(people)


def _duration(call: CallRecord) -> float | None:
    if call.duration_seconds is not None:
        return float(call.duration_seconds)  # Twilio's billed duration, when its callback came
    if call.ended_at is not None:
        return (call.ended_at - call.created_at).total_seconds()
    return None
