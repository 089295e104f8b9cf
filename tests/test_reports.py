"""The end-of-call report builder: each analyser on fixed transcripts, outcomes, tags, PII masking,
lead scoring from the business's rules, provenance on every automated field, and the JSON round trip."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

import orjson
import pytest

from booking.business import EXAMPLE_BUSINESS_FILE, Business, load_business, parse_business
from booking.calls import CallStatus, CallTurn
from booking.domain import Booking, BookingStatus, Customer, Interval
from booking.reports.builder import build_report
from booking.reports.cleaning import clean_text, mask_pii, remove_fillers
from booking.reports.schema import SCHEMA_VERSION, BookingTouched, CallReport, ParticipantRole, TurnLatency
from booking.reports.vocabulary import BookingAction, Intent, LifecycleStage, Outcome, SentimentLabel, Tag
from tests.report_calls import CALLER, CLINIC, GREETING, START, record, tool, turns

BOOKING_ID = "0190a1b2c3d4e5f60718293a4b5c6d7e"


@pytest.fixture(scope="module")
def clinic() -> Business:
    return load_business(EXAMPLE_BUSINESS_FILE)


BOOKED_RESULT = {
    "booking_id": BOOKING_ID,
    "service": "checkup",
    "service_name": "General check-up",
    "start": "2026-12-01T10:00",
    "spoken": "Tuesday, December 1 at 10 AM",
    "resource": "dr-lee",
    "resource_name": "Dr. Amelia Lee",
    "status": "booked",
}
BOOKING_CALL = turns(
    GREETING,
    ("caller", "Hi, um, I'd like to book a general check-up with Dr Lee on Tuesday morning please."),
    tool(
        "check_availability",
        {"service": "checkup", "date": "2026-12-01", "time": "10:00"},
        {"service": "checkup", "requested_available": True, "held": True, "slots": []},
    ),
    ("agent", "Dr. Amelia Lee is free on Tuesday, December 1 at 10 AM. Shall I book it?"),
    ("caller", "Yes, that's perfect. My name is Jane Doe, and my email is jane.doe@example.com."),
    tool(
        "book_appointment",
        {"service": "checkup", "start": "2026-12-01T10:00", "customer_name": "Jane Doe"},
        BOOKED_RESULT,
    ),
    ("agent", "You're booked for Tuesday, December 1 at 10 AM with Dr. Amelia Lee."),
    ("caller", "Great, thank you so much, that's really helpful!"),
)
COMPLAINT_CALL = turns(
    GREETING,
    ("caller", "I want to make a complaint. I waited for an hour yesterday and the receptionist was rude."),
    ("agent", "I'm sorry to hear that. I'll make sure the team hears about it."),
    ("caller", "It's unacceptable and I'm very disappointed. Somebody needs to call me back about this."),
    ("agent", "I understand, someone will call you back."),
)
ABANDONED_CALL = turns(GREETING, ("agent", "Are you still there?"))
TRANSFER_CALL = turns(
    GREETING,
    ("caller", "Can I speak to a real person please? It's about my bill."),
    ("agent", "Of course, let me put you through."),
    ("tool", "transfer", "transferred to a person: the caller asked for a person"),
)
VOICEMAIL_CALL = turns(
    GREETING,
    ("caller", "Hi, you've reached Sam. I'm not available to take your call, please leave a message after the beep."),
    ("agent", "Hello, this is Riverside Family Clinic returning your call."),
)


def booked_touch() -> BookingTouched:
    start = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
    booking = Booking(
        id=BOOKING_ID,
        resource_id="dr-lee",
        service_id="checkup",
        customer=Customer(id="c1", phone=CALLER, name="Jane Doe"),
        start=start,
        end=start + timedelta(minutes=30),
        block=Interval(start, start + timedelta(minutes=40)),
        status=BookingStatus.CONFIRMED,
        version=1,
        created_at=START,
        updated_at=START,
        source="phone",
    )
    return BookingTouched.from_booking(booking, BookingAction.BOOKED)


async def report_of(
    business: Business,
    lines: Sequence[CallTurn],
    *,
    touched: Sequence[BookingTouched] = (),
    known: bool = False,
    **call: Any,
) -> CallReport:
    return await build_report(record(**call), lines, business=business, bookings_touched=touched, known_customer=known)


def tags_of(report: CallReport) -> set[Tag]:
    return {tag.value for tag in report.tags}


def intents_of(report: CallReport) -> set[Intent]:
    return {intent.value for intent in report.intents}


# -- the fixed transcripts ---------------------------------------------------------------------------


async def test_a_booking_call(clinic: Business) -> None:
    report = await report_of(clinic, BOOKING_CALL, touched=[booked_touch()])
    assert report.schema_version == SCHEMA_VERSION
    assert (report.outcome.value, report.outcome.confidence) == (Outcome.BOOKED, 1.0)
    assert {Intent.BOOK, Intent.CHECK_AVAILABILITY} <= intents_of(report)
    assert tags_of(report) == {Tag.NEW_CUSTOMER}
    assert report.sentiment.value.label is SentimentLabel.POSITIVE
    assert report.summary.value == (
        "A new caller, Jane Doe, called. They wanted to book an appointment and to know when there was a free "
        'time: "Hi, I\'d like to book a general check-up with Dr Lee on Tuesday morning please." Booked General '
        f"check-up with Dr. Amelia Lee for Tuesday, December 1 at 10 AM (booking {BOOKING_ID}). "
        "Next step: none, the appointment is confirmed."
    )
    phrases = " ".join(report.key_phrases.value).lower()
    assert "check-up" in phrases or "general check" in phrases
    assert "[email]" not in phrases and "email" not in report.key_phrases.value
    # The cleaned transcript has no tool turns, no fillers, no e-mail address and not the name the caller
    # gave the booking tool; the raw one keeps all.
    cleaned = {turn.index: turn.text for turn in report.cleaned_transcript.value}
    assert cleaned[1] == "Hi, I'd like to book a general check-up with Dr Lee on Tuesday morning please."
    assert cleaned[4] == "Yes, that's perfect. My name is [name], and my email is [email]."
    assert 2 not in cleaned and 5 not in cleaned
    assert report.transcript[4].text.endswith("jane.doe@example.com.")
    assert [p.role for p in report.participants] == [ParticipantRole.CALLER, ParticipantRole.AGENT]
    assert report.participants[0].name == "Jane Doe"
    assert (report.caller_number, report.business_number, report.duration_seconds) == (CALLER, CLINIC, 180.0)
    assert report.lead_score.value.points == 65
    assert [reason.rule for reason in report.lead_score.value.reasons] == [
        "outcome:booked",
        "intent:check_availability",
        "tag:new_customer",
        "sentiment:positive",
    ]
    assert report.lead_score.value.high_value
    assert report.lifecycle.value.stage is LifecycleStage.BOOKED


async def test_a_complaint(clinic: Business) -> None:
    report = await report_of(clinic, COMPLAINT_CALL, known=True)
    assert report.outcome.value is Outcome.ENQUIRY_ONLY
    assert report.sentiment.value.label is SentimentLabel.NEGATIVE
    assert {Intent.COMPLAIN, Intent.REQUEST_CALLBACK} <= intents_of(report)
    assert {Tag.COMPLAINT, Tag.FOLLOW_UP_REQUIRED, Tag.RETURNING_CUSTOMER} <= tags_of(report)
    assert Tag.NEW_CUSTOMER not in tags_of(report)
    complaint = next(tag for tag in report.tags if tag.value is Tag.COMPLAINT)
    assert complaint.confidence == pytest.approx(0.9)  # a complaint cue in a negative call
    assert report.summary.value.endswith("Next step: review the complaint and call the caller back.")
    assert report.lead_score.value.points == 0  # -20 and -30, kept within 0..100
    assert {reason.points for reason in report.lead_score.value.reasons} == {-20, -30}
    assert report.lifecycle.value.stage is LifecycleStage.LOST
    negative_turns = [t.value.turn for t in report.turn_sentiments if t.value.label is SentimentLabel.NEGATIVE]
    assert 3 in negative_turns


async def test_an_abandoned_call_with_no_caller_speech(clinic: Business) -> None:
    report = await report_of(clinic, ABANDONED_CALL, end_reason="stop", duration_seconds=12)
    assert (report.outcome.value, report.outcome.confidence) == (Outcome.ABANDONED, 0.95)
    assert report.intents == () and report.tags == ()
    assert report.key_phrases.value == () and report.key_phrases.confidence == 0.0
    assert report.sentiment.value.label is SentimentLabel.NEUTRAL and report.sentiment.confidence == 0.0
    assert "hung up before saying anything" in report.summary.value
    assert report.lead_score.value.points == 0 and report.lead_score.value.reasons == ()
    assert report.lifecycle.value.stage is LifecycleStage.NEW


async def test_a_transfer_request(clinic: Business) -> None:
    report = await report_of(clinic, TRANSFER_CALL, end_reason="transferred")
    assert (report.outcome.value, report.outcome.confidence) == (Outcome.TRANSFERRED, 1.0)
    assert Intent.SPEAK_TO_PERSON in intents_of(report)
    assert Tag.ASKED_FOR_PERSON in tags_of(report)
    assert report.participants[-1].role is ParticipantRole.STAFF
    assert "transferred to a person (the caller asked for a person)" in report.summary.value


async def test_a_failed_transfer_needs_a_follow_up(clinic: Business) -> None:
    lines = [*TRANSFER_CALL[:3], CallTurn(role="tool", tool="transfer", text="transfer failed: busy", at=START)]
    report = await report_of(clinic, lines)
    assert report.outcome.value is Outcome.ENQUIRY_ONLY
    assert {Tag.ASKED_FOR_PERSON, Tag.FOLLOW_UP_REQUIRED} <= tags_of(report)
    assert report.summary.value.endswith("Next step: call the caller back.")


async def test_a_voicemail_greeting(clinic: Business) -> None:
    report = await report_of(clinic, VOICEMAIL_CALL, direction="outbound-api", from_number=CLINIC, to_number=CALLER)
    assert (report.outcome.value, report.outcome.confidence) == (Outcome.VOICEMAIL, 0.7)
    assert (report.caller_number, report.business_number) == (CALLER, CLINIC)  # the other party is the caller
    assert report.lifecycle.value.stage is LifecycleStage.NEW
    assert Tag.FOLLOW_UP_REQUIRED in tags_of(report)


# -- outcome classification ----------------------------------------------------------------------------


def changed(action: str, name: str) -> tuple[str, str, str]:
    return tool(name, {"booking_id": BOOKING_ID}, {"status": action, "booking_id": BOOKING_ID, "spoken": "Friday"})


@pytest.mark.parametrize(
    ("lines", "call", "expected", "confidence"),
    [
        (ABANDONED_CALL, {"status": CallStatus.NO_ANSWER}, Outcome.ABANDONED, 1.0),
        (BOOKING_CALL, {"status": CallStatus.BUSY}, Outcome.ABANDONED, 1.0),
        (BOOKING_CALL, {}, Outcome.BOOKED, 0.9),  # the tool said booked; no ledger touch given
        (turns(("caller", "Move it to Friday"), changed("rescheduled", "reschedule_appointment")), {},
         Outcome.RESCHEDULED, 0.9),
        (turns(("caller", "Cancel it"), changed("cancelled", "cancel_appointment")), {}, Outcome.CANCELLED, 0.9),
        # listing an already cancelled booking changes nothing
        (turns(("caller", "What do I have?"), changed("cancelled", "find_my_appointments")), {},
         Outcome.ENQUIRY_ONLY, 0.8),
        (turns(("caller", "Hello?")), {"end_reason": "voicemail"}, Outcome.VOICEMAIL, 1.0),
        (turns(("caller", "Can I leave a message for Dr Lee?")), {}, Outcome.ENQUIRY_ONLY, 0.8),
        (turns(("dtmf", "1")), {}, Outcome.ENQUIRY_ONLY, 0.8),
        (turns(("caller", "   ")), {}, Outcome.ABANDONED, 0.95),
    ],
)  # fmt: skip
async def test_outcome_classification(
    clinic: Business, lines: list[CallTurn], call: dict[str, Any], expected: Outcome, confidence: float
) -> None:
    report = await report_of(clinic, lines, **call)
    assert (report.outcome.value, report.outcome.confidence) == (expected, confidence)


async def test_a_ledger_touch_outranks_the_tools(clinic: Business) -> None:
    cancelled = booked_touch().model_copy(update={"action": BookingAction.CANCELLED, "status": "cancelled"})
    lines = turns(("caller", "Please cancel my check-up"))
    report = await report_of(clinic, lines, touched=[cancelled])
    assert (report.outcome.value, report.outcome.confidence) == (Outcome.CANCELLED, 1.0)
    assert "Cancelled General check-up with Dr. Amelia Lee for Tuesday, December 1 at 10:00" in report.summary.value


# -- provenance and the schema ---------------------------------------------------------------------------


async def test_every_automated_field_has_provenance(clinic: Business) -> None:
    for lines in (BOOKING_CALL, COMPLAINT_CALL, ABANDONED_CALL, TRANSFER_CALL, VOICEMAIL_CALL):
        report = await report_of(clinic, lines)
        fields = report.automated_fields()
        named = {"outcome", "cleaned_transcript", "summary", "sentiment", "key_phrases", "lead_score", "lifecycle"}
        assert named <= fields.keys()
        for name, field in fields.items():
            assert field.provenance.component and field.provenance.version, name
            assert 0.0 <= field.confidence <= 1.0, name
        assert report.sentiment.provenance.component == "vaderSentiment"
        assert report.sentiment.provenance.version == metadata.version("vaderSentiment")
        assert report.key_phrases.provenance.component == "yake"
        assert report.key_phrases.provenance.version == metadata.version("yake")
        assert report.outcome.provenance.component == "voicebook.outcome"
        assert report.outcome.provenance.version.startswith(metadata.version("voicebook"))
    fields = (await report_of(clinic, COMPLAINT_CALL)).automated_fields()
    assert {"intents[0]", "tags[0]", "turn_sentiments[0]"} <= fields.keys()


async def test_the_report_survives_a_json_round_trip(clinic: Business) -> None:
    latencies = [
        TurnLatency(trigger="speech", parts={"voice_to_voice_server": 0.4123, "server_overhead": 0.0021}),
        TurnLatency(trigger="dtmf", parts={}),
    ]
    report = await build_report(
        record(),
        BOOKING_CALL,
        business=clinic,
        bookings_touched=[booked_touch()],
        known_customer=False,
        latencies=latencies,
    )
    data = report.to_json()
    again = CallReport.from_json(data)
    assert again == report
    assert again.to_json() == data
    assert orjson.loads(data)["schema_version"] == 1
    assert again.turn_latencies is not None and again.turn_latencies[0].parts["voice_to_voice_server"] == 0.4123


async def test_the_report_is_deterministic(clinic: Business) -> None:
    first = await report_of(clinic, COMPLAINT_CALL)
    second = await report_of(clinic, COMPLAINT_CALL)
    assert first.to_json() == second.to_json()


# -- cleaning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Call me on (646) 555-0199 tomorrow", "Call me on [phone] tomorrow"),
        ("my number is +44 20 7946 0958.", "my number is [phone]."),
        ("write to jane.doe+clinic@example.co.uk please", "write to [email] please"),
        ("card 4111 1111 1111 1111 expires soon", "card [card] expires soon"),
        ("card 4111-1111-1111-1111", "card [card]"),
        ("account 4111 1111 1111 1112", "account [number]"),  # fails Luhn: still a long number
        ("member id 123456789", "member id [number]"),
        ("at 9:30 on 12/01/2026 or 2026-12-01", "at 9:30 on 12/01/2026 or 2026-12-01"),
        ("room 12, 3 of 5, 10:45 to 11:15", "room 12, 3 of 5, 10:45 to 11:15"),
        ("in 2026 at 14:00", "in 2026 at 14:00"),
    ],
)
def test_pii_masking(text: str, masked: str) -> None:
    assert mask_pii(text, "US") == masked


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("Um, I need, uh, a flu shot", "I need, a flu shot"),  # punctuation is the recogniser's: kept
        ("It was, like, really late", "It was really late"),
        ("I'd like a check-up", "I'd like a check-up"),
        ("I like Dr Lee, you know, she listens", "I like Dr Lee she listens"),
        ("Mm-hmm, that works", "Mm-hmm, that works"),
        ("Hmm. Erm, Tuesday?", "Tuesday?"),
        ("um", ""),
    ],
)
def test_filler_removal(text: str, cleaned: str) -> None:
    assert remove_fillers(text) == cleaned


def test_cleaning_masks_after_removing_fillers() -> None:
    assert clean_text("uh, it's 646 555 0199, um, thanks") == "it's [phone], thanks"


# -- lead scoring from the business's rules ----------------------------------------------------------


def custom_business(crm: dict[str, Any]) -> Business:
    return parse_business(
        {
            "business": {"name": "Salon", "timezone": "Europe/London", "phone": "+442079460000"},
            "resources": [{"id": "sam", "name": "Sam", "hours": {"mon": ["09:00-17:00"]}}],
            "services": [{"id": "checkup", "name": "Cut", "duration_minutes": 45, "resources": ["sam"]}],
            "crm": crm,
        }
    )


async def test_lead_score_and_lifecycle_follow_custom_rules() -> None:
    business = custom_business(
        {
            "high_score": 90,
            "default_stage": "nurture",
            "score_rules": [
                {"when": "intent:ask_price", "points": 30, "label": "price shopper"},
                {"when": "tag:new_customer", "points": 25},
                {"when": "outcome:booked", "points": 100},
                {"when": "tag:urgent", "points": 15},
            ],
            "lifecycle_rules": [
                {"stage": "qualified", "when": ["intent:ask_price"], "min_score": 60},
                {"stage": "contacted", "when": ["tag:urgent"]},
            ],
        }
    )
    lines = turns(GREETING, ("caller", "How much is a haircut? I need one urgently, it's for a wedding."))
    report = await report_of(business, lines)
    score = report.lead_score.value
    assert [(reason.rule, reason.label, reason.points) for reason in score.reasons] == [
        ("intent:ask_price", "price shopper", 30),
        ("tag:new_customer", "tag:new_customer", 25),
        ("tag:urgent", "tag:urgent", 15),
    ]
    assert (score.points, score.high_value) == (70, False)
    assert report.lead_score.confidence == pytest.approx(0.7)  # the least sure evidence: the urgency cue
    assert report.lifecycle.value.stage is LifecycleStage.QUALIFIED
    assert report.lifecycle.value.reason == "lifecycle_rules[0]: intent:ask_price, score 70 >= 60"

    known = await report_of(business, lines, known=True)  # no new-customer points: 45, below 60
    assert known.lead_score.value.points == 45
    assert known.lifecycle.value.stage is LifecycleStage.CONTACTED

    quiet = await report_of(business, turns(GREETING, ("caller", "Hello, just checking in")), known=True)
    assert quiet.lifecycle.value.stage is LifecycleStage.NURTURE  # the configured default
    assert quiet.lifecycle.value.reason == "no lifecycle rule matched: default_stage"


async def test_scores_are_capped() -> None:
    business = custom_business(
        {"score_rules": [{"when": "outcome:booked", "points": 100}, {"when": "tag:new_customer", "points": 50}]}
    )
    report = await report_of(business, BOOKING_CALL)
    assert report.lead_score.value.points == 100
    assert sum(reason.points for reason in report.lead_score.value.reasons) == 150


def test_names_are_masked_as_whole_words_in_any_case() -> None:
    from booking.reports.cleaning import clean_text

    text = "my name is john doe, thanks John! Johnny is my son, call 212 555 0142"
    assert clean_text(text, "US", ["John Doe"]) == "my name is [name], thanks [name]! Johnny is my son, call [phone]"
    assert clean_text("O'Brien speaking", "US", ["Mary O'Brien"]) == "[name] speaking"
    assert clean_text("John here", "US", []) == "John here"  # a name no tool recorded is not known
