"""Triggers on end-of-call reports: which rules fire for fixed calls and why, the review hold for
high-value leads, stable idempotency keys, what the webhook posts, and every rule mistake named in the
business configuration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from booking.business import EXAMPLE_BUSINESS_FILE, Business, TriggerAction, load_business, parse_business
from booking.calls import CallRecord, CallTurn
from booking.errors import ConfigurationError
from booking.reports.builder import build_report
from booking.reports.schema import CallReport
from booking.reports.triggers import WEBHOOK_EVENT, FiredTrigger, fire, webhook_payload
from booking.reports.vocabulary import SentimentLabel, Tag
from tests.report_calls import CALLER, CLINIC, GREETING, tool, turns
from tests.report_calls import record as base_record

CALL_SID = "CA" + "7" * 32
STAFF = "+12125550123"
HOOK = "https://crm.example.com/hooks/voicebook?token=abc"


BOOKING_CALL = turns(
    GREETING,
    ("caller", "Hi, I'd like to book a general check-up with Dr Lee on Tuesday morning please."),
    tool(
        "check_availability",
        {"service": "checkup", "date": "2026-12-01", "time": "10:00"},
        {"service": "checkup", "requested_available": True, "held": True, "slots": []},
    ),
    ("agent", "Dr. Amelia Lee is free on Tuesday, December 1 at 10 AM. Shall I book it?"),
    ("caller", "Yes, that's perfect. My name is Jane Doe."),
    tool(
        "book_appointment",
        {"service": "checkup", "start": "2026-12-01T10:00", "customer_name": "Jane Doe"},
        {
            "booking_id": "0190a1b2c3d4e5f60718293a4b5c6d7e",
            "service": "checkup",
            "service_name": "General check-up",
            "start": "2026-12-01T10:00",
            "spoken": "Tuesday, December 1 at 10 AM",
            "resource": "dr-lee",
            "resource_name": "Dr. Amelia Lee",
            "status": "booked",
        },
    ),
    ("agent", "You're booked for Tuesday, December 1 at 10 AM with Dr. Amelia Lee."),
    ("caller", "Great, thank you so much, that's really helpful!"),
)
COMPLAINT_CALL = turns(
    GREETING,
    ("caller", "I want to make a complaint. I waited for an hour yesterday and nobody told me why, it was rude."),
    ("agent", "I'm sorry to hear that. I'll make sure the team hears about it."),
    ("caller", "It's unacceptable and I'm very disappointed. Somebody needs to call me back about this."),
    ("agent", "I understand, someone will call you back."),
)
TRANSFER_CALL = turns(
    GREETING,
    ("caller", "Can I speak to a real person please? It's about my bill."),
    ("agent", "Of course, let me put you through."),
    ("tool", "transfer", "transferred to a person: the caller asked for a person"),
)
ABANDONED_CALL = turns(GREETING, ("agent", "Are you still there?"))
URGENT_PRICE_CALL = turns(GREETING, ("caller", "How much is a check-up? I need one urgently, I'm in pain."))


def record(**changes: Any) -> CallRecord:
    return base_record(**({"call_sid": CALL_SID} | changes))


async def report_of(business: Business, lines: Sequence[CallTurn], *, known: bool = False, **call: Any) -> CallReport:
    return await build_report(record(**call), lines, business=business, bookings_touched=(), known_customer=known)


@pytest.fixture(scope="module")
def clinic() -> Business:
    return load_business(EXAMPLE_BUSINESS_FILE)


def minimal(crm: dict[str, Any]) -> dict[str, Any]:
    return {
        "business": {"name": "Clinic", "timezone": "America/New_York", "phone": CLINIC},
        "resources": [{"id": "dr-lee", "name": "Dr Lee", "hours": {"mon": ["09:00-17:00"]}}],
        "services": [{"id": "checkup", "name": "Check-up", "duration_minutes": 30, "resources": ["dr-lee"]}],
        "crm": crm,
    }


def with_triggers(*triggers: dict[str, Any], **crm: Any) -> Business:
    return parse_business(minimal({**crm, "triggers": list(triggers)}))


def shown(fired: FiredTrigger) -> list[tuple[str, str]]:
    return [(reason.condition, reason.shown) for reason in fired.reasons]


# -- the example clinic's triggers ------------------------------------------------------------------


async def test_a_complaint_needs_attention(clinic: Business) -> None:
    report = await report_of(clinic, COMPLAINT_CALL, known=True)
    assert report.lead_score.value.points == 0
    [fired] = fire(report, clinic.crm, report_version=1)
    assert fired.rule == "needs-attention"
    assert fired.actions == (TriggerAction.FOLLOW_UP,)
    assert shown(fired) == [("sentiment:negative", "sentiment:negative"), ("tag:complaint", "tag:complaint")]
    complaint = next(tag for tag in report.tags if tag.value is Tag.COMPLAINT)
    assert fired.reasons[1].confidence == complaint.confidence  # the report's own evidence
    assert fired.reasons[0].confidence == report.sentiment.confidence
    assert (fired.needs_review, fired.review_reasons) == (False, ())
    assert fired.idempotency_key == f"{CALL_SID}:trigger:needs-attention:v1"
    assert fired.action_key(TriggerAction.FOLLOW_UP) == f"{CALL_SID}:trigger:needs-attention:v1:follow_up"
    assert (fired.webhook_url, fired.notify_number) == (None, None)


async def test_asking_for_a_person_needs_attention(clinic: Business) -> None:
    report = await report_of(clinic, TRANSFER_CALL, end_reason="transferred")
    [fired] = fire(report, clinic.crm, report_version=1)
    assert fired.rule == "needs-attention"
    assert ("tag:asked_for_person", "tag:asked_for_person") in shown(fired)


async def test_a_high_value_booking_is_held_for_review(clinic: Business) -> None:
    report = await report_of(clinic, BOOKING_CALL)
    assert report.lead_score.value.points == 65 and report.sentiment.value.label is SentimentLabel.POSITIVE
    [fired] = fire(report, clinic.crm, report_version=1)
    assert fired.rule == "high-value-lead"
    assert shown(fired) == [("high_score", "score 65 >= 60")]
    assert fired.reasons[0].confidence == report.lead_score.confidence
    assert (fired.needs_review, fired.review_reasons) == (True, ("the rule asks for review",))


async def test_an_abandoned_call_fires_nothing(clinic: Business) -> None:
    report = await report_of(clinic, ABANDONED_CALL, duration_seconds=12)
    assert fire(report, clinic.crm, report_version=1) == []


async def test_no_triggers_unless_configured() -> None:
    business = parse_business(minimal({}))
    assert business.crm.triggers == () and business.crm.review_high_value is False
    report = await report_of(business, COMPLAINT_CALL)
    assert fire(report, business.crm, report_version=1) == []


# -- custom rules ---------------------------------------------------------------------------------


async def test_every_matching_trigger_fires_in_configuration_order() -> None:
    business = with_triggers(
        {"name": "cancellations", "when": ["outcome:cancelled"], "actions": ["follow_up"]},
        {"name": "urgent", "when": ["tag:urgent", "tag:complaint"], "actions": ["sms"], "notify_number": STAFF},
        {
            "name": "warm-lead",
            "when": ["score >= 30", "intent:ask_price", "high_score"],
            "actions": ["webhook", "follow_up"],
            "webhook_url": HOOK,
        },
        high_score=90,
        score_rules=[{"when": "intent:ask_price", "points": 20}, {"when": "tag:urgent", "points": 15}],
    )
    assert business.crm.triggers[2].when == ("score>=30", "intent:ask_price", "high_score")  # written back tidy
    report = await report_of(business, URGENT_PRICE_CALL, known=True)
    assert report.lead_score.value.points == 35
    urgent, warm = fire(report, business.crm, report_version=3)
    assert (urgent.rule, urgent.actions, urgent.notify_number) == ("urgent", (TriggerAction.SMS,), STAFF)
    assert shown(urgent) == [("tag:urgent", "tag:urgent")]
    assert warm.actions == (TriggerAction.WEBHOOK, TriggerAction.FOLLOW_UP)
    assert warm.webhook_url == HOOK
    assert shown(warm) == [("score>=30", "score 35 >= 30"), ("intent:ask_price", "intent:ask_price")]
    assert warm.action_key(TriggerAction.WEBHOOK) == f"{CALL_SID}:trigger:warm-lead:v3:webhook"
    assert not urgent.needs_review and not warm.needs_review


@pytest.mark.parametrize(("review_high_value", "held"), [(True, True), (False, False)])
async def test_review_high_value_holds_every_trigger_for_a_high_value_lead(review_high_value: bool, held: bool) -> None:
    business = with_triggers(
        {"name": "booked", "when": ["outcome:booked"], "actions": ["follow_up"]},
        {"name": "unhappy", "when": ["sentiment:negative"], "actions": ["follow_up"]},
        {"name": "checked", "when": ["intent:book"], "actions": ["follow_up"], "review": True},
        review_high_value=review_high_value,
    )
    booked = await report_of(business, BOOKING_CALL)
    assert booked.lead_score.value.high_value
    booked_fired, checked = fire(booked, business.crm, report_version=1)
    assert booked_fired.needs_review is held
    expected = ("high-value lead: score 65 >= 60",) if held else ()
    assert booked_fired.review_reasons == expected
    assert checked.needs_review  # the rule's own review, whatever the score
    assert checked.review_reasons == ("the rule asks for review", *expected)

    complaint = await report_of(business, COMPLAINT_CALL)
    assert not complaint.lead_score.value.high_value
    [unhappy] = fire(complaint, business.crm, report_version=1)
    assert unhappy.rule == "unhappy" and not unhappy.needs_review  # a low score is never held by the flag


# -- determinism and idempotency keys -------------------------------------------------------------


async def test_keys_are_stable_and_versioned(clinic: Business) -> None:
    first = fire(await report_of(clinic, COMPLAINT_CALL), clinic.crm, report_version=1)
    again = await report_of(clinic, COMPLAINT_CALL)
    second = fire(again, clinic.crm, report_version=1)
    stored = fire(CallReport.from_json(again.to_json()), clinic.crm, report_version=1)
    assert first == second == stored
    assert [item.model_dump(mode="json") for item in first] == [item.model_dump(mode="json") for item in second]
    regenerated = fire(again, clinic.crm, report_version=2)
    assert [item.idempotency_key for item in regenerated] == [f"{CALL_SID}:trigger:needs-attention:v2"]
    other_call = fire(await report_of(clinic, COMPLAINT_CALL, call_sid="CA" + "8" * 32), clinic.crm, report_version=1)
    assert other_call[0].idempotency_key != first[0].idempotency_key
    # The outbox stores a fired trigger as JSON and reads back the same thing.
    assert FiredTrigger.model_validate(orjson.loads(orjson.dumps(first[0].model_dump(mode="json")))) == first[0]
    with pytest.raises(ValueError, match="report versions start at 1"):
        fire(again, clinic.crm, report_version=0)


# -- the webhook's payload ------------------------------------------------------------------------


async def test_the_webhook_payload_has_the_summary_but_no_transcript() -> None:
    business = with_triggers(
        {"name": "unhappy", "when": ["tag:complaint"], "actions": ["webhook"], "webhook_url": HOOK},
    )
    report = await report_of(business, COMPLAINT_CALL, known=True)
    [fired] = fire(report, business.crm, report_version=2)
    payload = webhook_payload(report, fired)
    assert orjson.loads(orjson.dumps(payload)) == payload  # plain JSON values only
    assert payload["event"] == WEBHOOK_EVENT
    assert payload["idempotency_key"] == f"{CALL_SID}:trigger:unhappy:v2:webhook"
    assert payload["trigger"] == {
        "rule": "unhappy",
        "reasons": [{"condition": "tag:complaint", "shown": "tag:complaint", "confidence": 0.9}],
        "held_for_review": False,
    }
    call = payload["call"]
    assert (call["call_sid"], call["report_version"], call["caller_number"], call["business_number"]) == (
        CALL_SID,
        2,
        CALLER,
        CLINIC,
    )
    assert call["started_at"] == "2026-11-30T15:00:00+00:00" and call["duration_seconds"] == 180.0
    assert payload["outcome"] == {"value": "enquiry_only", "confidence": report.outcome.confidence}
    assert payload["summary"] == report.summary.value
    assert payload["sentiment"]["label"] == "negative"
    assert payload["lead_score"]["points"] == 0
    assert {reason["rule"] for reason in payload["lead_score"]["reasons"]} == {"sentiment:negative", "tag:complaint"}
    assert {"complaint", "follow_up_required", "returning_customer"} <= {tag["value"] for tag in payload["tags"]}
    assert payload["lifecycle"] == "lost"
    text = orjson.dumps(payload).decode()
    for absent in ("transcript", "key_phrases", "I'm sorry to hear that", "someone will call you back"):
        assert absent not in text
    other = fire(await report_of(business, COMPLAINT_CALL, call_sid="CA" + "8" * 32), business.crm, report_version=1)
    with pytest.raises(ValueError, match="is not for call"):
        webhook_payload(report, other[0])


# -- mistakes in the rules ------------------------------------------------------------------------


def trigger(**changes: Any) -> dict[str, Any]:
    return {"name": "call-back", "when": ["tag:complaint"], "actions": ["follow_up"], **changes}


@pytest.mark.parametrize(
    ("triggers", "message"),
    [
        (
            [trigger(actions=["webhook"])],
            "crm.triggers[0]: trigger 'call-back': the webhook action needs 'webhook_url'",
        ),
        ([trigger(webhook_url=HOOK)], "'webhook_url' is only used by the webhook action, which is not listed"),
        (
            [trigger(actions=["webhook"], webhook_url="ftp://crm.example.com/in")],
            "crm.triggers[0].webhook_url: 'ftp://crm.example.com/in' is not an http:// or https:// URL with a host",
        ),
        ([trigger(actions=["webhook"], webhook_url="https:///no-host")], "is not an http:// or https:// URL"),
        ([trigger(actions=["webhook"], webhook_url="http://crm.example.com:99999/")], "is not a URL"),
        ([trigger(actions=["sms"])], "crm.triggers[0]: trigger 'call-back': the sms action needs 'notify_number'"),
        ([trigger(notify_number=STAFF)], "'notify_number' is only used by the sms action"),
        (
            [trigger(actions=["sms"], notify_number="(212) 555-0123")],
            "crm.triggers[0].notify_number: '(212) 555-0123' is not an E.164 number",
        ),
        ([trigger(actions=["sms"], notify_number="+15550000000")], "'+15550000000' is not a valid phone number"),
        ([trigger(), trigger(when=["tag:urgent"])], "crm.triggers: duplicate trigger name(s): call-back"),
        ([trigger(name="Call Back")], "crm.triggers[0].name"),
        ([trigger(when=["tag:vip"])], "crm.triggers[0].when: 'tag:vip': unknown tag 'vip'"),
        ([trigger(when=["complaint"])], "is not a condition like 'outcome:booked'"),
        ([trigger(when=["score>=150"])], "'score>=150': a lead score is at most 100"),
        ([trigger(when=["score>60"])], "'score>60' is not a score condition like 'score>=60' or 'high_score'"),
        ([trigger(when=["tag:urgent", "tag:urgent"])], "condition(s) listed twice: tag:urgent"),
        ([trigger(when=[])], "crm.triggers[0].when"),
        ([trigger(actions=[])], "crm.triggers[0].actions"),
        ([trigger(actions=["email"])], "crm.triggers[0].actions[0]"),
        ([trigger(actions=["follow_up", "follow_up"])], "action(s) listed twice: follow_up"),
        ([trigger(review="sometimes")], "crm.triggers[0].review"),
        ([trigger(then="call")], "crm.triggers[0].then: Extra inputs are not permitted"),
    ],
)
def test_rule_mistakes_are_named_with_their_location(triggers: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_business(minimal({"triggers": triggers}))
    assert message in caught.value.detail


def test_score_conditions_are_for_triggers_only() -> None:
    for when in ("high_score", "score>=10"):
        with pytest.raises(ConfigurationError, match="is not a condition like 'outcome:booked'"):
            parse_business(minimal({"score_rules": [{"when": when, "points": 5}]}))
